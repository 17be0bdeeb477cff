"""Evaluation receipts and their audit: every reported val_bpb can be re-checked mechanically.

A receipt is a JSON record of one evaluation, as an ordered list of events:
  score   a target range (lo, hi] of the validation stream, the fingerprint of the model state
          that scored it, and the exact partial sums (nats, tokens, bytes);
  update  (test-time training) the token range [lo, hi] an update consumed, and the state
          fingerprints before and after it.
The audit replays the events: the scored ranges must tile 1..T exactly once; each score must
use the current state; no target may be scored by a state whose updates consumed that target
or any later token (score first, adapt after); the reported totals must equal the sums of the
events; and the receipt's own sha256 must match its content (a tampered receipt fails).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pgolf.data.tokenizer import bits_per_byte
from pgolf.runtime.files import atomic_write

RECEIPT_FORMAT = "pgolf-eval-receipt/1"


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def state_fingerprint(model: nn.Module) -> str:
    """A cheap, device-side digest of the exact bits of every parameter.

    Per tensor: the int64 sums (wrapping) of each element's bit pattern, plain and weighted by
    an odd position-dependent multiplier, hashed with the names. Any change of any bit, or any
    reordering, changes it with overwhelming probability, at a fraction of hashing the bytes."""
    rows = []
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            bits = p.detach().reshape(-1).contiguous().view(_INT_VIEW[p.element_size()]).long()
            weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) * 0x9E3779B1 + 1
            rows.append(torch.stack((bits.sum(), (bits * (weights | 1)).sum())))
    digest = hashlib.sha256()
    for (name, _), values in zip(sorted(model.named_parameters()), torch.stack(rows).cpu().tolist()):
        digest.update(name.encode())
        digest.update(json.dumps(values).encode())
    return digest.hexdigest()[:32]


@dataclass
class Receipt:
    kind: str  # standard | sliding | ttt
    settings: dict
    total_targets: int
    initial_state: str
    events: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # artifact, timings: not audited

    def add_score(self, lo: int, hi: int, state: str, loss_sum: float, tokens: int, nbytes: int) -> None:
        self.events.append({"type": "score", "lo": lo, "hi": hi, "state": state, "loss_sum": loss_sum,
                            "tokens": tokens, "bytes": nbytes})

    def add_update(self, lo: int, hi: int, state_before: str, state_after: str) -> None:
        self.events.append({"type": "update", "lo": lo, "hi": hi, "before": state_before, "after": state_after})

    def finalize(self) -> dict:
        """Sum the score events (in order, as the audit will) into the reported totals."""
        loss_sum, tokens, nbytes = 0.0, 0, 0
        for e in self.events:
            if e["type"] == "score":
                loss_sum += e["loss_sum"]
                tokens += e["tokens"]
                nbytes += e["bytes"]
        self.totals = {"loss_sum": loss_sum, "tokens": tokens, "bytes": nbytes,
                       "val_loss": loss_sum / tokens, "val_bpb": bits_per_byte(loss_sum, tokens, nbytes)}
        return self.totals

    def body(self) -> dict:
        return {"format": RECEIPT_FORMAT, "kind": self.kind, "settings": self.settings,
                "total_targets": self.total_targets, "initial_state": self.initial_state,
                "events": self.events, "totals": self.totals, "info": self.info}


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_receipt(path: Path, receipt: Receipt, overwrite: bool = False) -> Path:
    body = receipt.body()
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"receipt {path} already exists; choose another path")
    atomic_write(path, json.dumps({**body, "sha256": _digest(body)}, indent=1) + "\n")
    return path


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
    if data.get("sha256") != _digest(body):
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
