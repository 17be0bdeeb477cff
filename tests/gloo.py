"""Run a test body in real processes joined by a gloo group (torch.distributed on CPU), as
torchrun would: each rank returns plain JSON data, which the test reads back per rank."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, body: Callable[[int, int], dict], tmp: str, world_size: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(body(rank, world_size)))
    finally:
        dist.destroy_process_group()


def run_ranks(body: Callable[[int, int], dict], tmp_path: Path, world_size: int = 2) -> list[dict]:
    """body(rank, world_size) in world_size processes (body: a module-level function, so that it
    pickles); what each rank returned, in rank order."""
    mp.spawn(_rank_main, args=(body, str(tmp_path), world_size), nprocs=world_size, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
