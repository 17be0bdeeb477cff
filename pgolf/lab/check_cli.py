"""The `pgolf check RUN_DIR | SUBMISSION_DIR` command: which checks to run, the rows printed or as
JSON, and its exit status (pgolf.lab.check says what each check verifies)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pgolf.lab.check import FAIL, KEYS, PASS, SKIP, Row, check_run, failed
from pgolf.lab.check_context import CheckOptions
from pgolf.lab.check_submission import check_submission
from pgolf.rules import EXIT_FAILED, EXIT_OK
from pgolf.runs import RunDir

def check_target(target: str | Path, opts: CheckOptions | None = None) -> list[Row]:
    path = Path(target)
    if RunDir(path).is_run():
        return check_run(path, opts)
    if (path / "submission.json").is_file():
        return check_submission(path, opts)
    raise FileNotFoundError(f"{target} is neither a run directory ({RunDir.CONFIG}) nor a records folder "
                            "(submission.json)")


def render(rows: list[Row], target: str) -> str:
    width = max(len((f"{r.target}: " if r.target else "") + r.check) for r in rows)
    lines = [f"pgolf check {target}"]
    for r in rows:
        name = (f"{r.target}: " if r.target else "") + r.check
        lines.append(f"{r.status}  {name:<{width}}  {r.detail}")
    counts = {s: sum(r.status == s for r in rows) for s in (PASS, FAIL, SKIP)}
    verdict = FAIL if counts[FAIL] else PASS
    lines.append(f"result: {verdict} ({counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped)")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    from pgolf.config import ConfigError

    skip = tuple(k.strip() for k in (args.skip or "").split(",") if k.strip())
    unknown = [k for k in skip if k not in KEYS]
    if unknown:
        raise ConfigError(f"--skip {', '.join(unknown)}: the checks are {', '.join(KEYS)}")
    if args.windows < 1:
        raise ConfigError(f"--windows must be at least 1 (evaluation windows per probe), got {args.windows}")
    opts = CheckOptions(device=args.device, windows=args.windows, seed=args.seed, data_dir=args.data,
                        runs_dir=args.runs_dir, skip=skip)
    rows = check_target(args.target, opts)
    if args.json:
        print(json.dumps({"target": args.target, "ok": not failed(rows), "rows": [r.to_dict() for r in rows]},
                         indent=2))
    else:
        print(render(rows, args.target))
    return EXIT_FAILED if failed(rows) else EXIT_OK


def register(subparsers) -> None:
    p = subparsers.add_parser("check", help="legality (causal, normalized, score-first, single pass), bytes, data "
                                            "provenance, compute phases and size of a run or records folder")
    p.add_argument("target", help="a run directory (runs/<id>) or a records folder written by `pgolf submit`")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the probes run (default cpu)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="shards (fineweb_val_*/fineweb_train_*) and tokenizer from DIR instead of the run's")
    p.add_argument("--runs-dir", default="runs", help="where a records folder's seed runs are (default runs)")
    p.add_argument("--windows", type=int, default=3, help="evaluation windows each probe samples (default 3)")
    p.add_argument("--seed", type=int, default=0, help="the probes' sampling seed (default 0)")
    p.add_argument("--skip", default=None, metavar="KEYS", help=f"comma list of checks not to run: {', '.join(KEYS)}")
    p.set_defaults(handler=cmd_check)
