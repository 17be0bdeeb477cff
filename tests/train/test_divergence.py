"""Divergence that stays finite (weights beyond the export's fp16 range, a loss that never moved),
the divergence message, and progress lines off a terminal."""

import math

import torch

from pgolf.train.run import Trainer, run_training
from tests.train.test_train import tiny_config

ABSURD_LR = [f"optim.{k}={{lr}}" for k in ("matrix_lr", "scalar_lr", "embed_lr", "tied_embed_lr", "head_lr")]


def _lr(value: float) -> list[str]:
    return [k.format(lr=value) for k in ABSURD_LR]


def test_absurd_learning_rate_stops_on_weights_beyond_fp16_before_export(tmp_path, capsys):
    # lr 1e6: the loss stays finite, the weights pass 65504 within a few steps.
    cfg = tiny_config(tmp_path, "train.iterations=12", "train.warmdown_iters=0", "train.weight_check_every=3",
                      "run.run_id=big", *_lr(1e6))
    summary = run_training(cfg, console=False)
    assert summary["status"] == "failed" and summary["stop_reason"] == "weights_out_of_range"
    assert summary["steps"] == 3
    err = capsys.readouterr().err
    assert "beyond fp16's 65504" in err and "at step 3" in err and "learning rates are likely too high" in err
    assert "train.checkpoint_every=0" in err
    assert not (tmp_path / "runs/big/model.pgolf").exists()


def test_weights_out_of_range_keep_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_step = Trainer.train_step

    def inflating(self, scale):
        loss = real_step(self, scale)
        if self.step >= 4:  # finite, but beyond fp16: the loss itself stays finite
            with torch.no_grad():
                next(self.base_model.parameters()).mul_(1e7)
        return loss

    monkeypatch.setattr(Trainer, "train_step", inflating)
    cfg = tiny_config(tmp_path, "train.iterations=10", "train.checkpoint_every=2", "train.weight_check_every=1",
                      "run.run_id=inflated")
    summary = run_training(cfg, console=False)
    assert summary["status"] == "failed" and summary["stop_reason"] == "weights_out_of_range"
    err = capsys.readouterr().err
    assert "at step 5" in err and "step_0000004.pt is kept" in err and "train.checkpoint_every=2" in err
    ckpt = torch.load(tmp_path / "runs/inflated/checkpoints/step_0000004.pt", weights_only=True)
    assert all(t.abs().max() <= 65504 for t in ckpt["model"].values())


def test_a_loss_stuck_at_ln_vocab_stops_at_the_stall_check(tmp_path, capsys):
    # lr 1000: the loss falls, then sits at ln(260) for good while the weights stay in range.
    cfg = tiny_config(tmp_path, "train.iterations=60", "train.train_log_every=0", "run.run_id=stuck", *_lr(1000))
    summary = run_training(cfg, console=False)
    assert summary["status"] == "failed" and summary["stop_reason"] == "loss_stalled"
    assert summary["steps"] == 50  # max(train.stall_check_steps=50, 60 // 10)
    err = capsys.readouterr().err
    assert "training loss has not moved" in err and "at step 50" in err and "learning rates are likely too high" in err
    assert not (tmp_path / "runs/stuck/model.pgolf").exists()


def test_stall_rule_spares_a_falling_loss_and_short_or_disabled_checks(tmp_path):
    from pgolf.train.trainer import StallCheck

    cfg = tiny_config(tmp_path, "train.iterations=200", "train.stall_check_steps=20")
    falling = StallCheck(cfg, start_step=0)
    for step in range(1, 21):
        falling.record(5.5 - 0.02 * step)
        assert not falling.due(step) or not falling.stalled()
    assert falling.done
    flat = StallCheck(cfg, start_step=0)
    for step in range(1, 21):
        flat.record(4.0 if step <= 10 else 3.99)  # below ln(260), but it has not moved from its start
    assert flat.due(20) and flat.stalled()
    off = StallCheck(tiny_config(tmp_path, "train.stall_check_steps=0"), start_step=0)
    for step in range(1, 100):
        off.record(math.log(260))
        assert not off.due(step, final=True)


def test_divergence_message_reports_the_real_checkpoint_setting(tmp_path):
    from pgolf.train.trainer import _divergence_message

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    msg = _divergence_message(7, "loss became nan", ckpt_dir, 100)
    assert "train.checkpoint_every=100" in msg and "no checkpoint had been written yet" in msg
    assert "checkpoint_every=0" not in msg
    assert "checkpoints are off" in _divergence_message(7, "loss became nan", ckpt_dir, 0)


def test_progress_lines_off_a_terminal_without_changing_results(tmp_path, capsys):
    quiet = run_training(tiny_config(tmp_path, "train.iterations=4", "train.train_log_every=0",
                                     "train.progress_every_seconds=0", "run.run_id=quiet"), console=True)
    assert "progress: step" not in capsys.readouterr().out
    chatty = run_training(tiny_config(tmp_path, "train.iterations=4", "train.train_log_every=0",
                                      "train.progress_every_seconds=0.000001", "run.run_id=chatty"), console=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("progress: step")]
    assert len(lines) == 4 and lines[-1].startswith("progress: step 4/4 loss ")
    assert all(" tokens/s " in line and " eta " in line for line in lines)
    assert "progress: step 4/4" in (tmp_path / "runs/chatty/train.log").read_text()
    assert chatty["roundtrip"] == quiet["roundtrip"]


def test_weight_check_skips_empty_parameters():
    """A layout without skips has an empty skip_weights; the check must not fail on it."""
    from pgolf.model.config import ModelConfig
    from pgolf.model.gpt import GPT
    from pgolf.train.trainer import weight_abs_max

    model = GPT(ModelConfig(vocab_size=64, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2))
    assert model.skip_weights.numel() == 0 and 0 < weight_abs_max(model) < 10
