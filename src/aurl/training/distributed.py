"""Data-parallel training through ``torchrun``: process group, device, rank-0 helpers.

``torchrun --nproc_per_node N -m aurl train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; without them training runs in one process and nothing here communicates.
The backend follows the device: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from aurl.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process sits: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


class DDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that also exposes the wrapped model's attributes.

    The loss function reads ``model.discriminator``, ``model.loss_log_vars`` and so on; the
    forward pass still goes through DDP so that gradients are averaged across processes.
    """

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else MPS (Apple GPUs), else CPU; ``cuda`` under DDP ->
    this process's GPU."""
    if name == "auto":
        mps = getattr(torch.backends, "mps", None)
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu" and mps is not None and mps.is_available():
            name = "mps"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"training.device: {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("training.device: CUDA requested but not available; use auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("training.device: MPS requested but not available; use auto or cpu")
    return device


def init(device_name: str = "auto") -> Dist:
    """Join the ``torchrun`` process group if there is one; decide the device once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Average a tensor over all processes (identity in one process)."""
    if not d.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / d.world


def average_gradients(params: list[torch.Tensor], d: Dist) -> None:
    """Average the gradients of ``params`` over all processes, in one all-reduce (nothing in
    one process). For parameters no DDP wrapper manages: the discriminator's."""
    if not d.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= d.world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def any_flag(flag: bool, d: Dist) -> bool:
    """True when ``flag`` is true on any process: every rank then takes the same branch."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
