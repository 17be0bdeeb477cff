"""`pgolf audit --rescore`: a receipt proves consistency, the rescore proves the numbers. A receipt
whose sums were lowered and whose sha256 was recomputed passes the plain audit but fails the
rescore, naming the range; untampered standard, sliding and TTT receipts pass it exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pgolf.cli import main as cli_main
from pgolf.data.tokenizer import bits_per_byte
from pgolf.eval.audit import AuditFailure, rescore_file
from pgolf.eval.receipt import receipt_digest
from pgolf.train.run import run_training
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("rescore")
    summary = run_training(tiny_config(tmp, "train.iterations=4", "train.val_loss_every=0", "run.run_id=tiny"),
                           console=False)
    assert summary["status"] == "done"
    return tmp / "runs" / "tiny"


def audit_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(["audit", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out + out.err


def lowered(data: dict, index: int = 0, by: float = 0.5) -> dict:
    """The receipt with the index-th score's loss lowered, totals re-derived, sha256 recomputed:
    consistent, so the plain audit accepts it."""
    data = json.loads(json.dumps(data))
    scores = [e for e in data["events"] if e["type"] == "score"]
    scores[index]["loss_sum"] -= by
    loss = 0.0
    for e in scores:
        loss += e["loss_sum"]
    t = data["totals"]
    t.update(loss_sum=loss, val_loss=loss / t["tokens"], val_bpb=bits_per_byte(loss, t["tokens"], t["bytes"]))
    body = {k: v for k, v in data.items() if k != "sha256"}
    return {**body, "sha256": receipt_digest(body)}


def test_lowered_roundtrip_receipt_passes_audit_but_fails_rescore(run_dir, tmp_path, capsys):
    path = run_dir / "receipts" / "roundtrip.json"
    code, out = audit_cli(capsys, path, "--rescore")
    assert code == 0 and out.startswith("OK ") and "bit for bit" in out, out
    assert "fingerprint" in out and "recomputed standard windows" in out

    copy = tmp_path / "runs" / "tiny"
    shutil.copytree(run_dir, copy)
    forged = copy / "receipts" / "roundtrip.json"
    data = json.loads(forged.read_text())
    forged.write_text(json.dumps(lowered(data)))
    code, out = audit_cli(capsys, forged)
    assert code == 0 and out.startswith("OK "), out  # consistent: the plain audit cannot tell
    code, out = audit_cli(capsys, forged, "--rescore")
    assert code == 1 and out.startswith("FAIL "), out
    assert f"targets (0, {data['total_targets']}] differs when rescored" in out, out
    with pytest.raises(AuditFailure, match=r"\(0, \d+\] differs"):
        rescore_file(forged)


def test_sliding_receipt_rescores_and_a_forged_one_fails(run_dir, tmp_path, capsys):
    path = tmp_path / "sliding.json"
    assert cli_main(["eval", str(run_dir), "--device", "cpu", "--stride", "32", "--batch", "5",
                     "--receipt", str(path)]) == 0
    # Not in a run's receipts/ folder: the artifact must be named.
    code, out = audit_cli(capsys, path, "--rescore")
    assert code == 1 and "pass --artifact" in out
    code, out = audit_cli(capsys, path, "--rescore", "--artifact", run_dir / "model.pgolf")
    assert code == 0 and "recomputed sliding windows" in out and "5 windows per batch" in out, out
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(lowered(json.loads(path.read_text()), by=1e-9)))
    code, out = audit_cli(capsys, forged, "--rescore", "--artifact", run_dir / "model.pgolf")
    assert code == 1 and "differs when rescored" in out, out


def test_rescore_refuses_another_artifact(run_dir, tmp_path, capsys):
    summary = run_training(tiny_config(tmp_path, "train.iterations=1", "train.val_loss_every=0",
                                       "run.run_id=other"), console=False)
    assert summary["status"] == "done"
    code, out = audit_cli(capsys, run_dir / "receipts" / "roundtrip.json", "--rescore",
                          "--artifact", tmp_path / "runs" / "other" / "model.pgolf")
    assert code == 1 and "is not the model that scored" in out, out


def test_ttt_receipt_replays_and_a_forged_chunk_is_named(run_dir, tmp_path, capsys):
    path = tmp_path / "ttt.json"
    assert cli_main(["eval", str(run_dir), "--device", "cpu", "--ttt", "--ttt-chunk", "1000", "--ttt-epochs", "1",
                     "--ttt-lr", "0.01", "--ttt-batch", "4", "--stride", "32", "--receipt", str(path)]) == 0
    art = run_dir / "model.pgolf"
    code, out = audit_cli(capsys, path, "--rescore", "--artifact", art)
    assert code == 0 and "replayed TTT chunks 1..5 of 5" in out and "state after each update" in out, out
    data = json.loads(path.read_text())
    scores = [e for e in data["events"] if e["type"] == "score"]
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(lowered(data, index=2)))
    assert audit_cli(capsys, forged)[0] == 0
    code, out = audit_cli(capsys, forged, "--rescore", "--artifact", art)
    assert code == 1 and f"TTT chunk 3 of 5: targets ({scores[2]['lo']}, {scores[2]['hi']}] differs" in out, out
    # A sample of the first two chunks does not reach the forged one, and says what it left out.
    code, out = audit_cli(capsys, forged, "--rescore", "--artifact", art, "--sample", "2")
    assert code == 0 and "replayed TTT chunks 1..2 of 5" in out and "NOT recomputed: chunks 3..5" in out, out
    # The first chunk, scored by the artifact itself, is checked exactly.
    forged.write_text(json.dumps(lowered(data, index=0, by=1e-9)))
    code, out = audit_cli(capsys, forged, "--rescore", "--artifact", art, "--sample", "1")
    assert code == 1 and f"TTT chunk 1 of 5: targets (0, {scores[0]['hi']}] differs" in out, out


def test_rescore_options_need_rescore(run_dir, capsys):
    code, out = audit_cli(capsys, run_dir / "receipts" / "roundtrip.json", "--sample", "2")
    assert code == 2 and "--sample only apply with --rescore" in out
