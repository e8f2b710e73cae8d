"""Fully sharded data parallelism (`parallel.fsdp: true`): the denoiser's weights, gradients, optimizer state and
EMA split over all processes with torch's FSDP2 (`fully_shard`, one unit per block and one for the rest), so each
process holds 1/W of the training state and gathers one block's weights at a time; the gradients are averaged as
DDP averages them, so the steps are DDP's.

Checkpoints are torch.distributed.checkpoint (DCP) folders, `<checkpoint>/sharded/`: every process writes its own
shards of the model, the optimizer state and the EMA, and any number of processes reads them back (DCP reshards),
one process without a process group too (`read_weights`, which export uses).
"""

import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..config import ConfigError

SHARDED = "sharded"  # the folder of a checkpoint that holds the shards


def shard(model, device: torch.device, param_dtype: str = "fp32", shard_size: int = 0) -> None:
    """Shard `model` (a VideoDiT, trained or frozen) over all processes, each block a unit; with `shard_size` N,
    over each N consecutive processes (a machine's GPUs) and replicated across those groups (HSDP: the gathers stay
    within a machine, only the gradients cross machines). Process 0 holds the weights; the others may hold the
    architecture alone on the meta device (so no process but the first ever holds a whole model): each gets its
    shards from process 0. One process without a process group (a plain `python train.py`) gets a group of its own.

    The shards stay fp32; `param_dtype` "bf16" gathers them in bf16 (half the traffic, and the matmuls need no
    casts) and reduces the gradients in fp32. The blocks' inputs are left as they come: the residual stream stays
    fp32."""
    device = torch.device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if shard_size in (0, world):
        mesh = init_device_mesh(device.type, (world,))
    elif world % shard_size:
        raise ConfigError(f"parallel.fsdp_shard_size = {shard_size} does not divide the {world} processes; give a "
                          f"divisor of {world} (the processes of one machine), or 0 to shard over all of them")
    else:
        mesh = init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))
    whole = model.state_dict() if dist.get_rank() == 0 else {}  # sharding keeps only this process's part
    # a block returns a flattened view (gated_residual); nothing modifies it in place, which is what FSDP warns of
    warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(FSDPDiTBlock\) returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if param_dtype == "bf16" else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # the root's weights stay gathered after the forward for the backward, but a frozen model has none
    frozen = not any(p.requires_grad for p in model.parameters())
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True if frozen else None)
    if world == 1:
        return
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=device)  # memory for the architecture; the values come next
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():  # not sharded, and not all in the state dict (RoPE's frequencies)
        dist.broadcast(buffer, 0)


def sync_across_groups(model, last: bool) -> None:
    """Under HSDP, gradients are reduce-scattered within each group every micro-batch but all-reduced across the
    groups (between machines) on a step's last micro-batch only; the groups' sums in between stay sharded. Plain FSDP
    still reduce-scatters every micro-batch: holding whole gradients until the last would undo its memory saving."""
    model.set_requires_all_reduce(last)


def drop_gathered(model) -> None:
    """Free the weights that forward passes without a backward (sampling, evaluation) left gathered: FSDP keeps the
    root unit's for the backward it expects, and the next forward would use them even after the shards changed (the
    EMA's swapped back out). A no-op for a model that is not sharded."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _ema_state(model, ema) -> dict:
    """The EMA's shadow weights by parameter name (the trainable ones, in the order EMAModel keeps them)."""
    if ema is None:
        return {}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {"ema": dict(zip(names, ema.shadow_params)), "ema_step": ema.optimization_step}


def save(folder: str, model, optimizer, ema) -> None:
    """Write this process's shards of the model, optimizer state and EMA to <folder>/sharded (collective)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state, **_ema_state(model, ema)},
             checkpoint_id=os.path.join(folder, SHARDED))


def load(folder: str, model, optimizer, ema) -> None:
    """Read <folder>/sharded into a sharded model, its optimizer and EMA, on any number of processes (collective)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state, **_ema_state(model, ema)}
    dcp.load(state, checkpoint_id=os.path.join(folder, SHARDED))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if ema is not None:
        ema.optimization_step = state["ema_step"]


def gather(model, main: bool) -> dict | None:
    """The whole weights, on the CPU of the main process (None elsewhere); collective."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if main else None


def grad_norm(norm):
    """clip_grad_norm_'s total norm, whole (it is a replicated DTensor for sharded gradients)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _has_ema(folder: str) -> bool:
    keys = dcp.FileSystemReader(os.path.join(folder, SHARDED)).read_metadata().state_dict_metadata
    return any(k.startswith("ema.") for k in keys)


def read_weights(folder: str, model) -> None:
    """Load a sharded checkpoint's weights into a whole model in this one process: the EMA's where it has one."""
    path = os.path.join(folder, SHARDED)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = {"model": model.state_dict()}
    if _has_ema(folder):
        state["ema"] = {n: torch.empty_like(p) for n, p in params.items()}
    with warnings.catch_warnings():  # DCP warns that it loads in one process even when asked to
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=True)
    with torch.no_grad():
        for n, w in state.get("ema", {}).items():
            params[n].copy_(w)
