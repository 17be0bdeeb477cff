"""Validation: exact val_loss and tokenizer-agnostic val_bpb over the validation split.

Sums (loss in nats, tokens, bytes) are accumulated in float64 and all-reduced across ranks,
so the reported numbers do not depend on the batch size or the number of processes.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.tokenizer import bits_per_byte, token_bytes


@dataclass
class EvalResult:
    val_loss: float  # mean nats per token
    val_bpb: float
    loss_sum: float  # total nats
    tokens: int
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate_bpb(
    model: nn.Module,
    val_tokens: Tensor,
    luts: tuple[Tensor, Tensor, Tensor],
    seq_len: int,
    batch_tokens: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> EvalResult:
    """Score every target of val_tokens (non-overlapping windows of seq_len).

    val_tokens holds k * seq_len + 1 tokens; window i predicts tokens[i*L+1 : (i+1)*L+1]
    from tokens[i*L : (i+1)*L]. Ranks take contiguous ranges of windows.
    """
    total_windows = (val_tokens.numel() - 1) // seq_len
    if total_windows <= 0:
        raise ValueError(f"validation needs at least seq_len+1={seq_len + 1} tokens, got {val_tokens.numel()}")
    first = total_windows * rank // world_size
    last = total_windows * (rank + 1) // world_size
    if batch_tokens < seq_len:
        raise ValueError(f"the validation batch ({batch_tokens} tokens per rank) must hold at least one sequence of "
                         f"{seq_len}; raise train.val_batch_size (it is split over world size x 8 // world size)")
    windows_per_batch = batch_tokens // seq_len
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss nats, tokens, bytes
    was_training = model.training
    model.eval()
    # no_grad, not inference_mode: tensors cached during evaluation (rotary tables) must stay
    # usable by training steps that follow.
    with torch.no_grad():
        for start in range(first, last, windows_per_batch):
            end = min(start + windows_per_batch, last)
            chunk = val_tokens[start * seq_len : end * seq_len + 1].to(device=device, dtype=torch.int64)
            x = chunk[:-1].view(-1, seq_len)
            y = chunk[1:].view(-1, seq_len)
            with autocast_for(device):
                loss_sum = model(x, y, reduction="sum")
            sums[0] += loss_sum.double()
            sums[1] += y.numel()
            sums[2] += token_bytes(x.reshape(-1), y.reshape(-1), luts).sum(dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    model.train(was_training)
    loss_sum, tokens, nbytes = (float(v) for v in sums.tolist())
    return EvalResult(
        val_loss=loss_sum / tokens,
        val_bpb=bits_per_byte(loss_sum, tokens, nbytes),
        loss_sum=loss_sum,
        tokens=int(tokens),
        bytes=int(nbytes),
    )
