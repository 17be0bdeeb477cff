"""Which evaluation counts (issue #1017's C4: one left-to-right pass, no selection among several).

A run can hold several receipts for the same split: the roundtrip that `pgolf train` scored, and
any number of `pgolf eval` runs, some of them sliding or TTT, some repeated. The rule, fixed before
any score is seen and the same for `pgolf check`, `pgolf submit` and the ledger:

- the claimed score is the roundtrip (receipts/roundtrip.json), the one evaluation training did;
- for sliding and TTT, the latest receipt of that kind (names sort by UTC time) among those that
  evaluated the run's artifact on the run's scored targets (the ledger's rule too); earlier ones
  are listed as evaluations that do not count;
- prefix evaluations (--max-tokens), live weights (--live) and other data (--data) are not
  evaluations of the split and never count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROUNDTRIP = "roundtrip.json"
EXTRA_KINDS = ("sliding", "ttt")


@dataclass
class Counted:
    kind: str  # roundtrip | sliding | ttt
    name: str  # the receipt file that counts
    data: dict
    others: list[str] = field(default_factory=list)  # other evaluations of the same split, not counted


def evaluates_split(data: dict, scored_targets: int | None) -> bool:
    """Whether a `pgolf eval` receipt scored the run's artifact on the run's scored targets."""
    info = data.get("info") or {}
    if not str(info.get("source", "artifact")).startswith("artifact") or info.get("data_dir"):
        return False
    return scored_targets is None or data.get("total_targets") == scored_targets


def counted_evaluations(receipts: dict[str, dict], scored_targets: int | None) -> dict[str, Counted]:
    """kind -> the evaluation that counts, from a run's receipts (file name -> receipt JSON)."""
    counted: dict[str, Counted] = {}
    repeats = [n for n, d in sorted(receipts.items())
               if n != ROUNDTRIP and d.get("kind") == "standard" and evaluates_split(d, scored_targets)]
    if ROUNDTRIP in receipts:
        counted["roundtrip"] = Counted("roundtrip", ROUNDTRIP, receipts[ROUNDTRIP], repeats)
    for kind in EXTRA_KINDS:
        names = [n for n, d in sorted(receipts.items())
                 if n != ROUNDTRIP and d.get("kind") == kind and evaluates_split(d, scored_targets)]
        if names:
            counted[kind] = Counted(kind, names[-1], receipts[names[-1]], names[:-1])
    return counted


def not_of_the_split(receipts: dict[str, dict], scored_targets: int | None) -> list[str]:
    """Receipts of evaluations that are not of the run's split (prefixes, live weights, other data)."""
    return [n for n, d in sorted(receipts.items()) if n != ROUNDTRIP and not evaluates_split(d, scored_targets)]
