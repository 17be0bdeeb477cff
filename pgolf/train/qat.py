"""Quantization-aware training: the linear layers see their weights as the export will store them.

A training callback (QATCallback); two modes, switched on late in training (`qat.start_frac` of
the wall-clock budget, or of the iterations when there is no cap):
- "ste": straight-through fake quantization, w + (quant(w) - w).detach(): the forward pass uses
  per-row symmetric intN weights (pgolf.compress.quantizers.rows, the export's quantizer without
  its clip search), the gradient flows to w unchanged;
- "noise": w + u * scale with u ~ U(-1/2, 1/2) drawn every step: rounding error as noise, for
  recurrent cores where hard rounding error compounds through the loop.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import Tensor

from pgolf.compress.quantizers.rows import dequantize_rows, quantize_rows, row_scales
from pgolf.model.layers import CastedLinear
from pgolf.model.roles import qat_eligible_names
from pgolf.train.callbacks import TrainCallback
from pgolf.train.config import QATConfig


def fake_quantize(w: Tensor, bits: int, mode: str) -> Tensor:
    """``w`` as the export's per-row intN stores it (max-abs clip, fp16 scale; no clip search,
    which would cost a dozen roundings per step), with the gradient passed straight through;
    or, in "noise" mode, ``w`` plus uniform noise of one such step."""
    if mode == "noise":
        scale = row_scales(w.detach(), bits, clip_search=False).to(w.dtype)
        return w + (torch.rand_like(w) - 0.5) * scale[:, None]
    q, scale = quantize_rows(w.detach(), bits, clip_search=False)
    return w + (dequantize_rows(q, scale).to(w.dtype) - w).detach()


def qat_layers(model: torch.nn.Module, pattern: str) -> list[tuple[str, CastedLinear]]:
    """The linear layers whose weight's role allows QAT (pgolf.model.roles) and matches pattern."""
    eligible = qat_eligible_names(model)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, CastedLinear) and name + ".weight" in eligible and re.search(pattern, name + ".weight")]


def enable_qat(model: torch.nn.Module, bits: int, mode: str, pattern: str) -> int:
    """Turn fake quantization on for the matching linear layers; returns how many."""
    if mode not in ("ste", "noise"):
        raise ValueError(f"qat.mode must be 'ste' or 'noise', got '{mode}'")
    layers = qat_layers(model, pattern)
    for _, layer in layers:
        layer.weight_transform = lambda w, b=bits, m=mode: fake_quantize(w, b, m)
    return len(layers)


def disable_qat(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.weight_transform = None


@contextlib.contextmanager
def qat_suspended(model: torch.nn.Module):
    """Plain weights inside the block (evaluation), the hooks restored after it."""
    saved = {m: m.weight_transform for m in model.modules() if isinstance(m, CastedLinear)}
    for m in saved:
        m.weight_transform = None
    try:
        yield
    finally:
        for m, transform in saved.items():
            m.weight_transform = transform


class QATCallback(TrainCallback):
    """Fake quantization switched on once `qat.start_frac` of training has passed; validation
    scores the plain weights; the export quantizes for real."""

    name = "qat"

    def __init__(self, cfg: QATConfig):
        self.cfg = cfg
        self.active = False

    def on_train_start(self, trainer) -> None:
        """Refuse a pattern that selects nothing QAT may touch; name layers it matches but skips."""
        model, pattern = trainer.base_model, self.cfg.pattern
        matching = [name for name, m in model.named_modules()
                    if isinstance(m, CastedLinear) and re.search(pattern, name + ".weight")]
        chosen = {name for name, _ in qat_layers(model, pattern)}
        if not chosen:
            raise ValueError(f"qat.pattern={pattern!r} matches no linear layer whose role allows quantization-aware "
                             f"training (the blocks' matrices, pgolf.model.roles); fix the pattern or set "
                             f"qat.enabled=false")
        skipped = [name for name in matching if name not in chosen]
        if skipped:
            trainer.logger.log(f"qat: qat.pattern also matches {', '.join(skipped)}, whose role is not "
                               f"quantization-aware trained; they keep their plain weights")

    def on_step_start(self, trainer, progress: float) -> None:
        if self.active or progress < self.cfg.start_frac:
            return
        n = enable_qat(trainer.base_model, self.cfg.bits, self.cfg.mode, self.cfg.pattern)
        self.active = True
        trainer.logger.log(f"qat: {self.cfg.mode} int{self.cfg.bits} on {n} linear layers from step {trainer.step}")
        trainer.logger.event("qat", step=trainer.step, layers=n, bits=self.cfg.bits, mode=self.cfg.mode)

    def eval_weights(self, trainer):
        return qat_suspended(trainer.base_model)

    def before_export(self, trainer) -> None:
        disable_qat(trainer.base_model)
