"""Gradient clipping with several processes where DDP has not simply averaged every gradient
before the clip (one process, and train.grad_clip_mode=synced under plain DDP, clip with torch's
clip_grad_norm_ in the trainer).

- per_rank (the #549 records'): each rank clips its local gradient over all parameters, then the
  gradients are averaged across ranks here (the trainer keeps DDP from syncing them). Under
  Parallel Muon the matrices are left local: its reduce-scatter in the step averages them.
- synced under Parallel Muon: the matrices' averaged gradients exist only as one shard per rank
  after the reduce-scatter, so the norm of the whole averaged gradient is that of the other
  (DDP-averaged, identical on every rank) gradients and of the shards summed over the ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def clip_gradients(model: nn.Module, muon: torch.optim.Optimizer, max_norm: float, per_rank: bool) -> None:
    """Clip under torch.distributed as train.grad_clip_mode says; `muon` is the matrices' optimizer."""
    sharded = hasattr(muon, "synced_grads")  # a ParallelMuon: its matrices are synced by its step
    own = {id(p) for group in muon.param_groups for p in group["params"]} if sharded else set()
    params = [p for p in model.parameters() if p.grad is not None]
    rest = [p.grad for p in params if id(p) not in own]
    if per_rank:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        average_gradients(rest)
        return
    shards = muon.synced_grads()
    device = params[0].device
    shard_sq = _square_norm(shards, device)
    dist.all_reduce(shard_sq)  # each rank holds other matrices' shards
    total = (shard_sq + _square_norm(rest, device)).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s rule
    torch._foreach_mul_(rest + shards, coef)


def _square_norm(grads: list[Tensor], device: torch.device) -> Tensor:
    """The sum of the grads' squares, in fp32 (a 0-d tensor; 0 for none)."""
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum()


@torch.no_grad()
def average_gradients(grads: list[Tensor]) -> None:
    """Average grads over the ranks in place: one all-reduce per dtype, divided before the sum as
    DDP does. Every rank passes the same tensors in the same order."""
    world_size = dist.get_world_size()
    for dtype in dict.fromkeys(g.dtype for g in grads):  # first-seen order: the same on every rank
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group]).div_(world_size)
        dist.all_reduce(flat)
        for g, part in zip(group, flat.split([g.numel() for g in group])):
            g.copy_(part.view_as(g))
