"""`pgolf check` end to end on real CPU runs: a legal tiny run with the #549 model switches,
scored standard, sliding and with TTT, passes every row; each check catches the broken model or
run made for it (a model peeking one token ahead, unnormalized scores, a receipt with an update
before its score, a validation document copied into a train shard, a calibration after the
budget, a byte count off by one); C4 names the evaluation that counts; what a run lacks is SKIP."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.cli import main as cli_main
from pgolf.data.shards import read_shard, write_shard
from pgolf.eval.receipt import receipt_digest, write_receipt
from pgolf.eval.run import EvalOptions, load_target, run_eval
from pgolf.eval.ttt import TTTConfig, run_ttt
from pgolf.lab.check import FAIL, KEYS, PASS, SKIP, check_run
from pgolf.lab.check_context import CheckOptions
from pgolf.lab.check_cli import check_target
from pgolf.lab.ledger import Ledger
from pgolf.model.gpt import GPT
from pgolf.runs import read_json, write_json
from pgolf.train.run import run_training
from tests.eval.test_probes import PeeksAhead, ScoresRawLogits, Unnormalized
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PR549 = ["model.embed=bigram", "model.post_norm=smear", "model.stream=value_embed", "model.xsa_layers=-1",
         "model.bigram_dim=16", "model.ve_dim=16", "model.ve_layers=-1"]
# Three 4,097-token documents: windows hold document boundaries.
VAL_TOKENS = "data.synthetic_val_tokens=12291"
TTT_ARGS = ["--ttt", "--ttt-chunk", "4096", "--ttt-epochs", "1", "--ttt-lr", "0.01", "--ttt-batch", "4",
            "--stride", "32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny #549-style run, its roundtrip (standard), a sliding and a TTT evaluation."""
    root = tmp_path_factory.mktemp("check")
    cfg = tiny_config(root, "train.iterations=6", "train.val_loss_every=0", "run.run_id=t", VAL_TOKENS, *PR549)
    assert run_training(cfg, console=False)["status"] == "done"
    run = root / "runs" / "t"
    assert cli_main(["eval", str(run), "--device", "cpu", "--stride", "32"]) == 0
    assert cli_main(["eval", str(run), "--device", "cpu", *TTT_ARGS]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the run (beside no ledger), to break."""
    copy = tmp_path / "runs" / "t"
    shutil.copytree(trained, copy)
    return copy


def rows_by_key(rows):
    out = {}
    for r in rows:
        out.setdefault(r.key, []).append(r)
    return out


def status(rows, key):
    (row,) = rows_by_key(rows)[key]
    return row.status, row.detail


def artifact_model(run_dir: Path, cls=GPT):
    """The run's model, reloaded from its artifact as `pgolf eval` does, as an instance of cls."""
    cfg, state, _, _ = load_target(str(run_dir), live=False)
    model = cls(cfg.model)
    model.load_state_dict(state)
    return model


def reseal(path: Path, data: dict) -> None:
    data = {k: v for k, v in data.items() if k != "sha256"}
    path.write_text(json.dumps({**data, "sha256": receipt_digest(data)}))


# --- a legal run -----------------------------------------------------------------------------------

def test_a_legal_run_passes_every_check(trained, capsys):
    rows = check_run(trained)
    failed = [(r.check, r.detail) for r in rows if r.status != PASS]
    assert not failed, failed
    labels = [r.check for r in rows if r.key == "c1"]
    assert labels == ["C1 causal (standard, seq_len 64)", "C1 causal (sliding, seq_len 64, stride 32)",
                      "C1 causal (TTT, seq_len 64, stride 32)"]
    assert [r.key for r in rows][3:] == list(KEYS[1:])
    ttt = rows_by_key(rows)["c1"][2].detail
    assert "at document boundaries" in ttt and "TTT over 3 chunks" in ttt and "bit-identical" in ttt
    assert "0 at document boundaries" not in ttt
    assert "3 receipts pass `pgolf audit`" in status(rows, "c3")[1]
    assert "eval-ttt-" in status(rows, "c4")[1] and "the latest of" not in status(rows, "c4")[1]
    assert "standard/sliding and TTT" in status(rows, "eval-data")[1]
    # The command: the same rows, exit 0.
    capsys.readouterr()
    assert cli_main(["check", str(trained)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"pgolf check {trained}\n")
    assert out.rstrip().endswith("result: PASS (12 passed, 0 failed, 0 skipped)")
    assert cli_main(["check", str(trained), "--json", "--skip", "provenance,eval-data"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ok"] is True and len(printed["rows"]) == 12
    assert {r["key"]: r["status"] for r in printed["rows"]}["provenance"] == SKIP


def test_unknown_skip_key_is_a_usage_error(trained, capsys):
    assert cli_main(["check", str(trained), "--skip", "nope"]) == 2
    assert "--skip nope" in capsys.readouterr().err
    assert cli_main(["check", str(trained), "--windows", "0"]) == 2
    assert cli_main(["check", str(trained.parent / "nope")]) == 1
    assert "neither a run directory" in capsys.readouterr().err


# --- each check catches its broken model or run -------------------------------------------------------

def test_c1_catches_a_model_peeking_one_token_ahead(trained, capsys):
    rows = check_run(trained, CheckOptions(model=artifact_model(trained, PeeksAhead), skip=("eval-data", "provenance")))
    c1 = rows_by_key(rows)["c1"]
    assert [r.status for r in c1] == [FAIL, FAIL, FAIL]
    assert all("sees tokens after the one it predicts" in r.detail for r in c1)
    assert status(rows, "c2")[0] == PASS  # normalized, just not causal


@pytest.mark.parametrize("cls, message", [(Unnormalized, "the distribution sums to"),
                                          (ScoresRawLogits, "not read from that distribution")])
def test_c2_catches_unnormalized_scores(trained, cls, message):
    rows = check_run(trained, CheckOptions(model=artifact_model(trained, cls), skip=("eval-data", "provenance")))
    got, detail = status(rows, "c2")
    assert got == FAIL and message in detail


def test_c1_catches_ttt_that_adapts_before_scoring(trained):
    opts = CheckOptions(ttt_runner=functools.partial(run_ttt, illegal_train_first=True), skip=("eval-data",))
    ttt = rows_by_key(check_run(trained, opts))["c1"][2]
    assert ttt.status == FAIL and "updated before its first score" in ttt.detail


def test_c3_catches_a_receipt_with_an_update_before_its_score(run, capsys):
    from pgolf.data.shards import load_validation_tokens
    from pgolf.data.tokenizer import ByteTokenizer

    cfg, _, _, _ = load_target(str(run), live=False)
    tokens = load_validation_tokens(cfg.val_files(), 64)[:2049]
    luts = ByteTokenizer().byte_luts(cfg.model.vocab_size).to_torch("cpu")
    _, receipt = run_ttt(artifact_model(run), tokens, luts, 64, 32, 8, TTTConfig(chunk_tokens=1024, epochs=1),
                         torch.device("cpu"), illegal_train_first=True)
    write_receipt(run / "receipts" / "eval-ttt-29990101-000000.json", receipt)
    got, detail = status(check_run(run, CheckOptions(skip=("eval-data", "provenance"))), "c3")
    assert got == FAIL
    assert detail.startswith("receipts/eval-ttt-29990101-000000.json: event 1: targets (0, 1024] were scored by a "
                             "model already trained on tokens up to 1024")
    capsys.readouterr()
    assert cli_main(["check", str(run), "--skip", "eval-data,provenance"]) == 1
    assert "result: FAIL" in capsys.readouterr().out


def test_c4_names_the_evaluation_that_counts(run, capsys):
    run_eval(str(run), EvalOptions(stride=16), log=lambda *_: None)  # a second sliding evaluation of the split
    run_eval(str(run), EvalOptions(stride=16, max_tokens=640), log=lambda *_: None)  # a prefix: never counts
    sliding = sorted(p.name for p in (run / "receipts").glob("eval-sliding-*.json"))
    assert len(sliding) == 3
    got, detail = status(check_run(run, CheckOptions(skip=("eval-data", "provenance"))), "c4")
    prefix = [n for n in sliding if json.loads((run / "receipts" / n).read_text())["total_targets"] == 640]
    full = [n for n in sliding if n not in prefix]
    assert got == PASS
    assert f"sliding: {full[-1]} counts" in detail
    assert f"the latest of 2 evaluations of the split; not counted: {full[0]}" in detail
    assert f"never counted: {prefix[0]}" in detail
    # A ledger that reports another evaluation's number fails.
    earlier = json.loads((run / "receipts" / full[0]).read_text())["totals"]["val_bpb"]
    Ledger(run.parent).upsert("t", sliding_val_bpb=earlier)
    got, detail = status(check_run(run, CheckOptions(skip=("eval-data", "provenance"))), "c4")
    assert got == FAIL and "the reported number comes from another evaluation" in detail


def test_bytes_recounts_each_document_of_a_per_document_ttt_receipt(run):
    assert cli_main(["eval", str(run), "--device", "cpu", "--max-tokens", "2048", "--ttt-mode", "doc_lora",
                     "--doc-context", "64", "--doc-batch", "4", "--lora-rank", "4", "--phases", "none"]) == 0
    (path,) = (run / "receipts").glob("eval-doc_lora-*.json")
    data = json.loads(path.read_text())
    docs = [d for e in data["events"] if e["type"] == "batch" for d in e["docs"]]
    got, detail = status(check_run(run, CheckOptions(skip=("eval-data", "provenance"))), "bytes")
    assert got == PASS and f"{path.name} {sum(d[6] for d in docs):,}" in detail
    lo, hi = docs[0][:2]
    docs[0][6] += 1
    data["totals"]["bytes"] += 1
    from pgolf.data.tokenizer import bits_per_byte

    t = data["totals"]
    t["val_bpb"] = bits_per_byte(t["loss_sum"], t["tokens"], t["bytes"])
    reseal(path, data)
    got, detail = status(check_run(run, CheckOptions(skip=("eval-data", "provenance"))), "bytes")
    assert got == FAIL and f"receipts/{path.name}: targets ({lo}, {hi}] are counted as" in detail


def test_bytes_catches_a_count_off_by_one_byte(run):
    (path,) = (run / "receipts").glob("eval-sliding-*.json")
    data = json.loads(path.read_text())
    (event,) = data["events"]
    event["bytes"] += 1
    data["totals"]["bytes"] += 1
    from pgolf.data.tokenizer import bits_per_byte

    t = data["totals"]
    t["val_bpb"] = bits_per_byte(t["loss_sum"], t["tokens"], t["bytes"])
    reseal(path, data)
    rows = check_run(run, CheckOptions(skip=("eval-data", "provenance")))
    assert status(rows, "c3")[0] == PASS  # consistent: the audit cannot see it
    got, detail = status(rows, "bytes")
    assert got == FAIL and f"receipts/{path.name}: targets (0, 12288] are counted as" in detail
    assert "(off by +1; the tokenizer's byte tables give" in detail


def data_copy(trained: Path, tmp_path: Path) -> Path:
    """The run's shards as an official-layout folder (fineweb_*), for --data."""
    corpus = Path(read_json(trained / "config.json")["config"]["data"]["data_path"])
    out = tmp_path / "data"
    out.mkdir()
    shutil.copy(corpus / "synthetic_val_000000.bin", out / "fineweb_val_000000.bin")
    shutil.copy(corpus / "synthetic_train_000000.bin", out / "fineweb_train_000000.bin")
    return out


def test_provenance_catches_a_val_document_copied_into_a_train_shard(trained, tmp_path, capsys):
    data = data_copy(trained, tmp_path)
    rows = check_run(trained, CheckOptions(data_dir=str(data)))
    assert status(rows, "provenance")[0] == PASS
    val, train = read_shard(data / "fineweb_val_000000.bin"), read_shard(data / "fineweb_train_000000.bin")
    write_shard(data / "fineweb_train_000000.bin", np.concatenate([train[:8194], val[4097:8194], train[8194:]]),
                overwrite=True)
    got, detail = status(check_run(trained, CheckOptions(data_dir=str(data))), "provenance")
    assert got == FAIL
    assert detail.startswith("1 of the 3 validation documents appear among the 17 training documents")
    assert "val document 1 (4,096 tokens) at token 8,194 of fineweb_train_000000.bin" in detail
    assert cli_main(["check", str(trained), "--data", str(data), "--skip", "eval-data"]) == 1


def test_a_calibration_after_the_budget_fails_the_phases(tmp_path):
    cfg = tiny_config(tmp_path, "train.iterations=100000", "train.max_wallclock_seconds=1", "train.val_loss_every=0",
                      "export.gptq=true", "export.gptq_seqs=4", "export.gptq_calibration=train_after_budget",
                      "run.run_id=late")
    summary = run_training(cfg, console=False)
    assert summary["status"] == "done" and summary["calibration"]["training_data_after_budget"] is True
    got, detail = status(check_run(tmp_path / "runs" / "late", CheckOptions(skip=("eval-data",))), "train-budget")
    assert got == FAIL and "read training data past the 1 s budget: training " in detail


@pytest.mark.parametrize("calibration, cap, expected, message", [
    ({"source": "train_reserved", "seconds": 2.0, "reserve_seconds": 4.0, "reserve": "measured",
      "training_data_after_budget": False}, 600, PASS,
     "inside the 600 s budget: training 595.0 s + calibration 2.00 s"),
    ({"source": "train_reserved", "seconds": 6.0, "reserve_seconds": 4.0, "reserve": "measured",
      "training_data_after_budget": False}, 600, FAIL, "its own numbers say True"),
    ({"source": "self_generated", "seconds": 9.0}, 600, PASS, "no training data"),
    ({"source": "train_after_budget", "seconds": 9.0, "training_data_after_budget": None}, 0, SKIP, "no wall-clock"),
    (None, 600, SKIP, "predates it"),
])
def test_the_training_budget_row(run, calibration, cap, expected, message):
    summary = read_json(run / "summary.json")
    summary["train_time_ms"] = 595_000.0
    if calibration is not None:
        summary["calibration"] = calibration
    write_json(run / "summary.json", summary)
    saved = read_json(run / "config.json")
    saved["config"]["export"]["gptq"] = True
    saved["config"]["train"]["max_wallclock_seconds"] = cap
    write_json(run / "config.json", saved)
    got, detail = status(check_run(run, CheckOptions(skip=("c1", "c2", "eval-data", "provenance"))), "train-budget")
    assert got == expected and message in detail, detail


def test_eval_data_fails_when_the_val_pattern_matches_training_shards(run):
    saved = read_json(run / "config.json")
    saved["config"]["data"]["val_pattern"] = "synthetic_*.bin"
    write_json(run / "config.json", saved)
    got, detail = status(check_run(run, CheckOptions(skip=("c1", "c2", "provenance"))), "eval-data")
    assert got == FAIL and "also matches training shards: synthetic_train_000000.bin" in detail


def test_eval_data_sees_a_training_shard_read(trained, monkeypatch):
    """An evaluation that (through a bug) also reads a training shard is caught by the trace."""
    import pgolf.data.shards as shards
    import pgolf.eval.run as eval_run

    real = eval_run.load_validation_tokens
    train = Path(read_json(trained / "config.json")["config"]["data"]["data_path"]) / "synthetic_train_000000.bin"

    def reads_train_too(files, seq_len, *args):
        shards.read_shard(train)
        return real(files, seq_len, *args)

    monkeypatch.setattr(eval_run, "load_validation_tokens", reads_train_too)
    got, detail = status(check_run(trained, CheckOptions(skip=("c1", "c2", "provenance"))), "eval-data")
    assert got == FAIL and detail == "the evaluation read training data: synthetic_train_000000.bin"


def test_artifact_row_recomputes_the_size_and_the_code(run):
    got, detail = status(check_run(run, CheckOptions(skip=("c1", "c2", "eval-data", "provenance"))), "artifact")
    assert got == PASS and "<= 16,000,000 bytes, recomputed from the files" in detail
    got, detail = status(check_run(run, CheckOptions(bundle=b"x" * 10, skip=("c1", "c2", "eval-data", "provenance"))),
                         "artifact")
    assert got == FAIL and "the shipped code is not the counted code" in detail
    with open(run / "model.pgolf", "ab") as f:
        f.write(b"\0")
    got, detail = status(check_run(run, CheckOptions(skip=("c1", "c2", "eval-data", "provenance"))), "artifact")
    assert got == FAIL and "not the" in detail and "the run recorded at export" in detail


# --- what a run lacks is SKIP --------------------------------------------------------------------------

def test_a_run_without_receipts_skips_what_needs_them(run):
    shutil.rmtree(run / "receipts")
    rows = check_run(run, CheckOptions(skip=("provenance",)))
    for key in ("c3", "c4", "bytes"):
        got, detail = status(rows, key)
        assert got == SKIP and "no receipts" in detail
    (c1,) = rows_by_key(rows)["c1"]
    assert c1.status == PASS and c1.check == "C1 causal (standard, seq_len 64)"


def test_missing_data_is_skip_not_pass(run, tmp_path):
    saved = read_json(run / "config.json")
    saved["config"]["data"]["data_path"] = str(tmp_path / "elsewhere")
    write_json(run / "config.json", saved)
    rows = check_run(run)
    for key in ("c1", "c2", "bytes", "provenance", "val-split", "eval-data"):
        for row in rows_by_key(rows)[key]:
            assert row.status == SKIP and "on this machine" in row.detail, (key, row.detail)


def test_a_records_folder(trained, tmp_path, capsys):
    from pgolf.lab.submit import SubmitArgs, submit

    folder = submit([str(trained)], SubmitArgs("Check", "A", "a", date="2026-01-03"), out=tmp_path / "rec")
    rows = check_target(folder, CheckOptions(runs_dir=str(trained.parent), skip=("eval-data", "provenance")))
    own = [r for r in rows if not r.target]
    assert [(r.key, r.status) for r in own] == [("c3", PASS), ("c4", PASS), ("artifact", PASS)]
    assert "seed 1337 sliding: eval-sliding-" in own[1].detail
    seed = [r for r in rows if r.target == "seed 1337"]
    assert len(seed) == 12 and {r.status for r in seed} == {PASS, SKIP}
    # Without the runs: the model checks are SKIP, naming the run to check.
    rows = check_target(folder, CheckOptions(runs_dir=str(tmp_path / "none")))
    assert rows[-1].status == SKIP and "is not here (pass --runs-dir)" in rows[-1].detail
    # An edited claim fails C4.
    sub = read_json(folder / "submission.json")
    sub["seed_results"]["1337"]["ttt_val_bpb"] -= 0.01
    write_json(folder / "submission.json", sub)
    got, detail = status([r for r in check_target(folder, CheckOptions(runs_dir=str(tmp_path / "none")))
                          if not r.target], "c4")
    assert got == FAIL and "seed 1337: submission.json reports ttt val_bpb" in detail
