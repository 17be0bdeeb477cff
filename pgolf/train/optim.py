"""Optimizers: Muon for the block matrices, Adam for embeddings, head and control scalars."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.train.config import OptimConfig
from pgolf.model.gpt import GPT
from pgolf.model.roles import ROLE_TABLE, Role, lr_key, param_roles

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon): they push all singular values
# of the normalised update towards ~1 in a handful of iterations.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: Tensor, steps: int, dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7) -> Tensor:
    """Approximate U V^T of the update's SVD with `steps` Newton-Schulz iterations.

    `update` is one matrix (r, c) or a stack (..., r, c) of same-shape matrices, each
    normalised by its own Frobenius norm and iterated independently in batched matmuls."""
    a, b, c = NS_COEFFS
    x = update.to(dtype)
    if x.ndim == 2:
        x = x / (x.norm() + eps)
    else:
        x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)
    tall = update.size(-2) > update.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    for _ in range(steps):
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
                 dtype: torch.dtype, batched: bool, orthogonalize_fn=orthogonalize) -> list[Tensor]:
    """Momentum (in place on `buffers`), Nesterov, Newton-Schulz, then the sqrt(max(1, rows/cols))
    scale: the update Muon subtracts (times lr) for each gradient, in `dtype`."""
    directions = []
    for g, buf in zip(grads, buffers):
        buf.mul_(momentum).add_(g)
        directions.append(g.add(buf, alpha=momentum) if nesterov else buf)
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
                 ns_dtype: torch.dtype = torch.bfloat16, weight_decay: float = 0.0, batched: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                                      weight_decay=weight_decay))
        self.ns_dtype = ns_dtype
        self.batched = batched
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
                                   self.batched, self.orthogonalize)
            for i, u in zip(owned, updates):
                flat[offsets[i] : offsets[i + 1]] = u.reshape(-1)
            if distributed and world_size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for i, p in enumerate(params):
                # .get: a checkpoint saved before weight decay existed has no such key
                decay = group.get("weight_decay", 0.0) if p.grad is not None else 0.0
                decay_and_update(p, flat[offsets[i] : offsets[i + 1]], group["lr"], decay)
        return None


@dataclass
class Optimizers:
    """The optimizer set of one model; every group carries its `base_lr` for scheduling."""

    adam_token: torch.optim.Adam
    muon: Muon
    adam_scalar: torch.optim.Adam
    adam_head: torch.optim.Adam | None = None

    def all(self) -> list[torch.optim.Optimizer]:
        """The optimizers present, in OPTIMIZER_NAMES order (the order of state_dict())."""
        return [opt for opt in (self.adam_token, self.muon, self.adam_scalar, self.adam_head) if opt is not None]

    def zero_grad(self) -> None:
        for opt in self.all():
            opt.zero_grad(set_to_none=True)

    def set_lr_scale(self, scale: float) -> None:
        for opt in self.all():
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale

    def set_muon_momentum(self, momentum: float) -> None:
        for group in self.muon.param_groups:
            group["momentum"] = momentum

    def step(self) -> None:
        for opt in self.all():
            opt.step()

    def arm_backward_sync(self, last_micro_batch: bool) -> None:
        """A Parallel Muon starts its gradient reduce-scatters during the last micro-batch's backward."""
        arm = getattr(self.muon, "arm_backward_sync", None)
        if arm is not None:
            arm(last_micro_batch)

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.all()]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.all(), states, strict=True):
            opt.load_state_dict(state)


# The Optimizers fields, in the order state_dict() lists them (ROLE_TABLE names these).
OPTIMIZER_NAMES = ("adam_token", "muon", "adam_scalar", "adam_head")


def muon_momentum_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup of Muon's momentum from muon_momentum_warmup_start to muon_momentum."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def resolve_switch(setting: str, default_on: bool) -> bool:
    """An auto | on | off config switch as a bool, `default_on` deciding auto."""
    return setting == "on" or (setting == "auto" and default_on)


def ordered_roles(model: GPT) -> dict[str, Role]:
    """Every parameter's role, the blocks' parameters first: the order the optimizer groups
    have always had (optimizer state in checkpoints is matched by position)."""
    roles = param_roles(model)
    blocks = [name for name in roles if name.startswith("blocks.")]
    return {name: roles[name] for name in blocks + [name for name in roles if not name.startswith("blocks.")]}


def build_optimizers(model: GPT, cfg: OptimConfig, device: torch.device, parallel_muon: bool = False) -> Optimizers:
    """One optimizer per role's ROLE_TABLE entry: Muon for the matrices, Adam (AdamW when
    optim.adam_wd > 0) for the embedding, an untied head and the control scalars, each group at
    its role's learning rate. Raises when a parameter has no role, or is not in exactly one group.

    parallel_muon: the matrices get a ParallelMuon, which takes over their gradient
    synchronisation from DDP (see pgolf.train.parallel_muon); only under torch.distributed."""
    tied = model.lm_head is None
    params = dict(model.named_parameters())
    # optimizer -> {(lr key, weight decay key): its parameters}, in ordered_roles order
    plan: dict[str, dict[tuple[str, str], list[Tensor]]] = {}
    for name, role in ordered_roles(model).items():
        keys = (lr_key(role, tied), ROLE_TABLE[role].wd_key)
        plan.setdefault(ROLE_TABLE[role].optimizer, {}).setdefault(keys, []).append(params[name])
    unknown = set(plan) - set(OPTIMIZER_NAMES)
    if unknown:
        raise ValueError(f"ROLE_TABLE names optimizers Optimizers does not have: {', '.join(sorted(unknown))}")
    fused = device.type == "cuda"  # the fused Adam kernel is CUDA-only

    def groups(opt_name: str) -> list[dict]:
        return [{"params": members, "lr": getattr(cfg, lr), "base_lr": getattr(cfg, lr), "weight_decay": getattr(cfg, wd)}
                for (lr, wd), members in plan.get(opt_name, {}).items()]

    def adam(opt_name: str) -> torch.optim.Adam | None:
        if opt_name not in plan:
            return None
        kwargs = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)
        if cfg.adam_wd > 0:  # AdamW's decay is decoupled: p <- p (1 - lr wd)
            return torch.optim.AdamW(groups(opt_name), weight_decay=cfg.adam_wd, **kwargs)
        return torch.optim.Adam(groups(opt_name), **kwargs)

    muon_kwargs = dict(lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                       ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                       weight_decay=cfg.muon_wd, batched=resolve_switch(cfg.batched_ns, device.type == "cuda"))
    if parallel_muon:
        from pgolf.train.parallel_muon import ParallelMuon  # it imports this module: Muon's step is its base

        muon = ParallelMuon(groups("muon"), **muon_kwargs)
    else:
        muon = Muon(groups("muon"), **muon_kwargs)
    opts = Optimizers(adam_token=adam("adam_token"), muon=muon, adam_scalar=adam("adam_scalar"),
                      adam_head=adam("adam_head"))
    check_one_group_each(model, opts)
    return opts


def check_one_group_each(model: GPT, opts: Optimizers) -> None:
    """Every parameter of model is in exactly one optimizer group: none is silently left
    untrained, none is updated twice. Raises ValueError naming the parameters that are not."""
    names = {id(p): n for n, p in model.named_parameters()}
    where: dict[str, list[str]] = {n: [] for n in names.values()}
    for opt_name in OPTIMIZER_NAMES:
        opt = getattr(opts, opt_name)
        for index, group in enumerate(opt.param_groups if opt is not None else []):
            for p in group["params"]:
                where.setdefault(names.get(id(p), f"<a tensor of shape {tuple(p.shape)} not in the model>"),
                                 []).append(f"{opt_name}[{index}]")
    problems = [f"{n} is in no optimizer group" for n, found in where.items() if not found]
    problems += [f"{n} is in {len(found)} groups ({', '.join(found)})" for n, found in where.items() if len(found) > 1]
    problems += [f"{n} is in {found[0]}" for n, found in where.items() if n.startswith("<")]
    if problems:
        raise ValueError("optimizer groups must hold every parameter exactly once: " + "; ".join(problems))
