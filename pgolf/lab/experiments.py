"""Groups of runs: `pgolf run PRESET --seeds ...` trains one config under several seeds as a
group, and `pgolf compare A B` tests whether B beats A by the challenge's rule.

Groups are the `run.group` of each run's config; their numbers come from the ledger
(pgolf.lab.ledger), which every run fills in itself.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pgolf.config import Config, ConfigError
from pgolf.config.resolve import data_dir_overrides, resolve_config
from pgolf.lab.ledger import (SCORED_STATUSES, LedgerHooks, Ledger, ensure_run, format_table,
                              live_runs_on_host)
from pgolf.rules import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_OVER_CAP
from pgolf.runs import RunDir, group_run_dirs
from pgolf.lab.stats import ALPHA, MARGIN_NATS, PROGRESSION_ALPHA, PROGRESSION_MARGIN_NATS, summarize, verdict


# name -> (what it is, ledger column in nats per token, ledger column in bits per byte)
LOSS_METRICS: dict[str, tuple[str, str, str]] = {
    "val_bpb": ("roundtrip: the artifact reloaded from disk (the score)", "val_loss", "val_bpb"),
    "pre_quant": ("before quantization", "pre_val_loss", "pre_val_bpb"),
    "sliding": ("sliding-window eval (pgolf eval --stride)", "sliding_val_loss", "sliding_val_bpb"),
    "ttt": ("score-first TTT eval (pgolf eval --ttt)", "ttt_val_loss", "ttt_val_bpb"),
}


# --- running one config under several seeds -----------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give integers separated by commas, e.g. --seeds 1337,42,2025") from None
    if not seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. --seeds 1337,42,2025")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text}: each seed once (a repeated seed repeats the same run)")
    return seeds


def default_group_id(preset: str) -> str:
    return f"{Path(preset).stem}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def resolve_with_data(preset: str | None, overrides: list[str], data: str | None) -> tuple[Config, list[str]]:
    """resolve_config as `pgolf train` does it, including --data DIR."""
    if data:
        overrides = data_dir_overrides(Path(data), overrides) + overrides
    return resolve_config(preset, overrides)


@dataclass
class Outcome:
    seed: int
    run_id: str | None
    run_dir: Path | None
    status: str
    error: str | None = None


def train_one(cfg: Config, preset: str | None, env_applied: list[str], console: bool) -> Outcome:
    """Train one run in this process; a failure is returned, not raised (KeyboardInterrupt is)."""
    from pgolf.train.run import run_training

    seed = cfg.train.seed
    try:
        summary = run_training(cfg, preset=preset, env_applied=env_applied, console=console, hooks=LedgerHooks(),
                               other_runs=live_runs_on_host(cfg.run.runs_dir, exclude=cfg.run.run_id or None))
        status, error = summary.get("status", "failed"), summary.get("error")
    except Exception as exc:  # noqa: BLE001 - one seed's failure, whatever it is, must not end the queue
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        print(f"seed {seed}: failed: {error}", file=sys.stderr)
    run_dir = Path(cfg.run.runs_dir) / cfg.run.run_id if cfg.run.run_id else None
    if run_dir is not None and not RunDir(run_dir).is_run():
        run_dir = None  # it failed before its run directory existed
    return Outcome(seed, run_dir.name if run_dir else None, run_dir, status, error)


class RunsProgress:
    """An overall bar over a queue of runs when training output is silenced (--quiet) on a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled and sys.stdout.isatty()
        self.total, self._progress, self._task = total, None, None

    def __enter__(self) -> "RunsProgress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                      TextColumn("{task.fields[info]}"))
            self._progress.__enter__()
            self._task = self._progress.add_task("runs", total=self.total, info="")
        return self

    def say(self, message: str) -> None:
        (self._progress.console.print if self._progress is not None else print)(message)

    def advance(self, info: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, info=info)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def run_group(preset: str, seeds: list[int], overrides: list[str], group: str | None = None,
              data: str | None = None, console: bool = True) -> tuple[str, list[Outcome], bool]:
    """Train `preset` + overrides once per seed, in sequence, as one group.
    Returns (group id, outcomes, interrupted). A failed seed is recorded and the group goes on."""
    group = group or default_group_id(preset)
    configs = []
    for seed in seeds:  # every config is checked before the first run starts
        cfg, applied = resolve_with_data(preset, [*overrides, f"train.seed={seed}", f"run.group={group}"], data)
        configs.append((cfg, applied))
    outcomes: list[Outcome] = []
    with RunsProgress(len(seeds), enabled=not console) as progress:
        for i, (cfg, applied) in enumerate(configs, 1):
            progress.say(f"[{i}/{len(seeds)}] group {group}: seed {cfg.train.seed}")
            try:
                outcome = train_one(cfg, preset, applied, console)
            except KeyboardInterrupt:
                return group, outcomes, True
            outcomes.append(outcome)
            progress.advance(f"seed {outcome.seed}: {outcome.status}")
    return group, outcomes, False


def group_rows(outcomes: list[Outcome]) -> list[dict]:
    """Ledger rows of the outcomes' runs (imported from their directories if missing)."""
    return [ensure_run(o.run_dir) for o in outcomes if o.run_dir is not None]


def scored(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") in SCORED_STATUSES and r.get("val_bpb") is not None]


def mean_std_text(values: list[float], digits: int = 4) -> str:
    s = summarize(values)
    return "-" if s.n == 0 else f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def seeds_table(outcomes: list[Outcome], rows_by_id: dict[str, dict]) -> str:
    headers = ["seed", "run_id", "status", "steps", "train_s", "pre_val_bpb", "val_loss", "val_bpb", "total_bytes"]
    lines = []
    for o in outcomes:
        r = rows_by_id.get(o.run_id or "", {})
        train_s = round(r["train_time_ms"] / 1000, 1) if r.get("train_time_ms") is not None else None
        lines.append([o.seed, o.run_id or "-", r.get("status", o.status), r.get("steps"), train_s,
                      r.get("pre_val_bpb"), r.get("val_loss"), r.get("val_bpb"), r.get("total_bytes")])
    return format_table(headers, lines)


def cmd_run(args: argparse.Namespace) -> int:
    args = parse_options_and_overrides(args)
    if not args.seeds:
        raise ConfigError("pgolf run needs --seeds, e.g. --seeds 1337,42,2025")
    seeds = parse_seeds(args.seeds)
    from pgolf.lab.plan import size_gate

    cfg, _ = resolve_with_data(args.preset, list(args.overrides), args.data)  # the seed does not change the size
    refused = size_gate(cfg, args.force, "pgolf run")
    if refused is not None:
        return refused
    group, outcomes, interrupted = run_group(args.preset, seeds, list(args.overrides), args.group, args.data,
                                             console=not args.quiet)
    rows = group_rows(outcomes)
    print(f"\ngroup {group}: {len(outcomes)} of {len(seeds)} seeds run")
    print(seeds_table(outcomes, {r["run_id"]: r for r in rows}))
    good = scored(rows)
    if good:
        print(f"mean ± std over {len(good)} runs: val_bpb {mean_std_text([r['val_bpb'] for r in good])}  "
              f"val_loss {mean_std_text([r['val_loss'] for r in good])}")
    print(f"compare it with another group: pgolf compare OTHER_GROUP {group}")
    if interrupted:
        return EXIT_INTERRUPTED
    statuses = {o.status for o in outcomes}
    if statuses - {"done", "over_cap"}:
        return EXIT_FAILED
    return EXIT_OVER_CAP if "over_cap" in statuses else EXIT_OK


# --- comparing two groups ---------------------------------------------------------------------------

def resolve_runs(target: str, runs_dir: str | Path = "runs") -> list[Path]:
    """Run directories named by a target: a run directory, a run id, a group id, or a comma list of them."""
    found: list[Path] = []
    for part in filter(None, (p.strip() for p in target.split(","))):
        path = Path(part)
        if RunDir(path).is_run():
            dirs = [path]
        elif RunDir(Path(runs_dir) / part).is_run():
            dirs = [Path(runs_dir) / part]
        else:
            dirs = group_run_dirs(part, runs_dir)
        if not dirs:
            known = Ledger(runs_dir).groups()
            hint = f"; groups in the ledger: {', '.join(known[-8:])}" if known else ""
            raise ConfigError(f"'{part}' is neither a run directory, a run id nor a group in {runs_dir}/{hint} "
                              f"(see `pgolf ledger --runs-dir {runs_dir}`)")
        found += [d for d in dirs if d.resolve() not in {f.resolve() for f in found}]
    return found


def compare_rows(rows_a: list[dict], rows_b: list[dict], margin: float = MARGIN_NATS, alpha: float = ALPHA) -> dict:
    """Per metric: n, mean, std of A and B, B - A in bpb and nats, Welch's p and the verdict."""
    a, b = scored(rows_a), scored(rows_b)
    metrics = []
    for name, (what, loss_col, bpb_col) in LOSS_METRICS.items():
        pairs_a = [(r[loss_col], r[bpb_col]) for r in a if r.get(loss_col) is not None]
        pairs_b = [(r[loss_col], r[bpb_col]) for r in b if r.get(loss_col) is not None]
        if not pairs_a or not pairs_b:
            continue
        loss_a, bpb_a = zip(*pairs_a)
        loss_b, bpb_b = zip(*pairs_b)
        v = verdict(loss_a, loss_b, margin, alpha)
        progression = verdict(loss_a, loss_b, PROGRESSION_MARGIN_NATS, PROGRESSION_ALPHA)
        sa, sb = summarize(bpb_a), summarize(bpb_b)
        metrics.append({
            "metric": name, "what": what, "n_a": sa.n, "n_b": sb.n,
            "bpb_a": {"mean": sa.mean, "std": sa.std}, "bpb_b": {"mean": sb.mean, "std": sb.std},
            "nats_a": vars(summarize(loss_a)), "nats_b": vars(summarize(loss_b)),
            "delta_bpb": sb.mean - sa.mean, "delta_nats": -v.improvement,
            "t": v.welch.t, "df": v.welch.df, "p": v.welch.p, "better": v.better, "verdict": v.reason,
            "progression": {"t": progression.welch.t, "p": progression.welch.p, "better": progression.better,
                            "verdict": progression.reason},
        })
    bytes_a = [r["total_bytes"] for r in a if r.get("total_bytes") is not None]
    bytes_b = [r["total_bytes"] for r in b if r.get("total_bytes") is not None]
    size = None
    if bytes_a and bytes_b:
        sa, sb = summarize(bytes_a), summarize(bytes_b)
        size = {"metric": "total_bytes", "n_a": sa.n, "n_b": sb.n, "a": vars(sa), "b": vars(sb),
                "delta": sb.mean - sa.mean,
                "over_cap_a": sum(r["status"] == "over_cap" for r in a),
                "over_cap_b": sum(r["status"] == "over_cap" for r in b)}
    notes = []
    for label, rows, good in (("A", rows_a, a), ("B", rows_b, b)):
        left_out = [r for r in rows if r not in good]
        if left_out:
            notes.append(f"{label}: left out {len(left_out)} runs without a roundtrip score ("
                         + ", ".join(f"{r['run_id']} {r['status']}" for r in left_out) + ")")
    tokenizers = {r.get("tokenizer") for r in a} | {r.get("tokenizer") for r in b}
    if len(tokenizers) > 1:
        notes.append(f"different tokenizers ({', '.join(sorted(map(str, tokenizers)))}): nats per token do not "
                     "compare across tokenizers; the bpb columns do")
    return {"margin_nats": margin, "alpha": alpha, "progression_margin_nats": PROGRESSION_MARGIN_NATS,
            "progression_alpha": PROGRESSION_ALPHA, "metrics": metrics, "size": size, "notes": notes,
            "runs_a": [r["run_id"] for r in a], "runs_b": [r["run_id"] for r in b]}


def _num(value: float, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def comparison_text(result: dict, label_a: str, label_b: str, headline: str) -> str:
    headers = ["metric", "n A", "A val_bpb", "n B", "B val_bpb", "Δbpb B−A", "Δnats B−A", "t", "p", "better"]
    lines = [[m["metric"], m["n_a"], f"{m['bpb_a']['mean']:.4f} ± {m['bpb_a']['std']:.4f}", m["n_b"],
              f"{m['bpb_b']['mean']:.4f} ± {m['bpb_b']['std']:.4f}", _num(m["delta_bpb"], "+.5f"),
              _num(m["delta_nats"], "+.5f"), _num(m["t"], ".3f"), _num(m["p"], ".3g"), "yes" if m["better"] else "no"]
             for m in result["metrics"]]
    out = [f"A = {label_a}  ({len(result['runs_a'])} scored runs)",
           f"B = {label_b}  ({len(result['runs_b'])} scored runs)", "", format_table(headers, lines)]
    size = result["size"]
    if size:
        out.append(f"total bytes: A {size['a']['mean']:,.0f} ± {size['a']['std']:,.0f}, B {size['b']['mean']:,.0f} ± "
                   f"{size['b']['std']:,.0f} (B−A {size['delta']:+,.0f}); over the cap: A {size['over_cap_a']}, "
                   f"B {size['over_cap_b']}")
    out += [f"note: {n}" for n in result["notes"]]
    head = next((m for m in result["metrics"] if m["metric"] == headline), None)
    rule = (f"rule: B must beat A by more than {result['margin_nats']:g} nats (val_loss) at p < {result['alpha']:g}, "
            "one-sided Welch t-test (the challenge README)")
    progression = (f"progression rule: B must beat A at p < {result['progression_alpha']:g}, one-sided Welch t-test, "
                   "no margin (the maintainers' leaderboard rule at the end of the challenge, PR #1902)")
    out += ["", rule]
    if head is None:
        out.append(f"verdict ({headline}): no runs with this metric in both groups")
    else:
        out.append(f"verdict ({headline}): {'YES' if head['better'] else 'NO'}, {head['verdict']}")
    out.append(progression)
    if head is None:
        out.append(f"progression verdict ({headline}): no runs with this metric in both groups")
    else:
        p = head["progression"]
        out.append(f"progression verdict ({headline}): {'YES' if p['better'] else 'NO'}, {p['verdict']}")
    return "\n".join(out)


def json_safe(value):
    """NaN (an undefined t or p) as null, so the output is valid JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def cmd_compare(args: argparse.Namespace) -> int:
    rows_a = [ensure_run(d) for d in resolve_runs(args.a, args.runs_dir)]
    rows_b = [ensure_run(d) for d in resolve_runs(args.b, args.runs_dir)]
    result = compare_rows(rows_a, rows_b, args.margin, args.alpha)
    result.update(a=args.a, b=args.b, headline=args.metric)
    if args.json:
        print(json.dumps(json_safe(result), indent=2))
    else:
        print(comparison_text(result, args.a, args.b, args.metric))
    return EXIT_OK


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 1337,42,2025 (required)")
    p.add_argument("--group", default=None, help="group id (default: PRESET-<UTC time>)")
    p.add_argument("--data", default=None, metavar="DIR", help="official shard layout in DIR, as for `pgolf train`")
    p.add_argument("--quiet", action="store_true", help="hide each run's output; show one progress bar")
    p.add_argument("--force", action="store_true",
                   help="train even when the planner's fast lower bound says the artifact cannot fit the cap")


def add_options_and_overrides(parser: argparse.ArgumentParser, add_options) -> None:
    """Options before or after the overrides, in any order. argparse (Python 3.11) matches no
    positional after an option once a nargs="*" positional matched empty, so what follows the
    first positional is parsed again by parse_options_and_overrides."""
    add_options(parser)
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="section.key=value",
                        help="override single config keys (options may come between them)")
    parser.set_defaults(add_options=add_options)


def parse_options_and_overrides(args: argparse.Namespace) -> argparse.Namespace:
    tail = argparse.ArgumentParser(prog=f"pgolf {args.command}")
    args.add_options(tail)
    tail.add_argument("overrides", nargs="*")
    parsed = tail.parse_intermixed_args(args.overrides)
    given = {k: v for k, v in vars(parsed).items() if v is not None and v is not False and k != "overrides"}
    return argparse.Namespace(**{**vars(args), **given, "overrides": parsed.overrides})


def register_run(subparsers) -> None:
    p = subparsers.add_parser("run", help="train one config under several seeds, in sequence, as one group")
    p.add_argument("preset", help="preset name or TOML path (e.g. smoke, baseline)")
    add_options_and_overrides(p, _run_options)
    p.set_defaults(handler=cmd_run)


def register_compare(subparsers) -> None:
    p = subparsers.add_parser("compare", help="is B better than A? Welch's t-test and the challenge verdict")
    p.add_argument("a", help="the reference: a group id, run id, run directory, or a comma list of them")
    p.add_argument("b", help="the candidate, likewise")
    p.add_argument("--metric", default="val_bpb", choices=list(LOSS_METRICS),
                   help="the metric the verdict is about (default val_bpb: the roundtrip score)")
    p.add_argument("--margin", type=float, default=MARGIN_NATS, help=f"nats B must win by (default {MARGIN_NATS})")
    p.add_argument("--alpha", type=float, default=ALPHA, help=f"significance level (default {ALPHA})")
    p.add_argument("--runs-dir", default="runs", help="where runs and ledger.sqlite live (default runs)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(handler=cmd_compare)

