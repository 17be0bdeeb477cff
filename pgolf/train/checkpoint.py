"""Training checkpoints: everything needed to continue a run exactly where it stopped.

`step_XXXXXXX.pt` holds the model weights, the data-stream position, the step, the
training time so far and each training callback's state (e.g. the EMA shadow); the last one of
a finished run holds the weights that were exported (after the callbacks' before_export: EMA
applied, QAT off); `step_XXXXXXX.opt<rank>.pt` holds each rank's optimizer state (with
several processes Muon's momentum for a matrix lives only on the rank that owns it).
Files are written to a temporary name and renamed, so a kill mid-write never corrupts the
last good checkpoint. After each new checkpoint is complete, all but the newest
train.keep_checkpoints are deleted (prune_checkpoints). Loading uses torch.load(weights_only=True): no code is executed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgolf.runs import STEP_FILE, checkpoint_path, checkpoint_step
from pgolf.runtime.files import atomic_write


@dataclass
class Checkpoint:
    step: int
    training_time_ms: float
    model: dict
    optimizers: list
    loader: dict
    world_size: int
    callbacks: dict = field(default_factory=dict)  # callback name -> its state_dict()


def _save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _to_cpu(tree):
    """Tensors of a nested dict/list moved to the CPU (a callback's state may hold device tensors)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def save_checkpoint(ckpt_dir: Path, ckpt: Checkpoint, rank: int, barrier=lambda: None) -> Path:
    """Every rank writes its optimizer state; then rank 0 writes the shared part, which marks
    the checkpoint complete (`latest_checkpoint` only sees finished ones)."""
    main = checkpoint_path(ckpt_dir, ckpt.step)
    _save(ckpt.optimizers, main.with_name(f"{main.stem}.opt{rank}.pt"))
    barrier()
    if rank == 0:
        cpu_model = {k: v.detach().cpu() for k, v in ckpt.model.items()}
        callbacks = _to_cpu(ckpt.callbacks)
        _save(
            {"step": ckpt.step, "training_time_ms": ckpt.training_time_ms, "model": cpu_model,
             "loader": ckpt.loader, "world_size": ckpt.world_size, "callbacks": callbacks},
            main,
        )
    return main


def load_checkpoint(path: Path, rank: int, world_size: int, map_location="cpu") -> Checkpoint:
    shared = torch.load(path, map_location=map_location, weights_only=True)
    if shared["world_size"] != world_size:
        raise RuntimeError(
            f"checkpoint {path} was written by {shared['world_size']} processes; resume it with the same "
            f"number (--nproc {shared['world_size']}), not {world_size}"
        )
    opt_path = path.with_name(f"{path.stem}.opt{rank}.pt")
    if not opt_path.exists():
        raise RuntimeError(f"checkpoint {path} is incomplete: {opt_path.name} is missing; resume an earlier step")
    optimizers = torch.load(opt_path, map_location=map_location, weights_only=True)
    return Checkpoint(shared["step"], shared["training_time_ms"], shared["model"], optimizers,
                      shared["loader"], shared["world_size"], shared.get("callbacks", {}))  # none before callbacks


def prune_checkpoints(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete every checkpoint file (shared and each rank's) of steps older than the newest
    `keep` complete checkpoints; keep <= 0 keeps all. Call only once the newest checkpoint is
    complete on every rank. Returns the deleted files."""
    if keep <= 0:
        return []
    complete = sorted(int(m.group(1)) for p in Path(ckpt_dir).glob("step_*.pt") if (m := STEP_FILE.match(p.name)))
    if len(complete) <= keep:
        return []
    oldest_kept = complete[-keep]
    old = [p for p in Path(ckpt_dir).glob("step_*.pt") if (step := checkpoint_step(p)) is not None and step < oldest_kept]
    # The shared file first: a checkpoint stops counting as complete before its parts go.
    old.sort(key=lambda p: (checkpoint_step(p), ".opt" in p.name))
    for path in old:
        path.unlink(missing_ok=True)
    return old
