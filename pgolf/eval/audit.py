"""The audit of an evaluation receipt (pgolf.eval.receipt): replay its events and re-derive the
reported score, or name the first thing that does not hold. `pgolf audit` and `pgolf submit`
run it; training only writes receipts, so a shipped train_gpt.py does not carry it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pgolf.data.tokenizer import bits_per_byte
from pgolf.eval.receipt import RECEIPT_FORMAT, receipt_digest


class AuditFailure(ValueError):
    """A receipt that does not prove its reported score."""


@dataclass
class AuditReport:
    kind: str
    val_bpb: float
    val_loss: float
    scored_targets: int
    updates: int


def audit_receipt(data: dict) -> AuditReport:
    """Re-check a receipt (as loaded from JSON); raise AuditFailure naming the first problem."""
    if not isinstance(data, dict):
        raise AuditFailure(f"not a pgolf evaluation receipt (a JSON {type(data).__name__}, not an object)")
    body = {k: v for k, v in data.items() if k != "sha256"}
    if data.get("format") != RECEIPT_FORMAT:
        raise AuditFailure(f"not a pgolf evaluation receipt (format {data.get('format')!r})")
    if data.get("sha256") != receipt_digest(body):
        raise AuditFailure("receipt content does not match its sha256: it was edited after it was written")
    if data["total_targets"] <= 0:
        raise AuditFailure("the receipt scores no targets")
    state = data["initial_state"]
    consumed_upto = -1  # highest token index any update so far has trained on
    covered = 0  # targets 1..covered are scored
    loss_sum, tokens, nbytes, updates = 0.0, 0, 0, 0
    for i, e in enumerate(data["events"]):
        if e["type"] == "update":
            if data["kind"] != "ttt":
                raise AuditFailure(f"event {i}: a {data['kind']} evaluation must not update the model")
            if e["before"] != state:
                raise AuditFailure(f"event {i}: update starts from state {e['before']} but the model was {state}")
            state = e["after"]
            consumed_upto = max(consumed_upto, e["hi"])
            updates += 1
        elif e["type"] == "score":
            lo, hi = e["lo"], e["hi"]
            if not lo < hi <= data["total_targets"]:
                raise AuditFailure(f"event {i}: ({lo}, {hi}] is not a target range within 1..{data['total_targets']}")
            if e["state"] != state:
                raise AuditFailure(f"event {i}: targets ({lo}, {hi}] were scored by state {e['state']}, "
                                   f"which no recorded update produced (current state {state})")
            if consumed_upto > lo:
                raise AuditFailure(
                    f"event {i}: targets ({lo}, {hi}] were scored by a model already trained on tokens up to "
                    f"{consumed_upto}; first offending target range ({lo}, {min(hi, consumed_upto)}]")
            if lo != covered:
                raise AuditFailure(f"event {i}: scores targets ({lo}, {hi}] but targets up to {covered} were "
                                   f"scored so far: every target must be scored exactly once, in order")
            if e["tokens"] != hi - lo:
                raise AuditFailure(f"event {i}: range ({lo}, {hi}] has {hi - lo} targets but reports {e['tokens']}")
            covered = hi
            loss_sum += e["loss_sum"]
            tokens += e["tokens"]
            nbytes += e["bytes"]
        else:
            raise AuditFailure(f"event {i}: unknown type {e.get('type')!r}")
    if covered != data["total_targets"]:
        raise AuditFailure(f"only targets 1..{covered} of {data['total_targets']} were scored")
    totals = data["totals"]
    if (totals["loss_sum"], totals["tokens"], totals["bytes"]) != (loss_sum, tokens, nbytes):
        raise AuditFailure(f"reported totals {totals['loss_sum']}, {totals['tokens']}, {totals['bytes']} differ "
                           f"from the events' sums {loss_sum}, {tokens}, {nbytes}")
    try:
        bpb = bits_per_byte(loss_sum, tokens, nbytes)
    except ValueError as exc:
        raise AuditFailure(f"the sums give no val_bpb: {exc}") from None
    if not math.isclose(totals["val_bpb"], bpb, rel_tol=1e-12):
        raise AuditFailure(f"reported val_bpb {totals['val_bpb']} differs from the sums' {bpb}")
    if not math.isclose(totals["val_loss"], loss_sum / tokens, rel_tol=1e-12):
        raise AuditFailure(f"reported val_loss {totals['val_loss']} differs from the sums' {loss_sum / tokens}")
    return AuditReport(data["kind"], bpb, loss_sum / tokens, tokens, updates)


def audit_file(path: str | Path) -> AuditReport:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers bad JSON and bad UTF-8
        raise AuditFailure(f"cannot read receipt {path}: {exc}") from None
    try:
        return audit_receipt(data)
    except (KeyError, TypeError) as exc:
        raise AuditFailure(f"receipt {path} is malformed: missing or wrong field {exc}") from None
