"""`pgolf export RUN`: re-export a run's last checkpoint into a new artifact (#17 item 9)."""

import functools
import json
import shutil

import pytest
import torch

from pgolf.cli import main as cli_main
from pgolf.compress import accounting
from pgolf.compress.container import ArtifactError, read_artifact
from pgolf.compress.quant import dequantize_state_dict
from pgolf.rules import EXIT_OK, EXIT_OVER_CAP, EXIT_USAGE
from pgolf.train.run import run_training
from tests.train.test_train import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_cpu_thread):
    tmp = tmp_path_factory.mktemp("export")
    # model_dim 192: the embedding and MLP matrices are large enough to be quantized (KEEP_FLOAT_MAX_NUMEL)
    cfg = tiny_config(tmp, "model.num_layers=2", "model.model_dim=192", "train.iterations=3", "train.val_loss_every=0",
                      "train.warmup_steps=0")
    summary = run_training(cfg, console=False)
    return tmp / "runs" / summary["run_id"]


def _tensors(path):
    qdict, meta = read_artifact(path)
    return dequantize_state_dict(qdict), meta


def test_reexport_with_the_runs_settings_equals_its_artifact(run_dir, capsys):
    own = (run_dir / "model.pgolf").read_bytes()
    assert cli_main(["export", str(run_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    [new] = (run_dir / "exports").glob("model-*.pgolf")
    assert (run_dir / "model.pgolf").read_bytes() == own  # the run's artifact is untouched
    ours, meta = _tensors(new)
    theirs, run_meta = _tensors(run_dir / "model.pgolf")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert meta == run_meta  # same settings, same run: the same metadata too
    size = json.loads((run_dir / "summary.json").read_text())["size"]
    assert f"artifact model bytes: {new.stat().st_size:,}" in out
    assert f"code bytes: {size['code_bytes']:,}" in out and "(fits)" in out and str(new) in out


def _trained_like_copy(run_dir, tmp_path):
    """A copy of the run whose last checkpoint holds Gaussian weights: a few steps from init leave
    matrices (zero-initialised projections, hardly moved ones) that the official int8 clip
    collapses to a handful of codes, which no trained model has."""
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("exports"))
    ckpt = max((copy / "checkpoints").glob("step_???????.pt"))
    saved = torch.load(ckpt, weights_only=True)
    gen = torch.Generator().manual_seed(0)
    saved["model"] = {k: torch.randn(v.shape, generator=gen) * 0.05 if v.ndim == 2 else v
                      for k, v in saved["model"].items()}
    torch.save(saved, ckpt)
    return copy


def test_scheme_override_gives_a_different_artifact(run_dir, tmp_path, capsys):
    run = _trained_like_copy(run_dir, tmp_path)
    int8, int6 = tmp_path / "int8.pgolf", tmp_path / "int6.pgolf"
    assert cli_main(["export", str(run), "--out", str(int8)]) == EXIT_OK
    assert "export settings: the run's own" in capsys.readouterr().out
    assert cli_main(["export", str(run), "export.scheme=int6", "--out", str(int6)]) == EXIT_OK
    assert "export.scheme=int6" in capsys.readouterr().out
    # A different artifact: other codes. Its size here is no guide: on Gaussian weights the
    # official int8 codes compress (zlib) to ~5.1 bits each, int6's to ~5.5; int4 is smaller.
    assert int6.read_bytes() != int8.read_bytes()
    int4 = tmp_path / "int4.pgolf"
    assert cli_main(["export", str(run), "export.scheme=int4", "--out", str(int4)]) == EXIT_OK
    assert int4.stat().st_size < int8.stat().st_size
    ours, meta = _tensors(int6)
    theirs, _ = _tensors(int8)
    assert any(not torch.equal(ours[n], theirs[n]) for n in theirs)
    assert meta["config"]["export"]["scheme"] == "int6" and meta["run_id"] == run_dir.name
    # The run's saved config is unchanged.
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["export"]["scheme"] == "int8"


def test_existing_files_are_never_overwritten(run_dir, tmp_path, capsys):
    taken = tmp_path / "taken.pgolf"
    taken.write_bytes(b"keep me")
    own = (run_dir / "model.pgolf").read_bytes()
    assert cli_main(["export", str(run_dir), "--out", str(taken)]) == EXIT_USAGE
    assert "already exists and is never overwritten" in capsys.readouterr().err
    assert taken.read_bytes() == b"keep me"
    assert cli_main(["export", str(run_dir), "--out", str(run_dir / "model.pgolf")]) == EXIT_USAGE
    assert "the run's own artifact" in capsys.readouterr().err
    assert (run_dir / "model.pgolf").read_bytes() == own
    # Two default exports in the same second get two files.
    before = set((run_dir / "exports").glob("*.pgolf")) if (run_dir / "exports").exists() else set()
    assert cli_main(["export", str(run_dir)]) == EXIT_OK
    assert cli_main(["export", str(run_dir)]) == EXIT_OK
    assert len(set((run_dir / "exports").glob("*.pgolf")) - before) == 2


def test_only_export_keys_may_be_overridden(run_dir, tmp_path, capsys):
    out = tmp_path / "refused.pgolf"
    assert cli_main(["export", str(run_dir), "model.num_layers=3", "--out", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "only export.* keys" in err and "model.num_layers=3" in err and "pgolf train" in err
    assert not out.exists()
    assert cli_main(["export", str(run_dir), "export.nope=1", "--out", str(out)]) == EXIT_USAGE
    assert "unknown config key 'export.nope'" in capsys.readouterr().err
    assert cli_main(["export", "no-such-run", "--runs-dir", str(tmp_path)]) == EXIT_USAGE
    assert "no run found" in capsys.readouterr().err
    assert not out.exists()


def test_over_the_cap_exits_3(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(accounting, "size_report", functools.partial(accounting.size_report, cap=1000))
    assert cli_main(["export", str(run_dir), "--out", str(tmp_path / "big.pgolf")]) == EXIT_OVER_CAP
    assert "OVER by" in capsys.readouterr().out


def test_eval_scores_the_roundtrip_like_training(run_dir, tmp_path, capsys):
    out = tmp_path / "scored" / "model.pgolf"
    assert cli_main(["export", str(run_dir), "--out", str(out), "--eval", "--device", "cpu"]) == EXIT_OK
    printed = capsys.readouterr().out
    rt = json.loads((run_dir / "summary.json").read_text())["roundtrip"]
    line = next(s for s in printed.splitlines() if s.startswith("roundtrip of model.pgolf"))
    assert float(line.rsplit("val_bpb ", 1)[1]) == pytest.approx(rt["val_bpb"], rel=1e-5)
    assert list((tmp_path / "scored").glob("eval-standard-*.json"))  # the receipt, beside the artifact


def test_corrupt_artifact_names_the_export_command(run_dir, tmp_path):
    bad = tmp_path / "bad.pgolf"
    blob = bytearray((run_dir / "model.pgolf").read_bytes())
    blob[-1] ^= 0xFF
    bad.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=r"re-export it from the run's last checkpoint with `pgolf export RUN`"):
        read_artifact(bad)
