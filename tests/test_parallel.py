"""Scale: sequence parallelism (Ulysses) on two (and four) gloo processes equals one process (outputs and
gradients, for uneven token counts, a rank holding no tokens, a mixed batch of shapes, with selective activation
checkpointing, with a local MLP, with the step cache); FSDP's bf16 gathers are as accurate as autocast; the trainer
with sequence parallel 2 x data parallel 2 (DDP, FSDP or HSDP) on four processes equals one process; checkpoint
policies keep the gradients; sample.py on several processes writes what one process writes; offloaded sampling
gives the same video."""

import itertools
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import tiny_text
from test_train import ROOT, TINY, log
from videodit.config import load_config, save_config
from videodit.dit import StepCache, VideoDiT
from videodit.parallel import Shard, check_heads, frame_windows, sequence_parallel_groups
from videodit.patchify import pack
from videodit.train import sharded
from videodit.train.loop import train
from videodit.train.models import with_guidance_embedding
from videodit.vae import CausalVideoVAE

CASES = {
    # tokens per sample (patch 1x2x2): 27 (odd), 8, 6 -> 41 in all, split 21 + 20 (sample 0 straddles the ranks)
    "mixed": [(4, 3, 6, 6), (4, 1, 4, 8), (4, 2, 2, 6)],
    # one token: the second rank holds nothing
    "one_token": [(4, 1, 2, 2)],
}


def _model(local_mlp=False):
    torch.manual_seed(0)
    model = VideoDiT(in_channels=4, hidden_size=32, depth=2, num_heads=4, text_dim=16, local_mlp=local_mlp)
    for p in model.parameters():  # random, not zero-initialized: outputs and every gradient depend on the inputs
        p.data.normal_(0, 0.1)
    return model


def _inputs(shapes):
    g = torch.Generator().manual_seed(1)
    latents = [torch.randn(s, generator=g) for s in shapes]
    B = len(shapes)
    frame_t = [torch.rand(s[1], generator=g) for s in shapes]  # per latent frame timesteps
    text = torch.randn(B, 5, 16, generator=g)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[0, 3:] = False  # a padded prompt
    return pack(latents), frame_t, text, mask


def _run(model, shapes, policy="none"):
    packed, frame_t, text, mask = _inputs(shapes)
    model.set_checkpoint_policy(policy)
    model.zero_grad(set_to_none=True)
    out = model(packed, frame_t, text, mask)  # (N, token_dim)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group, dp_rank, dp_size = sequence_parallel_groups(world)
        assert (dp_rank, dp_size) == (0, 1)
        for name, shapes in CASES.items():
            # static: the blocks take segment offsets as ints, as compile_blocks(dynamic=False) traces them (a tensor
            # there would break each compiled block's graph at attention)
            # local: a Mix-FFN, whose convolution reaches tokens on other ranks (on four, a rank's window of
            # neighbouring frames spans three others)
            cases = (("none", False, False), ("attention", False, False), ("none", True, False), ("mlp", False, True))
            for policy, static, local in cases if world == 2 else cases[-1:]:
                model = _model(local)
                want_out, want_grad = _run(model, shapes)
                model.set_sequence_parallel(group)
                model.dynamic_blocks = not static
                seen = []
                model.blocks[0].attn.register_forward_pre_hook(lambda m, args: seen.append(args[4].cu_seqlens))
                got_out, got_grad = _run(model, shapes, policy)
                assert all(isinstance(c, tuple if static else torch.Tensor) for c in seen) and seen
                model.set_sequence_parallel(None)
                case = f"{name}/{policy}/{local}"
                torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6, msg=f"{case} output")
                for n, g in got_grad.items():
                    dist.all_reduce(g, group=group)  # the group's mean, as DDP takes it
                    torch.testing.assert_close(g / world, want_grad[n], rtol=1e-5, atol=1e-6,
                                               msg=f"{case} grad {n}")
        if world > 2:
            return
        # the step cache decides on the whole sequence: the ranks skip together, where one process skips
        packed, frame_t, text, mask = _inputs(CASES["mixed"])
        g = torch.Generator().manual_seed(3)
        inputs = [packed.with_tokens(packed.tokens + s * torch.randn(packed.tokens.shape, generator=g))
                  for s in (0.0, 0.01, 1.0)]  # a step, a nudge (skipped), a jump (every block again)
        model = _model(local_mlp=True)
        with torch.no_grad():
            one = StepCache(0.1)
            want = [model(p, frame_t, text, mask, cache=one) for p in inputs]
            model.set_sequence_parallel(group)
            two = StepCache(0.1)
            got = [model(p, frame_t, text, mask, cache=two) for p in inputs]
        assert (one.steps, one.skipped) == (two.steps, two.skipped) == (3, 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # guidance's two passes on two ranks (--cfg-parallel) decide together as well, as one process decides on
        # both: at the second step half 0 is unchanged (alone it would skip) and half 1 jumps
        halves = [[torch.randn(s, generator=g) for s in CASES["mixed"]] for _ in range(2)]
        jumped = [z + torch.randn(z.shape, generator=g) for z in halves[1]]
        steps = [halves, [halves[0], jumped]]
        model = _model()
        with torch.no_grad():
            one = StepCache(0.1)
            want = [model(pack(a + b), frame_t + frame_t, torch.cat([text, text]), torch.cat([mask, mask]), cache=one)
                    for a, b in steps]
            two = StepCache(0.1, pair=dist.group.WORLD)
            got = [model(pack(step[rank]), frame_t, text, mask, cache=two) for step in steps]
        assert (one.steps, one.skipped) == (two.steps, two.skipped) == (2, 0)
        half = pack(halves[0]).tokens.shape[0]
        torch.testing.assert_close(got, [w[:half] if rank == 0 else w[half:] for w in want], rtol=1e-5, atol=1e-6)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_processes_equal_one(tmp_path, world):
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous")), nprocs=world, join=True)


def _sharded_worker(rank, world, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shapes = CASES["mixed"]
        exact = _run(_model(), shapes)  # fp32, one process
        with torch.autocast("cpu", torch.bfloat16):
            runs = {"autocast": _run(_model(), shapes)}
            for dtype in ("fp32", "bf16"):
                with torch.device("cpu" if rank == 0 else "meta"):  # as train.py builds it: weights on rank 0 only
                    model = _model()
                sharded.shard(model, "cpu", dtype)
                seen = []
                model.blocks[1].attn.register_forward_pre_hook(lambda m, args: seen.append(m.qkv.weight.dtype))
                out, grads = _run(model, shapes)  # every rank the same batch: the mean gradient is one process's
                assert seen == [torch.float32 if dtype == "fp32" else torch.bfloat16], seen
                assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())  # shards, fp32
                runs[f"fsdp_{dtype}"] = out, {n: g.full_tensor() for n, g in grads.items()}
        if rank == 0:
            results.update(exact=exact, **runs)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp_gathers_in_bf16_as_accurately_as_autocast(tmp_path):
    """sharded.shard on two gloo processes, the second building the model on the meta device: gathered in fp32 under
    bf16 autocast it gives one process's autocast outputs and gradients; gathered in bf16 (the blocks see bf16
    weights, the shards and their gradients stay fp32) it is as close to the fp32 result as autocast is."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sharded_worker, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2, join=True)
        results = dict(results)
    (exact_out, exact_grad), (auto_out, auto_grad) = results["exact"], results["autocast"]
    out, grad = results["fsdp_fp32"]
    torch.testing.assert_close(out, auto_out, rtol=1e-5, atol=1e-6)
    for n, g in grad.items():
        torch.testing.assert_close(g, auto_grad[n], rtol=1e-4, atol=1e-6, msg=n)

    def error(got, want):
        return ((got - want).norm() / want.norm()).item()

    out, grad = results["fsdp_bf16"]
    assert 0 < error(auto_out, exact_out) < 0.02
    assert error(out, exact_out) < 1.5 * error(auto_out, exact_out)
    whole = [torch.cat([g.flatten() for g in grads.values()]) for grads in (grad, auto_grad, exact_grad)]
    assert error(whole[0], whole[2]) < 1.25 * error(whole[1], whole[2])
    for n, g in grad.items():  # a few tensors' gradients are rounded to bf16 on the way (the norms' weights)
        assert error(g, exact_grad[n]) < 2.5 * error(auto_grad[n], exact_grad[n]) + 1e-3, n


def test_frame_windows_hold_every_neighbour_a_slice_needs_and_little_more():
    """Each rank's window holds, for every token of its slice, the 3x3x3 neighbourhood within its sample; it is
    whole frames, at most two frames more on each side than the slice, and its grids describe it."""
    packings = [[(3, 3, 3), (1, 2, 4), (2, 1, 3)], [(5, 2, 2)], [(1, 4, 4), (1, 4, 4), (9, 2, 3)], [(1, 1, 1)]]
    for grids in packings:
        sizes = [t * h * w for t, h, w in grids]
        cu = torch.tensor([0] + sizes).cumsum(0)
        for P in (1, 2, 3, 4, 8):
            for rank in range(P):
                shard = Shard(None, rank, P, cu)
                windows, mine = frame_windows(shard, grids)
                lo, hi = windows[rank]
                assert windows == [frame_windows(Shard(None, q, P, cu), grids)[0][q] for q in range(P)][:P]
                assert sum(t * h * w for t, h, w in mine) == hi - lo
                if shard.start == shard.end:
                    assert (lo, hi, mine) == (shard.start, shard.start, [])
                    continue
                for i in range(shard.start, shard.end):
                    k = int(torch.searchsorted(cu, i, right=True)) - 1
                    t, h, w = grids[k]
                    f, y, x = (i - cu[k].item()) // (h * w), (i - cu[k].item()) // w % h, (i - cu[k].item()) % w
                    for df, dy, dx in itertools.product((-1, 0, 1), repeat=3):
                        if 0 <= f + df < t and 0 <= y + dy < h and 0 <= x + dx < w:
                            assert lo <= cu[k].item() + ((f + df) * h + y + dy) * w + x + dx < hi
                frame = lambda j: grids[int(torch.searchsorted(cu, j, right=True)) - 1][1:]  # noqa: E731
                assert lo >= shard.start - 2 * math.prod(frame(shard.start))
                assert hi <= shard.end + 2 * math.prod(frame(shard.end - 1))


def test_shards_cover_any_length():
    for total in (0, 1, 5, 41, 64):
        for size in (1, 2, 3, 4, 8):
            shards = [Shard(None, r, size, torch.tensor([0, total])) for r in range(size)]
            assert [s.start for s in shards][0] == 0 and shards[-1].end == total
            assert all(a.end == b.start for a, b in zip(shards, shards[1:]))
            assert all(s.end - s.start <= s.chunk for s in shards)


def test_heads_not_divisible_names_the_degrees_that_work():
    check_heads(12, 4)
    with pytest.raises(ValueError, match=r"12 heads are not divisible by 5; use a degree in \[1, 2, 3, 4, 6, 12\]"):
        check_heads(12, 5)


def test_checkpoint_policies_keep_gradients():
    shapes = CASES["mixed"]
    model = _model()
    want_out, want_grad = _run(model, shapes)
    for policy in ("all", "every_2", "attention", "mlp"):
        out, grad = _run(model, shapes, policy)
        torch.testing.assert_close(out, want_out)
        for n, g in grad.items():
            torch.testing.assert_close(g, want_grad[n], msg=f"{policy}: {n}")
    with pytest.raises(ValueError, match="every_k"):
        model.set_checkpoint_policy("sometimes")


def torchrun(script: str, args: list, processes: int, fails: bool = False) -> str:
    """A script of the repository on CPU processes (gloo); its stderr. fails: it is meant to exit with an error."""
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", port,
           os.path.join(ROOT, script), *args]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT), capture_output=True,
                          text=True, timeout=300)
    assert (proc.returncode != 0) == fails, proc.stderr[-3000:]
    return proc.stderr


def tiny_run_assets(folder) -> list:
    """A tiny text encoder and VAE saved in `folder`: the overrides of a tiny training run that uses them."""
    model, tok = tiny_text()
    model.save_pretrained(folder / "text")
    tok.save_pretrained(folder / "text")
    torch.manual_seed(0)
    CausalVideoVAE(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, spatial_factor=4,
                   temporal_factor=4, mid_attention=False).save_pretrained(folder / "vae")
    return TINY + [f"text.path={folder / 'text'}", f"train.vae={folder / 'vae'}"]


@pytest.mark.parametrize("sharding,accum", [([], 1), (["parallel.fsdp=true"], 1),
                                            (["parallel.fsdp=true", "parallel.fsdp_shard_size=2"], 2)],
                         ids=["ddp", "fsdp", "hsdp"])
def test_trainer_sequence_parallel_2_by_data_parallel_2_equals_one_process(tmp_path, sharding, accum):
    """train.py with parallel.sequence_parallel: 2 on four gloo processes (two groups of two: data parallel over the
    groups, by DDP, by FSDP over all four, or by HSDP: sharded over pairs, replicated across them, with grad_accum 2,
    whose all-reduce across the pairs waits for a step's last micro-batch) takes the same steps as one process with
    twice the grad_accum: the same global batches, losses and weights, up to the order of float sums."""
    base = tiny_run_assets(tmp_path) + [
        "train.max_steps=3", "train.checkpoint_every=3", "train.ema_decay=0", "train.gradient_checkpointing=true",
        "train.checkpoint_policy=attention", "train.sample_every=3",
        "train.sample_prompts=['a red circle moving left']", "sample.steps=2",  # rank 0 samples alone
        "train.eval_every=2", "train.eval_clips=3"]  # 15 (clip, t) pairs in 3 batches: 2 + 1 at weight 0
    train(load_config(None, base + [f"train.output_dir={tmp_path / 'one'}", f"train.grad_accum={2 * accum}"]))
    config = str(tmp_path / "sp.yaml")
    save_config(load_config(None, base + [f"train.output_dir={tmp_path / 'sp'}", "parallel.sequence_parallel=2",
                                          f"train.grad_accum={accum}", *sharding]), config)
    torchrun("train.py", ["--config", config], processes=4)
    assert os.listdir(tmp_path / "sp" / "samples") == ["step_00000003_0.mp4"]
    if sharding:  # a weight in 4 shards over all the processes, or in 2 (each pair holds the whole)
        meta = dcp.FileSystemReader(str(tmp_path / "sp" / "checkpoints" / "step_00000003" / "sharded")).read_metadata()
        chunks = meta.state_dict_metadata["model.blocks.0.attn.qkv.weight"].chunks
        assert len(chunks) == (2 if "parallel.fsdp_shard_size=2" in sharding else 4)
    got, want = log(tmp_path / "sp"), log(tmp_path / "one")
    torch.testing.assert_close([r.get("loss") for r in got], [r.get("loss") for r in want], rtol=1e-4, atol=1e-6)
    for r, w in zip(got, want):  # the held-out loss, its batches shared out over the two groups
        assert ("eval_loss" in r) == ("eval_loss" in w) == (r["step"] in (0, 2))
        torch.testing.assert_close({k: v for k, v in r.items() if k.startswith("eval")},
                                   {k: v for k, v in w.items() if k.startswith("eval")}, rtol=1e-4, atol=1e-6)
    got, want = ([r for r in records if "loss" in r] for records in (got, want))  # not step 0's evaluation
    assert [r["flops_per_step"] for r in got] == [r["flops_per_step"] for r in want]  # a group's batch counts once
    assert all(0 < r["mfu"] < 1 for r in got)
    a, b = (load_file(tmp_path / run / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
            for run in ("one", "sp"))
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_a_resumed_sequence_parallel_run_samples_and_goes_on(tmp_path):
    """A sequence-parallel run resumed from its checkpoint keeps its group: the main process samples alone, then the
    pair trains on together (the group was once lost after a resume, at the first sample)."""
    base = tiny_run_assets(tmp_path) + [
        "train.checkpoint_every=1", f"train.output_dir={tmp_path / 'sp'}", "parallel.sequence_parallel=2",
        "train.ema_decay=0", "train.sample_prompts=['a red circle moving left']", "sample.steps=1"]
    config = str(tmp_path / "sp.yaml")
    for i, steps in enumerate((1, 3)):
        save_config(load_config(None, base + [f"train.max_steps={steps}", "train.sample_every=2"]), config)
        torchrun("train.py", ["--config", config] + ["--resume", "latest"] * i, processes=2)
    assert os.listdir(tmp_path / "sp" / "samples") == ["step_00000002_0.mp4"]
    assert [r["step"] for r in log(tmp_path / "sp")] == [1, 2, 3]


def test_sample_command_on_several_processes_writes_what_one_process_writes(tiny_pipe, tmp_path):
    """torchrun sample.py: processes sharing out three prompts (data parallel), splitting every video's tokens
    (--sequence-parallel 2) or guidance's two passes (--cfg-parallel), alone and together, write the videos and
    prompts.jsonl of one process."""
    from videodit.data.video import read_video
    from videodit.generate import main

    tiny_pipe.save_pretrained(tmp_path / "pipe")  # guidance 3: two passes a step
    (tmp_path / "prompts.txt").write_text("a red circle\ntwo blue squares moving up\na green triangle\n")
    args = ["--prompt-file", str(tmp_path / "prompts.txt"), "--checkpoint", str(tmp_path / "pipe"), "--height", "16",
            "--width", "24", "--num-frames", "9", "--seed", "3", "--batch-size", "2"]
    main(args + ["--output-dir", str(tmp_path / "one")])
    want = (tmp_path / "one" / "prompts.jsonl").read_text()
    runs = {"sp2": (2, ["--sequence-parallel", "2"]), "dp2_cfg": (4, ["--cfg-parallel"]),
            "sp2_cfg": (4, ["--sequence-parallel", "2", "--cfg-parallel"])}
    for name, (processes, extra) in runs.items():
        out = tmp_path / name
        torchrun("sample.py", args + ["--output-dir", str(out), *extra], processes)
        assert (out / "prompts.jsonl").read_text() == want, name
        for i in range(3):
            a, b = (read_video(str(d / f"{i:03d}.mp4")) for d in (tmp_path / "one", out))
            assert (a - b).abs().mean() < 0.004, (name, i)  # equal here; float sums may differ by a level elsewhere
    # an error every process meets (a guidance-distilled model has no second pass to share) is printed once
    tiny_pipe.register_modules(transformer=with_guidance_embedding(tiny_pipe.transformer))
    tiny_pipe.save_pretrained(tmp_path / "distilled")
    err = torchrun("sample.py", [*args[:2], "--checkpoint", str(tmp_path / "distilled"), "--cfg-parallel"], 2, True)
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: this checkpoint has guidance distilled into it: one denoiser pass a step, nothing for --cfg-parallel "
        "to share; leave it out"]


def test_offloaded_pipeline_samples_the_same(tiny_pipe, monkeypatch):
    """Memory-lean sampling: enable_offload moves each part (text encoder, denoiser, VAE) to the device only while
    it runs and back to the CPU after: the same video. Here the CPU stands in for the GPU, so the output cannot show
    the moves; a log of each part's .to calls and forward passes does."""
    run = lambda: tiny_pipe("a red circle", height=16, width=16, num_frames=5, output_type="pt",  # noqa: E731
                            generator=torch.Generator().manual_seed(0), progress=False).frames[0]
    want = run()
    tiny_pipe.enable_offload("cpu")
    log = []  # (part, "m") a move, (part, "r") a forward pass of the part or any of its modules
    moves = {name: [] for name in ("text_encoder", "transformer", "vae")}
    for name in moves:
        part, real_to = getattr(tiny_pipe, name), getattr(tiny_pipe, name).to

        def to(*a, _name=name, _to=real_to, **kw):
            log.append((_name, "m"))
            moves[_name].append(torch.device(a[0] if a else kw["device"]))
            return _to(*a, **kw)

        monkeypatch.setattr(part, "to", to)
        for module in part.modules():
            module.register_forward_pre_hook(lambda *_, _name=name: log.append((_name, "r")))
    torch.testing.assert_close(run(), want, rtol=0, atol=0)
    assert tiny_pipe.offload_device == torch.device("cpu")
    for name, where in moves.items():  # each run of forward passes between a move there and a move back
        events = re.sub("r+", "r", "".join(e for n, e in log if n == name))
        assert re.fullmatch("(mrm)+", events), f"{name}: moves (m) and runs (r) {events!r}, not (mrm)+"
        assert where == [tiny_pipe.offload_device, torch.device("cpu")] * (len(where) // 2), (name, where)
