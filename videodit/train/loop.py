"""The training loop, on accelerate: one process on CPU, DDP over processes and machines (launched by `torchrun` or
`accelerate launch --multi_gpu`) or FSDP2 (`parallel.fsdp: true`, sharded.py), bf16 / fp16 / fp32, gradient
accumulation, clipping, AdamW with warmup and a cosine or constant schedule, EMA of the weights, activation
checkpointing and torch.compile. `train(cfg, resume)` runs the denoiser (`train.task: dit`) or the VAE
(`train.task: vae`).

The run folder (`train.output_dir`): config.yaml, log.jsonl (one JSON object per logged step: loss, lr,
grad_norm, tokens/s, samples/s, steps/s, data_wait, skipped; denoiser: flops_per_step (3 x forward FLOPs from
videodit.flops, all ranks), tflops_per_s (all ranks) and mfu = tflops_per_s / (processes x train.peak_tflops);
with train.eval_every, at step 0 of a fresh run (a line of these alone) and every eval_every steps, measures on the
data's last train.eval_clips items, held out of training, by the EMA weights where there is an EMA: denoiser runs
eval_loss and eval_loss_t<t>, the velocity error at each of train.eval_timesteps with noise fixed for the run, so
the curve moves only as the model does; VAE runs eval_psnr and eval_l1 of the reconstructions), tensorboard/ (and
W&B, by train.report_to), checkpoints/step_*/ (see checkpoint.py), samples/, and at the end the EMA weights:
pipeline/ (dit: a VideoDiTPipeline for sample.py; LoRA runs also lora/, the adapters alone) or vae/ (vae).

Determinism: a step's data is fixed by the global batch index (see data/loader.py) and its noise by a generator
seeded with (train.seed, global batch index), so a resumed run repeats the uninterrupted one exactly on CPU, and a
run on W processes with grad_accum A sees the same global batches as one on W' processes with A' = W * A / W'.

Stopping early: SIGTERM or SIGUSR1 (a scheduler's preemption or time-limit warning, e.g. SLURM's
`--signal=USR1@120`; torchrun passes SIGTERM on to its processes), or SIGINT (Ctrl-C) ends the run at the end of the
step under way on every rank alike: it writes that step's checkpoint and raises Stopped, and `--resume latest` goes
on from there as if nothing had happened.

Sequence parallelism (`parallel.sequence_parallel: S`, dit only): consecutive groups of S ranks split each sequence
(videodit.parallel); the W / S groups are the data-parallel ranks: the ranks of a group read the same batches and
draw the same noise, and DDP's mean over all W ranks is the data-parallel mean of the groups' gradients. FSDP's
mean is the same one, so sequence parallelism combines with either.
"""

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import uuid

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.tracking import TensorBoardTracker, WandBTracker
from accelerate.utils import DistributedType, ProjectConfiguration, is_wandb_available, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from ..config import ConfigError, as_saved, save_config
from ..data.loader import STOP_SIGNALS, DataPosition, make_loader
from ..parallel import degrees, sequence_parallel_groups
from . import sharded
from .checkpoint import (abandon_checkpoints_after, checkpoint_dirs, find_checkpoint, load_checkpoint, save_checkpoint,
                         write_error)
from .models import named_vae_config
from .tasks import DiTTask, VAETask

logger = logging.getLogger(__name__)


class Stopped(Exception):
    """A stop signal ended the run early, after the checkpoint of the step it stopped at."""

    def __init__(self, signum: int, step: int, output_dir: str):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; its checkpoint is in "
                         f"{output_dir}/checkpoints: go on with --resume latest")


class Diverged(Exception):
    """The loss or the weights stopped being finite: the run ends before writing a checkpoint of them."""

    def __init__(self, step: int, what: str, out: str, clipped: bool):
        last = (checkpoint_dirs(out) or [None])[-1]
        fix = "a lower train.lr" + ("" if clipped else ", or train.grad_clip > 0")
        super().__init__(f"step {step}: {what} (the run diverged, or a sample holds NaN or inf); no checkpoint of it "
                         f"was written. " + (f"The newest is {last}: go on from it with --resume latest and {fix}"
                                             if last else f"No checkpoint was written before: start again with {fix}"))


def make_schedule(optimizer, t):
    if t.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, t.warmup_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps,
                                                       min_lr_rate=t.min_lr_ratio)


def _truncate_log(path: str, step: int):
    """Drop log lines after `step` (a resumed run rewrites them), and a last line a kill or a full disk cut short;
    the file is replaced whole, never left half-written."""
    if not os.path.isfile(path):
        return
    lines = []
    with open(path) as f:
        for ln in f:
            try:
                if json.loads(ln)["step"] <= step:
                    lines.append(ln if ln.endswith("\n") else ln + "\n")
            except (ValueError, KeyError, TypeError):  # a torn or empty line
                continue
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def train(cfg, resume: str | None = None) -> str:
    """Train as the config says; `resume` is 'latest' or a checkpoint folder. Returns the run folder. A process
    group the run started (accelerate's, or a sharded run's own on one process) ends with it, also on an error."""
    had_group, had_state = torch.distributed.is_initialized(), bool(AcceleratorState._shared_state)
    with _stop_signals() as received:  # also while the process group ends: a signal then must not kill the process
        try:
            with contextlib.ExitStack() as closing:
                return _train(cfg, resume, received, closing)
        finally:
            if not had_group and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            if not had_state:  # accelerate keeps its settings (mixed precision) process-wide: another run may differ
                AcceleratorState._reset_state()


def native_cpu_bf16() -> bool:
    """Whether this x86 CPU computes in bfloat16 (AVX512-BF16 or AMX); other architectures are given the benefit of
    the doubt."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@contextlib.contextmanager
def _run_lock(out: str):
    """Hold <out>/.lock while the run lives: a second run writing the same folder (a job submitted twice) is refused.
    A POSIX record lock: it goes with its process, a killed one too (forked data workers do not inherit it), so a
    restart is never locked out."""
    import fcntl
    import socket

    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"{out} is being written by a run still going ({who}): stop it first, or give another "
                          f"train.output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    try:
        yield
    finally:
        f.close()


@contextlib.contextmanager
def _batches(loader):
    """Iterate over the loader; its data workers stop when the block ends, on an error too. Left to the garbage
    collector, they would outlive a run whose traceback is kept (it holds the iterator), and Python's exit would wait
    for them forever: they ignore SIGTERM (_worker_init)."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        if hasattr(batches, "_shutdown_workers"):  # torch's multi-process iterator
            batches._shutdown_workers()


@contextlib.contextmanager
def _stop_signals():
    """A list that gets each stop signal received while the block runs. Signals can only be caught in the main
    thread: elsewhere they keep their usual effect."""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(signum, frame):
        received.append(signum)
        if signum == signal.SIGINT:  # a second Ctrl-C stops at once, without the checkpoint
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("Ctrl-C: stopping after this step's checkpoint (press it again to stop at once)", file=sys.stderr)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _train(cfg, resume: str | None, received: list, closing: contextlib.ExitStack) -> str:
    t, out = cfg.train, cfg.train.output_dir
    _check_fsdp(cfg)
    trackers = _trackers(t, out)
    acc = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available(), log_with=trackers or None,
                      project_config=ProjectConfiguration(project_dir=out, logging_dir=out),
                      step_scheduler_with_optimizer=False)
    set_seed(t.seed)  # the same initial weights on every rank
    if acc.is_main_process and acc.device.type == "cpu" and t.mixed_precision == "bf16" and not native_cpu_bf16():
        logger.warning("train.mixed_precision bf16: this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX), so torch "
                       "emulates it, several times slower than float32: --set train.mixed_precision=no")
    fsdp = cfg.parallel.fsdp
    if acc.distributed_type == DistributedType.FSDP:
        raise ConfigError("accelerate's FSDP flags are not used by train.py: set parallel.fsdp: true (--set "
                          "parallel.fsdp=true) and launch with torchrun or accelerate launch --multi_gpu")
    holdout = t.eval_clips if t.eval_every else 0  # items the loader leaves out, for evaluation
    locked = acc.is_main_process and os.path.isdir(out)  # a folder in use is refused before anything loads
    if locked:
        closing.enter_context(_run_lock(out))
    checkpoint = find_checkpoint(resume, out) if resume else None
    if not checkpoint and checkpoint_dirs(out):  # its rotation would delete this run's checkpoints, not those
        raise ConfigError(f"{out} holds checkpoints of an earlier run (the newest: "
                          f"{os.path.basename(checkpoint_dirs(out)[-1])}): pass --resume latest to go on with it, or "
                          f"give another train.output_dir (or remove {os.path.join(out, 'checkpoints')})")
    if checkpoint:
        _check_resume(checkpoint, t, fsdp, holdout)
        changed = _changed_stream(checkpoint, cfg)
        if changed and acc.is_main_process:
            more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            logger.warning(f"--resume {checkpoint}: {'; '.join(changed[:6])}{more}: the data, captions or noise the "
                           f"run draws change from here on (it no longer repeats the run it resumes)")

    task = (DiTTask if t.task == "dit" else VAETask)(cfg, acc)
    S, W, A = cfg.parallel.sequence_parallel, acc.num_processes, t.grad_accum
    group, dp_rank, dp_size = _sequence_parallel(S, task, acc) if S > 1 else (None, acc.process_index, W)
    model, optimizer, scheduler, unwrapped, params, ema = _prepare(cfg, task, acc)

    step, position, skipped_total = 0, DataPosition(), 0
    vae_config = named_vae_config(cfg) if t.task == "dit" else None  # what an export checks its VAE against
    log_path = os.path.join(out, "log.jsonl")
    if checkpoint:
        _check_resumed_model(checkpoint, task.model_config, dp_size * A, acc.is_main_process)
        state = load_checkpoint(acc, checkpoint)
        if fsdp:
            sharded.load(checkpoint, model, optimizer, ema)
        elif ema:  # accelerate loads it on the CPU, and EMAModel keeps the tensors it is given: back beside the weights
            ema.to(params[0].device)
        step, position, skipped_total = state["step"], DataPosition(**state["data"]), state["skipped"]
        _follow_schedule(optimizer, scheduler.scheduler, t.lr)
        if acc.is_main_process:
            logger.info(f"resumed from {checkpoint} at step {step} ({position.batches} global batches consumed)")
    elif resume:
        logger.info(f"--resume {resume}: no checkpoint in {out} yet, starting fresh")
    if acc.is_main_process:  # the folder is this run's from here on (a run refused before leaves no new folder)
        if not locked:
            closing.enter_context(_run_lock(out))
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        save_config(cfg, os.path.join(out, "config.yaml"))
        if checkpoint:
            _truncate_log(log_path, step)
            abandon_checkpoints_after(out, step)
        elif os.path.exists(log_path):
            os.remove(log_path)
    for tracker in trackers:
        if isinstance(tracker, WandBTracker) and acc.is_main_process:  # a resumed run goes on in its W&B run
            tracker.init_kwargs.update(id=_wandb_id(out, checkpoint is not None), resume="allow", config=cfg.to_dict())
    acc.init_trackers(t.wandb_project)

    loader = make_loader(cfg, task.source, task.geom, dp_rank, dp_size, position, holdout)
    held = _held_out(acc, task, holdout) if t.eval_every else None
    batches = closing.enter_context(_batches(loader))
    consumed = position.batches
    generator = torch.Generator(acc.device)
    bar = tqdm(total=t.max_steps, initial=step, disable=not acc.is_main_process, desc=t.task)
    if held is not None and step == 0:  # the held-out measures before training: a fine-tune's baseline
        _write_record(acc, log_path, dict(step=0, **_evaluate(acc, task, unwrapped, held, dp_rank, dp_size)))
    window = _window()
    model.train()
    while step < t.max_steps:
        extra, live = {}, 0
        for m in range(A):
            tic = time.perf_counter()
            batch = next(batches)
            window["wait"] += time.perf_counter() - tic
            generator.manual_seed(t.seed * 1_000_000_007 + consumed + m * dp_size + dp_rank)
            # DDP syncs the last micro-batch only; FSDP reduce-scatters each (gradients stay sharded), and HSDP
            # all-reduces across its groups on the last only
            sync = contextlib.nullcontext() if m == A - 1 or fsdp else acc.no_sync(model)
            if fsdp:
                sharded.sync_across_groups(model, m == A - 1)
            with sync:
                loss, logs = task.loss(model, batch, generator, step)
                acc.backward(loss / A)
            window["loss"] += loss.detach().float()  # summed on the device: read at log steps (no sync here)
            window["batches"] += batch["size"] > 0  # the loss's mean leaves out micro-batches that all failed
            window["tokens"] += batch["tokens"]
            window["samples"] += batch["size"]
            window["skipped"] += batch["skipped"]
            for why in batch["errors"]:  # said here, as counted: the loader's workers read ahead
                logger.warning(f"skipping a sample: {why}")
            live += batch["size"]
            window["flops"] += logs.pop("flops", 0)
            for k, v in logs.items():
                extra[k] = extra.get(k, 0.0) + v / A
        # a step whose every micro-batch, on every rank, failed to load leaves the weights, AdamW's moments, the LR
        # schedule and the EMA as they were (a zero gradient would still move the weights: momentum, weight decay);
        # a stop signal may reach the ranks at different steps: they agree to stop after the first step any has it at
        # (several processes: as it stands here, in the same reduction, one device sync for both)
        stop = received[0] if received else 0
        if W > 1:
            live, stop = (int(v) for v in acc.reduce(torch.tensor([live, stop], device=acc.device), "max").tolist())
        grad_norm, lr = None, optimizer.param_groups[0]["lr"]  # the rate this step runs at, for the log
        if live:
            if t.grad_clip > 0:
                grad_norm = sharded.grad_norm(acc.clip_grad_norm_(model.parameters(), t.grad_clip))
            optimizer.step()
            scheduler.step()
            task.after_step()
            if ema:
                ema.step(params)
        optimizer.zero_grad(set_to_none=True)
        if W == 1:  # alone, a signal that came during the update counts for this step too
            stop = received[0] if received else 0
        step += 1
        consumed += dp_size * A
        window["steps"] += 1

        checkpoint_now = step % t.checkpoint_every == 0 or step == t.max_steps or stop
        eval_now = held is not None and step % t.eval_every == 0
        if step % t.log_every == 0 or checkpoint_now or eval_now:  # a checkpoint's skipped count is then exact
            record = _record(acc, step, window, extra, lr, grad_norm, S, t.peak_tflops)
            if eval_now:  # after the rates are taken: they leave its time out
                with _ema_weights(ema, params, model):
                    record.update(_evaluate(acc, task, unwrapped, held, dp_rank, dp_size))
            skipped_total += record.pop("skipped_now")
            record["skipped"] = skipped_total
            _write_record(acc, log_path, record)
            # (fp16's loss scaling meets inf gradients by design: it skips those steps itself)
            bad = [f"the {k} is {record[k]}" for k in ("loss", "grad_norm")[:1 if acc.scaler else 2]
                   if not math.isfinite(record[k] or 0)]
            if bad:
                raise Diverged(step, " and ".join(bad), out, t.grad_clip > 0)
            if acc.is_main_process:
                bar.set_postfix(loss=f"{record['loss'] or 0:.4f}", it_s=f"{record['steps_per_s']:.2f}",
                                tok_s=f"{record['tokens_per_s']:.0f}", skipped=skipped_total)
            window = _window()
        bar.update(1)

        pause = time.perf_counter()  # sampling and checkpointing are left out of the next log line's rates
        if t.sample_every and step % t.sample_every == 0 and not stop:
            _write_samples(acc, task, model, unwrapped, ema, params, step, out, fsdp, group if S > 1 else None)
        if checkpoint_now and not _all_finite(acc, params):
            raise Diverged(step, "the weights are no longer finite", out, t.grad_clip > 0)
        if checkpoint_now:
            state = dict(step=step, data=loader.batch_sampler.position(consumed).to_dict(), skipped=skipped_total,
                         world_size=W, grad_accum=A, sequence_parallel=S, holdout=holdout, ema=ema is not None,
                         task=t.task, lora_rank=t.lora_rank, vae_config=vae_config)
            save_checkpoint(acc, out, step, state, cfg, task.model_config, t.keep_checkpoints,
                            (lambda folder: sharded.save(folder, model, optimizer, ema)) if fsdp else None)
        window["start"] += time.perf_counter() - pause
        if stop:
            bar.close()
            acc.wait_for_everyone()
            acc.end_training()
            raise Stopped(stop, step, out)
    bar.close()

    acc.wait_for_everyone()
    with _ema_weights(ema, params, model):
        _export(acc, task, model, unwrapped, fsdp, out)
    acc.wait_for_everyone()
    acc.end_training()
    return out


def _sequence_parallel(S: int, task, acc):
    """Split the denoiser's (and a distillation teacher's) sequences over groups of S processes: the group, and this
    process's data-parallel rank and count."""
    W = acc.num_processes
    if task.cfg.train.task != "dit" or W == 1:
        raise ConfigError(f"parallel.sequence_parallel = {S} splits the denoiser's sequences over processes: it "
                          f"needs train.task: dit and a multi-process launch (torchrun --nproc_per_node {S})")
    heads = task.model.config.num_heads
    if W % S or heads % S:
        raise ConfigError(f"parallel.sequence_parallel = {S} must divide the {W} processes and the denoiser's "
                          f"{heads} attention heads; use one of {degrees(W, heads)}")
    group, dp_rank, dp_size = sequence_parallel_groups(S)
    for m in (task.model, getattr(task, "teacher", None)):
        if m is not None:
            m.set_sequence_parallel(group)
    return group, dp_rank, dp_size


def _follow_schedule(optimizer, scheduler, lr: float):
    """On resuming: the rate of this config's schedule (its lr, its length) at the checkpoint's step; the optimizer
    holds the one the checkpoint's run set."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, f in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * f(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _export(acc, task, model, unwrapped, fsdp: bool, out: str):
    """The run's model (the weights in place now) exported by the main process; a sharded one is gathered first
    (collective: every process calls this)."""
    final = unwrapped
    if fsdp:
        full = sharded.gather(model, acc.is_main_process)
        if acc.is_main_process:
            final = type(unwrapped).from_config(task.model_config)
            final.load_state_dict(full)
    if acc.is_main_process:  # into a temporary folder, then each part (pipeline/, vae/, lora/) moved in whole
        tmp = os.path.join(out, ".tmp_export")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            task.export(final, tmp)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(f"could not export the run's model to {out}", out, e) from e
        for name in os.listdir(tmp):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        os.rmdir(tmp)


def _trackers(t, out: str) -> list:
    """The experiment trackers train.report_to names (accelerate starts them on the main process alone): TensorBoard
    in <out>/tensorboard, W&B in the project train.wandb_project, the run named after its folder."""
    trackers = [TensorBoardTracker("tensorboard", out)] if "tensorboard" in t.report_to else []
    if "wandb" in t.report_to:
        if not is_wandb_available():
            raise ConfigError("train.report_to has wandb, which is not installed: pip install wandb, then wandb login "
                              "(or set WANDB_MODE=offline to keep the run in <output_dir>/wandb)")
        trackers.append(WandBTracker(t.wandb_project, name=os.path.basename(os.path.abspath(out)), dir=out))
    return trackers


def _wandb_id(out: str, resumed: bool) -> str:
    """The run's W&B id: kept in <out>/wandb_id for resumes, new for a fresh start."""
    path = os.path.join(out, "wandb_id")
    if resumed and os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    run_id = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(run_id)
    return run_id


def _write_samples(acc, task, model, unwrapped, ema, params, step: int, out: str, fsdp: bool, group):
    """The task's samples at `step` by the EMA weights, into <out>/samples. A sharded model's forward is collective:
    every rank samples, in its group, and the main one writes; otherwise the main process samples alone, without its
    sequence-parallel group (collective: every process calls this)."""
    if fsdp or acc.is_main_process:
        alone = not fsdp and group is not None
        if alone:
            unwrapped.set_sequence_parallel(None)
        with _ema_weights(ema, params, model), acc.autocast():
            task.write_samples(unwrapped, step, os.path.join(out, "samples") if acc.is_main_process else None)
        if alone:
            unwrapped.set_sequence_parallel(group)
    acc.wait_for_everyone()


def _prepare(cfg, task, acc) -> tuple:
    """The task's model compiled (train.compile) and sharded (parallel.fsdp) as asked, its optimizer and LR schedule,
    prepared by accelerate, and the EMA of its trained weights: (model, optimizer, scheduler, the unwrapped model,
    the trained weights, the EMA or None)."""
    t, fsdp = cfg.train, cfg.parallel.fsdp
    if t.compile:  # the denoiser's blocks (one graph serves all), the VAE whole
        if hasattr(task.model, "compile_blocks"):
            task.model.compile_blocks(dynamic=True)
        else:
            task.model.compile(dynamic=True)
    if fsdp:  # before the optimizer: it takes the shards
        for m in (task.model, getattr(task, "teacher", None)):  # a distillation's frozen teacher too
            if m is not None:
                sharded.shard(m, acc.device, cfg.parallel.fsdp_param_dtype, cfg.parallel.fsdp_shard_size)
    trainable = [p for p in task.model.parameters() if p.requires_grad]
    # fused: one kernel over all tensors (on CPU 5x the default's speed for the B preset's 122M weights)
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=True)
    if fsdp:  # accelerate keeps the schedule and RNG states; the shards are sharded.py's
        model, scheduler = task.model, acc.prepare(make_schedule(optimizer, t))
    else:
        model, optimizer, scheduler = acc.prepare(task.model, optimizer, make_schedule(optimizer, t))
    unwrapped = acc.unwrap_model(model)
    if hasattr(unwrapped, "patch_size"):
        model.patch_size = unwrapped.patch_size  # flow_loss reads it; DDP does not forward attributes
    params = [p for p in unwrapped.parameters() if p.requires_grad]
    # EMAModel's foreach ops have no sharded (DTensor) form: per tensor under FSDP
    ema = EMAModel(params, decay=t.ema_decay, foreach=not fsdp) if t.ema_decay > 0 else None
    for obj in ([ema] if ema and not fsdp else []) + task.extra_state():
        acc.register_for_checkpointing(obj)
    return model, optimizer, scheduler, unwrapped, params, ema


def _check_resume(checkpoint: str, t, fsdp: bool, holdout: int):
    """A checkpoint resumes only as the run it came from trained (the task, LoRA or not, at its rank), sharded as
    it was, with an EMA if it kept one, and with the same items held out (the data stream depends on them)."""
    with open(os.path.join(checkpoint, "state.json")) as f:
        state = json.load(f)
    for key in ("task", "lora_rank"):  # recorded since these checks exist
        if key in state and state[key] != getattr(t, key):
            raise ConfigError(f"--resume {checkpoint}: the checkpoint was written with train.{key} = {state[key]}, "
                              f"this run has {getattr(t, key)}; resume with --set train.{key}={state[key]}, or start "
                              f"a new run in another train.output_dir")
    if fsdp != os.path.isdir(os.path.join(checkpoint, sharded.SHARDED)):
        raise ConfigError(f"--resume {checkpoint}: the checkpoint was written with parallel.fsdp = {not fsdp}; "
                          f"resume it with --set parallel.fsdp={str(not fsdp).lower()}")
    ema = t.ema_decay > 0
    if state.get("ema", ema) != ema:
        raise ConfigError(f"--resume {checkpoint}: the checkpoint was written " + ("without" if ema else "with") +
                          " an EMA of the weights; resume it with train.ema_decay " +
                          ("= 0, or start the EMA in a new run" if ema else "> 0, as it ran"))
    was = state.get("holdout", 0)
    if was != holdout:
        fix = "--set train.eval_every=0" if not was else f"--set train.eval_every=N train.eval_clips={was}"
        raise ConfigError(f"--resume {checkpoint}: that run held out {was} items of the data for evaluation, this one "
                          f"{holdout}, which would change the data it trains on; resume with {fix}")


def _changed_stream(checkpoint: str, cfg) -> list[str]:
    """The keys that decide what a run trains on (data.*, flow.*, text.*, train.seed) that differ from the
    checkpoint's config: each 'key old -> new'. A checkpoint config that no longer loads is not compared."""
    from ..config import load_config

    try:
        was = load_config(os.path.join(checkpoint, "config.yaml")).to_dict()
    except (ConfigError, OSError):
        return []
    now = cfg.to_dict()
    unused = {"num_workers", *{"shapes": ("manifest", "cache_dir"), "manifest": ("cache_dir",),
                               "cache": ("manifest",)}.get(now["data"]["source"], ())}  # the other sources' paths
    pairs = [(f"{s}.{k}", v, now[s][k]) for s in ("data", "flow", "text") for k, v in was[s].items()
             if not (s == "data" and k in unused)] + [("train.seed", was["train"]["seed"], now["train"]["seed"])]
    return [f"{key} {a!r} -> {b!r}" for key, a, b in pairs if as_saved(a) != as_saved(b)]


def _check_resumed_model(checkpoint: str, model_config: dict, batch: int, main: bool):
    """The checkpoint's model must be this config's; a global batch of another size (micro-batches a step over the
    data-parallel ranks) is warned about."""
    with open(os.path.join(checkpoint, "model_config.json")) as f:
        was = json.load(f)
    now = as_saved(model_config)
    changed = [f"{k} {was.get(k)} -> {now.get(k)}" for k in sorted(set(was) | set(now))
               if not k.startswith("_") and was.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"--resume {checkpoint}: the checkpoint's model is not this config's ({'; '.join(changed)}); "
                          f"resume with the settings it was written with, or start a new run in another "
                          f"train.output_dir")
    with open(os.path.join(checkpoint, "state.json")) as f:
        state = json.load(f)
    before = state["world_size"] // state.get("sequence_parallel", 1) * state["grad_accum"]
    if before != batch and main:
        logger.warning(f"--resume {checkpoint}: that run's steps took {before} micro-batches (data-parallel processes "
                       f"x train.grad_accum), this one's {batch}: the data order and the batch size change from here "
                       f"on; set train.grad_accum so that processes / sequence_parallel x grad_accum = {before} to "
                       f"go on as it would have")


def _check_fsdp(cfg):
    """What parallel.fsdp does not shard, and the bf16 gather's precision."""
    t, p = cfg.train, cfg.parallel
    if p.fsdp_shard_size and not p.fsdp:
        raise ConfigError(f"parallel.fsdp_shard_size = {p.fsdp_shard_size} sets how FSDP shards; it needs "
                          f"parallel.fsdp: true")
    if p.fsdp_param_dtype == "bf16" and not (p.fsdp and t.mixed_precision == "bf16"):
        raise ConfigError(f"parallel.fsdp_param_dtype: bf16 gathers sharded weights in bf16 for bf16 compute; it "
                          f"needs parallel.fsdp: true and train.mixed_precision: bf16 (got fsdp {p.fsdp}, "
                          f"mixed_precision {t.mixed_precision})")
    if not p.fsdp:
        return
    if t.task != "dit":
        raise ConfigError("parallel.fsdp shards the denoiser; train.task: vae trains a small VAE, which DDP "
                          "replicates: leave parallel.fsdp false")
    if t.lora_rank:
        raise ConfigError("parallel.fsdp with train.lora_rank > 0: LoRA trains few weights, so shard nothing; use "
                          "DDP (leave parallel.fsdp false)")
    if t.mixed_precision == "fp16":
        raise ConfigError("parallel.fsdp with train.mixed_precision: fp16 (its loss scaling does not unscale sharded "
                          "gradients); use bf16")


def _record(acc, step: int, window: dict, extra: dict, lr: float, grad_norm, sp: int, peak_tflops: float) -> dict:
    """One log line: the window's sums over all ranks (collective), as rates, and the loss's mean over the
    micro-batches that trained (null if none did: every sample failed to load); the task's logs of the last step
    averaged over ranks (the same names on every rank). The sp ranks of a sequence-parallel group share a batch:
    its tokens, samples and FLOPs count once."""
    names = ("loss", "batches", "tokens", "samples", "skipped", "wait", "flops")
    stats = torch.tensor([float(window[k]) for k in names], dtype=torch.float64, device=acc.device)
    loss, batches, tokens, samples, skipped, wait, flops = acc.reduce(stats, "sum").tolist()
    tokens, samples, skipped, flops = tokens / sp, samples / sp, skipped / sp, flops / sp
    names = sorted(extra)
    if names:
        values = acc.reduce(torch.tensor([extra[k] for k in names], dtype=torch.float64, device=acc.device), "mean")
        extra = dict(zip(names, values.tolist()))
    W, n, elapsed = acc.num_processes, window["steps"], time.perf_counter() - window["start"]
    counted = flops > 0 or None  # a VAE run counts no FLOPs: null, not 0
    return dict(step=step, loss=loss / batches if batches else None, lr=lr,
                grad_norm=float(grad_norm) if grad_norm is not None else None,
                tokens_per_s=tokens / elapsed, samples_per_s=samples / elapsed, steps_per_s=n / elapsed,
                data_wait=wait / W / elapsed, flops_per_step=counted and flops / n,
                tflops_per_s=counted and flops / elapsed / 1e12,
                mfu=counted and flops / elapsed / 1e12 / (W * peak_tflops), skipped_now=round(skipped), **extra)


def _held_out(acc, task, count: int):
    """The task's held-out set, the same on every rank (a rank that read fewer would run fewer collective forward
    passes and hang the others)."""
    held = task.held_out(count)
    read = acc.gather(torch.tensor([len(held["items"])], device=acc.device))
    if read.min() != read.max():
        raise RuntimeError(f"the processes read {read.tolist()} of the {count} held-out items: a file read failed on "
                           f"some of them only")
    if not held["items"]:
        raise ConfigError(f"none of the data's last {count} items, held out by train.eval_clips, could be read; "
                          f"fix or remove those rows, or hold out more items (train.eval_clips)")
    return held


def _all_finite(acc, params) -> bool:
    """Whether every trained weight is finite, on every rank (one device sync)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # a sharded model's shards
    bad = torch.stack([x.detach().float().sum() for x in local if x.numel()]).isfinite().all().logical_not()
    return not acc.reduce(bad.float().reshape(1), "max").item()


def _write_record(acc, path: str, record: dict):
    """One line of log.jsonl (a NaN or inf as null: strict JSON) and its scalars to TensorBoard, from the main
    process."""
    if acc.is_main_process:
        with open(path, "a") as f:
            f.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                for k, v in record.items()}) + "\n")
        acc.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])


def _evaluate(acc, task, model, held, dp_rank: int, dp_size: int) -> dict:
    """The task's held-out measures, each a mean over all ranks' shares (collective)."""
    sums = task.eval_sums(model, held, dp_rank, dp_size)
    total = acc.reduce(torch.stack(list(sums.values()), 1), "sum")  # (2, measures): sums and counts
    return dict(zip(sums, (total[0] / total[1]).tolist()))


def _window() -> dict:
    """Sums over the steps since the last log line."""
    return dict(loss=0.0, batches=0, tokens=0, samples=0, skipped=0, wait=0.0, flops=0, steps=0,
                start=time.perf_counter())


@contextlib.contextmanager
def _ema_weights(ema, params, model):
    """Swap the EMA weights into `params` for the duration of the block (a sharded `model` drops the EMA weights
    its forward passes left gathered)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        sharded.drop_gathered(model)
        ema.restore(params)
