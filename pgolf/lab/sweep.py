"""`pgolf sweep SPEC.toml`: a queue of variants, each trained under every seed as a group and
compared with the current default; a variant that wins by the keep rule becomes the default for
the rest of the queue (later variants build on it).

Spec (TOML; paths as on the command line):

    name = "mlp_ablation"             # default: the file's stem
    preset = "smoke"                  # preset name or TOML path
    data = "../shared/data/fineweb_sp1024_sample"   # optional, as `pgolf train --data`
    seeds = [1337, 42, 2025]

    [base]                            # overrides of every experiment, "section.key" = value
    "train.iterations" = 200

    [keep]                            # the keep rule (default: the challenge's)
    margin_nats = 0.005
    p = 0.01

    [budget]                          # checked before each experiment; 0 = no limit
    max_experiments = 10              # the baseline counts as one
    max_seconds = 3600

    [[variants]]                      # a list of named variants ...
    name = "swiglu"
    overrides = { "model.mlp" = "swiglu" }

    [grid]                            # ... and/or the cartesian product of key lists
    "optim.matrix_lr" = [0.02, 0.06]

Experiment 0 is the baseline (the base config). The state lives in
`<run.runs_dir>/sweeps/<name>/state.json`, rewritten atomically around every run: rerunning the
same command continues where it stopped, never repeats a finished run, and restarts a run that
was interrupted midway from scratch in a new run directory. A changed spec is refused (the
budget may change). At the end it writes results.md, results.json and results.png there.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pgolf.config import ConfigError
from pgolf.lab.experiments import (RunsProgress, add_options_and_overrides, parse_options_and_overrides,
                               resolve_with_data, scored, train_one)
from pgolf.lab.ledger import ensure_run, move_to_group
from pgolf.runs import RunDir, read_json, write_json
from pgolf.lab.stats import ALPHA, MARGIN_NATS, summarize, verdict
from pgolf.rules import EXIT_OK

SPEC_KEYS = {"name", "preset", "data", "seeds", "base", "keep", "budget", "variants", "grid"}
BASELINE = "baseline"
DECISION_COLORS = {"baseline": "tab:gray", "keep": "tab:green", "discard": "tab:blue", "over_cap": "tab:red",
                   "failed": "black"}


@dataclass
class Variant:
    name: str
    overrides: dict[str, str]  # section.key -> value as a command-line override


@dataclass
class SweepSpec:
    name: str
    preset: str | None
    data: str | None
    seeds: list[int]
    base: dict[str, str]
    variants: list[Variant]
    margin: float = MARGIN_NATS
    alpha: float = ALPHA
    max_experiments: int = 0
    max_seconds: float = 0.0
    path: str = ""

    def fingerprint(self) -> str:
        """What the experiments mean; the budget and the file's location may change between resumes."""
        fixed = {k: v for k, v in asdict(self).items() if k not in ("max_experiments", "max_seconds", "path")}
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()


# --- the spec -------------------------------------------------------------------------------------

def _override_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):  # as on the command line: a,b,... or export.policy's pattern:value,...
        if all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            return ",".join(map(str, value))
        if not all(isinstance(v, list) and len(v) == 2 for v in value):
            raise ConfigError(f"{key}: a list value must hold names, integers or [pattern, value] pairs, got {value!r}")
        return ",".join(f"{p}:{v}" for p, v in value)
    if isinstance(value, dict):
        raise ConfigError(f"{key}: expected a value, got a table")
    return str(value)


def _flatten(table: Any, where: str, prefix: str = "") -> dict[str, str]:
    """{"model": {"mlp": "x"}} and {"model.mlp": "x"} both give {"model.mlp": "x"}."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of \"section.key\" = value, got {table!r}")
    out = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, where, full))
        else:
            out[full] = _override_value(full, value)
    return out


def _grid_variants(grid: Any) -> list[Variant]:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("[grid] must map \"section.key\" to a list of values, e.g. \"model.mlp\" = [\"swiglu\"]")
    keys, value_lists = [], []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"[grid] {key}: give a non-empty list of values")
        keys.append(key)
        value_lists.append([_override_value(key, v) for v in values])
    short = [k.rsplit(".", 1)[-1] for k in keys]
    names = short if len(set(short)) == len(short) else keys
    return [Variant(",".join(f"{n}={v}" for n, v in zip(names, combo)), dict(zip(keys, combo)))
            for combo in itertools.product(*value_lists)]


def parse_spec(data: dict, name: str, extra_overrides: list[str] | None = None) -> SweepSpec:
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"sweep spec: unknown keys {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(SPEC_KEYS))}")
    seeds = data.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError("sweep spec: seeds must be a list of distinct integers, e.g. seeds = [1337, 42, 2025]")
    base = _flatten(data.get("base", {}), "[base]")
    for item in extra_overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, value = item.split("=", 1)
        base[key.strip()] = value.strip()
    variants = []
    for i, v in enumerate(data.get("variants", [])):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or set(v) - {"name", "overrides"}:
            raise ConfigError(f"sweep spec: variants[{i}] needs name = \"...\" and overrides = {{...}} (nothing else)")
        variants.append(Variant(v["name"], _flatten(v.get("overrides", {}), f"variant '{v['name']}'")))
    if "grid" in data:
        variants += _grid_variants(data["grid"])
    if not variants:
        raise ConfigError("sweep spec: no variants; add [[variants]] entries or a [grid]")
    names = [BASELINE] + [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"sweep spec: experiment names must be unique ('{BASELINE}' is the base config): "
                          f"{', '.join(duplicates)}")
    keep, budget = data.get("keep", {}), data.get("budget", {})
    if set(keep) - {"margin_nats", "p"} or set(budget) - {"max_experiments", "max_seconds"}:
        raise ConfigError("sweep spec: [keep] takes margin_nats and p; [budget] takes max_experiments and max_seconds")
    spec = SweepSpec(str(data.get("name", name)), data.get("preset"), data.get("data"), seeds, base, variants,
                     float(keep.get("margin_nats", MARGIN_NATS)), float(keep.get("p", ALPHA)),
                     int(budget.get("max_experiments", 0)), float(budget.get("max_seconds", 0.0)))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", spec.name):
        raise ConfigError(f"sweep spec: name '{spec.name}' may use letters, digits, '_', '.' and '-' only")
    if not 0 < spec.alpha <= 1:
        raise ConfigError(f"sweep spec: [keep] p must be within (0, 1], got {spec.alpha}")
    return spec


def load_spec(path: str | Path, extra_overrides: list[str] | None = None) -> SweepSpec:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"sweep spec {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"sweep spec {path} is not valid TOML: {exc}") from None
    spec = parse_spec(data, path.stem, extra_overrides)
    spec.path = str(path)
    return spec


def _overrides(mapping: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in mapping.items()]


def _resolve(spec: SweepSpec, overrides: dict[str, str]):
    return resolve_with_data(spec.preset, _overrides(overrides), spec.data)


# --- state ----------------------------------------------------------------------------------------

@dataclass
class Experiment:
    index: int
    name: str
    changes: dict[str, str]  # the variant's own overrides
    overrides: dict[str, str]  # everything on top of the preset: base + kept winners + changes
    group: str
    compared_with: int | None  # index of the default it is compared with
    runs: list[dict] = field(default_factory=list)  # {seed, run_id, status}; "abandoned" = restarted
    decision: str | None = None
    reason: str = ""
    stats: dict = field(default_factory=dict)


class SweepState:
    def __init__(self, directory: Path, spec: SweepSpec):
        self.dir, self.path = directory, directory / "state.json"
        self.spec_fingerprint = spec.fingerprint()
        self.elapsed_seconds = 0.0
        self.experiments: list[Experiment] = []
        if self.path.exists():
            saved = read_json(self.path)
            if saved["spec"] != self.spec_fingerprint:
                raise ConfigError(f"the sweep in {directory} was started from a different spec (only [budget] may "
                                  "change when resuming); give the sweep another name, or delete that folder "
                                  "to start over")
            self.elapsed_seconds = saved["elapsed_seconds"]
            self.experiments = [Experiment(**e) for e in saved["experiments"]]

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"spec": self.spec_fingerprint, "elapsed_seconds": round(self.elapsed_seconds, 3),
                               "experiments": [asdict(e) for e in self.experiments]})


# --- running ----------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")[:60] or "variant"


def _new_run_id(group: str, seed: int, runs_dir: Path, attempt: int) -> str:
    while True:
        run_id = f"{group}-s{seed}" + (f"-r{attempt}" if attempt > 1 else "")
        if not (runs_dir / run_id).exists():
            return run_id
        attempt += 1


class Sweep:
    def __init__(self, spec: SweepSpec, console: bool = True, log=print):
        self.spec, self.console, self.log = spec, console, log
        cfg, _ = _resolve(spec, spec.base)
        self.runs_dir = Path(cfg.run.runs_dir)
        self.dir = self.runs_dir / "sweeps" / spec.name
        for v in spec.variants:  # a typo fails now, not hours into the queue
            _resolve(spec, {**spec.base, **v.overrides})
        self.state = SweepState(self.dir, spec)
        self.stopped_by_budget = ""

    def queue(self) -> list[Variant]:
        return [Variant(BASELINE, {})] + self.spec.variants

    def run(self) -> dict:
        default: Experiment | None = None
        queue = self.queue()
        total_runs = len(queue) * len(self.spec.seeds)
        done_runs = sum(1 for e in self.state.experiments for r in e.runs if r["status"] != "abandoned")
        with RunsProgress(total_runs - done_runs, enabled=not self.console) as progress:
            for index, variant in enumerate(queue):
                if index < len(self.state.experiments):
                    exp = self.state.experiments[index]
                else:
                    self.stopped_by_budget = self._budget_exhausted()
                    if self.stopped_by_budget:
                        break
                    exp = self._new_experiment(index, variant, default)
                if exp.decision is None:
                    self._run_seeds(exp, progress)
                    self._decide(exp, default)
                    self.state.save()
                if exp.decision == "failed" and exp.index == 0:
                    raise RuntimeError(f"sweep {self.spec.name}: the baseline failed ({exp.reason}); fix the base "
                                       f"config, then delete {self.dir} and start again")
                if default is None or exp.decision == "keep":
                    default = exp
        return self.results()

    def _budget_exhausted(self) -> str:
        s, started = self.spec, len(self.state.experiments)
        if s.max_experiments and started >= s.max_experiments:
            return f"budget: {started} of max_experiments = {s.max_experiments} run"
        if s.max_seconds and self.state.elapsed_seconds >= s.max_seconds:
            return f"budget: {self.state.elapsed_seconds:.0f} s of max_seconds = {s.max_seconds:g} used"
        return ""

    def _new_experiment(self, index: int, variant: Variant, default: Experiment | None) -> Experiment:
        start = default.overrides if default is not None else self.spec.base
        exp = Experiment(index, variant.name, variant.overrides, {**start, **variant.overrides},
                         f"{self.spec.name}-{index:02d}-{_slug(variant.name)}",
                         default.index if default is not None else None)
        self.state.experiments.append(exp)
        self.state.save()
        return exp

    def _run_seeds(self, exp: Experiment, progress: RunsProgress) -> None:
        for entry in exp.runs:
            if entry["status"] != "running":
                continue
            summary_path = RunDir(self.runs_dir / entry["run_id"]).summary
            finished = read_json(summary_path).get("status") if summary_path.is_file() else None
            if finished in ("done", "over_cap"):  # the sweep stopped right after this run ended: keep it
                entry["status"] = finished
            else:  # the sweep stopped during this run: it starts again, fresh
                entry["status"] = "abandoned"
                self._abandon(exp, entry["run_id"])
        finished = {r["seed"] for r in exp.runs if r["status"] != "abandoned"}
        for seed in self.spec.seeds:
            if seed in finished:
                continue
            attempt = 1 + sum(r["seed"] == seed for r in exp.runs)
            run_id = _new_run_id(exp.group, seed, self.runs_dir, attempt)
            cfg, applied = _resolve(self.spec, {**exp.overrides, "train.seed": str(seed), "run.group": exp.group,
                                                "run.run_id": run_id, "run.name": exp.name})
            entry = {"seed": seed, "run_id": run_id, "status": "running"}
            exp.runs.append(entry)
            self.state.save()
            progress.say(f"[sweep {self.spec.name}] experiment {exp.index} {exp.name}: seed {seed} ({run_id})")
            start = time.perf_counter()
            try:
                entry["status"] = self._train(cfg, applied).status
            finally:  # an interrupted run's time counts against the budget too
                self.state.elapsed_seconds += time.perf_counter() - start
                self.state.save()
            progress.advance(f"{exp.name} s{seed}: {entry['status']}")

    def _abandon(self, exp: Experiment, run_id: str) -> None:
        """The group holds the claim's runs only (`pgolf submit GROUP` reads it): the stopped attempt
        leaves it for <group>.abandoned."""
        run_dir = self.runs_dir / run_id
        if RunDir(run_dir).is_run():
            move_to_group(run_dir, f"{exp.group}.abandoned")
        self.log(f"[sweep {self.spec.name}] {run_id} stopped midway; it moves to group {exp.group}.abandoned "
                 "and its seed starts again in a new run directory")

    def _train(self, cfg, applied):
        return train_one(cfg, self.spec.preset, applied, self.console)

    def rows(self, exp: Experiment) -> list[dict]:
        dirs = [self.runs_dir / r["run_id"] for r in exp.runs if r["status"] != "abandoned"]
        return [ensure_run(d) for d in dirs if RunDir(d).is_run()]

    def _decide(self, exp: Experiment, default: Experiment | None) -> None:
        rows = self.rows(exp)
        good = scored(rows)
        exp.stats = _group_stats(good)
        bad = [r for r in exp.runs if r["status"] not in ("done", "over_cap", "abandoned")]
        over = [r for r in rows if r["status"] == "over_cap"]
        v = None
        if default is not None and good:
            v = verdict([r["val_loss"] for r in scored(self.rows(default))], [r["val_loss"] for r in good],
                        self.spec.margin, self.spec.alpha)
            exp.stats.update(delta_nats=-v.improvement, p=v.welch.p)
        if bad or not good:
            exp.decision = "failed"
            exp.reason = "; ".join(f"seed {r['seed']}: {r['status']}" for r in bad) or "no run was scored"
        elif over:
            exp.decision = "over_cap"
            exp.reason = "; ".join(f"seed {r['seed']}: {r['total_bytes']:,} bytes, over the cap" for r in over)
        elif v is None:
            exp.decision, exp.reason = BASELINE, "the first default"
        else:
            exp.decision = "keep" if v.better else "discard"
            exp.reason = v.reason

    # --- results ----------------------------------------------------------------------------------
    def results(self) -> dict:
        experiments = self.state.experiments
        rows = []
        for exp in experiments:
            rows.append({"index": exp.index, "name": exp.name, "changes": exp.changes, "group": exp.group,
                         "vs": experiments[exp.compared_with].name if exp.compared_with is not None else None,
                         **{k: exp.stats.get(k) for k in ("n", "mean_bpb", "std_bpb", "mean_loss", "delta_nats",
                                                          "p", "total_bytes")},
                         "decision": exp.decision or "unfinished", "reason": exp.reason,
                         "runs": [r["run_id"] for r in exp.runs if r["status"] != "abandoned"]})
        for variant in self.queue()[len(experiments):]:
            rows.append({"index": None, "name": variant.name, "changes": variant.overrides, "group": None, "vs": None,
                         "n": 0, "decision": "not run", "reason": self.stopped_by_budget or "not reached", "runs": []})
        final = _final_default(experiments)
        return {"sweep": self.spec.name, "spec": self.spec.path, "seeds": self.spec.seeds,
                "rule": {"margin_nats": self.spec.margin, "p": self.spec.alpha}, "stopped": self.stopped_by_budget,
                "elapsed_seconds": round(self.state.elapsed_seconds, 1),
                "final_default": {"name": final.name, "overrides": final.overrides,
                                  "changes": {k: v for k, v in final.overrides.items()
                                              if self.spec.base.get(k) != v}} if final else None,
                "experiments": rows}

    def write_results(self, results: dict) -> list[Path]:
        from pgolf.lab.experiments import json_safe
        from pgolf.lab.plots import bar_chart

        self.dir.mkdir(parents=True, exist_ok=True)
        md, js = self.dir / "results.md", self.dir / "results.json"
        md.write_text(results_markdown(results), encoding="utf-8")
        write_json(js, json_safe(results))
        written = [md, js]
        plotted = [r for r in results["experiments"] if r.get("mean_bpb") is not None]
        if plotted:
            written.append(bar_chart([r["name"] for r in plotted], [r["mean_bpb"] for r in plotted],
                                     [r["std_bpb"] for r in plotted], self.dir / "results.png",
                                     f"sweep {results['sweep']}: roundtrip val_bpb, mean ± std over seeds",
                                     colors=[DECISION_COLORS.get(r["decision"], "tab:blue") for r in plotted],
                                     notes=[r["decision"] for r in plotted]))
        return written


def _group_stats(rows: list[dict]) -> dict:
    if not rows:
        return {"n": 0}
    bpb, loss = summarize([r["val_bpb"] for r in rows]), summarize([r["val_loss"] for r in rows])
    size = [r["total_bytes"] for r in rows if r.get("total_bytes") is not None]
    return {"n": bpb.n, "mean_bpb": bpb.mean, "std_bpb": bpb.std, "mean_loss": loss.mean,
            "total_bytes": max(size) if size else None}


def _final_default(experiments: list[Experiment]) -> Experiment | None:
    default = None
    for exp in experiments:
        if default is None or exp.decision == "keep":
            default = exp
    return default


def _cell(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def results_markdown(results: dict) -> str:
    rule = results["rule"]
    lines = [f"# Sweep `{results['sweep']}`", "",
             (f"Seeds {', '.join(map(str, results['seeds']))}; keep rule: better than the current default by more "
              f"than {rule['margin_nats']:g} nats (val_loss) at p < {rule['p']:g} (one-sided Welch t-test). "
              "val_bpb is the roundtrip score; Δ nats is the mean val_loss minus the default's; total bytes is "
              "the largest artifact + code of the seeds."), "",
             "| # | experiment | overrides | vs | n | val_bpb (mean ± std) | Δ nats | p | decision | total bytes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["experiments"]:
        changes = ", ".join(f"`{k}={v}`" for k, v in r["changes"].items()) or "–"
        bpb = (f"{r['mean_bpb']:.4f} ± {r['std_bpb']:.4f}" if r.get("mean_bpb") is not None else "–")
        lines.append(f"| {_cell(r['index'], 'd')} | {r['name']} | {changes} | {r['vs'] or '–'} | {r.get('n', 0)} | "
                     f"{bpb} | {_cell(r.get('delta_nats'), '+.4f')} | {_cell(r.get('p'), '.3g')} | {r['decision']} | "
                     f"{_cell(r.get('total_bytes'), ',')} |")
    final = results["final_default"]
    if final:
        changes = ", ".join(f"`{k}={v}`" for k, v in final["changes"].items()) or "the base config"
        lines += ["", f"Default at the end: **{final['name']}** ({changes})."]
    if results["stopped"]:
        lines += ["", f"Stopped by the {results['stopped']}; raise it in the spec and rerun to continue."]
    return "\n".join(lines) + "\n"


def cmd_sweep(args: argparse.Namespace) -> int:
    args = parse_options_and_overrides(args)
    spec = load_spec(args.spec, list(args.overrides))
    sweep = Sweep(spec, console=not args.quiet)
    try:
        results = sweep.run()
    except KeyboardInterrupt:
        print(f"\nsweep interrupted; rerun `pgolf sweep {args.spec}` to continue where it stopped", file=sys.stderr)
        raise
    paths = sweep.write_results(results)
    print("\n" + results_markdown(results))
    print("written: " + ", ".join(str(p) for p in paths))
    return EXIT_OK


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a resumable queue of variants; winners become the default")
    p.add_argument("spec", help="sweep spec TOML (see pgolf/lab/sweep.py or configs/sweeps/)")
    add_options_and_overrides(p, _sweep_options)  # overrides: extra base keys, part of the spec when resuming
    p.set_defaults(handler=cmd_sweep)


def _sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="hide each run's output; show one progress bar")
