"""Stochastic weight averaging (SWA): the uniform mean of snapshots of the weights taken late in
training, evaluated and exported in their place.

After every swa.every-th step (counting steps done, as the #549 record) whose lr multiplier was
below swa.start_scale (in the warmdown), the weights join a running fp32 mean. Once it holds a
snapshot, validation scores the mean; at the end it replaces the weights, so the pre-quant score,
the export and the roundtrip use it (as EMA's shadow does, pgolf.train.averaging). With no
snapshot (the lr never fell below start_scale) the trained weights stay, and the log says so.
The mean and its count are saved in checkpoints, so a resumed run continues exactly.

The #549 record sums such snapshots (every 50 steps below scale 0.2) but never applies them: it
exports its EMA weights (its log says "ema:applying EMA weights"), so its SWA is dead code. Here
the average is applied, and ema and swa together are refused (one average replaces the weights).
"""

from __future__ import annotations

import contextlib

import torch

from pgolf.train.averaging import EMACallback
from pgolf.train.config import SWAConfig


class SWACallback(EMACallback):
    """EMA's weight swapping and export, with a uniform mean of late snapshots as the shadow."""

    name = "swa"

    def __init__(self, cfg: SWAConfig):
        self.every, self.start_scale = cfg.every, cfg.start_scale
        self.shadow: dict[str, torch.Tensor] = {}
        self.count = 0

    def on_train_start(self, trainer) -> None:
        self.shadow = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in self._weights(trainer).items()}
        self.count = 0

    @torch.no_grad()
    def on_step_end(self, trainer) -> None:
        if (trainer.step + 1) % self.every or trainer.lr_scale >= self.start_scale:
            return
        self.count += 1
        weights = self._weights(trainer)
        # The running mean m <- m + (w - m) / n; n = 1 gives the snapshot exactly.
        torch._foreach_lerp_(list(self.shadow.values()), [weights[n].float() for n in self.shadow], 1.0 / self.count)

    @contextlib.contextmanager
    def eval_weights(self, trainer):
        with super().eval_weights(trainer) if self.count else contextlib.nullcontext():
            yield

    def before_export(self, trainer) -> None:
        if not self.count:
            trainer.logger.log(f"swa: no snapshot was taken (the lr multiplier never fell below swa.start_scale="
                               f"{self.start_scale:g} on a multiple of swa.every={self.every}); the trained weights stay")
            return
        self._copy_into(self._weights(trainer), self.shadow)
        trainer.logger.log(f"swa: the weights are replaced by the mean of {self.count} snapshots")

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.count = int(state["count"])
