import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import random_dit, tiny_text
from videodit.config import ConfigError, load_config, save_config
from videodit.data.cache import build_cache
from videodit.data.video import probe
from videodit.dit import VideoDiT
from videodit.patchify import pack
from videodit.train.checkpoint import checkpoint_dirs, export_ema, find_checkpoint
from videodit.train.lora import load_lora
from videodit.train.loop import Stopped, train
from videodit.train.tasks import DiTTask, VAETask
from videodit.train.models import build_denoiser, check_cache_text
from videodit.vae import CausalVideoVAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "text.encoder=minilm",
        "vae.ft=4", "vae.fs=4", "vae.latent_channels=4", "vae.base_channels=8", "vae.channel_mults=[1,1,1]",
        "vae.num_res_blocks=1", "vae.mid_attention=false", "vae.perceptual_weight=0.1",
        "data.sizes=[[5,16,16],[1,16,32],[9,16,16]]", "data.max_tokens=64", "data.num_workers=0",
        "data.shapes_count=32", "data.image_ratio=0.3", "flow.cond_prob=0.5", "flow.text_dropout=0.2",
        "train.log_every=1", "train.warmup_steps=1", "train.ema_decay=0.9", "train.lr=0.001"]


def log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny text encoder folder and a tiny VAE trained for 2 steps by a VAE run (GAN on from step 1)."""
    d = tmp_path_factory.mktemp("assets")
    model, tok = tiny_text()
    model.save_pretrained(d / "text")
    tok.save_pretrained(d / "text")
    base = TINY + [f"text.path={d / 'text'}"]
    cfg = load_config(None, base + ["train.task=vae", f"train.output_dir={d / 'vae_run'}", "train.max_steps=2",
                                    "vae.gan_weight=0.1", "vae.gan_start=1", "train.sample_every=2", "data.fps=6"])
    train(cfg)
    return dict(dir=d, base=base + [f"train.vae={d / 'vae_run' / 'vae'}"], vae_run=str(d / "vae_run"))


def test_vae_run_writes_reconstructions_and_exports_a_normalized_vae(assets):
    run = assets["vae_run"]
    records = log(run)
    assert [r["step"] for r in records] == [1, 2]
    assert "gan" not in records[0] and "gan" in records[1] and "disc_loss" in records[1]  # GAN after warm-up
    previews = [f for f in os.listdir(os.path.join(run, "samples")) if f.endswith(".mp4")]
    assert previews and probe(os.path.join(run, "samples", previews[0]))["fps"] == 6  # at data.fps, as read
    vae = CausalVideoVAE.from_pretrained(os.path.join(run, "vae"))
    assert vae.config.latents_mean is not None and len(vae.config.latents_std) == 4
    assert os.path.isfile(os.path.join(run, "config.yaml")) and os.listdir(os.path.join(run, "tensorboard"))
    exported = CausalVideoVAE.from_pretrained(export_ema(checkpoint_dirs(run)[-1], str(assets["dir"] / "vae_export")))
    assert exported.config.latents_std == vae.config.latents_std  # the statistics, as the run's own export
    assert exported.used_channels == vae.used_channels
    assert json.load(open(os.path.join(run, "vae", "config.json"))).get("_name_or_path") is None  # no folder of ours


def test_dit_without_a_vae_says_how_to_train_one(tmp_path):
    cfg = load_config(None, TINY + [f"train.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="configs/shapes/vae.yaml"):
        train(cfg)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """One process, grad_accum 2, 4 steps, a checkpoint every step (3 kept)."""
    run = str(tmp_path_factory.mktemp("reference"))
    cfg = load_config(None, assets["base"] + [f"train.output_dir={run}", "train.max_steps=4", "train.grad_accum=2",
                                              "train.checkpoint_every=1", "train.keep_checkpoints=3"])
    train(cfg)
    return run


def test_a_run_never_mixes_its_checkpoints_with_another_history(assets, reference, tmp_path):
    """A fresh run in a folder with an earlier run's checkpoints is refused (rotation deleted the new run's own,
    and --resume latest then went back to the old run); resuming from an older checkpoint moves the newer ones of
    the branch left aside, so that --resume latest follows the new branch."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    cfg = lambda steps, *more: load_config(None, assets["base"] + [  # noqa: E731
        f"train.output_dir={run}", f"train.max_steps={steps}", "train.grad_accum=2", "train.checkpoint_every=1",
        "train.keep_checkpoints=3", *more])
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run \\(the newest: step_00000004\\): pass "
                                          "--resume latest"):
        train(cfg(4, "train.lr=1e-3"))
    train(cfg(3, "train.lr=1e-3"), resume=str(run / "checkpoints" / "step_00000002"))
    names = lambda folder: sorted(os.listdir(folder))  # noqa: E731
    assert names(run / "checkpoints") == ["abandoned", "step_00000002", "step_00000003"]
    assert names(run / "checkpoints" / "abandoned") == ["step_00000003", "step_00000004"]
    assert load_config(os.path.join(find_checkpoint("latest", str(run)), "config.yaml")).train.lr == 1e-3
    assert [r["step"] for r in log(run)] == [1, 2, 3]


def test_a_diverged_run_stops_before_a_checkpoint_of_it_and_logs_strict_json(assets, tmp_path, monkeypatch):
    """A NaN loss from step 3 on: the run ends with Diverged naming the step and the newest good checkpoint (step 2),
    writes no checkpoint or export of the poisoned weights, and its log holds null, not NaN."""
    from videodit.train.loop import Diverged
    from videodit.train.tasks import DiTTask

    loss = DiTTask.loss

    def poisoned(self, model, batch, generator, step):
        value, logs = loss(self, model, batch, generator, step)
        return (value * float("nan") if step >= 2 else value), logs

    monkeypatch.setattr(DiTTask, "loss", poisoned)
    cfg = load_config(None, assets["base"] + [f"train.output_dir={tmp_path}", "train.max_steps=6",
                                              "train.checkpoint_every=2"])
    with pytest.raises(Diverged, match=r"step 3: the loss is nan and the grad_norm is nan .* The newest is "
                                       r".*step_00000002: go on from it"):
        train(cfg)
    assert [os.path.basename(d) for d in checkpoint_dirs(str(tmp_path))] == ["step_00000002"]
    assert not os.path.exists(tmp_path / "pipeline")
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    records = [json.loads(x, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl")) for x in lines]
    assert records[-1]["step"] == 3 and records[-1]["loss"] is None


def test_a_failed_checkpoint_write_is_one_line_and_leaves_nothing_half_written(assets, reference, tmp_path,
                                                                               monkeypatch):
    """A full disk surfaces as torch's or safetensors' own errors: the write fails with an OSError naming the
    checkpoint and the space left, the unfinished folder removed; a resume after it skips a torn last log line."""
    from accelerate import Accelerator

    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1')  # a kill or a full disk cut the last line short
    cfg = load_config(None, assets["base"] + [f"train.output_dir={tmp_path}", "train.max_steps=6",
                                              "train.grad_accum=2", "train.checkpoint_every=1"])

    def full(self, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1150464 vs 1150356")

    monkeypatch.setattr(Accelerator, "save_state", full)
    with pytest.raises(OSError, match=r"could not write checkpoint 5 to .*checkpoints \(\[enforce fail.*; \d+ MB free "
                                      r"there\); with room to write, go on with --resume latest"):
        train(cfg, resume="latest")
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp")]
    assert [r["step"] for r in log(tmp_path)] == [1, 2, 3, 4, 5]  # the torn line dropped, step 5 logged again


def test_a_run_folder_takes_one_run_at_a_time_and_a_resume_names_what_changes_its_data(assets, reference,
                                                                                       tmp_path, caplog):
    """A second run writing a folder that a live run holds is refused (the lock goes with its process); a resume
    with keys that change what the run draws is warned about, naming them; the weights are readable by others."""
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    cfg = load_config(None, assets["base"] + [f"train.output_dir={tmp_path}", "train.max_steps=5",
                                              "train.grad_accum=2", "train.checkpoint_every=1", "data.max_tokens=512",
                                              "train.seed=7"])
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"  # another process's run
                               f"f = open({str(tmp_path / '.lock')!r}, 'a+'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
                               "f.truncate(0); f.write('pid 12345 on elsewhere'); f.flush()\n"
                               "print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=r"is being written by a run still going \(pid 12345 on elsewhere\)"):
            train(cfg, resume="latest")
    finally:
        holder.kill()
        holder.wait()
    mask = os.umask(0o022)
    try:
        train(cfg, resume="latest")
    finally:
        os.umask(mask)
    assert re.search(r"data.max_tokens \d+ -> 512; train.seed 0 -> 7: the data, captions or noise the run draws change",
                     caplog.text)
    weights = tmp_path / "checkpoints" / "step_00000005" / "model.safetensors"
    assert os.stat(weights).st_mode & 0o044 == 0o044  # safetensors writes 0600


def test_run_folder_and_checkpoint_rotation(reference):
    assert [os.path.basename(d) for d in checkpoint_dirs(reference)] == ["step_00000002", "step_00000003",
                                                                        "step_00000004"]
    assert find_checkpoint("latest", reference) == checkpoint_dirs(reference)[-1]
    records = log(reference)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "lr", "tokens_per_s", "steps_per_s", "skipped", "data_wait"):
        assert key in records[0]
    with open(os.path.join(reference, "checkpoints", "step_00000004", "state.json")) as f:
        assert json.load(f)["data"]["batches"] == 8  # 4 steps x 2 micro-batches x 1 process
    assert not [n for n in os.listdir(os.path.join(reference, "checkpoints")) if n.startswith(".tmp")]


def test_the_ema_follows_the_weights_a_step_behind(reference):
    """The checkpoint's EMA moved from the initial weights (the zero-initialized output layer) towards the trained
    ones, and lags them: neither the initial nor the current weights."""
    ckpt = os.path.join(reference, "checkpoints", "step_00000004")
    weights = load_file(os.path.join(ckpt, "model.safetensors"))
    with open(os.path.join(ckpt, "model_config.json")) as f:
        names = [n for n, _ in VideoDiT.from_config(json.load(f)).named_parameters()]  # EMAModel's order
    shadow = dict(zip(names, torch.load(os.path.join(ckpt, "custom_checkpoint_0.pkl"))["shadow_params"]))
    out = "final.linear.weight"
    assert weights[out].abs().sum() > 0 and shadow[out].abs().sum() > 0  # both left zero
    assert not torch.equal(shadow[out], weights[out])


def test_resume_latest_is_bit_exact(assets, reference, tmp_path):
    """A run stopped after step 2 (its newest checkpoint is step 2, its log ran ahead to step 4) and resumed with
    --resume latest repeats the uninterrupted run: the same losses, weights and EMA."""
    shutil.copytree(os.path.join(reference, "checkpoints", "step_00000002"),
                    tmp_path / "checkpoints" / "step_00000002")
    shutil.copy(os.path.join(reference, "log.jsonl"), tmp_path / "log.jsonl")
    cfg = load_config(None, assets["base"] + [f"train.output_dir={tmp_path}", "train.max_steps=4",
                                              "train.grad_accum=2", "train.checkpoint_every=1"])
    train(cfg, resume="latest")
    assert [r["loss"] for r in log(tmp_path)] == [r["loss"] for r in log(reference)]  # steps 1-4, no duplicates
    a, b = (os.path.join(run, "checkpoints", "step_00000004") for run in (reference, tmp_path))
    for k, v in load_file(os.path.join(a, "model.safetensors")).items():
        assert torch.equal(v, load_file(os.path.join(b, "model.safetensors"))[k]), k
    ema_a, ema_b = (torch.load(os.path.join(d, "custom_checkpoint_0.pkl"))["shadow_params"] for d in (a, b))
    assert all(torch.equal(x, y) for x, y in zip(ema_a, ema_b))


def test_a_run_extended_on_resume_follows_the_longer_schedule(assets, reference, tmp_path):
    """Stopped at max_steps 2, then resumed with max_steps 4: the same steps as a run of 4 from the start (the rate
    of step 3 is the 4-step schedule's, not the 2-step schedule's last); the log gives each step's own rate."""
    base = assets["base"] + [f"train.output_dir={tmp_path}", "train.grad_accum=2", "train.checkpoint_every=1"]
    train(load_config(None, base + ["train.max_steps=2"]))
    train(load_config(None, base + ["train.max_steps=4"]), resume="latest")
    assert [r["loss"] for r in log(tmp_path)] == [r["loss"] for r in log(reference)]
    assert [r["lr"] for r in log(tmp_path)] == [r["lr"] for r in log(reference)]
    assert log(reference)[0]["lr"] == 0 and log(reference)[1]["lr"] == 1e-3  # warmup_steps 1: step 1 runs at 0
    a, b = (os.path.join(run, "checkpoints", "step_00000004", "model.safetensors") for run in (reference, tmp_path))
    for k, v in load_file(a).items():
        assert torch.equal(v, load_file(b)[k]), k


def test_trackers_tensorboard_wandb_or_none(assets, tmp_path, monkeypatch):
    """train.report_to: [] writes log.jsonl alone; wandb (a stand-in module here) gets the run's config, named after
    its folder, and every logged line, and a resumed run goes on in the same W&B run; without wandb installed it is
    a ConfigError saying how to install it."""
    from videodit.train import loop

    base = assets["base"] + ["train.max_steps=2", "train.checkpoint_every=2", "train.eval_every=0"]
    train(load_config(None, base + [f"train.output_dir={tmp_path / 'none'}", "train.report_to=[]"]))
    assert (tmp_path / "none" / "log.jsonl").exists() and not (tmp_path / "none" / "tensorboard").exists()

    runs = []

    class Run:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], False
            runs.append(self)

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=Run))
    monkeypatch.setattr(loop, "is_wandb_available", lambda: True)
    out = tmp_path / "wb"
    cfg = load_config(None, base + [f"train.output_dir={out}", "train.report_to=[wandb]", "train.wandb_project=p"])
    train(cfg)
    train(load_config(None, base + [f"train.output_dir={out}", "train.report_to=[wandb]", "train.wandb_project=p",
                                    "train.max_steps=3"]), "latest")
    assert len(runs) == 2 and all(r.finished for r in runs) and not (out / "tensorboard").exists()
    first, again = (r.kwargs for r in runs)
    assert (first["project"], first["name"], first["dir"]) == ("p", "wb", str(out))
    assert first["config"]["train"]["wandb_project"] == "p" and first["resume"] == again["resume"] == "allow"
    assert first["id"] == again["id"] == (out / "wandb_id").read_text()
    assert [s for s, _ in runs[0].logged] == [1, 2] and [s for s, _ in runs[1].logged] == [3]
    assert runs[0].logged[0][1]["loss"] == log(out)[0]["loss"]

    monkeypatch.setattr(loop, "is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match="wandb, which is not installed: pip install wandb"):
        train(cfg)
    with pytest.raises(ConfigError, match="report_to"):
        load_config(None, base + ["train.report_to=[mlflow]"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_its_step_and_resume_repeats_the_run(assets, reference, tmp_path, monkeypatch,
                                                                       signum):
    """SIGTERM (a preemption) or SIGINT (Ctrl-C) during step 2 ends the run after step 2 with that step's checkpoint
    and no export, the signal handlers as they were; --resume latest then ends where the uninterrupted run ends."""
    calls, before = [], signal.getsignal(signum)

    def after_step(self):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(DiTTask, "after_step", after_step)
    cfg = load_config(None, assets["base"] + [f"train.output_dir={tmp_path}", "train.max_steps=4",
                                              "train.grad_accum=2", "train.checkpoint_every=3"])
    with pytest.raises(Stopped, match=f"stopped by {signum.name} at step 2; .*--resume latest") as err:
        train(cfg)
    assert (err.value.signum, err.value.step) == (signum, 2)
    assert [os.path.basename(d) for d in checkpoint_dirs(str(tmp_path))] == ["step_00000002"]
    assert not (tmp_path / "pipeline").exists() and signal.getsignal(signum) == before
    monkeypatch.undo()
    train(cfg, "latest")
    assert [r["loss"] for r in log(tmp_path)] == [r["loss"] for r in log(reference)]
    a, b = (os.path.join(run, "checkpoints", "step_00000004", "model.safetensors") for run in (reference, tmp_path))
    for k, v in load_file(a).items():
        assert torch.equal(v, load_file(b)[k]), k


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return out


def test_a_stop_signal_to_one_process_stops_all_at_one_step(assets, tmp_path):
    """torchrun, two processes with a data worker each; SIGTERM to the second and its worker (as a job-wide signal
    reaches them): both stop after the same step, whose checkpoint they write together (both processes' RNG
    states), the log ends at it, and the message is printed once."""
    run = tmp_path / "run"
    config = str(tmp_path / "config.yaml")
    save_config(load_config(None, assets["base"] + [f"train.output_dir={run}", "train.max_steps=1000",
                                                    "train.checkpoint_every=1000", "train.eval_every=0",
                                                    "data.num_workers=1"]), config)
    cmd, env = _torchrun_cmd(config)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "log.jsonl").exists() or len(log(run)) < 2:  # training: two steps logged
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        (second,) = [pid for pid in _children(proc.pid) if b"RANK=1\0" in open(f"/proc/{pid}/environ", "rb").read()]
        workers = _children(second)
        assert workers  # its data worker
        for pid in [second, *workers]:
            os.kill(pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    (ckpt,) = checkpoint_dirs(str(run))
    with open(os.path.join(ckpt, "state.json")) as f:
        step = json.load(f)["step"]
    assert 2 <= step < 1000 and log(run)[-1]["step"] == step
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(ckpt))
    assert stderr.count(f"stopped by SIGTERM at step {step};") == 1, stderr[-3000:]


def _torchrun_cmd(config: str, *args) -> tuple[list, dict]:
    """The command and environment that run train.py on two CPU processes (gloo)."""
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           os.path.join(ROOT, "train.py"), "--config", config, *args]
    return cmd, dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def torchrun(config: str, *args):
    """train.py on two CPU processes (gloo)."""
    cmd, env = _torchrun_cmd(config, *args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_match_one_and_resume_on_a_new_world_size(assets, reference, tmp_path):
    """The reference ran 2 steps on 1 process x grad_accum 2; two processes (gloo) x grad_accum 1 resume from its
    step-2 checkpoint: same global batches, so the same losses and weights (up to the order of float sums)."""
    config = str(tmp_path / "config.yaml")
    save_config(load_config(None, assets["base"] + [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=4",
                                                    "train.grad_accum=1", "train.checkpoint_every=2"]), config)
    torchrun(config, "--resume", os.path.join(reference, "checkpoints", "step_00000002"))
    run = str(tmp_path / "run")
    got, want = log(run), log(reference)[2:]
    assert [r["step"] for r in got] == [3, 4]
    torch.testing.assert_close([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-4, atol=1e-6)
    a = load_file(os.path.join(reference, "checkpoints", "step_00000004", "model.safetensors"))
    b = load_file(os.path.join(run, "checkpoints", "step_00000004", "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    with open(os.path.join(run, "checkpoints", "step_00000004", "state.json")) as f:
        state = json.load(f)
    assert state["world_size"] == 2 and state["data"]["batches"] == 8


def test_fsdp_on_two_processes_matches_one_and_resumes_on_one(assets, reference, tmp_path):
    """parallel.fsdp on two processes (gloo) x grad_accum 1 takes the reference's steps (1 process x grad_accum 2):
    the same losses, and its sharded checkpoint exports the same EMA weights. Resumed from its step-2 shards on one
    process x grad_accum 2, it ends where the reference ends. Every rank samples, by the EMA weights, between steps
    (which then go on with the trained weights); the main one writes."""
    base = assets["base"] + ["train.max_steps=4", "train.checkpoint_every=2", "parallel.fsdp=true",
                             "train.sample_every=3", "train.sample_prompts=['a red circle']", "sample.steps=2"]
    config = str(tmp_path / "config.yaml")
    save_config(load_config(None, base + [f"train.output_dir={tmp_path / 'run'}", "train.grad_accum=1"]), config)
    torchrun(config)
    run = tmp_path / "run"
    torch.testing.assert_close([r["loss"] for r in log(run)], [r["loss"] for r in log(reference)], rtol=1e-4,
                               atol=1e-6)
    assert os.listdir(run / "samples") == ["step_00000003_0.mp4"]
    ckpt = run / "checkpoints" / "step_00000004"
    assert (ckpt / "sharded").is_dir() and not (ckpt / "model.safetensors").exists()
    want = export_ema(os.path.join(reference, "checkpoints", "step_00000004"), str(tmp_path / "want"))
    got = export_ema(str(ckpt), str(tmp_path / "got"))
    want, got = (VideoDiT.from_pretrained(d).state_dict() for d in (want, got))
    final = VideoDiT.from_pretrained(run / "pipeline" / "transformer").state_dict()  # the run's own export
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6, msg=k)
        assert torch.equal(final[k], got[k]), k

    shutil.copytree(run, tmp_path / "again", ignore=shutil.ignore_patterns("step_00000004", "pipeline"))
    train(load_config(None, base + [f"train.output_dir={tmp_path / 'again'}", "train.grad_accum=2"]), "latest")
    torch.testing.assert_close([r["loss"] for r in log(tmp_path / "again")], [r["loss"] for r in log(reference)],
                               rtol=1e-4, atol=1e-6)
    again = VideoDiT.from_pretrained(tmp_path / "again" / "pipeline" / "transformer").state_dict()
    for k, v in want.items():
        torch.testing.assert_close(again[k], v, rtol=1e-4, atol=1e-6, msg=k)
    with pytest.raises(ConfigError, match="written with an EMA.*ema_decay > 0"):  # its shards hold one
        train(load_config(None, base + [f"train.output_dir={tmp_path / 'again'}", "train.ema_decay=0"]), "latest")


@pytest.mark.parametrize("source", ["fresh", "model folder", "pipeline", "distillation"])
def test_sharded_processes_build_the_main_process_architecture_without_weights(tmp_path, source):
    """A sharded run's other processes build on the meta device (no memory) what the main one builds with weights."""
    teacher, overrides = None, []
    if source in ("model folder", "pipeline"):
        folder = tmp_path / ("pipe" if source == "pipeline" else "model")
        random_dit(depth=3).save_pretrained(folder / "transformer" if source == "pipeline" else folder)
        overrides = [f"train.init_from={folder}"]
    elif source == "distillation":
        teacher, overrides = random_dit(), [f"distill.teacher={tmp_path}"]
    cfg = load_config(None, TINY + overrides)
    main, other = (build_denoiser(cfg, 4, 16, teacher, meta) for meta in (False, True))
    assert {k: v.shape for k, v in other.state_dict().items()} == {k: v.shape for k, v in main.state_dict().items()}
    arch = [{k: v for k, v in m.config.items() if not k.startswith("_")} for m in (main, other)]
    assert arch[0] == arch[1]
    assert all(t.is_meta for t in [*other.parameters(), *other.buffers()])
    assert not any(t.is_meta for t in [*main.parameters(), *main.buffers()])


def test_init_from_names_the_architecture_keys_it_overrides(tmp_path, caplog):
    """train.init_from's weights decide the architecture: the config's model.* and vae.* keys that differ are named
    in a warning, the matching ones are not, and a VAE run takes its factors from the weights."""
    from videodit.vae import CausalVideoVAE

    random_dit(depth=3).save_pretrained(tmp_path / "dit")
    with caplog.at_level("WARNING"):
        model = build_denoiser(load_config(None, TINY + [f"train.init_from={tmp_path / 'dit'}"]), 4, 16)
    assert model.config.depth == 3 and "model.depth = 2 (the model's: 3)" in caplog.text
    assert "hidden_size" not in caplog.text and "num_heads" not in caplog.text and "patch_size" not in caplog.text
    caplog.clear()
    CausalVideoVAE(block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, temporal_factor=2,
                   spatial_factor=2, mid_attention=False).save_pretrained(tmp_path / "vae")
    cfg = load_config(None, TINY + [f"train.init_from={tmp_path / 'vae'}", "train.task=vae",
                                    f"train.output_dir={tmp_path / 'run'}"])
    with caplog.at_level("WARNING"):
        task = VAETask(cfg, types.SimpleNamespace(device=torch.device("cpu")))
    assert "vae.fs = 4 (the model's: 2)" in caplog.text and "vae.ft = 4 (the model's: 2)" in caplog.text
    assert "latent_channels" not in caplog.text
    assert task.geom.latent_shape(5, 16, 16) == (3, 8, 8)
    caplog.clear()  # a denoiser run's VAE decides its compression too: the keys a config changed are named
    from videodit.train.models import load_trained_vae

    with caplog.at_level("WARNING"):
        load_trained_vae(load_config(None, TINY + [f"train.vae={tmp_path / 'vae'}", "vae.ft=1", "vae.fs=2"]))
    assert "train.vae = " in caplog.text and "ignored: vae.ft = 1 (the model's: 2)" in caplog.text
    assert "vae.fs" not in caplog.text and "latent_channels" not in caplog.text  # fs as the VAE's, 4 channels


@pytest.mark.parametrize("overrides, words", [
    (["train.task=vae"], ["train.task: vae", "parallel.fsdp false"]),
    (["train.lora_rank=4"], ["train.lora_rank", "DDP"]),
    (["train.mixed_precision=fp16"], ["fp16", "bf16"]),
    (["parallel.fsdp_param_dtype=bf16"], ["fsdp_param_dtype", "train.mixed_precision: bf16"]),
])
def test_fsdp_refuses_what_it_does_not_shard(assets, tmp_path, overrides, words):
    cfg = load_config(None, assets["base"] + [f"train.output_dir={tmp_path}", "parallel.fsdp=true", *overrides])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert all(w in str(err.value) for w in words), err.value


def test_sharding_settings_need_fsdp_and_a_group_size_that_divides_the_processes(assets, tmp_path):
    cfg = load_config(None, assets["base"] + [f"train.output_dir={tmp_path}", "parallel.fsdp_shard_size=2"])
    with pytest.raises(ConfigError, match="fsdp_shard_size = 2.*needs parallel.fsdp: true"):
        train(cfg)
    cfg = load_config(None, assets["base"] + [f"train.output_dir={tmp_path}", "parallel.fsdp_shard_size=2",
                                              "parallel.fsdp=true"])
    with pytest.raises(ConfigError, match="fsdp_shard_size = 2 does not divide the 1 processes.*divisor of 1"):
        train(cfg)


def test_a_checkpoint_resumes_only_as_it_was_sharded(assets, reference, tmp_path):
    ckpt = os.path.join(reference, "checkpoints", "step_00000002")
    cfg = load_config(None, assets["base"] + [f"train.output_dir={tmp_path}", "parallel.fsdp=true"])
    with pytest.raises(ConfigError, match="parallel.fsdp = False.*--set parallel.fsdp=false"):
        train(cfg, ckpt)
    shutil.copytree(ckpt, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "sharded").mkdir()
    cfg = load_config(None, assets["base"] + [f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="parallel.fsdp = True.*--set parallel.fsdp=true"):
        train(cfg, str(tmp_path / "ckpt"))


def test_a_checkpoint_resumes_only_as_the_task_and_lora_rank_it_trained(assets, reference, tmp_path):
    ckpt = os.path.join(reference, "checkpoints", "step_00000002")
    for override, words in (("train.lora_rank=4", "train.lora_rank = 0, this run has 4.*--set train.lora_rank=0"),
                            ("train.task=vae", "train.task = dit, this run has vae.*--set train.task=dit"),
                            ("model.depth=3", "the checkpoint's model is not this config's \\(depth 2 -> 3\\)")):
        cfg = load_config(None, assets["base"] + [f"train.output_dir={tmp_path}", override])
        with pytest.raises(ConfigError, match=words):
            train(cfg, ckpt)


def test_a_resume_on_another_global_batch_is_warned_about(assets, reference, tmp_path, caplog):
    ckpt = os.path.join(reference, "checkpoints", "step_00000002")
    with caplog.at_level("WARNING"):
        train(load_config(None, assets["base"] + [f"train.output_dir={tmp_path}", "train.max_steps=3"]), ckpt)
    assert "steps took 2 micro-batches" in caplog.text and "this one's 1" in caplog.text


def test_data_workers_stop_when_a_run_fails(assets, tmp_path, monkeypatch):
    """A run that raises leaves no data worker behind, even while its traceback (which holds the loader) is kept:
    the workers ignore SIGTERM, so one left over would hang the interpreter's exit."""
    import multiprocessing

    def fail(self, model, batch, generator, step):
        raise ValueError("a failing step")

    monkeypatch.setattr(DiTTask, "loss", fail)
    cfg = load_config(None, assets["base"] + [f"train.output_dir={tmp_path}", "data.num_workers=1"])
    with pytest.raises(ValueError, match="a failing step") as kept:
        train(cfg)
    assert kept.traceback and not multiprocessing.active_children()


def test_held_out_loss_takes_the_ema_weights_and_leaves_training_alone(assets, tmp_path):
    """Evaluating every 2 or every 4 steps: the same training losses and weights (evaluation draws nothing training
    draws and changes no weight) and the same held-out loss at step 4, which is the exported (EMA) denoiser's
    velocity error on the data's last items at each timestep, with the noise fixed. A resume evaluates as the
    uninterrupted run; one that would hold out other items is refused."""
    from videodit.pipeline import VideoDiTPipeline

    base = assets["base"] + ["train.max_steps=4", "train.eval_clips=5", "train.eval_timesteps=[0.2,0.6,1.0]",
                             "train.checkpoint_every=2"]
    for every in (2, 4):
        train(load_config(None, base + [f"train.output_dir={tmp_path / str(every)}", f"train.eval_every={every}"]))
    two, four = log(tmp_path / "2"), log(tmp_path / "4")
    assert [r["loss"] for r in two[1:]] == [r["loss"] for r in four[1:]]
    weights = [load_file(tmp_path / run / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
               for run in ("2", "4")]
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())
    assert [r["step"] for r in two if "eval_loss" in r] == [0, 2, 4]
    assert [r["step"] for r in four if "eval_loss" in r] == [0, 4] and "loss" not in four[0]  # 0: before training
    per_t = [four[-1][f"eval_loss_t{t}"] for t in ("0.2", "0.6", "1")]
    assert two[-1]["eval_loss"] == four[-1]["eval_loss"] == pytest.approx(sum(per_t) / 3)
    assert two[0]["eval_loss"] == four[0]["eval_loss"] != two[2]["eval_loss"]

    cfg = load_config(None, base + [f"train.output_dir={tmp_path / 'x'}"])
    task = DiTTask(cfg, types.SimpleNamespace(device=torch.device("cpu"), is_main_process=True,
                                              autocast=contextlib.nullcontext))
    model = VideoDiTPipeline.from_pretrained(tmp_path / "4" / "pipeline").transformer  # the EMA weights
    sums = task.eval_sums(model, task.held_out(5), 0, 1)
    assert [sums[f"eval_loss_t{t}"][1].item() for t in ("0.2", "0.6", "1")] == [5, 5, 5]
    torch.testing.assert_close([(s / c).item() for s, c in sums.values()], [four[-1]["eval_loss"], *per_t], rtol=1e-5,
                               atol=0)

    shutil.copytree(tmp_path / "2", tmp_path / "again", ignore=shutil.ignore_patterns("step_00000004", "pipeline"))
    again = base + [f"train.output_dir={tmp_path / 'again'}", "train.eval_every=2"]
    train(load_config(None, again), "latest")
    def exact(records):  # what does not depend on timing
        return [{k: v for k, v in r.items() if k in ("step", "loss", "grad_norm") or k.startswith("eval")}
                for r in records]
    assert exact(log(tmp_path / "again")) == exact(two)
    for extra, words in ((["train.eval_clips=4"], "held out 5 items.*eval_clips=5"),
                         (["train.eval_every=0"], "held out 5 items.*eval_clips=5"),
                         (["train.ema_decay=0"], "written with an EMA.*ema_decay > 0")):
        with pytest.raises(ConfigError, match=words):
            train(load_config(None, again + extra), "latest")


def test_vae_run_measures_held_out_reconstructions(assets, tmp_path):
    """A VAE run's eval_psnr / eval_l1: at step 0 and every eval_every steps, by the EMA weights (the last one is
    the exported VAE's PSNR on the data's last clips)."""
    from videodit.data.loader import Geometry, make_source

    cfg = load_config(None, assets["base"] + ["train.task=vae", f"train.output_dir={tmp_path}", "train.max_steps=2",
                                              "train.eval_every=1", "train.eval_clips=3"])
    train(cfg)
    records = log(tmp_path)
    assert [r["step"] for r in records if "eval_psnr" in r] == [0, 1, 2]
    vae = CausalVideoVAE.from_pretrained(tmp_path / "vae")
    source = make_source(cfg.data, Geometry(4, 4, (1, 2, 2)))
    psnr = []
    for i in range(29, 32):  # shapes_count 32: the last three
        x = source.load(i, False, None)["video"][None]
        with torch.no_grad():
            recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        psnr.append(10 * torch.log10(4 / (recon - x).pow(2).mean()).item())
    assert records[-1]["eval_psnr"] == pytest.approx(sum(psnr) / 3, abs=1e-4)
    assert records[0]["eval_psnr"] != records[-1]["eval_psnr"]


def test_vae_with_gan_on_two_processes_matches_one(assets, tmp_path):
    """The discriminator is replicated and its gradients averaged by hand: 2 processes x grad_accum 1 must give the
    losses and weights of 1 process x grad_accum 2 (step 3 sees the discriminator step 2 trained)."""
    base = assets["base"] + ["train.task=vae", "train.max_steps=3", "vae.gan_weight=0.1", "vae.gan_start=1"]
    train(load_config(None, base + [f"train.output_dir={tmp_path / 'one'}", "train.grad_accum=2"]))
    config = str(tmp_path / "config.yaml")
    save_config(load_config(None, base + [f"train.output_dir={tmp_path / 'two'}", "train.grad_accum=1"]), config)
    torchrun(config)
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    for key in ("loss", "disc_loss"):
        torch.testing.assert_close([r.get(key, 0.0) for r in two], [r.get(key, 0.0) for r in one], rtol=1e-4,
                                   atol=1e-6)
    for name in ("model.safetensors", "custom_checkpoint_1.pkl"):  # the VAE and the discriminator
        a, b = (os.path.join(tmp_path, run, "checkpoints", "step_00000003", name) for run in ("one", "two"))
        wa, wb = (load_file(p) if p.endswith("safetensors") else torch.load(p) for p in (a, b))
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_export_ema_as_a_diffusers_model_and_a_pipeline(reference, tmp_path):
    from videodit.pipeline import VideoDiTPipeline

    ckpt = os.path.join(reference, "checkpoints", "step_00000004")
    exported = VideoDiT.from_pretrained(export_ema(ckpt, str(tmp_path / "model")))
    final = VideoDiTPipeline.from_pretrained(os.path.join(reference, "pipeline"))  # what the run wrote at its end
    stale = tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json"  # a sharded save's
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"weight_map": {"w": "diffusion_pytorch_model-00001-of-00002.safetensors"}}))
    again = VideoDiTPipeline.from_pretrained(export_ema(ckpt, str(tmp_path / "pipe"), pipeline=True))
    for model in (final.transformer, again.transformer):
        for (k, a), b in zip(exported.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), k
    assert final.config.max_text_length == 64 and isinstance(final.vae, CausalVideoVAE)
    assert final.config.image_first is False and final.config.default_guidance_parallel == 1.0
    assert final.config.shared_noise == 0.0 and final.config.default_shift is None  # shift by resolution
    assert final.config.default_size == [5, 16, 16] and final.config.default_fps == 8.0  # data.sizes[0], data.fps
    cfg = yaml.safe_load(open(os.path.join(ckpt, "config.yaml")))  # a run that samples image-first says so
    cfg["sample"].update(image_first=True, guidance_parallel=0.0, size=[9, 16, 32])
    cfg["flow"].update(shared_noise=0.5, shift=3.0)  # a fixed training shift: the samples' too
    cfg["data"]["fps"] = 12.0
    shutil.copytree(ckpt, tmp_path / "ckpt")
    yaml.safe_dump(cfg, open(tmp_path / "ckpt" / "config.yaml", "w"))
    first = VideoDiTPipeline.from_pretrained(export_ema(str(tmp_path / "ckpt"), str(tmp_path / "p2"), pipeline=True))
    assert first.config.image_first is True and first.config.default_guidance_parallel == 0.0
    assert first.config.shared_noise == 0.5 and first.config.default_shift == 3.0
    assert first.config.default_size == [9, 16, 32] and first.config.default_fps == 12.0
    with pytest.raises(ValueError, match="must come from a package"):  # this run's encoder is a local folder
        export_ema(ckpt, str(tmp_path / "lean"), pipeline=True, lean=True)
    for part in ("transformer", "vae"):  # no folder of this machine in what is published
        assert json.load(open(tmp_path / "pipe" / part / "config.json")).get("_name_or_path") is None
    state = json.load(open(tmp_path / "ckpt" / "state.json"))
    del state["ema"]  # written before state.json said it: the config's ema_decay does
    json.dump(state, open(tmp_path / "ckpt" / "state.json", "w"))
    old = VideoDiT.from_pretrained(export_ema(str(tmp_path / "ckpt"), str(tmp_path / "old")))
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), exported.state_dict().values()))
    vae = tmp_path / "vae"  # the run's VAE, its statistics measured again in place since
    shutil.copytree(cfg["train"]["vae"], vae)
    vae_config = json.load(open(vae / "config.json"))
    vae_config["latents_std"][0] *= 1.5
    json.dump(vae_config, open(vae / "config.json", "w"))
    cfg["train"]["vae"] = str(vae)
    yaml.safe_dump(cfg, open(tmp_path / "ckpt" / "config.yaml", "w"))
    with pytest.raises(ValueError, match=f"train.vae = {vae} is not the VAE this checkpoint trained with any more "
                                         f"\\(it differs in latents_std\\)"):
        export_ema(str(tmp_path / "ckpt"), str(tmp_path / "p3"), pipeline=True)


@pytest.mark.parametrize("args,words", [
    (["{tmp}", "--out", "{tmp}/o"], "is not a training checkpoint"),
    (["{dit}", "--out", "{file}"], "is a file; give a folder"),
    (["{dit}", "--out", "{tmp}/o", "--lean"], "add --pipeline"),
    (["{dit}", "--out", "{tmp}/o", "--no-merge"], "trained the whole model"),
    (["{vae}", "--out", "{tmp}/o", "--pipeline"], "VAE run's checkpoint"),
])
def test_export_command_refuses_what_it_cannot_do_in_one_line(assets, reference, tmp_path, capsys, args, words):
    from videodit.train.checkpoint import main

    (tmp_path / "f").write_text("x")
    paths = dict(tmp=str(tmp_path), file=str(tmp_path / "f"), dit=checkpoint_dirs(reference)[-1],
                 vae=checkpoint_dirs(assets["vae_run"])[-1])
    with pytest.raises(SystemExit) as e:
        main([a.format(**paths) for a in args])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "error:" in err and words in err


def test_cache_gives_the_same_loss_as_live_encoding(assets, tmp_path, monkeypatch):
    """The same step and the same held-out loss (before and after it) from cached latents and text as live."""
    common = assets["base"] + ["data.shapes_count=8", "train.max_steps=1", "train.ema_decay=0",
                               "train.eval_every=1", "train.eval_clips=3"]
    build_cache(load_config(None, common), str(tmp_path / "cache"))
    records = []
    cached = ["data.source=cache", f"data.cache_dir={tmp_path / 'cache'}", "train.sample_every=1", "data.fps=6",
              "train.sample_prompts=['a red circle moving left']", "sample.steps=2"]  # samples from a cached run
    for name, extra in (("live", []), ("cached", cached)):
        train(load_config(None, common + extra + [f"train.output_dir={tmp_path / name}"]))
        records.append(log(tmp_path / name))
    live, cache = ([r.get(k) for r in run for k in ("loss", "eval_loss", "eval_loss_t0.5")] for run in records)
    assert live[0] is cache[0] is None and None not in live[1:]  # step 0: the held-out loss alone
    assert live[1:] == pytest.approx(cache[1:], rel=1e-4)
    assert os.listdir(tmp_path / "cached" / "samples") == ["step_00000001_0.mp4"]
    assert probe(str(tmp_path / "cached" / "samples" / "step_00000001_0.mp4"))["fps"] == 6  # data.fps
    other = CausalVideoVAE.from_pretrained(assets["dir"] / "vae_run" / "vae")  # retrained: other statistics
    other.register_to_config(latents_mean=[m + 0.1 for m in other.config.latents_mean])
    other.save_pretrained(tmp_path / "other_vae")
    with pytest.raises(ConfigError, match=r"holds latents of another VAE .* \(they differ in latents_mean\)"):
        train(load_config(None, common + cached + [f"train.output_dir={tmp_path / 'stale'}",
                                                   f"train.vae={tmp_path / 'other_vae'}"]))
    with pytest.raises(ConfigError, match=r"another text encoder setting \(text.max_length = \d+ there, 128 here\)"):
        train(load_config(None, common + cached + [f"train.output_dir={tmp_path / 'longer'}", "text.max_length=128"]))
    from videodit.data.loader import CacheSource

    text = load_config(None, common).text.path  # the same folder written another way is the same encoder
    check_cache_text(CacheSource(str(tmp_path / "cache")).index,
                     load_config(None, common + [f"text.path={os.path.relpath(text)}/."]))
    import videodit.data.cache as cache_module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cache_module, "save_file", fail)  # a failed rebuild: the old cache stays, no leftovers
    with pytest.raises(OSError, match="disk full"):
        build_cache(load_config(None, common), str(tmp_path / "cache"))
    assert sorted(os.listdir(tmp_path)) == ["cache", "cached", "live", "other_vae"] and os.listdir(tmp_path / "cache")


def test_the_cache_stores_each_captions_own_embedding(assets, tmp_path):
    """A cached item holds, under its short and its detailed caption, the text encoder's embedding of that very
    caption (real tokens), as a live run would encode it."""
    from videodit.data.loader import CacheSource
    from videodit.text import load_text_encoder

    cfg = load_config(None, assets["base"] + ["data.shapes_count=3"])
    build_cache(cfg, str(tmp_path / "cache"))
    text = load_text_encoder(cfg.text.encoder, cfg.text.path, cfg.text.max_length)
    source = CacheSource(str(tmp_path / "cache"))
    assert len(source) == 3
    for i, item in enumerate(source.items):
        assert item["detailed_caption"] and item["detailed_caption"] != item["caption"]
        cached = source.load(i, False, random.Random(0))["text"]
        for caption in (item["caption"], item["detailed_caption"]):
            emb, mask = text.encode([caption])
            live = emb[0][mask[0]].float()
            assert cached[caption].shape == live.shape and torch.allclose(cached[caption], live, atol=1e-5), caption


def test_data_sizes_that_do_not_fit_the_vae_are_a_config_error(assets, tmp_path):
    with pytest.raises(ConfigError, match=r"data.sizes entry \[6, 16, 16\].*frames must be 1 \+ 4\*k"):
        train(load_config(None, assets["base"] + [f"train.output_dir={tmp_path}", "data.sizes=[[6,16,16]]"]))


def test_runs_in_one_process_may_differ_in_mixed_precision(assets, tmp_path, monkeypatch, caplog):
    """accelerate keeps its settings process-wide; each train() call starts from its own config's: the two bf16 runs
    give one gradient norm at every step, the float32 run between them another (not the loss: the fresh model
    outputs zeros until the warm-up step, and AdamW's first step moves each weight by the learning rate whatever
    the precision, so the losses may agree to the last digit). On a CPU without bfloat16 arithmetic (here made to
    say so, as AVX2-only CPUs do) bf16 is emulated, several times slower: each bf16 run says so, the float32 run
    does not."""
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    warned = []
    for i, precision in enumerate(("bf16", "no", "bf16")):
        caplog.clear()
        train(load_config(None, assets["base"] + [f"train.output_dir={tmp_path / str(i)}", "train.max_steps=3",
                                                  "train.sample_every=0", f"train.mixed_precision={precision}"]))
        warned.append("has no bfloat16 arithmetic" in caplog.text)
    bf16, fp32, again = ([r["grad_norm"] for r in log(tmp_path / str(i))] for i in range(3))
    assert bf16 == again and all(a != b for a, b in zip(bf16, fp32)) and warned == [True, False, True]


@pytest.mark.parametrize("args, message", [
    (["--device", "gpu0"], "--device gpu0: not a device; use auto, cpu"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--num", "0"], "--num and --shard-size must be >= 1"),
])
def test_cache_command_refuses_bad_arguments_in_one_line(tmp_path, capsys, args, message):
    from videodit.data.cache import main as cache_main

    with pytest.raises(SystemExit):
        cache_main(["--config", os.path.join(ROOT, "configs", "shapes", "tiny.yaml"), "--out", str(tmp_path / "c"),
                    *args])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m videodit.data.cache: error:") and message in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("what", ["clips", "file"])
def test_cache_command_never_replaces_what_is_not_a_cache(tmp_path, capsys, what):
    """--out pointed at a folder of the user's clips (or at a file) is refused before anything is encoded, and
    nothing there is touched."""
    from videodit.data.cache import main as cache_main

    out = tmp_path / "mine"
    if what == "clips":
        out.mkdir()
        (out / "clip.mp4").write_bytes(b"not really")
        (out / "manifest.jsonl").write_text("{}")
    else:
        out.write_text("notes")
    before = sorted(os.listdir(out)) if what == "clips" else out.read_text()
    with pytest.raises(SystemExit) as e:
        cache_main(["--config", os.path.join(ROOT, "configs", "shapes", "tiny.yaml"), "--out", str(out)])
    assert "error: --out" in str(e.value) and ("clip.mp4" in str(e.value) or "is a file" in str(e.value))
    assert (sorted(os.listdir(out)) if what == "clips" else out.read_text()) == before
    assert not os.path.exists(str(out) + ".tmp")


def test_a_batch_sorted_by_shape_keeps_each_latent_with_its_prompt_and_conditioning(monkeypatch):
    """DiTTask.loss orders a batch by shape (runs of equal shapes batch together); each sample's prompt and
    conditioning frames must move with its latent."""
    import contextlib

    from videodit.data.loader import Geometry
    from videodit.train import tasks

    seen = {}
    monkeypatch.setattr(tasks, "flow_loss", lambda model, latents, text, mask, cond, **kw: seen.update(
        latents=latents, mask=mask, cond=cond) or torch.zeros(()))
    task = DiTTask.__new__(DiTTask)  # the parts of a task that loss() reads, without a VAE or a text encoder
    task.cfg, task.device, task.teacher, task.last_batch = load_config(None, []), torch.device("cpu"), None, None
    task.autocast, task.geom = contextlib.nullcontext, Geometry(4, 8, (1, 2, 2))
    task.model_config = dict(random_dit().config)
    latents = [torch.randn(4, t, 4, 4) for t in (3, 1, 2)]  # not in shape order
    text = [torch.randn(i + 1, 16) for i in range(3)]  # sample i's prompt: i + 1 tokens
    cond = [torch.zeros(z.shape[1], dtype=torch.bool) for z in latents]
    task.loss(None, dict(size=3, latent=latents, text=text, cond=cond), None, 0)
    assert [z.shape[1] for z in seen["latents"]] == [1, 2, 3]
    for z, m, c in zip(seen["latents"], seen["mask"], seen["cond"]):
        i = next(j for j, x in enumerate(latents) if x is z)
        assert m.sum() == i + 1 and c is cond[i]


def test_lora_adapts_every_blocks_projections_at_full_strength_from_zero():
    """add_lora wraps each block's attention, cross-attention and MLP projections; an adapter starts at zero (the
    output unchanged) and adds exactly x A^T B^T (alpha = rank: scale 1, whatever the rank)."""
    from peft.tuners.lora import LoraLayer

    from videodit.train.lora import add_lora

    model = add_lora(random_dit(), rank=4)
    adapted = {n.split("base_model.model.", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    want = {f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv",
                                                          "cross_attn.proj", "mlp.fc1", "mlp.fc2")}
    assert adapted == want
    layer = model.get_base_model().blocks[1].mlp.fc1
    x = torch.randn(3, layer.in_features)
    base = layer.base_layer(x)
    assert torch.equal(layer(x), base)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.normal_()
        torch.testing.assert_close(layer(x), base + x @ A.T @ B.T)


def test_lora_trains_only_adapters_and_merges_exactly(assets, tmp_path):
    base = random_dit()  # a random "pretrained" model, so outputs depend on the weights
    base.save_pretrained(tmp_path / "base")
    run = tmp_path / "lora"
    train(load_config(None, assets["base"] + [f"train.output_dir={run}", "train.max_steps=2", "train.lora_rank=2",
                                              f"train.init_from={tmp_path / 'base'}", "train.checkpoint_every=2"]))
    state = load_file(str(run / "checkpoints" / "step_00000002" / "model.safetensors"))
    base_sd = base.state_dict()
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys and any(state[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)  # adapters trained
    for k, v in state.items():
        if "lora_" not in k:  # base weights untouched
            name = k.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(v, base_sd[name]), k
    assert os.listdir(run / "lora") and str(tmp_path) not in (run / "lora" / "README.md").read_text()  # alone
    mask = os.umask(0)
    os.umask(mask)
    for f in (run / "lora").iterdir():  # readable as the umask allows (safetensors writes 0600)
        assert os.stat(f).st_mode & 0o444 & ~mask == 0o444 & ~mask, f
    with_adapters = load_lora(VideoDiT.from_pretrained(tmp_path / "base"), str(run / "lora"))
    merged = VideoDiT.from_pretrained(run / "pipeline", subfolder="transformer")
    packed = pack([torch.randn(4, 2, 4, 4), torch.randn(4, 1, 4, 8)], (1, 2, 2))
    text, t = torch.randn(2, 3, 16), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        a, b, c = with_adapters(packed, t, text), merged(packed, t, text), base(packed, t, text)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(b, c, atol=1e-5)  # the adapters changed the outputs
    exported = export_ema(str(run / "checkpoints" / "step_00000002"), str(tmp_path / "export"))  # from a checkpoint
    assert os.listdir(os.path.join(exported, "lora"))
    for x, y in zip(VideoDiT.from_pretrained(exported).state_dict().values(), merged.state_dict().values()):
        assert torch.equal(x, y)


def test_a_corrupt_file_is_skipped_and_counted_in_the_log(assets, tmp_path, caplog):
    """Each skip the log counts is warned about once, and no other: the data workers read batches ahead."""
    from videodit.data.shapes import make_clip
    from videodit.data.video import write_video

    rows = []
    for i, (h, w) in enumerate([(32, 32), (32, 64), (64, 32)]):  # read back resized to ~16x16 pixels
        clip = make_clip(i, h, w, 8)
        write_video(str(tmp_path / f"{i}.mp4"), clip["frames"], fps=8)
        rows.append(dict(path=f"{i}.mp4", caption=clip["caption"]))
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 100)
    rows.append(dict(path="bad.mp4", caption="a broken file", num_frames=8, fps=8.0, height=16, width=16))
    with open(tmp_path / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    run = tmp_path / "run"
    train(load_config(None, assets["base"] + [
        "data.source=manifest", f"data.manifest={tmp_path / 'data.jsonl'}", "data.target_area=256",
        "data.num_frames=[5]", "data.image_ratio=0", f"train.output_dir={run}", "train.max_steps=2",
        "data.num_workers=1"]))
    records = log(run)
    assert records[-1]["skipped"] == 2  # all four fit one batch: each step is an epoch and meets the bad file once
    assert caplog.text.count("skipping a sample: ") == 2 and "bad.mp4" in caplog.text
    assert all(r["samples_per_s"] > 0 for r in records)


@pytest.mark.parametrize("task", ["dit", "vae"])
def test_a_batch_of_unreadable_files_is_skipped_from_the_first_step_on(assets, tmp_path, task):
    """One readable clip and two broken files, a batch each: a batch that fails to load whole, even the first, runs
    at weight 0 (counted as skipped; its log line's loss null, and a line over several steps averages the loss of
    those that trained), leaves the weights and AdamW's state as they were, and the run goes on."""
    from videodit.data.loader import PackedBatchSampler
    from videodit.data.shapes import make_clip
    from videodit.data.video import write_video

    clip = make_clip(0, 32, 32, 8)
    write_video(str(tmp_path / "good.mp4"), clip["frames"], fps=8)
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 100)
    rows = [dict(path="good.mp4", caption=clip["caption"])] + \
        [dict(path="bad.mp4", caption="a broken file", num_frames=8, fps=8.0, height=16, width=16)] * 2
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a data order whose first batch is a broken file (each sample is 8 tokens, a batch's budget)
    seed = next(s for s in range(100) if PackedBatchSampler([8] * 3, [4] * 3, 8, 0.0, s).epoch(0)[0][0][0] != 0)
    run = tmp_path / "run"
    config = assets["base"] + [
        "data.source=manifest", f"data.manifest={tmp_path / 'data.jsonl'}", "data.target_area=256",
        "data.num_frames=[5]", "data.image_ratio=0", "data.max_tokens=8", f"data.seed={seed}", f"train.task={task}",
        "train.max_steps=3", "train.sample_every=0"]
    train(load_config(None, config + [f"train.output_dir={run}", "train.checkpoint_every=1",
                                      "train.keep_checkpoints=3"]))
    records = log(run)
    assert [r["skipped"] for r in records][-1] == 2 and records[0]["skipped"] == 1 and records[0]["loss"] is None
    trained = [r["loss"] for r in records if r["loss"] is not None]
    assert len(trained) == 1 and trained[0] > 0
    train(load_config(None, config + [f"train.output_dir={tmp_path / 'one_line'}", "train.log_every=3"]))
    assert [r["loss"] for r in log(tmp_path / "one_line")] == pytest.approx(trained)  # not a third of it
    # AdamW keeps no state until its first step: only the readable batch's step made one
    first = next(i for i, r in enumerate(records) if r["loss"] is not None)
    stepped = [bool(torch.load(os.path.join(c, "optimizer.bin"))["state"]) for c in checkpoint_dirs(str(run))]
    assert stepped == [i >= first for i in range(3)]


def test_stage_recipes_chain_their_models():
    stages = [load_config(os.path.join(ROOT, "configs", "stages", f)) for f in
              ("1_images.yaml", "2_video_low.yaml", "3_video_high.yaml")]
    assert all(t == 1 for t, _, _ in stages[0].data.sizes) and stages[0].data.image_ratio == 1.0
    for before, after in zip(stages, stages[1:]):
        assert after.train.init_from == os.path.join(before.train.output_dir, "pipeline")  # the last EMA export
        assert max(h * w for _, h, w in after.data.sizes) >= max(h * w for _, h, w in before.data.sizes)
    vae = load_config(os.path.join(ROOT, "configs", "shapes", "vae.yaml"))
    assert vae.train.task == "vae" and vae.train.output_dir + "/vae" == "runs/shapes-vae/vae"


def test_lora_recipe_fine_tunes_the_default_model_on_a_manifest(tmp_path):
    """configs/finetune/lora.yaml on a manifest of three clips: adapters on the shipped model, merged into a pipeline
    that samples at the clips' size."""
    from videodit.data.shapes import make_clip
    from videodit.data.video import write_video
    from videodit.pipeline import VideoDiTPipeline
    from videodit.train.lora import TARGET_MODULES

    rows = []
    for i, (h, w) in enumerate([(64, 96), (72, 56), (64, 96)]):
        clip = make_clip(i, h, w, 17)
        write_video(str(tmp_path / f"{i}.mp4"), clip["frames"], fps=8)
        rows.append(dict(path=f"{i}.mp4", caption=clip["caption"]))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = os.path.join(ROOT, "configs", "finetune", "lora.yaml")
    shipped = os.path.join(ROOT, "models", "shapes-tiny")
    cfg = load_config(recipe, [f"data.manifest={tmp_path / 'm.jsonl'}", f"train.init_from={shipped}",
                               f"train.vae={shipped}/vae", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
                               "train.sample_every=0", "data.num_workers=0"])
    assert cfg.train.lora_rank > 0 and cfg.data.source == "manifest"
    train(cfg)
    base = VideoDiT.from_pretrained(shipped, subfolder="transformer")
    pipe = VideoDiTPipeline.from_pretrained(str(tmp_path / "run" / "pipeline"))
    tuned = dict(pipe.transformer.state_dict())
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v.float(), tuned[k].float())]
    assert changed and all(re.fullmatch(TARGET_MODULES + r"\.weight", k) for k in changed)  # only the adapted
    assert pipe.config.default_size == [17, 56, 80]  # the clips' most common size: 2:3 at about 64x64 pixels
    assert os.listdir(tmp_path / "run" / "lora")


def test_guidance_distillation_starts_as_the_teacher_and_exports_a_one_pass_pipeline(assets, tmp_path):
    """Also sharded: FSDP on two processes, the teacher sharded as well (built by process 0 alone), takes the steps
    of one process with grad_accum 2."""
    from videodit.config import ConfigError
    from videodit.flow import guidance_distilled
    from videodit.pipeline import VideoDiTPipeline

    random_dit().save_pretrained(tmp_path / "teacher")
    common = assets["base"] + [f"distill.teacher={tmp_path / 'teacher'}", "train.max_steps=2", "train.ema_decay=0"]
    for g in (1, 5):
        train(load_config(None, common + [f"distill.guidance=[{g},{g}]", f"train.output_dir={tmp_path / f'g{g}'}",
                                          "train.grad_accum=2"]))
    # step 1's loss is the untrained student's: the teacher's conditional velocity, which is the target at scale 1
    assert log(tmp_path / "g1")[0]["loss"] < 1e-10 and log(tmp_path / "g5")[0]["loss"] > 1e-7
    config = str(tmp_path / "fsdp.yaml")
    save_config(load_config(None, common + ["distill.guidance=[5,5]", f"train.output_dir={tmp_path / 'fsdp'}",
                                            "parallel.fsdp=true"]), config)
    torchrun(config)
    torch.testing.assert_close([r["loss"] for r in log(tmp_path / "fsdp")], [r["loss"] for r in log(tmp_path / "g5")],
                               rtol=1e-4, atol=1e-9)
    pipe = VideoDiTPipeline.from_pretrained(str(tmp_path / "g5" / "pipeline"))
    assert guidance_distilled(pipe.transformer) and pipe.transformer.g_embed.mlp[2].weight.abs().sum() > 0
    for extra, words in ((["distill.teacher=" + str(tmp_path / "g5" / "pipeline")], "itself guidance-distilled"),
                         ([f"train.init_from={tmp_path / 'teacher'}"], "has no guidance embedding"),
                         (["train.task=vae"], "train.task: dit"), (["train.lora_rank=2"], "lora_rank=0")):
        with pytest.raises(ConfigError, match=words):
            train(load_config(None, common + extra + [f"train.output_dir={tmp_path / 'bad'}"]))


def test_the_vae_is_named_once_and_a_missing_pretrained_folder_in_one_line(tmp_path):
    """train.vae (a VAE run's folder, often inherited from a base config) and vae.path (a pretrained VAE) naming two
    VAEs are refused, not one silently ignored; a pretrained kind's missing local folder is named, not sent to the
    hub."""
    from videodit.train.models import load_trained_vae

    with pytest.raises(ConfigError, match="train.vae = runs/x/vae and vae.path = .* both name the VAE"):
        load_trained_vae(load_config(None, TINY + ["train.vae=runs/x/vae", f"vae.path={tmp_path}", "vae.kind=wan"]))
    with pytest.raises(FileNotFoundError, match=r"vae.path = \./nowhere is not a folder .*the wan VAE's folder"):
        load_trained_vae(load_config(None, TINY + ["train.vae=", "vae.path=./nowhere", "vae.kind=wan"]))


def test_a_folder_of_the_wrong_model_is_named_in_one_line(tmp_path):
    """A VAE folder given as the denoiser to start from, or our VAE given as a Wan VAE: the class its config.json
    names, against the one wanted, before any weights load."""
    from videodit.train.models import load_trained_vae

    CausalVideoVAE(block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, temporal_factor=2,
                   spatial_factor=2, mid_attention=False).save_pretrained(tmp_path / "vae")
    with pytest.raises(ConfigError, match=f"train.init_from = {tmp_path / 'vae'} holds a model of class "
                                          f"CausalVideoVAE, where VideoDiT is needed: give a denoiser"):
        build_denoiser(load_config(None, TINY + [f"train.init_from={tmp_path / 'vae'}"]), 4, 16)
    with pytest.raises(ConfigError, match="class CausalVideoVAE, where AutoencoderKLWan is needed: give the VAE of "
                                          "vae.kind wan"):
        load_trained_vae(load_config(None, TINY + [f"train.vae={tmp_path / 'vae'}", "vae.kind=wan"]))


def test_sampling_and_checkpoints_stay_out_of_the_logged_rates(assets, tmp_path, monkeypatch):
    """The rates of a log line (steps/s, tokens/s, MFU) time training steps only: a sample written after step 1
    (made to take 5 s here) does not slow step 2's line; a VAE run, which counts no FLOPs, logs null MFU."""
    import time as clock

    from videodit.train.tasks import DiTTask

    monkeypatch.setattr(DiTTask, "write_samples", lambda *a, **k: clock.sleep(5))
    train(load_config(None, assets["base"] + [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
                                              "train.log_every=1", "train.sample_every=1"]))
    rows = log(tmp_path / "run")
    assert rows[1]["steps_per_s"] > 0.2 and rows[1]["mfu"] > 0
    assert all(r["mfu"] is None and r["flops_per_step"] is None for r in log(assets["vae_run"]))
