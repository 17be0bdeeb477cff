"""`pgolf submit`: the records folder of a group's seeds, and every reason it refuses."""

import json
import re
import shutil
import statistics
from pathlib import Path

import pytest

import pgolf.lab.submit as submit_module
from pgolf.compress import accounting
from pgolf.train import export
from pgolf.cli import main as cli_main
from pgolf.eval.run import EvalOptions, run_eval
from pgolf.eval.receipt import Receipt, write_receipt
from pgolf.runs import read_json, write_json
from pgolf.lab.submit import SubmitArgs, SubmitRefused, submit
from pgolf.train.run import run_training
from tests.train.test_train import tiny_config

SEEDS = (1, 2)
ARGS = ["--name", "Tiny Test", "--author", "A. Author", "--github", "aauthor", "--date", "2026-01-02"]
FOLDER = Path("records/track_10min_16mb/2026-01-02_Tiny_Test")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_cpu_thread):
    """Two seeds of one tiny config in group 'g', trained once for the whole module."""
    root = tmp_path_factory.mktemp("group")
    for seed in SEEDS:
        cfg = tiny_config(root, "train.iterations=2", "train.warmup_steps=0", "train.val_loss_every=0",
                          f"train.seed={seed}", "run.group=g", f"run.run_id=g-s{seed}")
        assert run_training(cfg, console=False)["status"] == "done"
    return root / "runs"


@pytest.fixture
def runs(trained, tmp_path, monkeypatch):
    """A private copy of the group's runs; the test's cwd is an empty folder for records/."""
    copy = tmp_path / "runs"
    shutil.copytree(trained, copy)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return copy


def run_submit(runs: Path, *extra: str, target: str = "g") -> int:
    return cli_main(["submit", target, *ARGS, "--runs-dir", str(runs), *extra])


def test_constants_agree_with_their_owners():
    assert submit_module.SIZE_CAP_BYTES == accounting.SIZE_CAP_BYTES
    assert submit_module.ARTIFACT_NAME == export.ARTIFACT_NAME


def test_submit_writes_the_records_folder(runs, capsys):
    assert run_submit(runs) == 0
    assert str(FOLDER) in capsys.readouterr().out
    names = sorted(str(p.relative_to(FOLDER)) for p in FOLDER.rglob("*") if p.is_file())
    assert names == ["README.md", "receipts/seed1_roundtrip.json", "receipts/seed2_roundtrip.json",
                     "submission.json", "train_gpt.py", "train_seed1.log", "train_seed2.log"]
    summaries = [read_json(runs / f"g-s{s}" / "summary.json") for s in SEEDS]
    code = (FOLDER / "train_gpt.py").read_bytes()
    sub = read_json(FOLDER / "submission.json")
    bpbs = [s["roundtrip"]["val_bpb"] for s in summaries]
    artifacts = [(runs / f"g-s{s}" / "model.pgolf").stat().st_size for s in SEEDS]
    assert (sub["name"], sub["author"], sub["github_id"], sub["date"], sub["track"]) == (
        "Tiny Test", "A. Author", "aauthor", "2026-01-02", "10min_16mb")
    assert sub["val_bpb"] == round(statistics.fmean(bpbs), 8) and sub["val_bpb_std"] == round(statistics.stdev(bpbs), 8)
    assert sub["val_loss"] == round(statistics.fmean(s["roundtrip"]["val_loss"] for s in summaries), 8)
    # Code bytes: the file written, which is what every run counted at export.
    assert sub["bytes_code"] == len(code) == summaries[0]["size"]["code_bytes"] == summaries[1]["size"]["code_bytes"]
    assert sub["bytes_model"] == max(artifacts) and sub["bytes_total"] == max(artifacts) + len(code)
    assert sub["seeds"] == list(SEEDS) and sub["seed_results"]["2"]["steps"] == 2
    assert sub["seed_results"]["1"]["artifact_bytes"] == artifacts[0]
    assert sub["config"]["model"]["num_layers"] == 3 and "seed" not in sub["config"]["train"]
    for s in SEEDS:
        assert (FOLDER / f"train_seed{s}.log").read_bytes() == (runs / f"g-s{s}" / "train.log").read_bytes()
    readme = (FOLDER / "README.md").read_text()
    assert "| `model.num_layers` | `3` | `9` |" in readme  # the config's difference from the baseline
    assert re.search(rf"^\| 1 \| 2 \| [\d.]+ \| [\d.]+ \| {sub['seed_results']['1']['val_bpb']:.8f} \|", readme, re.M)
    assert f"{sub['val_bpb']:.8f} ± {sub['val_bpb_std']:.8f}" in readme
    assert "SEED=2 RUN_ID=g-s2 python train_gpt.py" in readme and "cpu x 1" in readme
    assert "roundtrip score was recomputed from its artifact" in readme and "WARNING" not in readme
    assert "sha256 equals the one its run recorded at export" in readme
    assert sub["compliance"]["scores_recomputed"] is True
    assert all(len(read_json(runs / f"g-s{s}" / "summary.json")["size"]["artifact_sha256"]) == 64 for s in SEEDS)

    # Never overwritten: a second submission of the same name and date is refused, the folder kept.
    before = (FOLDER / "submission.json").read_bytes()
    assert run_submit(runs) == 1
    assert "already exists" in capsys.readouterr().err
    assert (FOLDER / "submission.json").read_bytes() == before


def test_run_directories_and_sliding_scores(runs, tmp_path):
    run_eval(str(runs / "g-s1"), EvalOptions(stride=32), log=lambda *_: None)
    out = tmp_path / "explicit"
    folder = submit([str(runs / "g-s1"), str(runs / "g-s2")], SubmitArgs("Explicit", "A", "a", date="2026-01-03"),
                    out=out)
    assert folder == out
    sub = read_json(out / "submission.json")
    assert "sliding_val_bpb" in sub["seed_results"]["1"] and "sliding_val_bpb" not in sub["seed_results"]["2"]
    readme = (out / "README.md").read_text()
    assert "sliding val_bpb" in readme and "stride 32" in readme and "(1 of 2 seeds)" in readme
    assert len(list((out / "receipts").glob("seed1_eval-sliding-*.json"))) == 1


def test_only_the_counted_evaluation_is_used(runs, tmp_path):
    """Two sliding evaluations of the split and one of a prefix: the submission reports the latest
    of the two (pgolf.lab.evaluations), and says which did not count."""
    for opts in (EvalOptions(stride=32), EvalOptions(stride=16), EvalOptions(stride=16, max_tokens=128)):
        run_eval(str(runs / "g-s1"), opts, log=lambda *_: None)
    receipts = {p.name: json.loads(p.read_text()) for p in (runs / "g-s1" / "receipts").glob("eval-sliding-*.json")}
    full = sorted(n for n, d in receipts.items() if d["total_targets"] > 128)  # names sort by time
    assert len(full) == 2
    out = tmp_path / "counted"
    submit(["g"], SubmitArgs("Counted", "A", "a", date="2026-01-03"), out=out, runs_dir=runs)
    sub = read_json(out / "submission.json")
    assert sub["seed_results"]["1"]["sliding_val_bpb"] == round(receipts[full[-1]]["totals"]["val_bpb"], 8)
    readme = (out / "README.md").read_text()
    assert f"(`receipts/seed1_{full[-1]}`); the latest of 2 evaluations of the split, the only one counted " \
           f"(not counted: `receipts/seed1_{full[0]}`)" in readme
    assert "Every seed passed every `pgolf check` row" in readme


def _sliding_bytes_off_by_one(runs):
    """A sliding receipt whose byte count is one too many, its totals and sha256 made consistent
    (the audit accepts it; `pgolf check` recounts the bytes)."""
    from pgolf.data.tokenizer import bits_per_byte
    from pgolf.eval.receipt import receipt_digest

    run_eval(str(runs / "g-s1"), EvalOptions(stride=32), log=lambda *_: None)
    (path,) = (runs / "g-s1" / "receipts").glob("eval-sliding-*.json")
    data = json.loads(path.read_text())
    data.pop("sha256")
    data["events"][0]["bytes"] += 1
    t = data["totals"]
    t.update(bytes=t["bytes"] + 1, val_bpb=bits_per_byte(t["loss_sum"], t["tokens"], t["bytes"] + 1))
    path.write_text(json.dumps({**data, "sha256": receipt_digest(data)}))


def _drop_final_line(runs):
    log = runs / "g-s1" / "train.log"
    lines = log.read_text().splitlines(True)
    log.write_text("".join(line for line in lines if not line.startswith("final_roundtrip_exact")))


def _edit_receipt(runs):
    path = runs / "g-s2" / "receipts" / "roundtrip.json"
    data = json.loads(path.read_text())
    data["totals"]["val_bpb"] -= 0.01
    path.write_text(json.dumps(data))


def _illegal_ttt_receipt(runs):
    """A TTT receipt whose second chunk was scored by a model already trained on it."""
    r = Receipt("ttt", {"chunk_tokens": 100}, 200, "s0")
    r.add_score(0, 100, "s0", 100.0, 100, 120)
    r.add_update(0, 150, "s0", "s1")
    r.add_score(100, 200, "s1", 90.0, 100, 110)
    r.finalize()
    write_receipt(runs / "g-s1" / "receipts" / "eval-ttt-20260101-000000.json", r)


def _flip_bit(runs):
    """One bit of the artifact's payload flipped: the same size, a corrupt file."""
    path = runs / "g-s1" / "model.pgolf"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _wrong_digest(runs):
    path = runs / "g-s2" / "summary.json"
    summary = read_json(path)
    summary["size"]["artifact_sha256"] = "0" * 64
    write_json(path, summary)


def _lowered_roundtrip(runs):
    """The roundtrip receipt's sums and totals lowered consistently and its sha256 recomputed
    (the plain audit accepts it), summary.json and the log's final line edited to agree."""
    from pgolf.data.tokenizer import bits_per_byte
    from pgolf.eval.receipt import receipt_digest

    path = runs / "g-s2" / "receipts" / "roundtrip.json"
    data = json.loads(path.read_text())
    data.pop("sha256")
    (event,) = data["events"]
    event["loss_sum"] -= 1.0
    t = data["totals"]
    t.update(loss_sum=event["loss_sum"], val_loss=event["loss_sum"] / t["tokens"],
             val_bpb=bits_per_byte(event["loss_sum"], t["tokens"], t["bytes"]))
    path.write_text(json.dumps({**data, "sha256": receipt_digest(data)}))
    summary_path = runs / "g-s2" / "summary.json"
    summary = read_json(summary_path)
    old = summary["roundtrip"]
    summary["roundtrip"] = {**old, "loss_sum": t["loss_sum"], "val_loss": t["val_loss"], "val_bpb": t["val_bpb"]}
    write_json(summary_path, summary)
    log = runs / "g-s2" / "train.log"
    log.write_text(log.read_text().replace(f"val_loss:{old['val_loss']:.8f} val_bpb:{old['val_bpb']:.8f}",
                                           f"val_loss:{t['val_loss']:.8f} val_bpb:{t['val_bpb']:.8f}"))


def _edit_config(runs, key, value):
    path = runs / "g-s2" / "config.json"
    saved = read_json(path)
    section, name = key.split(".")
    saved["config"][section][name] = value
    write_json(path, saved)


def _set_status(runs):
    path = runs / "g-s2" / "summary.json"
    write_json(path, {**read_json(path), "status": "failed"})


def _grow_artifact(runs):
    with open(runs / "g-s1" / "model.pgolf", "ab") as f:
        f.write(b"\0")


@pytest.mark.parametrize("tamper, expected", [
    (_drop_final_line, r"run g-s1: train\.log lacks the final roundtrip line"),
    (_edit_receipt, r"run g-s2: receipt receipts/roundtrip\.json fails the audit: .*edited"),
    (_illegal_ttt_receipt, r"run g-s1: receipt receipts/eval-ttt-20260101-000000\.json fails the audit: .*"
                           r"already trained on tokens up to 150"),
    (lambda runs: _edit_config(runs, "model.num_layers", 4),
     r"runs g-s1 and g-s2 differ in more than the seed: model\.num_layers \(3 vs 4\)"),
    (lambda runs: _edit_config(runs, "train.seed", 1), r"runs g-s1 and g-s2 both use seed 1"),
    (_set_status, r"run g-s2: it did not finish \(status failed\)"),
    (_grow_artifact, r"run g-s1: model\.pgolf is [\d,]+ bytes but the run accounted"),
    (_flip_bit, r"run g-s1: model\.pgolf has sha256 [0-9a-f]{64} but the run recorded [0-9a-f]{64}"),
    (_wrong_digest, r"run g-s2: model\.pgolf has sha256 [0-9a-f]{64} but the run recorded 0{64}"),
    (_lowered_roundtrip, r"run g-s2: receipts/roundtrip\.json fails the rescore .*targets \(0, \d+\] differs when "
                         r"rescored"),
    (lambda runs: shutil.rmtree(runs / "g-s2" / "receipts"), r"run g-s2: receipts/roundtrip\.json is missing"),
    (_sliding_bytes_off_by_one, r"run g-s1: `pgolf check` byte accounting: FAIL: receipts/eval-sliding-\S+\.json: "
                                r"targets \(0, \d+\] are counted as [\d,]+ bytes, .*off by \+1"),
])
def test_refusals_name_the_run_and_reason(runs, capsys, tamper, expected):
    tamper(runs)
    assert run_submit(runs) == 1
    err = capsys.readouterr().err
    assert "refused" in err and re.search(expected, err), err
    assert not Path("records").exists()  # nothing written


def test_refused_when_a_seed_exceeds_the_cap(runs, monkeypatch, capsys):
    code = read_json(runs / "g-s1" / "summary.json")["size"]["code_bytes"]
    totals = {s: (runs / f"g-s{s}" / "model.pgolf").stat().st_size + code for s in SEEDS}
    over = max(totals, key=totals.get)
    monkeypatch.setattr(submit_module, "SIZE_CAP_BYTES", totals[over] - 1)
    assert run_submit(runs) == 1
    err = capsys.readouterr().err
    assert re.search(rf"run g-s{over} \(seed {over}\): artifact [\d,]+ \+ code [\d,]+ = {totals[over]:,} bytes, "
                     rf"OVER the {totals[over] - 1:,}-byte cap by 1", err), err
    assert not Path("records").exists()


def test_refused_when_the_code_changed_since_the_runs(runs, monkeypatch, capsys):
    changed = {**submit_module.bundle_modules()}
    changed["pgolf.model.gpt"] += "\n# an edit made after the runs\n"
    monkeypatch.setattr(submit_module, "bundle_modules", lambda cfg=None: changed)
    assert run_submit(runs) == 1
    err = capsys.readouterr().err
    assert "run g-s1: it counted" in err and "the code that ran differs" in err
    assert not Path("records").exists()


def test_unknown_group_and_bad_arguments(runs, capsys):
    assert run_submit(runs, target="nope") == 2
    assert "'nope' is neither a run directory nor a group" in capsys.readouterr().err
    assert cli_main(["submit", "g", "--name", "x", "--author", "a", "--github", "g", "--date", "2026-13-01",
                     "--runs-dir", str(runs)]) == 2
    assert "--date" in capsys.readouterr().err
    assert cli_main(["submit", "g", "--name", "!!!", "--author", "a", "--github", "g", "--runs-dir", str(runs)]) == 2
    assert not Path("records").exists()


def test_a_failed_write_leaves_no_partial_folder(runs, monkeypatch):
    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(submit_module.os, "rename", fail)
    with pytest.raises(OSError, match="disk full"):
        submit(["g"], SubmitArgs("Tiny Test", "A", "a", date="2026-01-02"), runs_dir=runs)
    assert list(FOLDER.parent.iterdir()) == []  # neither the folder nor its staging copy


def test_refusal_is_an_exception_for_callers(runs):
    _set_status(runs)
    with pytest.raises(SubmitRefused, match="did not finish"):
        submit(["g"], SubmitArgs("Tiny Test", "A", "a"), runs_dir=runs)


def test_a_corrupt_artifact_of_a_run_without_a_digest_is_refused(runs, capsys):
    """Runs that predate recorded digests: the container is re-read (its crc and payload sha256)."""
    for seed in SEEDS:
        path = runs / f"g-s{seed}" / "summary.json"
        summary = read_json(path)
        del summary["size"]["artifact_sha256"]
        write_json(path, summary)
    _flip_bit(runs)
    assert run_submit(runs) == 1
    err = capsys.readouterr().err
    assert re.search(r"run g-s1: model\.pgolf is corrupt and `pgolf eval` would refuse it", err), err
    assert not Path("records").exists()


def test_undigested_runs_and_no_rescore_are_said_in_the_readme(runs, capsys):
    path = runs / "g-s1" / "summary.json"
    summary = read_json(path)
    del summary["size"]["artifact_sha256"]
    write_json(path, summary)
    assert run_submit(runs, "--no-rescore") == 0
    assert "--no-rescore" in capsys.readouterr().err
    readme = (FOLDER / "README.md").read_text()
    assert "WARNING" in readme and "NOT recomputed" in readme
    assert "Run g-s1 predates recorded artifact digests" in readme
    assert read_json(FOLDER / "submission.json")["compliance"]["scores_recomputed"] is False
