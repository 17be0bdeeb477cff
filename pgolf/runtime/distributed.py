"""Process-group setup: one code path for a single CPU/GPU process and torchrun DDP."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pgolf.rules import MICRO_BATCHES  # world_size x grad_accum_steps


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_accum_steps(self) -> int:
        return MICRO_BATCHES // self.world_size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's value of obj on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def max_all(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks, in one collective (identity on one process)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def main_only(self, fn, *args, **kwargs):
        """Run fn on rank 0 and hand its result to every rank; if it raises, every rank raises
        the same error (instead of the other ranks waiting forever in the next collective)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:  # re-raised below, on every rank
                error = exc
        if not self.distributed:
            if error is not None:
                raise error
            return result
        result, message = self.broadcast_object((result, None if error is None else str(error)))
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"rank 0 failed: {message}")
        return result


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def setup_distributed(device_preference: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 0 or MICRO_BATCHES % world_size:
        raise RuntimeError(
            f"world size {world_size} must divide {MICRO_BATCHES} so that gradient accumulation "
            f"({MICRO_BATCHES} // world size) keeps the batch identical; use 1, 2, 4 or 8 processes"
        )
    device = pick_device(device_preference, local_rank)
    if distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank, world_size, local_rank, device, distributed)


def teardown_distributed(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
