"""torchrun environment, device and autocast policy, all-reduce helpers; single-process runs need none of it."""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device | None = None) -> DistEnv:
    """Join the torchrun group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); else one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # set_device and DDP need an index
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world_size, local_rank, device)


def process_group_active() -> bool:
    """Whether this process is in a torchrun process group now."""
    return dist.is_available() and dist.is_initialized()


def pick_device() -> torch.device:
    """The device a command runs on: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> torch.autocast:
    """The one mixed-precision policy: bf16 autocast on CUDA (weights and sums stay float32), plain
    float32 elsewhere (CPU bf16 matmuls are slow and would change the CPU-pinned test figures)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group this process belongs to, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def dist_backend_needs_device() -> bool:
    """NCCL reduces only CUDA tensors; gloo (and a single process) take CPU ones."""
    return dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks in place (a no-op for one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean run the ranks first meet at a barrier (so none tears down
    its gloo pairs while a peer still talks to it) and the collected garbage drops DDP's reducer, which
    holds the group alive past destroy_process_group and can abort a rank at interpreter exit. After a
    failure a peer may never arrive, so then there is no barrier."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    if clean and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device without blocking the host (through pinned memory on CUDA)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor
