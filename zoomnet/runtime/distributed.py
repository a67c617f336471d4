"""Several processes, one run: torch.distributed as ``torchrun`` sets it up.

``torchrun --nproc_per_node=P -m zoomnet train ...`` starts P processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment; each joins the process group (NCCL
on GPUs, gloo on CPUs), trains its share of every epoch's batches, and the gradients are
averaged by :class:`~torch.nn.parallel.DistributedDataParallel`.
"""

from __future__ import annotations

import os

import torch


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` when launched by torchrun (joining the process group), else
    ``(0, 1)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def local_device(device: torch.device, world: int) -> torch.device:
    """This process's own GPU under torchrun (``LOCAL_RANK``); the device as it is otherwise."""
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def wrap(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module | None:
    """The DistributedDataParallel copy that trains, or None in a single process."""
    if world <= 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier(world: int) -> None:
    """Wait for every process (rank 0 writes the last files while the others wait); nothing
    where no process group was joined."""
    if world > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
