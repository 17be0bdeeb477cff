"""Optimizers: Muon for the block matrices, Adam for embeddings, head and control scalars."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.config import OptimConfig
from pgolf.model import GPT, is_control_param

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon): they push all singular values
# of the normalised update towards ~1 in a handful of iterations.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: Tensor, steps: int, dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7) -> Tensor:
    """Approximate U V^T of the update's SVD with `steps` Newton-Schulz iterations."""
    a, b, c = NS_COEFFS
    x = update.to(dtype)
    x = x / (x.norm() + eps)
    tall = update.size(0) > update.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum + Nesterov, then orthogonalised updates scaled by sqrt(max(1, rows/cols)).

    Under torch.distributed each rank orthogonalises every world_size-th matrix and the
    updates are summed across ranks, so the work is split but the result is identical.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, nesterov: bool = True,
                 ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov))
        self.ns_dtype = ns_dtype
        self.orthogonalize = orthogonalize  # replaced by a torch.compile'd version on CUDA

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=self.ns_dtype)
            offset = 0
            for index, p in enumerate(params):
                if index % world_size == rank and p.grad is not None:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(p.grad)
                    g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    g = self.orthogonalize(g, group["backend_steps"], self.ns_dtype)
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    flat[offset : offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed and world_size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()
        return None


@dataclass
class Optimizers:
    """The optimizer set of one model; every group carries its `base_lr` for scheduling."""

    adam_token: torch.optim.Adam
    muon: Muon
    adam_scalar: torch.optim.Adam
    adam_head: torch.optim.Adam | None = None

    def all(self) -> list[torch.optim.Optimizer]:
        opts = [self.adam_token, self.muon, self.adam_scalar]
        return opts + ([self.adam_head] if self.adam_head is not None else [])

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

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.all()]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.all(), states, strict=True):
            opt.load_state_dict(state)


def muon_momentum_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup of Muon's momentum from muon_momentum_warmup_start to muon_momentum."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def build_optimizers(model: GPT, cfg: OptimConfig, device: torch.device) -> Optimizers:
    block_params = list(model.blocks.named_parameters())
    matrices = [p for name, p in block_params if not is_control_param(name, p)]
    scalars = [p for name, p in block_params if is_control_param(name, p)]
    if model.skip_weights.numel() > 0:
        scalars.append(model.skip_weights)
    fused = device.type == "cuda"  # the fused Adam kernel is CUDA-only

    def adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
        return torch.optim.Adam([{"params": params, "lr": lr, "base_lr": lr}],
                                betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)

    token_lr = cfg.tied_embed_lr if model.lm_head is None else cfg.embed_lr
    muon = Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    for group in muon.param_groups:
        group["base_lr"] = cfg.matrix_lr
    return Optimizers(
        adam_token=adam([model.tok_emb.weight], token_lr),
        muon=muon,
        adam_scalar=adam(scalars, cfg.scalar_lr),
        adam_head=adam([model.lm_head.weight], cfg.head_lr) if model.lm_head is not None else None,
    )
