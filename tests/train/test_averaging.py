"""EMA of the weights: the recurrence, what validation and the export see, and exact resume."""

import pytest
import torch
from torch import nn

from pgolf.eval.audit import audit_file
from pgolf.runs import read_metrics
from pgolf.train.averaging import EMACallback
from pgolf.train.config import EMAConfig
from pgolf.train.run import run_training
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class FakeTrainer:
    def __init__(self):
        torch.manual_seed(0)
        self.base_model = nn.Linear(4, 3)


def test_shadow_follows_the_records_recurrence_in_fp32():
    trainer, ema = FakeTrainer(), EMACallback(EMAConfig(enabled=True, decay=0.9))
    ema.on_train_start(trainer)
    expected = {k: v.double().clone() for k, v in trainer.base_model.state_dict().items()}
    for step in range(5):
        with torch.no_grad():
            for p in trainer.base_model.parameters():
                p.add_(0.1 * (step + 1))
        ema.on_step_end(trainer)
        for k, v in trainer.base_model.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * v.double()
    for k, shadow in ema.shadow.items():
        assert shadow.dtype == torch.float32
        assert torch.allclose(shadow.double(), expected[k], atol=1e-6)


def test_validation_sees_the_average_and_training_keeps_its_weights():
    trainer, ema = FakeTrainer(), EMACallback(EMAConfig(enabled=True, decay=0.5))
    ema.on_train_start(trainer)
    with torch.no_grad():
        trainer.base_model.weight.add_(1.0)
    ema.on_step_end(trainer)
    live = trainer.base_model.weight.detach().clone()
    with ema.eval_weights(trainer):
        assert torch.equal(trainer.base_model.weight, ema.shadow["weight"])
    assert torch.equal(trainer.base_model.weight, live)


def test_a_run_exports_the_average(tmp_path):
    common = ("train.iterations=6", "train.val_loss_every=0")
    plain = run_training(tiny_config(tmp_path, *common, "run.run_id=plain"), console=False)
    ema = run_training(tiny_config(tmp_path, *common, "ema.enabled=true", "ema.decay=0.5", "run.run_id=ema"),
                       console=False)
    assert plain["status"] == ema["status"] == "done"
    # Same training (losses), different weights scored and exported.
    losses = {r: [e["train_loss"] for e in read_metrics(tmp_path / "runs" / r) if e["event"] == "train"]
              for r in ("plain", "ema")}
    assert losses["plain"] == losses["ema"]
    assert ema["pre_quant"]["val_loss"] != plain["pre_quant"]["val_loss"]
    # The roundtrip scores the artifact reloaded from disk, not the float average: it differs
    # from the pre-quant score, and its receipt passes the audit.
    assert ema["roundtrip"]["val_loss"] != ema["pre_quant"]["val_loss"]
    assert audit_file(tmp_path / "runs" / "ema" / "receipts" / "roundtrip.json").val_bpb == ema["roundtrip"]["val_bpb"]
    log = (tmp_path / "runs" / "ema" / "train.log").read_text()
    assert "ema: the weights are replaced by their moving average (decay 0.5)" in log
    final = torch.load(tmp_path / "runs/ema/checkpoints/step_0000006.pt", weights_only=True)
    shadow = final["callbacks"]["ema"]["shadow"]
    assert all(torch.equal(final["model"][k], shadow[k].to(final["model"][k].dtype)) for k in shadow)


def test_a_resumed_ema_run_equals_an_uninterrupted_one(tmp_path):
    common = ("train.iterations=8", "train.checkpoint_every=3", "train.val_loss_every=0", "ema.enabled=true",
              "ema.decay=0.6")
    straight = run_training(tiny_config(tmp_path, *common, "run.run_id=straight"), console=False)
    run_training(tiny_config(tmp_path, *common, "run.run_id=killed"), interrupt_at_step=5, console=False)
    resumed = run_training(tiny_config(tmp_path), resume=str(tmp_path / "runs" / "killed"), console=False)
    assert resumed["pre_quant"] == straight["pre_quant"] and resumed["roundtrip"] == straight["roundtrip"]


def test_a_checkpoint_with_other_weights_is_refused():
    trainer, ema = FakeTrainer(), EMACallback(EMAConfig(enabled=True))
    ema.on_train_start(trainer)
    with pytest.raises(RuntimeError, match="covers other weights"):
        ema.load_state_dict({"shadow": {"weight": ema.shadow["weight"]}})

