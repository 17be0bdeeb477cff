"""Evaluation receipts end to end: `pgolf eval` writes one that `pgolf audit` accepts (standard,
sliding, TTT), the standard one reproduces the training run's roundtrip score, any edit is
caught (by the sha256, and by the semantic checks once the sha256 is recomputed), broken
files fail cleanly, and the state fingerprint sees every single parameter element."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from pgolf.cli import main as cli_main
from pgolf.eval.audit import AuditFailure, audit_file, audit_receipt
from pgolf.eval.receipt import Receipt, receipt_digest, state_fingerprint, write_receipt
from pgolf.train.run import run_training
from tests.eval.test_evaluate import tiny_gpt
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SHA_MESSAGE = "does not match its sha256"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("receipt")
    summary = run_training(tiny_config(tmp, "train.iterations=8", "train.val_loss_every=0", "run.run_id=tiny"),
                           console=False)
    assert summary["status"] == "done"
    return tmp / "runs" / "tiny"


def eval_json(run_dir: Path, capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli_main(["eval", str(run_dir), "--json", "--device", "cpu", *args]) == 0
    return json.loads(capsys.readouterr().out)


def audit_cli(path: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(["audit", str(path)])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def ttt_receipt(run_dir, tmp_path_factory) -> dict:
    """A TTT receipt written by `pgolf eval --ttt` (several scores and updates)."""
    path = tmp_path_factory.mktemp("ttt") / "ttt.json"
    code = cli_main(["eval", str(run_dir), "--device", "cpu", "--ttt", "--ttt-chunk", "1000", "--ttt-epochs", "1",
                     "--ttt-lr", "0.01", "--ttt-batch", "4", "--stride", "32", "--receipt", str(path)])
    assert code == 0
    data = json.loads(path.read_text())
    assert [e["type"] for e in data["events"]] == ["score", "update"] * 4 + ["score"]
    return data


# --- pgolf eval / pgolf audit ------------------------------------------------------------------

def test_standard_eval_reproduces_the_roundtrip_and_its_receipt_passes(run_dir, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    # The training run's own roundtrip receipt passes the audit and holds the summary's numbers.
    code, out = audit_cli(run_dir / "receipts" / "roundtrip.json", capsys)
    assert code == 0 and out.startswith("OK ")
    roundtrip = audit_file(run_dir / "receipts" / "roundtrip.json")
    assert roundtrip.val_bpb == summary["roundtrip"]["val_bpb"]
    # Re-scoring the artifact with the training run's batch (val_batch_size 4096 / 8 / 64 = 8
    # windows) is the same computation: the same number, exactly.
    before = set((run_dir / "receipts").glob("eval-*.json"))
    result = eval_json(run_dir, capsys, "--batch", "8")
    assert result["kind"] == "standard"
    for key in ("val_bpb", "val_loss", "loss_sum", "tokens", "bytes"):
        assert result[key] == summary["roundtrip"][key], key
    (path,) = set((run_dir / "receipts").glob("eval-standard-*.json")) - before
    assert Path(result["receipt"]) == path
    report = audit_file(path)
    assert (report.kind, report.val_bpb, report.scored_targets, report.updates) == (
        "standard", result["val_bpb"], result["tokens"], 0)
    data = json.loads(path.read_text())
    assert data["settings"] == {"seq_len": 64, "stride": 64}
    assert data["initial_state"] == json.loads((run_dir / "receipts" / "roundtrip.json").read_text())["initial_state"]
    code, out = audit_cli(path, capsys)
    assert code == 0 and out.startswith(f"OK {path}") and "standard val_bpb" in out
    # The default batch sums the same per-token losses in another order.
    other = eval_json(run_dir, capsys)
    assert other["val_bpb"] == pytest.approx(result["val_bpb"], rel=1e-12)
    assert other["receipt"] != result["receipt"]  # a second receipt never overwrites the first


def test_sliding_and_ttt_evals_pass_the_audit(run_dir, capsys, ttt_receipt):
    standard = eval_json(run_dir, capsys)
    sliding = eval_json(run_dir, capsys, "--stride", "16")
    assert sliding["kind"] == "sliding" and "sliding" in Path(sliding["receipt"]).name
    assert (sliding["tokens"], sliding["bytes"]) == (standard["tokens"], standard["bytes"])
    assert sliding["val_bpb"] != standard["val_bpb"]
    ttt = eval_json(run_dir, capsys, "--stride", "16", "--ttt", "--ttt-chunk", "1024", "--ttt-epochs", "1",
                    "--ttt-lr", "0.01", "--ttt-batch", "4")
    assert ttt["kind"] == "ttt" and (ttt["tokens"], ttt["bytes"]) == (standard["tokens"], standard["bytes"])
    assert ttt["val_bpb"] != sliding["val_bpb"]
    for result in (sliding, ttt):
        code, out = audit_cli(Path(result["receipt"]), capsys)
        assert code == 0 and out.startswith("OK ") and f"{result['kind']} val_bpb {result['val_bpb']:.8f}" in out
    data = json.loads(Path(ttt["receipt"]).read_text())
    assert data["settings"]["chunk_tokens"] == 1024 and data["settings"]["chunks"] == 4
    assert sum(e["type"] == "update" for e in data["events"]) == 3
    assert audit_receipt(ttt_receipt).updates == 4


def test_human_output_names_the_receipt(run_dir, capsys):
    capsys.readouterr()
    assert cli_main(["eval", str(run_dir), "--device", "cpu", "--stride", "32"]) == 0
    out = capsys.readouterr().out
    assert "sliding val_loss:" in out and "pgolf audit" in out
    path = out.split("receipt: ", 1)[1].split(" ", 1)[0]
    assert audit_file(path).kind == "sliding"


# --- tampering ---------------------------------------------------------------------------------

def write(tmp_path: Path, data: dict, name: str = "edited.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=1))
    return path


def resealed(data: dict) -> dict:
    body = {k: v for k, v in data.items() if k != "sha256"}
    return {**body, "sha256": receipt_digest(body)}


def first(data: dict, kind: str, index: int = 0) -> dict:
    return [e for e in data["events"] if e["type"] == kind][index]


def edit_loss(d):
    first(d, "score", 1)["loss_sum"] += 1.0


def edit_state(d):
    first(d, "score", 2)["state"] = "0" * 32


def edit_range(d):
    first(d, "score", 1)["hi"] -= 1
    first(d, "score", 1)["tokens"] -= 1


def edit_totals(d):
    d["totals"]["bytes"] += 1


def edit_bpb(d):
    d["totals"]["val_bpb"] *= 0.99


def edit_update(d):
    first(d, "update", 1)["before"] = first(d, "update", 0)["before"]


def edit_swap_order(d):  # adapt on chunk 1 before scoring it, and score it with the adapted state
    ev = d["events"]
    ev[2], ev[3] = ev[3], ev[2]
    ev[3]["state"] = ev[2]["after"]


def edit_drop_score(d):
    d["events"] = [e for e in d["events"] if e is not first(d, "score", 4)]


def edit_overlap(d):
    e = first(d, "score", 1)
    e["lo"] -= 1
    e["tokens"] += 1


def edit_tokens_only(d):
    first(d, "score", 0)["tokens"] += 1


EDITS = {
    # name: (edit, message of the semantic check once the sha256 is recomputed)
    "partial_sum": (edit_loss, "reported totals .* differ from the events' sums"),
    "state": (edit_state, r"were scored by state 0{32}, which no recorded update produced"),
    "range": (edit_range, r"scores targets \(2000, 3000\] but targets up to 1999 were scored so far"),
    "totals": (edit_totals, "reported totals .* differ from the events' sums"),
    "val_bpb": (edit_bpb, "reported val_bpb .* differs from the sums'"),
    "update_chain": (edit_update, "update starts from state"),
    "train_first": (edit_swap_order,
                    r"already trained on tokens up to 2000; first offending target range \(1000, 2000\]"),
    "missing_range": (edit_drop_score, r"only targets 1\.\.4000 of 4096 were scored"),
    # (999, 2000] overlaps (0, 1000]; target 1000 was also trained on already, which is found first
    "overlap": (edit_overlap, r"already trained on tokens up to 1000; first offending target range \(999, 1000\]"),
    "token_count": (edit_tokens_only, r"range \(0, 1000\] has 1000 targets but reports 1001"),
}


@pytest.mark.parametrize("name", EDITS)
def test_any_edit_breaks_the_sha256(ttt_receipt, tmp_path, name):
    data = copy.deepcopy(ttt_receipt)
    EDITS[name][0](data)
    assert data != ttt_receipt
    with pytest.raises(AuditFailure, match=SHA_MESSAGE):
        audit_file(write(tmp_path, data))


@pytest.mark.parametrize("name", EDITS)
def test_resealed_edits_fail_the_semantic_checks(ttt_receipt, tmp_path, name, capsys):
    edit, message = EDITS[name]
    data = copy.deepcopy(ttt_receipt)
    edit(data)
    path = write(tmp_path, resealed(data))
    with pytest.raises(AuditFailure, match=message) as info:
        audit_file(path)
    assert SHA_MESSAGE not in str(info.value)
    code, out = audit_cli(path, capsys)
    assert code == 1 and out.startswith(f"FAIL {path}: ")


def test_resealed_unedited_receipt_still_passes(ttt_receipt, tmp_path):
    assert resealed(ttt_receipt) == ttt_receipt  # the sha256 is over exactly the rest of the file
    assert audit_file(write(tmp_path, ttt_receipt)).scored_targets == 4096
    # Formatting does not matter to the sha256; the (unaudited) info block is covered by it.
    (tmp_path / "compact.json").write_text(json.dumps(ttt_receipt))
    assert audit_file(tmp_path / "compact.json").updates == 4
    edited = copy.deepcopy(ttt_receipt)
    edited["info"]["eval_seconds"] = 0.0
    with pytest.raises(AuditFailure, match=SHA_MESSAGE):
        audit_file(write(tmp_path, edited))


def test_overlapping_and_missing_ranges_without_updates(tmp_path):
    def receipt_with(ranges):
        r = Receipt("sliding", {"seq_len": 4, "stride": 2}, 20, "s")
        for lo, hi in ranges:
            r.add_score(lo, hi, "s", 1.5 * (hi - lo), hi - lo, 2 * (hi - lo))
        r.finalize()
        return {**r.body(), "sha256": receipt_digest(r.body())}

    assert audit_receipt(receipt_with([(0, 10), (10, 20)])).scored_targets == 20
    with pytest.raises(AuditFailure, match=r"scores targets \(9, 20\] but targets up to 10 were scored so far"):
        audit_receipt(receipt_with([(0, 10), (9, 20)]))
    with pytest.raises(AuditFailure, match=r"scores targets \(11, 20\] but targets up to 10 were scored so far"):
        audit_receipt(receipt_with([(0, 10), (11, 20)]))
    with pytest.raises(AuditFailure, match=r"only targets 1\.\.10 of 20 were scored"):
        audit_receipt(receipt_with([(0, 10)]))
    with pytest.raises(AuditFailure, match=r"only targets 1\.\.20 of 20|targets up to 20 were scored"):
        audit_receipt(receipt_with([(0, 10), (10, 20), (10, 20)]))


def test_wrong_format_is_refused(ttt_receipt, tmp_path):
    with pytest.raises(AuditFailure, match="not a pgolf evaluation receipt"):
        audit_file(write(tmp_path, resealed({**ttt_receipt, "format": "something-else/1"})))


# --- broken files ------------------------------------------------------------------------------

BROKEN = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "not_json": lambda text: "receipt: yes\n",
}


@pytest.mark.parametrize("name", BROKEN)
def test_unreadable_files_fail_cleanly(ttt_receipt, tmp_path, capsys, name):
    path = tmp_path / "broken.json"
    path.write_text(BROKEN[name](json.dumps(ttt_receipt)))
    with pytest.raises(AuditFailure, match="cannot read receipt"):
        audit_file(path)
    code, out = audit_cli(path, capsys)
    assert code == 1 and out.startswith(f"FAIL {path}: cannot read receipt")


def test_missing_file_and_missing_fields_fail_cleanly(ttt_receipt, tmp_path, capsys):
    with pytest.raises(AuditFailure, match="cannot read receipt"):
        audit_file(tmp_path / "nowhere.json")
    code, out = audit_cli(tmp_path / "nowhere.json", capsys)
    assert code == 1 and out.startswith("FAIL")
    for drop in ("events", "totals", "initial_state", "total_targets"):
        data = resealed({k: v for k, v in ttt_receipt.items() if k != drop})
        with pytest.raises(AuditFailure, match="malformed"):
            audit_file(write(tmp_path, data))
    data = copy.deepcopy(ttt_receipt)
    del first(data, "score", 1)["bytes"]
    with pytest.raises(AuditFailure, match="malformed"):
        audit_file(write(tmp_path, resealed(data)))
    data = copy.deepcopy(ttt_receipt)
    data["events"][0]["type"] = "peek"
    with pytest.raises(AuditFailure, match="unknown type 'peek'"):
        audit_file(write(tmp_path, resealed(data)))


@pytest.mark.parametrize("content", ["[1, 2]", "null", '"receipt"'])
def test_json_that_is_not_an_object_fails_cleanly(tmp_path, content):
    path = tmp_path / "odd.json"
    path.write_text(content)
    with pytest.raises(AuditFailure):
        audit_file(path)


def test_binary_file_fails_cleanly(tmp_path, capsys):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00\x01garbage")
    try:
        audit_file(path)
    except AuditFailure:
        pass
    code, out = audit_cli(path, capsys)
    assert code == 1 and out.startswith("FAIL")


def test_receipt_without_targets_fails_cleanly():
    receipt = Receipt("standard", {}, 0, "s")
    receipt.totals = {"loss_sum": 0.0, "tokens": 0, "bytes": 0, "val_loss": 0.0, "val_bpb": 0.0}
    with pytest.raises(AuditFailure):
        audit_receipt({**receipt.body(), "sha256": receipt_digest(receipt.body())})


def test_edited_val_loss_fails_the_audit(ttt_receipt, tmp_path):
    data = copy.deepcopy(ttt_receipt)
    data["totals"]["val_loss"] *= 0.5
    with pytest.raises(AuditFailure, match="val_loss"):
        audit_file(write(tmp_path, resealed(data)))


def test_backward_range_cannot_score_targets_twice():
    receipt = Receipt("sliding", {}, 10, "s")
    receipt.add_score(0, 10, "s", 20.0, 10, 30)
    receipt.add_score(10, 5, "s", -5.0, -5, -15)
    receipt.add_score(5, 10, "s", 4.0, 5, 15)
    receipt.finalize()
    with pytest.raises(AuditFailure):
        audit_receipt({**receipt.body(), "sha256": receipt_digest(receipt.body())})


def test_receipt_file_is_never_overwritten(tmp_path):
    receipt = Receipt("standard", {}, 4, "s")
    receipt.add_score(0, 4, "s", 8.0, 4, 5)
    receipt.finalize()
    path = write_receipt(tmp_path / "r.json", receipt)
    with pytest.raises(FileExistsError):
        write_receipt(path, receipt)
    assert audit_file(path).val_bpb == pytest.approx(8.0 / 0.6931471805599453 / 5, rel=1e-15)


# --- the state fingerprint ----------------------------------------------------------------------

def test_state_fingerprint_sees_every_single_element_change():
    model = tiny_gpt(9)
    base = state_fingerprint(model)
    assert state_fingerprint(model) == base  # stable
    assert state_fingerprint(copy.deepcopy(model)) == base
    other = tiny_gpt(9)
    other.load_state_dict(model.state_dict())
    assert state_fingerprint(other) == base
    g = torch.Generator().manual_seed(0)
    seen = {base}
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.view(-1)
            picks = {0, flat.numel() - 1, int(torch.randint(flat.numel(), (1,), generator=g))}
            for i in sorted(picks):
                old = flat[i].clone()
                # one float32 ulp up (zeros: to 1e-6; one denormal step is below the float64 sums' resolution)
                up = torch.nextafter(old, torch.tensor(float("inf"))) if old != 0 else old + 1e-6
                for new in (up, -old if old != 0 else old - 1e-3):
                    flat[i] = new
                    fp = state_fingerprint(model)
                    assert fp != base, f"{name}[{i}]: {old.item()} -> {new.item()} not seen"
                    seen.add(fp)
                flat[i] = old
                assert state_fingerprint(model) == base
    assert len(seen) > 2 * len(list(model.parameters()))  # distinct changes, distinct fingerprints
    # Evaluating does not change it; a training step does.
    x = torch.randint(0, 64, (2, 16))
    model.eval()
    with torch.no_grad():
        model(x, x.roll(-1, 1))
    assert state_fingerprint(model) == base
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model(x, x.roll(-1, 1)).backward()
    opt.step()
    assert state_fingerprint(model) != base


@pytest.mark.parametrize("change", ["swap_1021_apart", "denormal"])
def test_state_fingerprint_sees_bit_level_changes(change):
    model = tiny_gpt(10)
    base = state_fingerprint(model)
    with torch.no_grad():
        flat = model.tok_emb.weight.view(-1)
        if change == "swap_1021_apart":
            # Values with few mantissa bits (as dequantized int8 rows have) make the sums exact.
            flat.copy_(torch.randint(-127, 128, flat.shape, generator=torch.Generator().manual_seed(0)) / 1024)
            base = state_fingerprint(model)
            assert flat[5] != flat[5 + 1021]
            flat[5], flat[5 + 1021] = flat[5 + 1021].clone(), flat[5].clone()
        else:
            model.blocks[0].resid_mix.view(-1)[-1] = 1.401298464324817e-45  # was 0.0
    assert state_fingerprint(model) != base
