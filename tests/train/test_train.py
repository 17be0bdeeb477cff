"""End-to-end training runs on CPU: run directories, resume, divergence, bad input, oracle."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgolf.compress.container import read_artifact
from pgolf.eval.audit import audit_file
from pgolf.cli import main as cli_main
from pgolf.config.resolve import resolve_config
from pgolf.runs import RunError, read_metrics
from pgolf.data.tokenizer import TokenizerError
from pgolf.train.run import Trainer, run_training

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fineweb_sp1024_sample"

TINY_MODEL = ["model.num_layers=3", "model.model_dim=32", "model.num_heads=2", "model.num_kv_heads=1"]
TINY_TRAIN = ["train.train_batch_tokens=1024", "train.train_seq_len=64", "train.val_batch_size=4096",
              "train.max_wallclock_seconds=0", "train.warmup_steps=2", "train.train_log_every=1"]


def synthetic_overrides(tmp_path: Path) -> list[str]:
    return ["data.source=synthetic", f"data.data_path={tmp_path / 'corpus'}", "data.tokenizer_path=byte260",
            "data.train_pattern=synthetic_train_*.bin", "data.val_pattern=synthetic_val_*.bin",
            "data.synthetic_train_tokens=65536", "data.synthetic_val_tokens=4097", "model.vocab_size=260",
            f"run.runs_dir={tmp_path / 'runs'}"]


def tiny_config(tmp_path: Path, *extra: str):
    cfg, _ = resolve_config(None, synthetic_overrides(tmp_path) + TINY_MODEL + TINY_TRAIN + list(extra), env={})
    return cfg


def test_run_directory_is_complete(tmp_path):
    cfg = tiny_config(tmp_path, "train.iterations=6", "train.val_loss_every=3", "train.checkpoint_every=3")
    summary = run_training(cfg, console=False)
    run_dir = tmp_path / "runs" / summary["run_id"]
    assert summary["status"] == "done" and summary["steps"] == 6
    for name in ("config.json", "metrics.jsonl", "train.log", "summary.json", "model.pgolf"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt") if "opt" not in p.name) == [
        "step_0000003.pt", "step_0000006.pt"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["config"]["model"]["num_layers"] == 3
    events = [e["event"] for e in read_metrics(run_dir)]
    assert events.count("train") == 6 and "val" in events and events[-1] == "final"
    log = (run_dir / "train.log").read_text()
    assert "final_roundtrip_exact val_loss:" in log and "total:" in log
    # Accounted model bytes are the artifact file's length; the roundtrip is scored from that file.
    assert summary["size"]["model_bytes"] == (run_dir / "model.pgolf").stat().st_size
    qdict, meta = read_artifact(run_dir / "model.pgolf")
    assert meta["run_id"] == summary["run_id"] and "tok_emb.weight" in qdict
    assert abs(summary["roundtrip"]["val_bpb"] - summary["pre_quant"]["val_bpb"]) < 0.05
    # The reported roundtrip number carries a receipt that the audit accepts.
    report = audit_file(run_dir / "receipts" / "roundtrip.json")
    assert report.val_bpb == summary["roundtrip"]["val_bpb"] and report.updates == 0


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared FineWeb sample not present")
def test_short_run_on_fineweb_sample(tmp_path, capsys):
    code = cli_main(["train", "--data", str(SHARED), *TINY_MODEL, *TINY_TRAIN, "train.iterations=4",
                     "train.val_max_tokens=8192", f"run.runs_dir={tmp_path}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "tokenizer fineweb_1024_bpe" in out and "roundtrip" in out
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # beside ledger.sqlite
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["val_tokens_total"] == 392_384
    assert json.loads((run_dir / "config.json").read_text())["config"]["model"]["vocab_size"] == 1024


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    common = ("train.iterations=8", "train.checkpoint_every=3", "train.warmdown_iters=4", "train.val_loss_every=0")
    straight = run_training(tiny_config(tmp_path, *common, "run.run_id=straight"), console=False)
    killed = run_training(tiny_config(tmp_path, *common, "run.run_id=killed"), interrupt_at_step=5, console=False)
    assert killed["status"] == "interrupted" and killed["steps"] == 5
    resumed = run_training(tiny_config(tmp_path), resume=str(tmp_path / "runs" / "killed"), console=False)
    assert resumed["status"] == "done" and resumed["steps"] == 8
    assert resumed["pre_quant"]["val_loss"] == straight["pre_quant"]["val_loss"]
    assert resumed["roundtrip"]["val_bpb"] == straight["roundtrip"]["val_bpb"]
    a = torch.load(tmp_path / "runs/straight/checkpoints/step_0000008.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "runs/killed/checkpoints/step_0000008.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    train_losses = {e["step"]: e["train_loss"] for e in read_metrics(tmp_path / "runs/straight") if e["event"] == "train"}
    resumed_losses = {e["step"]: e["train_loss"] for e in read_metrics(tmp_path / "runs/killed") if e["event"] == "train"}
    assert resumed_losses == train_losses
    with pytest.raises(RunError, match="already finished"):
        run_training(tiny_config(tmp_path), resume=str(tmp_path / "runs" / "killed"), console=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_step = Trainer.train_step

    def poisoned(self, scale):
        loss = real_step(self, scale)
        return loss * float("nan") if self.step >= 4 else loss

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    cfg = tiny_config(tmp_path, "train.iterations=10", "train.checkpoint_every=2", "run.run_id=diverged")
    summary = run_training(cfg, console=False)
    assert summary["status"] == "failed" and summary["stop_reason"] == "non_finite_loss"
    err = capsys.readouterr().err
    assert "loss became nan at step 5" in err and "step_0000004.pt is kept" in err
    ckpts = sorted(p.name for p in (tmp_path / "runs/diverged/checkpoints").glob("step_*.pt") if "opt" not in p.name)
    assert ckpts == ["step_0000002.pt", "step_0000004.pt"]
    assert not (tmp_path / "runs/diverged/model.pgolf").exists()
    ckpt = torch.load(tmp_path / "runs/diverged/checkpoints/step_0000004.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_existing_run_directory_is_never_overwritten(tmp_path):
    cfg = tiny_config(tmp_path, "train.iterations=1", "run.run_id=same")
    run_training(cfg, console=False)
    before = (tmp_path / "runs/same/summary.json").read_text()
    with pytest.raises(RunError, match="already exists and is never overwritten"):
        run_training(tiny_config(tmp_path, "train.iterations=1", "run.run_id=same"), console=False)
    assert (tmp_path / "runs/same/summary.json").read_text() == before


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared FineWeb sample not present")
def test_vocab_mismatch_is_explained(tmp_path):
    cfg, _ = resolve_config(None, [f"data.data_path={SHARED}", f"data.tokenizer_path={SHARED}/fineweb_1024_bpe.model",
                                   "model.vocab_size=512", f"run.runs_dir={tmp_path}", *TINY_MODEL, *TINY_TRAIN], env={})
    with pytest.raises(TokenizerError, match="vocabulary 1024 but model.vocab_size=512"):
        run_training(cfg, console=False)


def test_missing_tokenizer_and_shards_are_explained(tmp_path, capsys):
    code = cli_main(["train", "--config", "baseline", f"data.data_path={tmp_path}/nowhere",
                     f"data.tokenizer_path={tmp_path}/nope.model", f"run.runs_dir={tmp_path}/runs"])
    assert code == 1
    assert "tokenizer not found" in capsys.readouterr().err


def test_unknown_key_on_the_command_line(capsys):
    assert cli_main(["train", "model.num_layer=3"]) == 2
    assert "did you mean 'num_layers'" in capsys.readouterr().err


def test_synthetic_oracle_bounds_the_score(tmp_path):
    """Training moves val_bpb towards the source's entropy rate, never below it (test (a))."""
    cfg = tiny_config(tmp_path, "train.iterations=40", "train.val_loss_every=0", "model.model_dim=64",
                      "model.num_heads=4", "model.num_kv_heads=2", "train.warmup_steps=0",
                      "data.synthetic_val_tokens=32769")
    summary = run_training(cfg, console=False)
    meta = json.loads((tmp_path / "corpus" / "synthetic.json").read_text())
    entropy = meta["entropy_rate_bits"]
    uniform = math.log2(260)
    final = summary["pre_quant"]["val_bpb"]
    assert final < entropy + 0.6 * (uniform - entropy)  # clearly learned the source
    # Sampling noise of a 32K-byte estimate is ~0.01 bits; a bpb far below the rate is a byte-count bug.
    assert final > entropy - 0.03
    assert summary["roundtrip"]["val_bpb"] > entropy - 0.03


def test_two_process_ddp_matches_one_process(tmp_path):
    """torchrun with 2 gloo ranks (grad accumulation 4) gives the 1-process (accumulation 8) result."""
    base = ["train", *synthetic_overrides(tmp_path), *TINY_MODEL, *TINY_TRAIN, "train.iterations=4",
            "train.val_loss_every=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    subprocess.run([sys.executable, "-m", "pgolf", *base, "run.run_id=one"], check=True, env=env)
    subprocess.run([sys.executable, "-m", "pgolf", *base, "run.run_id=two", "--nproc", "2"], check=True, env=env)
    one = json.loads((tmp_path / "runs/one/summary.json").read_text())
    two = json.loads((tmp_path / "runs/two/summary.json").read_text())
    assert two["status"] == "done"
    assert two["pre_quant"]["val_loss"] == pytest.approx(one["pre_quant"]["val_loss"], abs=1e-4)
    assert two["pre_quant"]["bytes"] == one["pre_quant"]["bytes"]


@pytest.mark.slow
def test_compiled_path_matches_eager(tmp_path):
    """train.compile=on (the CUDA path's torch.compile, here on CPU) compiles with fullgraph and
    trains to the same losses as eager."""
    eager = run_training(tiny_config(tmp_path, "train.iterations=3", "run.run_id=eager"), console=False)
    compiled = run_training(tiny_config(tmp_path, "train.iterations=3", "run.run_id=compiled", "train.compile=on"),
                            console=False)
    assert compiled["pre_quant"]["val_loss"] == pytest.approx(eager["pre_quant"]["val_loss"], abs=1e-3)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared FineWeb sample not present")
def test_shards_from_a_larger_tokenizer_are_refused(tmp_path):
    from pgolf.data.shards import ShardError

    cfg, _ = resolve_config(None, [f"data.data_path={SHARED}", "data.tokenizer_path=byte260", "model.vocab_size=260",
                                   f"run.runs_dir={tmp_path}", *TINY_MODEL, *TINY_TRAIN], env={})
    with pytest.raises(ShardError, match="holds token id 10.. but model.vocab_size=260"):
        run_training(cfg, console=False)


def test_corrupt_train_shard_is_found_before_training(tmp_path):
    cfg = tiny_config(tmp_path, "train.iterations=1")
    run_training(cfg, console=False)  # generates the corpus
    shard = tmp_path / "corpus" / "synthetic_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-7])
    from pgolf.data.shards import ShardError

    with pytest.raises(ShardError, match="synthetic_train_000000.bin"):
        run_training(tiny_config(tmp_path, "train.iterations=1"), console=False)


def test_metrics_survive_a_line_cut_by_a_kill(tmp_path):
    from pgolf.runs import RunLogger

    (tmp_path / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n{"event": "tra')
    logger = RunLogger(tmp_path)
    logger.event("resume", step=1)
    assert [e["event"] for e in read_metrics(tmp_path)] == ["train", "resume"]
