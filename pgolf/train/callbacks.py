"""Training callbacks: techniques that act around the optimizer steps rather than inside the
model (quantization-aware training, weight averaging: EMA, SWA, the loop's late start).

A callback is one module with one class; it is switched on by its own config section (the loop:
by model.layout=loop with model.loop_start_frac > 0), listed
once in CALLBACKS below, and built by pgolf.train.trainer.build_callbacks. Its module is imported
only when its switch is on, so a shipped train_gpt.py carries it only then (pgolf.train.shipping
reads CALLBACKS).
"""

from __future__ import annotations

import contextlib
from typing import Callable


class TrainCallback:
    """The hooks a technique may use; each does nothing unless overridden.

    - on_train_start(trainer): once, after the model and optimizers exist (before warmup).
    - on_warmup(trainer, steps): after the compile warmup's steps, before its state is restored:
      run more warmup steps (trainer.train_step) in any other form the callback gives the model.
    - on_step_start(trainer, progress): before each optimizer step; progress is the fraction
      of training done (of the wall-clock budget when capped, else of the iterations).
    - on_step_end(trainer): after each optimizer step.
    - eval_weights(trainer): a context in which validation scores the weights it should.
    - before_export(trainer): once after the last step; leaves in the model the weights to export.
    - state_dict() / load_state_dict(state): what a checkpoint keeps for an exact resume.
    """

    name = "callback"

    def on_train_start(self, trainer) -> None:
        pass

    def on_warmup(self, trainer, steps: int) -> None:
        pass

    def on_step_start(self, trainer, progress: float) -> None:
        pass

    def on_step_end(self, trainer) -> None:
        pass

    @contextlib.contextmanager
    def eval_weights(self, trainer):
        yield

    def before_export(self, trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# name -> (module, whether a config switches it on), in the order the callbacks run.
CALLBACKS: dict[str, tuple[str, Callable]] = {
    "qat": ("pgolf.train.qat", lambda cfg: cfg.qat.enabled),
    "ema": ("pgolf.train.averaging", lambda cfg: cfg.ema.enabled),
    "swa": ("pgolf.train.swa", lambda cfg: cfg.swa.enabled),
    "loop": ("pgolf.train.looping", lambda cfg: cfg.model.layout == "loop" and cfg.model.loop_start_frac > 0),
}
