"""Weight averaging: an exponential moving average (EMA) of the weights, evaluated and exported
in their place.

An fp32 shadow of the whole state dict starts from the initial weights and follows every
optimizer step as ``ema <- decay * ema + (1 - decay) * w`` (the records' #549 form, decay 0.997).
Validation during training scores the shadow; at the end it replaces the weights, so the
pre-quantization score, the export and the roundtrip all see the averaged model. The shadow is
saved in checkpoints, so a resumed run continues it exactly.
"""

from __future__ import annotations

import contextlib

import torch

from pgolf.train.callbacks import TrainCallback
from pgolf.train.config import EMAConfig


class EMACallback(TrainCallback):
    name = "ema"

    def __init__(self, cfg: EMAConfig):
        self.decay = cfg.decay
        self.shadow: dict[str, torch.Tensor] = {}

    def _weights(self, trainer) -> dict[str, torch.Tensor]:
        return {name: t for name, t in trainer.base_model.state_dict().items() if t.is_floating_point()}

    def on_train_start(self, trainer) -> None:
        self.shadow = {name: t.detach().float().clone() for name, t in self._weights(trainer).items()}

    @torch.no_grad()
    def on_step_end(self, trainer) -> None:
        weights = self._weights(trainer)
        shadows = list(self.shadow.values())
        torch._foreach_mul_(shadows, self.decay)
        torch._foreach_add_(shadows, [weights[name].float() for name in self.shadow], alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def eval_weights(self, trainer):
        weights = self._weights(trainer)
        saved = {name: t.detach().clone() for name, t in weights.items()}
        self._copy_into(weights, self.shadow)
        try:
            yield
        finally:
            self._copy_into(weights, saved)

    def before_export(self, trainer) -> None:
        self._copy_into(self._weights(trainer), self.shadow)
        trainer.logger.log(f"ema: the weights are replaced by their moving average (decay {self.decay})")

    @staticmethod
    @torch.no_grad()
    def _copy_into(weights: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
        for name, t in weights.items():
            t.copy_(source[name])  # copy_ casts to the weight's dtype (bf16 embeddings on CUDA)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise RuntimeError(f"the checkpoint's {self.name} average covers other weights than this model's "
                               f"({sorted(set(state['shadow']) ^ set(self.shadow))[:4]} ...); resume with the config "
                               "the checkpoint was written with")
        with torch.no_grad():
            for name, t in state["shadow"].items():
                self.shadow[name].copy_(t)
