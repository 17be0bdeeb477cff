"""SWA of the weights: which steps are collected, the uniform mean, what validation and the
export see, exact resume, and the refusal to combine it with EMA."""

import pytest
import torch
from torch import nn

from pgolf.config import ConfigError
from pgolf.config.resolve import resolve_config
from pgolf.runs import read_metrics
from pgolf.train.config import SWAConfig
from pgolf.train.run import run_training
from pgolf.train.swa import SWACallback
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class FakeTrainer:
    def __init__(self):
        torch.manual_seed(0)
        self.base_model = nn.Linear(4, 3)
        self.step, self.lr_scale = 0, 1.0
        self.lines = []
        self.logger = self

    def log(self, line):
        self.lines.append(line)


def _train(trainer, swa, scales):
    """Steps with these lr multipliers; returns the weights after each step (1-based step count)."""
    after = {}
    for scale in scales:
        with torch.no_grad():
            for p in trainer.base_model.parameters():
                p.add_(torch.randn_like(p))
        trainer.lr_scale = scale
        swa.on_step_end(trainer)  # before the step count moves on, as run_loop calls it
        trainer.step += 1
        after[trainer.step] = {k: v.clone() for k, v in trainer.base_model.state_dict().items()}
    return after


def test_the_mean_of_the_snapshots_every_n_steps_below_the_scale():
    trainer, swa = FakeTrainer(), SWACallback(SWAConfig(enabled=True, every=2, start_scale=0.5))
    swa.on_train_start(trainer)
    # Step counts 1..8; collected: even counts whose step ran below 0.5, i.e. 4, 6, 8 (not 2: scale 0.9).
    after = _train(trainer, swa, [1.0, 0.9, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05])
    assert swa.count == 3
    for name, mean in swa.shadow.items():
        assert mean.dtype == torch.float32
        assert torch.allclose(mean, sum(after[s][name] for s in (4, 6, 8)) / 3, atol=1e-6)


def test_validation_sees_the_mean_once_there_is_one_and_the_export_gets_it():
    trainer, swa = FakeTrainer(), SWACallback(SWAConfig(enabled=True, every=1, start_scale=0.5))
    swa.on_train_start(trainer)
    _train(trainer, swa, [1.0])
    live = trainer.base_model.weight.detach().clone()
    with swa.eval_weights(trainer):  # no snapshot yet: the live weights
        assert torch.equal(trainer.base_model.weight, live)
    _train(trainer, swa, [0.4, 0.3])
    live = trainer.base_model.weight.detach().clone()
    with swa.eval_weights(trainer):
        assert torch.equal(trainer.base_model.weight, swa.shadow["weight"])
    assert torch.equal(trainer.base_model.weight, live)
    swa.before_export(trainer)
    assert torch.equal(trainer.base_model.weight, swa.shadow["weight"])
    assert trainer.lines == ["swa: the weights are replaced by the mean of 2 snapshots"]


def test_without_a_snapshot_the_trained_weights_stay():
    trainer, swa = FakeTrainer(), SWACallback(SWAConfig(enabled=True, every=1, start_scale=0.2))
    swa.on_train_start(trainer)
    _train(trainer, swa, [1.0, 0.5])
    live = trainer.base_model.weight.detach().clone()
    swa.before_export(trainer)
    assert torch.equal(trainer.base_model.weight, live) and "no snapshot was taken" in trainer.lines[0]


def test_a_run_exports_the_mean(tmp_path):
    # 8 iterations, a 4-step warmdown: the steps ending at counts 6, 7, 8 run below 0.8; every=2 takes 6 and 8.
    common = ("train.iterations=8", "train.warmdown_iters=4", "train.val_loss_every=0")
    plain = run_training(tiny_config(tmp_path, *common, "run.run_id=plain"), console=False)
    swa = run_training(tiny_config(tmp_path, *common, "swa.enabled=true", "swa.every=2", "swa.start_scale=0.8",
                                   "run.run_id=swa"), console=False)
    assert plain["status"] == swa["status"] == "done"
    losses = {r: [e["train_loss"] for e in read_metrics(tmp_path / "runs" / r) if e["event"] == "train"]
              for r in ("plain", "swa")}
    assert losses["plain"] == losses["swa"]  # the same training, other weights scored and exported
    assert swa["pre_quant"]["val_loss"] != plain["pre_quant"]["val_loss"]
    assert "swa: the weights are replaced by the mean of 2 snapshots" in (tmp_path / "runs/swa/train.log").read_text()
    final = torch.load(tmp_path / "runs/swa/checkpoints/step_0000008.pt", weights_only=True)
    state = final["callbacks"]["swa"]
    assert state["count"] == 2
    assert all(torch.equal(final["model"][k], state["shadow"][k].to(final["model"][k].dtype)) for k in state["shadow"])


def test_a_resumed_swa_run_equals_an_uninterrupted_one(tmp_path):
    # The lr multiplier falls below 1 from count 4: snapshots at 4 (checkpointed), 5 (cut there) and 6.
    common = ("train.iterations=6", "train.warmdown_iters=4", "train.checkpoint_every=4", "train.val_loss_every=0",
              "swa.enabled=true", "swa.every=1", "swa.start_scale=1.0")
    straight = run_training(tiny_config(tmp_path, *common, "run.run_id=straight"), console=False)
    run_training(tiny_config(tmp_path, *common, "run.run_id=killed"), interrupt_at_step=5, console=False)
    resumed = run_training(tiny_config(tmp_path), resume=str(tmp_path / "runs" / "killed"), console=False)
    assert resumed["pre_quant"] == straight["pre_quant"] and resumed["roundtrip"] == straight["roundtrip"]
    assert "mean of 3 snapshots" in (tmp_path / "runs/killed/train.log").read_text()


def test_ema_and_swa_together_are_refused():
    with pytest.raises(ConfigError, match="ema.enabled and swa.enabled both replace the weights"):
        resolve_config(None, ["ema.enabled=true", "swa.enabled=true"], env={})
    with pytest.raises(ConfigError, match="swa.every must be positive"):
        resolve_config(None, ["swa.every=0"], env={})
