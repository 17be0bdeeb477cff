"""Validation scoring: exact val_loss and tokenizer-agnostic val_bpb, standard or sliding-window.

Targets are token positions 1..T of the validation stream (T = len - 1); target t is predicted
from tokens [start, t) of the window that scores it. Windows are all `seq_len` long (shorter
only when the stream is) and are described by the last target they score: the first ends at
min(seq_len, T), each next one `stride` later, the last at T. A window scores the targets after
the previous window's end, so every target is scored exactly once, with at least
seq_len - stride tokens of context (all of it in the first window). stride == seq_len is the
standard (official) evaluation.

Extra cut points (test-time-training chunk boundaries) add window ends, so a chunk's targets
are scored by windows ending inside the chunk. Sums (nats, tokens, bytes) are float64 and
all-reduced across ranks: results do not depend on batch size or process count.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.data.tokenizer import bits_per_byte, token_bytes


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

@dataclass(frozen=True)
class Window:
    start: int  # first input token
    end: int  # last target (inputs are tokens[start:end], targets tokens[start+1:end+1])
    first_scored: int  # first target this window scores

    @property
    def scored(self) -> int:
        return self.end - self.first_scored + 1


def window_plan(total_targets: int, seq_len: int, stride: int, lo: int = 0, hi: int | None = None,
                cuts: tuple[int, ...] = ()) -> list[Window]:
    """Windows scoring targets lo+1..hi (default all, 1..total_targets) exactly once.

    The window ends follow the global schedule min(seq_len, T), +stride, ..., plus `hi` and any
    `cuts`, so scoring a sub-range gives the same windows as scoring everything with those cuts.
    """
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be within 1..seq_len={seq_len}, got {stride}")
    hi = total_targets if hi is None else hi
    if not 0 <= lo < hi <= total_targets:
        raise ValueError(f"target range ({lo}, {hi}] is outside 1..{total_targets}")
    first_end = min(seq_len, total_targets)
    # Global schedule ends inside (lo, hi], then the range end and the cuts inside it.
    if first_end > lo:
        k0 = 0
    else:
        k0 = (lo - first_end) // stride + 1
    ends = set(range(first_end + k0 * stride, hi + 1, stride))
    ends.add(hi)
    ends.update(c for c in cuts if lo < c < hi)
    windows, prev = [], lo
    for end in sorted(ends):
        start = max(end - seq_len, 0)
        windows.append(Window(start, end, prev + 1))
        prev = end
    return windows


@dataclass
class ScoreSums:
    """Exact sums over scored targets: nats (float64), token count, byte count."""

    loss_sum: float = 0.0
    tokens: int = 0
    bytes: int = 0

    def add(self, other: "ScoreSums") -> None:
        self.loss_sum += other.loss_sum
        self.tokens += other.tokens
        self.bytes += other.bytes


def score_windows(model: nn.Module, tokens: Tensor, windows: list[Window], luts, device: torch.device,
                  batch_windows: int, rank: int = 0, world_size: int = 1) -> ScoreSums:
    """Score the given windows (ranks take contiguous shares) and all-reduce the sums.

    luts: the tokenizer's byte tables (ByteLUTs.to_torch), or a byte sidecar aligned with tokens
    (pgolf.data.shards.validation_bytes)."""
    share = windows[len(windows) * rank // world_size: len(windows) * (rank + 1) // world_size]
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        # Same-length windows batch together; only a stream shorter than seq_len makes others.
        by_len: dict[int, list[Window]] = {}
        for w in share:
            by_len.setdefault(w.end - w.start, []).append(w)
        for length, group in by_len.items():
            for i in range(0, len(group), batch_windows):
                batch = group[i: i + batch_windows]
                idx = torch.tensor([w.start for w in batch])[:, None] + torch.arange(length + 1)[None, :]
                seqs = tokens[idx].to(device=device, dtype=torch.int64, non_blocking=True)
                x, y = seqs[:, :-1], seqs[:, 1:]
                with autocast_for(device):
                    losses = model(x, y, reduction="none").view(len(batch), length)
                # Score only each window's last `scored` targets.
                first = torch.tensor([w.first_scored - w.start - 1 for w in batch], device=device)
                mask = torch.arange(length, device=device)[None, :] >= first[:, None]
                sums[0] += losses.double()[mask].sum()
                sums[1] += mask.sum()
                if isinstance(luts, Tensor):  # a byte sidecar: the bytes of each target position
                    nbytes = luts[idx[:, 1:]].to(device=device, non_blocking=True)[mask]
                else:
                    nbytes = token_bytes(x[mask], y[mask], luts)
                sums[2] += nbytes.sum(dtype=torch.float64)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    model.train(was_training)
    loss_sum, count, nbytes = sums.tolist()
    return ScoreSums(loss_sum, int(count), int(nbytes))


def to_result(sums: ScoreSums) -> EvalResult:
    return EvalResult(val_loss=sums.loss_sum / sums.tokens, val_bpb=bits_per_byte(sums.loss_sum, sums.tokens, sums.bytes),
                      loss_sum=sums.loss_sum, tokens=sums.tokens, bytes=sums.bytes)


def evaluate_bpb(
    model: nn.Module,
    val_tokens: Tensor,
    luts: tuple[Tensor, Tensor, Tensor] | Tensor,
    seq_len: int,
    batch_tokens: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    stride: int | None = None,
) -> EvalResult:
    """Score every target of val_tokens; stride None (= seq_len) is the standard evaluation.

    batch_tokens is per rank: windows are batched batch_tokens // seq_len at a time."""
    if val_tokens.numel() < 2:
        raise ValueError(f"validation needs at least 2 tokens, got {val_tokens.numel()}")
    if batch_tokens < seq_len:
        raise ValueError(f"the validation batch ({batch_tokens} tokens per rank) must hold at least one sequence of "
                         f"{seq_len}; raise train.val_batch_size (it is split over world size x 8 // world size)")
    targets = val_tokens.numel() - 1
    if stride is None:  # the official evaluation: whole windows only
        targets = targets // seq_len * seq_len
        if targets == 0:
            raise ValueError(f"validation needs at least seq_len+1={seq_len + 1} tokens, got {val_tokens.numel()}")
    windows = window_plan(targets, seq_len, stride or seq_len)
    sums = score_windows(model, val_tokens, windows, luts, device, batch_tokens // seq_len, rank, world_size)
    return to_result(sums)
