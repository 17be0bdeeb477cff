"""Muon: momentum, then the update orthogonalised by Newton-Schulz iterations, for 2-D weights."""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor


# Quintic Newton-Schulz coefficients (Keller Jordan's Muon): they push all singular values
# of the normalised update towards ~1 in a handful of iterations.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# optim.muon_ns: (a, b, c) per iteration; iterations past the end repeat the last. polar_express:
# Polar Express's per-iteration minimax coefficients, as the 1.06108 record (#1855, from #1344)
# runs them: 5 iterations, the same Frobenius normalisation (no safety factor).
NS_SCHEDULES = {"classic": (NS_COEFFS,), "polar_express": (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))}


def orthogonalize(update: Tensor, steps: int, dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7,
                  coeffs: tuple = (NS_COEFFS,)) -> Tensor:
    """Approximate U V^T of the update's SVD with `steps` Newton-Schulz iterations.

    `update` is one matrix (r, c) or a stack (..., r, c) of same-shape matrices, each
    normalised by its own Frobenius norm and iterated independently in batched matmuls.
    Iteration i uses coeffs[i] (the last one once they run out)."""
    x = update.to(dtype)
    if x.ndim == 2:
        x = x / (x.norm() + eps)
    else:
        x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)
    tall = update.size(-2) > update.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def orthogonalize_many(updates: list[Tensor], steps: int, dtype: torch.dtype = torch.bfloat16,
                       orthogonalize_fn=orthogonalize) -> list[Tensor]:
    """Orthogonalise each matrix of `updates`, batching those of one shape (a tall matrix
    joins the bank of its transpose) into a single call; results come back in input order."""
    banks: dict[tuple[int, int], list[int]] = {}
    for index, u in enumerate(updates):
        banks.setdefault((min(u.shape), max(u.shape)), []).append(index)  # the wide orientation's shape
    out: list[Tensor | None] = [None] * len(updates)
    for indices in banks.values():
        if len(indices) == 1:  # a lone matrix takes the unbatched path, exactly
            out[indices[0]] = orthogonalize_fn(updates[indices[0]], steps, dtype)
            continue
        tall = [updates[i].size(0) > updates[i].size(1) for i in indices]
        stack = torch.stack([updates[i].mT if t else updates[i] for i, t in zip(indices, tall)])
        for i, t, result in zip(indices, tall, orthogonalize_fn(stack, steps, dtype).unbind(0)):
            out[i] = result.mT if t else result
    return out


def muon_updates(grads: list[Tensor], buffers: list[Tensor], momentum: float, nesterov: bool, steps: int,
                 dtype: torch.dtype, batched: bool, orthogonalize_fn=orthogonalize, coeffs: tuple = (NS_COEFFS,),
                 row_norm: bool = False) -> list[Tensor]:
    """Momentum (in place on `buffers`), Nesterov, Newton-Schulz, then the sqrt(max(1, rows/cols))
    scale: the update Muon subtracts (times lr) for each gradient, in `dtype`. row_norm (MuonEq-R):
    each row of the direction is first divided by its L2 norm (fp32, clamped at 1e-7)."""
    directions = []
    for g, buf in zip(grads, buffers):
        buf.mul_(momentum).add_(g)
        d = g.add(buf, alpha=momentum) if nesterov else buf
        if row_norm:
            d = d / d.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(d.dtype)
        directions.append(d)
    if coeffs != (NS_COEFFS,):
        orthogonalize_fn = partial(orthogonalize_fn, coeffs=coeffs)
    if batched:
        ortho = orthogonalize_many(directions, steps, dtype, orthogonalize_fn)
    else:
        ortho = [orthogonalize_fn(d, steps, dtype) for d in directions]
    return [u * max(1.0, u.size(0) / u.size(1)) ** 0.5 for u in ortho]


def decay_and_update(p: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay p <- p (1 - lr wd), then p <- p - lr update."""
    if weight_decay:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(update.view_as(p).to(p.dtype), alpha=-lr)


class Muon(torch.optim.Optimizer):
    """Momentum + Nesterov, then orthogonalised updates scaled by sqrt(max(1, rows/cols)).

    Under torch.distributed each rank orthogonalises every world_size-th matrix and the
    updates are summed across ranks, so the work is split but the result is identical.
    `batched` runs Newton-Schulz once per bank of same-shape matrices instead of per matrix;
    `weight_decay` is decoupled: p <- p (1 - lr wd) before the update, with the group's lr.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, nesterov: bool = True,
                 ns_dtype: torch.dtype = torch.bfloat16, weight_decay: float = 0.0, batched: bool = False,
                 ns: str = "classic", row_norm: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                                      weight_decay=weight_decay))
        self.ns_dtype = ns_dtype
        self.batched = batched
        self.ns_coeffs, self.row_norm = NS_SCHEDULES[ns], row_norm  # optim.muon_ns, optim.muon_row_norm
        self.orthogonalize = orthogonalize  # replaced by a torch.compile'd version on CUDA

    def momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            offsets = [0]
            for p in params:
                offsets.append(offsets[-1] + p.numel())
            flat = torch.zeros(offsets[-1], device=params[0].device, dtype=self.ns_dtype)
            owned = [i for i, p in enumerate(params) if i % world_size == rank and p.grad is not None]
            updates = muon_updates([params[i].grad for i in owned], [self.momentum_buffer(params[i]) for i in owned],
                                   group["momentum"], group["nesterov"], group["backend_steps"], self.ns_dtype,
                                   self.batched, self.orthogonalize, self.ns_coeffs, self.row_norm)
            for i, u in zip(owned, updates):
                flat[offsets[i] : offsets[i + 1]] = u.reshape(-1)
            if distributed and world_size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for i, p in enumerate(params):
                # .get: a checkpoint saved before weight decay existed has no such key
                decay = group.get("weight_decay", 0.0) if p.grad is not None else 0.0
                decay_and_update(p, flat[offsets[i] : offsets[i + 1]], group["lr"], decay)
        return None
