"""Evaluation receipts: every reported val_bpb can be re-checked mechanically (pgolf.eval.audit).

A receipt is a JSON record of one evaluation, as an ordered list of events:
  score   a target range (lo, hi] of the validation stream, the fingerprint of the model state
          that scored it, and the exact partial sums (nats, tokens, bytes);
  update  (test-time training) the token range [lo, hi] an update consumed, and the state
          fingerprints before and after it.
Per-document LoRA TTT (kind doc_lora, pgolf.eval.doc_ttt) records instead:
  batch   one batch of documents: its rank, the base state that scored it, the fingerprints of
          the LoRA A matrices at its start (and whether fresh) and end, and per document a row
          DOC_ROW: its target range, the first and last token its windows read, its sums, and
          the order of its chunk events ("s" scored, "u" an update on the chunk just scored);
  phase   a global phase: the base states before and after it and the documents it trained on.
The audit (pgolf.eval.audit) replays the events: the scored ranges must tile 1..T exactly once;
each score must use the current state; no target may be scored by a state whose updates
consumed that target or any later token (score first, adapt after); the reported totals must
equal the sums of the events; and the receipt's own sha256 must match its content (a tampered
receipt fails). Training only writes receipts, so the audit lives apart and is not shipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pgolf.data.tokenizer import bits_per_byte
from pgolf.runtime.files import atomic_write

RECEIPT_FORMAT = "pgolf-eval-receipt/1"
DOC_ROW = ("lo", "hi", "ctx_from", "ctx_to", "loss_sum", "tokens", "bytes", "ops")


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def state_fingerprint(model: nn.Module) -> str:
    """A cheap, device-side digest of the exact bits of every parameter.

    Per tensor: the int64 sums (wrapping) of each element's bit pattern, plain and weighted by
    an odd position-dependent multiplier, hashed with the names. Any change of any bit, or any
    reordering, changes it with overwhelming probability, at a fraction of hashing the bytes."""
    return tensors_fingerprint(model.named_parameters())


def tensors_fingerprint(named) -> str:
    """state_fingerprint of (name, tensor) pairs (e.g. only the LoRA A matrices)."""
    named = sorted(named, key=lambda item: item[0])
    rows = []
    with torch.no_grad():
        for name, p in named:
            bits = p.detach().reshape(-1).contiguous().view(_INT_VIEW[p.element_size()]).long()
            weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) * 0x9E3779B1 + 1
            rows.append(torch.stack((bits.sum(), (bits * (weights | 1)).sum())))
    digest = hashlib.sha256()
    for (name, _), values in zip(named, torch.stack(rows).cpu().tolist()):
        digest.update(name.encode())
        digest.update(json.dumps(values).encode())
    return digest.hexdigest()[:32]


@dataclass
class Receipt:
    kind: str  # standard | sliding | ttt | doc_lora
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
            elif e["type"] == "batch":  # doc_lora: one row per document, DOC_ROW's fields
                for row in e["docs"]:
                    loss_sum += row[4]
                    tokens += row[5]
                    nbytes += row[6]
        self.totals = {"loss_sum": loss_sum, "tokens": tokens, "bytes": nbytes,
                       "val_loss": loss_sum / tokens, "val_bpb": bits_per_byte(loss_sum, tokens, nbytes)}
        return self.totals

    def body(self) -> dict:
        return {"format": RECEIPT_FORMAT, "kind": self.kind, "settings": self.settings,
                "total_targets": self.total_targets, "initial_state": self.initial_state,
                "events": self.events, "totals": self.totals, "info": self.info}


def receipt_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_receipt(path: Path, receipt: Receipt, overwrite: bool = False) -> Path:
    body = receipt.body()
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"receipt {path} already exists; choose another path")
    atomic_write(path, json.dumps({**body, "sha256": receipt_digest(body)}, indent=1) + "\n")
    return path
