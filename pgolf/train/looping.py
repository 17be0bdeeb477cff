"""The loop's late start (model.layout=loop with model.loop_start_frac > 0), as #1855: the model
runs its plain U-Net until that fraction of training (of the wall-clock budget when capped, else
of the iterations), then its looped schedule for the rest of training, and for the export's
calibration, evaluation and TTT (GPT.looping is on in any model built from the artifact).

Under torch.compile the switch is a second graph: the warmup compiles both, so the switch
itself costs no compilation inside the budget (without warmup steps it recompiles once there)."""

from __future__ import annotations

from pgolf.train.callbacks import TrainCallback


class LoopSwitch(TrainCallback):
    name = "loop"

    def __init__(self, start_frac: float):
        self.start_frac = start_frac

    def _set(self, trainer, looping: bool) -> None:
        model = trainer.base_model
        if model.looping != looping:
            model.looping = looping
            s = model.schedule if looping else model.schedule.unlooped
            trainer.logger.log(f"loop: {'on' if looping else 'off'} at step {trainer.step}: encoder {list(s.encoder)} "
                               f"decoder {list(s.decoder)}")

    def on_warmup(self, trainer, steps: int) -> None:
        model = trainer.base_model
        model.looping = not model.looping
        for _ in range(steps):
            trainer.train_step(1.0)
        model.looping = not model.looping

    def on_step_start(self, trainer, progress: float) -> None:
        self._set(trainer, progress >= self.start_frac)

    def before_export(self, trainer) -> None:
        self._set(trainer, True)
