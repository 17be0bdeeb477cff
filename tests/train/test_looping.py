"""The loop's late start (pgolf.train.looping) in a CPU training run: the compile warmup runs both
forms, training runs the plain U-Net until model.loop_start_frac of the iterations and the looped
order after, and everything after training (validation, export roundtrip, `pgolf eval`) loops."""

from __future__ import annotations

import pytest
import torch

from pgolf.eval.run import EvalOptions, run_eval
from pgolf.model.gpt import GPT
from pgolf.train.run import run_training
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

LOOP = ["model.layout=loop", "model.loop_start=1", "model.loop_end=1", "model.loop_passes=2"]


def spy_on_forward(monkeypatch) -> list[tuple[bool, bool]]:
    """(gradients on, model.looping) of every forward pass."""
    calls, forward = [], GPT.hidden_states

    def spied(self, input_ids):
        calls.append((torch.is_grad_enabled(), self.looping))
        return forward(self, input_ids)

    monkeypatch.setattr(GPT, "hidden_states", spied)
    return calls


def test_the_loop_switches_on_at_its_fraction_and_stays_on(tmp_path, monkeypatch):
    calls = spy_on_forward(monkeypatch)
    cfg = tiny_config(tmp_path, *LOOP, "model.loop_start_frac=0.5", "train.iterations=6", "train.val_loss_every=0",
                      "train.checkpoint_every=0", "run.run_id=loop")
    summary = run_training(cfg, console=False)
    assert summary["status"] == "done"
    accum = 8  # micro-batches per step on one process
    training = [looping for grad, looping in calls if grad]
    # warmup: 2 steps looped (the model's default), 2 plain; then steps 0-2 plain (progress 0, 1/6, 2/6), 3-5 looped
    assert training == [True] * 2 * accum + [False] * 2 * accum + [False] * 3 * accum + [True] * 3 * accum
    after = calls[len(training):]
    assert after and all(not grad and looping for grad, looping in after)  # validation and roundtrip loop
    log = (tmp_path / "runs" / "loop" / "train.log").read_text()
    assert "loop: off at step 0: encoder [0] decoder [1, 2]" in log
    assert "loop: on at step 3: encoder [0, 1] decoder [1, 2]" in log
    # `pgolf eval` builds a fresh model from the artifact: it loops, and scores what the roundtrip scored.
    calls.clear()
    result = run_eval(str(tmp_path / "runs" / "loop"), EvalOptions(), log=lambda *_: None)
    assert calls and all(looping for _, looping in calls)
    assert result["val_loss"] == pytest.approx(summary["roundtrip"]["val_loss"], rel=1e-5)


def test_a_run_ending_before_the_fraction_still_exports_the_loop(tmp_path, monkeypatch):
    calls = spy_on_forward(monkeypatch)
    cfg = tiny_config(tmp_path, *LOOP, "model.loop_start_frac=1.0", "train.iterations=2", "train.val_loss_every=0",
                      "train.warmup_steps=0")
    assert run_training(cfg, console=False)["status"] == "done"
    assert [looping for grad, looping in calls if grad] == [False] * 16
    assert all(looping for grad, looping in calls if not grad)
