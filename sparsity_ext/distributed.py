"""Process-group plumbing shared by the monitor and the training job.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`init_from_env` starts
the default process group: NCCL when the job runs on CUDA, gloo otherwise. Outside a
process group every helper here degrades to the single-process answer, so callers never
branch on whether they run distributed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_sum",
    "collective_device",
    "init_from_env",
    "is_initialized",
    "is_main_process",
    "rank",
    "shutdown",
    "union_of_names",
    "world_size",
]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Start the default process group when launched by torchrun; return True if it did.

    The backend follows the device: ``nccl`` for CUDA, ``gloo`` for everything else.
    On CUDA each process binds to ``cuda:LOCAL_RANK`` before the group starts.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """The device the default group's backend reduces on (CUDA for NCCL, else CPU)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (a no-op in a single process); returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def union_of_names(names: list[str]) -> list[str]:
    """Sorted union of ``names`` over all ranks, so every rank builds the same layout."""
    if world_size() == 1:
        return sorted(set(names))
    gathered: list[list[str] | None] = [None] * world_size()
    dist.all_gather_object(gathered, list(names))
    return sorted({name for part in gathered for name in (part or [])})
