"""`pgolf check` on a records folder (what `pgolf submit` writes): the checks its files allow, then
the run checks (pgolf.lab.check) of each seed's run directory that is on this machine."""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from pathlib import Path

from pgolf.lab.check import CODE_BYTES_LINE, FAIL, FINAL_LINE, MODEL_BYTES_LINE, PASS, SHA, SKIP, Row, check_row, check_run
from pgolf.lab.check_context import CheckOptions, Skip
from pgolf.lab.evaluations import EXTRA_KINDS, ROUNDTRIP, counted_evaluations
from pgolf.rules import SIZE_CAP_BYTES
from pgolf.runs import RunDir, read_json



def _last(pattern: re.Pattern, text: str):
    match = None
    for match in pattern.finditer(text):
        pass
    return match


def check_submission(folder: str | Path, opts: CheckOptions | None = None) -> list[Row]:
    """The checks a records folder's files allow (receipts, the reported numbers, code and sizes from
    the logs), then the run checks of each seed's run directory found under opts.runs_dir."""
    opts = opts or CheckOptions()
    folder = Path(folder)
    sub = read_json(folder / "submission.json")
    seeds = [str(s) for s in sub.get("seeds", [])]
    receipts: dict[str, dict[str, dict]] = {s: {} for s in seeds}
    for path in sorted((folder / "receipts").glob("seed*_*.json")):
        seed, _, name = path.name[len("seed"):].partition("_")
        try:
            receipts.setdefault(seed, {})[name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            receipts.setdefault(seed, {})[name] = {}
    logs = {s: (folder / f"train_seed{s}.log").read_text(encoding="utf-8", errors="replace")
            if (folder / f"train_seed{s}.log").exists() else "" for s in seeds}

    def score_first() -> tuple[str, str]:
        from pgolf.eval.audit import AuditFailure, audit_file

        files = sorted((folder / "receipts").glob("*.json"))
        if not files:
            raise Skip("the folder has no receipts/")
        for path in files:
            try:
                audit_file(path)
            except AuditFailure as exc:
                return FAIL, f"receipts/{path.name}: {exc}"
        missing = [s for s in seeds if ROUNDTRIP not in receipts.get(s, {})]
        if missing:
            return FAIL, f"seed {', '.join(missing)}: no roundtrip receipt (receipts/seed<S>_{ROUNDTRIP})"
        return PASS, f"{len(files)} receipts pass `pgolf audit`"

    def single_pass() -> tuple[str, str]:
        results, parts, bpbs = sub.get("seed_results") or {}, [], []
        for s in seeds:
            rc, row = receipts.get(s, {}), results.get(s) or {}
            if ROUNDTRIP not in rc:
                raise Skip(f"seed {s} has no roundtrip receipt (C3 names it)")
            scored = rc[ROUNDTRIP].get("total_targets")
            counted = counted_evaluations(rc, scored)
            bpb = counted["roundtrip"].data["totals"]["val_bpb"]
            bpbs.append(bpb)
            if row.get("val_bpb") != round(bpb, 8):
                return FAIL, (f"seed {s}: submission.json reports val_bpb {row.get('val_bpb')}, its roundtrip "
                              f"receipt {bpb}")
            final = _last(FINAL_LINE, logs.get(s, ""))
            if final is None or final[2] != f"{bpb:.8f}":
                return FAIL, (f"seed {s}: train_seed{s}.log's last roundtrip line does not report the receipt's "
                              f"{bpb:.8f}")
            for kind in EXTRA_KINDS:
                value = row.get(f"{kind}_val_bpb")
                if value is None:
                    continue
                if kind not in counted:
                    return FAIL, (f"seed {s}: submission.json reports a {kind} val_bpb but no {kind} receipt of the "
                                  "split")
                want = round(counted[kind].data["totals"]["val_bpb"], 8)
                if value != want:
                    return FAIL, (f"seed {s}: submission.json reports {kind} val_bpb {value}, but the evaluation that "
                                  f"counts ({counted[kind].name}) scored {want}")
                parts.append(f"seed {s} {kind}: {counted[kind].name}"
                             + (f" (latest of {len(counted[kind].others) + 1})" if counted[kind].others else ""))
        if bpbs and sub.get("val_bpb") != round(statistics.fmean(bpbs), 8):
            return FAIL, (f"submission.json's val_bpb {sub.get('val_bpb')} is not the mean of the seeds' roundtrip "
                          "receipts")
        return PASS, ("each seed's val_bpb is its roundtrip receipt's and its log's last line; the claim is their mean"
                      + ("; " + ", ".join(parts) if parts else ""))

    def artifact() -> tuple[str, str]:
        code_path = folder / "train_gpt.py"
        if not code_path.is_file():
            return FAIL, "the folder has no train_gpt.py"
        code = code_path.read_bytes()
        sha = hashlib.sha256(code).hexdigest()[:16]
        models = []
        for s in seeds:
            model, counted = _last(MODEL_BYTES_LINE, logs.get(s, "")), _last(CODE_BYTES_LINE, logs.get(s, ""))
            if model is None or counted is None:
                raise Skip(f"train_seed{s}.log has no size lines (artifact model bytes / code bytes)")
            digest = SHA.search(counted[2])
            if int(counted[1].replace(",", "")) != len(code) or digest is None or digest[1] != sha:
                what = digest[0] if digest else "no sha256"
                return FAIL, (f"seed {s} counted {counted[1]} code bytes ({what}) but train_gpt.py is "
                              f"{len(code):,} bytes (sha256:{sha}): the shipped code is not the counted code")
            models.append(int(model[1].replace(",", "")))
        if not models:
            raise Skip("no seeds")
        total = max(models) + len(code)
        if sub.get("bytes_total") != total:
            return FAIL, f"submission.json's bytes_total {sub.get('bytes_total')} is not the logs' {total:,}"
        if total > SIZE_CAP_BYTES:
            return FAIL, f"largest artifact {max(models):,} + code {len(code):,} = {total:,} bytes, over the cap"
        return PASS, (f"largest artifact {max(models):,} + train_gpt.py {len(code):,} = {total:,} <= "
                      f"{SIZE_CAP_BYTES:,} bytes (from the logs and the file); every seed counted this train_gpt.py "
                      f"(sha256:{sha})")

    rows = [check_row("c3", "C3 score before update", score_first, opts),
            check_row("c4", "C4 single pass", single_pass, opts),
            check_row("artifact", "artifact", artifact, opts)]
    for s in seeds:
        run_id = ((sub.get("seed_results") or {}).get(s) or {}).get("run_id", "")
        run_dir = Path(opts.runs_dir) / run_id
        if run_id and RunDir(run_dir).is_run():
            rows += check_run(run_dir, opts, target=f"seed {s}")
        else:
            rows.append(Row("c1", "run checks", SKIP, f"the run directory {run_dir} is not here (pass --runs-dir): C1, "
                                                      "C2, bytes, provenance and the phases need the run", f"seed {s}"))
    return rows
