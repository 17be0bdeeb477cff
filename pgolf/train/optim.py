"""Optimizers: Muon for the block matrices, Adam for embeddings, head and control scalars, in
the groups the parameters' roles (pgolf.model.roles) assign."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pgolf.model.gpt import GPT
from pgolf.model.roles import ROLE_TABLE, Role, lr_key, param_roles
from pgolf.train.config import OptimConfig
from pgolf.train.muon import Muon


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


def weight_decay(cfg: OptimConfig, key: str) -> float:
    """The optim.* weight decay `key` names; embed_wd < 0 follows adam_wd."""
    value = getattr(cfg, key)
    return cfg.adam_wd if key == "embed_wd" and value < 0 else value


def resolve_switch(setting: str, default_on: bool) -> bool:
    """An auto | on | off config switch as a bool, `default_on` deciding auto."""
    return setting == "on" or (setting == "auto" and default_on)


def use_parallel_muon(setting: str, device: torch.device, world_size: int) -> bool:
    """optim.parallel_muon: auto is on for CUDA with several processes; with one process it is plain Muon."""
    if world_size <= 1:
        return False
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def ordered_roles(model: GPT) -> dict[str, Role]:
    """Every trainable parameter's role, the blocks' parameters first: the order the optimizer
    groups have always had (optimizer state in checkpoints is matched by position). Parameters
    with no elements (the skip weights of a layout without skips) have nothing to train."""
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    roles = {name: role for name, role in param_roles(model).items() if sizes[name]}
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
        return [{"params": members, "lr": getattr(cfg, lr), "base_lr": getattr(cfg, lr), "weight_decay": weight_decay(cfg, wd)}
                for (lr, wd), members in plan.get(opt_name, {}).items()]

    def adam(opt_name: str) -> torch.optim.Adam | None:
        if opt_name not in plan:
            return None
        kwargs = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)
        if cfg.adam_wd > 0 or weight_decay(cfg, "embed_wd") > 0:  # AdamW's decay is decoupled: p <- p (1 - lr wd)
            return torch.optim.AdamW(groups(opt_name), weight_decay=cfg.adam_wd, **kwargs)
        return torch.optim.Adam(groups(opt_name), **kwargs)

    muon_kwargs = dict(lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                       ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                       weight_decay=cfg.muon_wd, batched=resolve_switch(cfg.batched_ns, device.type == "cuda"),
                       ns=cfg.muon_ns, row_norm=cfg.muon_row_norm)
    if parallel_muon:
        from pgolf.train.parallel_muon import ParallelMuon  # optional: shipped only when optim.parallel_muon may enable it

        muon = ParallelMuon(groups("muon"), bf16=cfg.parallel_muon_bf16, **muon_kwargs)
    else:
        muon = Muon(groups("muon"), **muon_kwargs)
    opts = Optimizers(adam_token=adam("adam_token"), muon=muon, adam_scalar=adam("adam_scalar"),
                      adam_head=adam("adam_head"))
    check_one_group_each(model, opts)
    return opts


def check_one_group_each(model: GPT, opts: Optimizers) -> None:
    """Every parameter of model (with elements) is in exactly one optimizer group: none is
    silently left untrained, none is updated twice. Raises ValueError naming the parameters that
    are not."""
    names = {id(p): n for n, p in model.named_parameters()}
    where: dict[str, list[str]] = {n: [] for n, p in model.named_parameters() if p.numel()}
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
