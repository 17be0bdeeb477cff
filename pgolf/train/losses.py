"""Softcapped cross-entropy without the whole batch's fp32 logits in memory.

The reference (GPT.forward) computes logits = cap * tanh(hidden @ W^T / cap) in the hidden
dtype for every token, upcasts them to fp32 and calls F.cross_entropy: with 65,536 tokens a
micro-batch and a 1024 vocabulary that is 256 MiB of fp32 logits, plus the bf16 copies and
their gradients. Here tokens go through in chunks: the forward keeps only each token's
log-sum-exp, and the backward recomputes one chunk's logits at a time, so the extra memory is
O(chunk_tokens x vocab). The arithmetic follows the reference: logits and tanh in the compute
dtype (bf16 under CUDA autocast), softmax and losses in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_CHUNK_TOKENS = 8192


def _capped_logits(hidden: Tensor, weight: Tensor, softcap: float) -> Tensor:
    return softcap * _tanh_of_scaled(hidden, weight, softcap)


def _tanh_of_scaled(hidden: Tensor, weight: Tensor, softcap: float) -> Tensor:
    return torch.tanh(F.linear(hidden, weight) / softcap)


class _SoftcappedCrossEntropy(torch.autograd.Function):
    """Per-token losses (fp32) of (N, D) hidden states against an (V, D) head, chunked over N."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float, chunk: int) -> Tensor:
        losses = torch.empty(hidden.size(0), device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(losses)
        for start in range(0, hidden.size(0), chunk):
            end = min(start + chunk, hidden.size(0))
            logits = _capped_logits(hidden[start:end], weight, softcap).float()
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            losses[start:end] = lse[start:end] - logits.gather(1, targets[start:end, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.softcap, ctx.chunk = softcap, chunk
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        softcap, chunk = ctx.softcap, ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.size(0), chunk):
            end = min(start + chunk, hidden.size(0))
            h = hidden[start:end]
            tanh = _tanh_of_scaled(h, weight, softcap)
            capped = softcap * tanh
            # d loss / d capped = softmax - onehot (fp32, as F.cross_entropy), then through the
            # tanh in the compute dtype, as autograd does after the reference's .float().
            grad = torch.exp(capped.float() - lse[start:end, None])
            grad[torch.arange(end - start, device=grad.device), targets[start:end]] -= 1.0
            grad = (grad * grad_losses[start:end, None]).to(capped.dtype)
            grad = grad * (1 - tanh.square())
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.mT @ h).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def softcapped_cross_entropy(hidden: Tensor, head_weight: Tensor, targets: Tensor, softcap: float,
                             reduction: str = "mean", chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Tensor:
    """Cross-entropy (nats, fp32) of cap * tanh(hidden @ head_weight^T / cap) against targets.

    hidden: (..., D) final hidden states; head_weight: (V, D); targets: (...) token ids.
    reduction: "mean" | "sum" | "none" (per-token losses in the targets' shape).
    Under autocast the matmuls run in the autocast dtype, like F.linear in the reference."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    # Cast outside the Function (differentiably, as autocast would) and run it without autocast.
    flat = hidden.reshape(-1, hidden.size(-1)).to(dtype)
    with torch.autocast(device_type, enabled=False):
        losses = _SoftcappedCrossEntropy.apply(flat, head_weight.to(dtype), targets.reshape(-1), float(softcap),
                                               int(chunk_tokens))
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses.view(targets.shape)


def reference_softcapped_cross_entropy(hidden: Tensor, head_weight: Tensor, targets: Tensor, softcap: float,
                                       reduction: str = "mean") -> Tensor:
    """The model's path (GPT.logits + GPT.forward): all logits at once, upcast, F.cross_entropy."""
    logits = _capped_logits(hidden, head_weight.to(hidden.dtype), softcap)
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
    return losses.view(targets.shape) if reduction == "none" else losses


def model_loss(model, input_ids: Tensor, target_ids: Tensor, reduction: str = "mean",
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Tensor:
    """GPT.forward's loss through the chunked path: the model's final hidden states, its output
    head (the tied embedding or lm_head) and its logit softcap."""
    hidden = model.hidden_states(input_ids)
    head = model.tok_emb.weight if model.lm_head is None else model.lm_head.weight
    return softcapped_cross_entropy(hidden, head, target_ids, model.cfg.logit_softcap, reduction, chunk_tokens)


class ChunkedLossModel(nn.Module):
    """A GPT whose forward(input_ids, target_ids, reduction) goes through the chunked loss.

    Wraps the model without copying it: its parameters, hooks and (unprefixed) state dict stay
    the model's own; training, validation and DDP call the wrapper exactly as they call a GPT."""

    def __init__(self, model: nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: Tensor, target_ids: Tensor, reduction: str = "mean") -> Tensor:
        return model_loss(self.model, input_ids, target_ids, reduction, self.chunk_tokens)
