"""`pgolf submit`: package the seeds of one claim as a records folder in the official layout.

records/<track>/<date>_<name>/
  README.md          summary, config difference from the baseline, per-seed results, sizes, hardware
  submission.json    the leaderboard metadata (name, author, github_id, val_bpb, bytes_total, ...)
  train_gpt.py       the single-file bundle that trains and evaluates this config (pgolf.train.bundle)
  train_seed<S>.log  each seed's train.log
  receipts/          each seed's evaluation receipts (`pgolf audit` re-checks them)

The claimed val_bpb is the mean over seeds of the roundtrip score (artifact reloaded from disk),
the number train_gpt.py prints last. Sliding-window and TTT scores found in a run's receipts
are shown next to it. bytes_total is the largest artifact + code of any seed: every seed must
fit. Nothing is written unless every check passes, and an existing folder is never replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from datetime import date as Date
from pathlib import Path
from typing import Any

from pgolf.train.bundle import BUNDLE_NAME, bundle_config, bundle_modules, build_bundle, compressor_of, describe_code
from pgolf.config import Config, ConfigError, config_from_dict
from pgolf.rules import EXIT_FAILED, EXIT_OK, SIZE_CAP_BYTES, TRACK_TIME_LIMIT_S
from pgolf.runs import RunDir, RunError, find_run_dir, group_run_dirs, read_json
from pgolf.lab.check import SKIP, check_run, failed
from pgolf.lab.check_context import CheckOptions
from pgolf.lab.evaluations import counted_evaluations
from pgolf.lab.stats import summarize

DEFAULT_TRACK = "track_10min_16mb"
ROUNDTRIP_RECEIPT = RunDir.ROUNDTRIP_RECEIPT
# The last line `pgolf train` (and train_gpt.py) writes: the submitted score, in full.
FINAL_LINE = re.compile(r"^final_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)\s*$", re.MULTILINE)
SHA_IN_DESCRIPTION = re.compile(r"sha256:([0-9a-f]{16})")
EXTRA_EVAL_KINDS = ("sliding", "ttt")
ARTIFACT_NAME = RunDir.ARTIFACT


class SubmitRefused(RuntimeError):
    """The runs do not make a valid submission; the message names each run and reason."""


@dataclass
class RunRecord:
    run_dir: Path
    config: dict
    summary: dict
    log: str
    seed: int
    artifact_bytes: int | None
    receipts: dict[str, dict] = field(default_factory=dict)  # file name -> receipt JSON
    checks: list = field(default_factory=list)  # its `pgolf check` rows (pgolf.lab.check.Row), once run

    @property
    def name(self) -> str:
        return self.run_dir.name

    def extra_evals(self) -> dict[str, dict]:
        """The sliding / TTT evaluation that counts, of each kind (pgolf.lab.evaluations: the latest
        receipt of the run's split); "others" names the evaluations of the split that do not count."""
        counted = counted_evaluations(self.receipts, self.summary.get("val_tokens_scored"))
        return {kind: {"receipt": c.name, **c.data["totals"], "settings": c.data.get("settings", {}),
                       "targets": c.data.get("total_targets"), "others": c.others}
                for kind, c in counted.items() if kind in EXTRA_EVAL_KINDS}

    def hardware(self) -> str:
        info = self.receipts.get(ROUNDTRIP_RECEIPT, {}).get("info", {})
        return f"{info.get('device', '?')} x {info.get('world_size', '?')}"


# --- finding and reading the runs ------------------------------------------------------------
def find_runs(targets: list[str], runs_dir: str | Path) -> list[Path]:
    """Run directories named directly, or the runs of a group id (runs/*/config.json with
    run.group = id), in the order given, each once."""
    found: list[Path] = []
    for target in targets:
        try:
            dirs = [find_run_dir(target, str(runs_dir))]
        except RunError:
            dirs = group_run_dirs(target, runs_dir)
            if not dirs:
                raise ConfigError(f"'{target}' is neither a run directory nor a group with runs in {runs_dir}/ "
                                  f"(no {runs_dir}/*/config.json has run.group = '{target}'); pass a group id, "
                                  "run directories, or --runs-dir") from None
        for d in dirs:
            if d.resolve() not in {f.resolve() for f in found}:
                found.append(d)
    return found


def load_run(run_dir: Path) -> RunRecord:
    try:
        config = read_json(RunDir(run_dir).config)["config"]
        summary = RunDir(run_dir).read_summary()
    except (OSError, ValueError, KeyError) as exc:
        raise SubmitRefused(f"run {run_dir}: cannot read its config.json / summary.json: {exc}") from None
    log_path = RunDir(run_dir).log
    log = log_path.read_text(encoding="utf-8", errors="replace") if log_path.exists() else ""
    artifact = RunDir(run_dir).artifact
    record = RunRecord(run_dir, config, summary, log, int(config.get("train", {}).get("seed", 0)),
                       artifact.stat().st_size if artifact.exists() else None)
    for path in sorted(RunDir(run_dir).receipts.glob("*.json")):
        try:
            record.receipts[path.name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record.receipts[path.name] = {}  # the audit below names the problem
    return record


# --- the checks ------------------------------------------------------------------------------
def recipe_problems(records: list[RunRecord]) -> list[str]:
    """The runs must share one recipe (config apart from the seed) and have distinct seeds."""
    problems, recipes = [], []
    for r in records:
        try:
            recipes.append(bundle_config(r.config))
        except ConfigError as exc:
            problems.append(f"run {r.name}: its config.json cannot be read by this pgolf: {exc}")
    if problems:
        return problems
    first, first_flat = records[0], _flatten(recipes[0])
    for r, recipe in zip(records[1:], recipes[1:]):
        flat = _flatten(recipe)
        differing = [f"{k} ({_show(first_flat.get(k))} vs {_show(flat.get(k))})"
                     for k in sorted(set(first_flat) | set(flat)) if first_flat.get(k) != flat.get(k)]
        if differing:
            problems.append(f"runs {first.name} and {r.name} differ in more than the seed: {', '.join(differing)}; "
                            "a submission is one config run with several seeds")
    seen: dict[int, str] = {}
    for r in records:
        if r.seed in seen:
            problems.append(f"runs {seen[r.seed]} and {r.name} both use seed {r.seed}; each seed counts once")
        seen.setdefault(r.seed, r.name)
    return problems


def run_problems(r: RunRecord, bundle: bytes, rescore: bool = True) -> list[str]:
    """Everything that stops one run from counting, each naming the run and the reason. With
    rescore, the roundtrip receipt's score is recomputed from the artifact (`pgolf audit --rescore`)."""
    status = r.summary.get("status")
    if status not in ("done", "over_cap"):
        return [f"run {r.name}: it did not finish (status {status or 'unknown'}); only completed runs are submitted"]
    from pgolf.eval.audit import AuditFailure, audit_file, rescore_file

    problems = []
    match = None
    for match in FINAL_LINE.finditer(r.log):
        pass
    rt = r.summary.get("roundtrip") or {}
    if match is None:
        problems.append(f"run {r.name}: train.log lacks the final roundtrip line 'final_roundtrip_exact val_loss:... "
                        "val_bpb:...'; every completed run writes it")
    elif (match[1], match[2]) != (f"{rt.get('val_loss', math.nan):.8f}", f"{rt.get('val_bpb', math.nan):.8f}"):
        problems.append(f"run {r.name}: train.log's final roundtrip line ({match[0].strip()}) disagrees with "
                        f"summary.json (val_loss {rt.get('val_loss')}, val_bpb {rt.get('val_bpb')})")
    if ROUNDTRIP_RECEIPT not in r.receipts:
        problems.append(f"run {r.name}: receipts/{ROUNDTRIP_RECEIPT} is missing: the roundtrip score has no receipt")
    for file_name in r.receipts:
        try:
            report = audit_file(RunDir(r.run_dir).receipts / file_name)
        except AuditFailure as exc:
            problems.append(f"run {r.name}: receipt receipts/{file_name} fails the audit: {exc}")
            continue
        if file_name == ROUNDTRIP_RECEIPT and not math.isclose(report.val_bpb, rt.get("val_bpb", math.nan),
                                                               rel_tol=1e-12):
            problems.append(f"run {r.name}: receipts/{ROUNDTRIP_RECEIPT} proves val_bpb {report.val_bpb}, "
                            f"not the {rt.get('val_bpb')} in summary.json")
    size_problems = _size_problems(r, bundle)
    artifact_problems = _artifact_problems(r)
    problems += size_problems + artifact_problems
    # Recompute the claimed score from the artifact: a consistent receipt proves nothing about
    # whether its numbers are the model's. Skipped when the artifact itself is already refused.
    if rescore and not problems:
        try:
            rescore_file(RunDir(r.run_dir).receipts / ROUNDTRIP_RECEIPT)
        except AuditFailure as exc:
            problems.append(f"run {r.name}: receipts/{ROUNDTRIP_RECEIPT} fails the rescore (`pgolf audit --rescore`): "
                            f"{exc}")
    # `pgolf check` on the seed: legality, bytes, provenance, phases (after the checks above, which
    # name the simpler problems first).
    if not problems:
        r.checks = check_run(r.run_dir, CheckOptions(bundle=bundle))
        problems += [f"run {r.name}: `pgolf check` {row.check}: FAIL: {row.detail}" for row in failed(r.checks)]
    return problems


def _artifact_problems(r: RunRecord) -> list[str]:
    """The artifact must be the file the run wrote: its sha256 equals the one recorded at export
    (summary.json size.artifact_sha256; runs that predate it have none), and its container
    (header crc, payload sha256, tensors) reads back, as `pgolf eval` reads it."""
    from pgolf.compress.container import read_artifact

    if r.artifact_bytes is None:
        return []  # _size_problems names it
    path = RunDir(r.run_dir).artifact
    recorded = (r.summary.get("size") or {}).get("artifact_sha256")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if recorded is not None and digest != recorded:
        return [f"run {r.name}: {ARTIFACT_NAME} has sha256 {digest} but the run recorded {recorded} when it exported "
                "it: the artifact changed after its run (restore the file the run wrote, or train the seed again)"]
    try:
        read_artifact(path)
    except (OSError, ValueError) as exc:  # ArtifactError is a ValueError
        return [f"run {r.name}: {ARTIFACT_NAME} is corrupt and `pgolf eval` would refuse it: {exc} (restore the file "
                "the run wrote, or train the seed again)"]
    return []


def _size_problems(r: RunRecord, bundle: bytes) -> list[str]:
    if r.artifact_bytes is None:
        return [f"run {r.name}: its artifact {ARTIFACT_NAME} is missing"]
    size = r.summary.get("size") or {}
    problems = []
    if size.get("model_bytes") != r.artifact_bytes:
        problems.append(f"run {r.name}: {ARTIFACT_NAME} is {r.artifact_bytes:,} bytes but the run accounted "
                        f"{size.get('model_bytes')}: the artifact was replaced after the run")
    total = r.artifact_bytes + len(bundle)
    if total > SIZE_CAP_BYTES:
        problems.append(f"run {r.name} (seed {r.seed}): artifact {r.artifact_bytes:,} + code {len(bundle):,} = "
                        f"{total:,} bytes, OVER the {SIZE_CAP_BYTES:,}-byte cap by {total - SIZE_CAP_BYTES:,}")
    counted = SHA_IN_DESCRIPTION.search(str(size.get("code_description", "")))
    built = SHA_IN_DESCRIPTION.search(describe_code(bundle, ""))
    if size.get("code_bytes") != len(bundle) or counted is None or counted[1] != built[1]:
        problems.append(
            f"run {r.name}: it counted {size.get('code_bytes')} code bytes "
            f"({'sha256:' + counted[1] if counted else 'no train_gpt.py checksum'}) but the {BUNDLE_NAME} built now "
            f"from its config is {len(bundle):,} bytes (sha256:{built[1]}): the code that ran differs from the code "
            "that would be submitted; run the seeds again with this pgolf")
    return problems


# --- the folder ------------------------------------------------------------------------------
def _flatten(mapping: dict) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in mapping.items() for key, value in values.items()}


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    s = summarize(values)
    return s.mean, (s.std if s.n > 1 else None)  # no spread to report from one seed


def seed_results(records: list[RunRecord], code_bytes: int) -> dict[str, dict]:
    results = {}
    for r in records:
        s = r.summary
        row = {"run_id": r.name, "val_loss": round(s["roundtrip"]["val_loss"], 8),
               "val_bpb": round(s["roundtrip"]["val_bpb"], 8),
               "pre_quant_val_loss": round(s["pre_quant"]["val_loss"], 8),
               "pre_quant_val_bpb": round(s["pre_quant"]["val_bpb"], 8),
               "steps": s["steps"], "train_time_s": round(s["train_time_ms"] / 1000, 3),
               "artifact_bytes": r.artifact_bytes, "bytes_total": r.artifact_bytes + code_bytes,
               "hardware": r.hardware()}
        for kind, ev in r.extra_evals().items():
            row[f"{kind}_val_bpb"] = round(ev["val_bpb"], 8)
            row[f"{kind}_val_loss"] = round(ev["val_loss"], 8)
        results[str(r.seed)] = row
    return results


def submission_json(args: SubmitArgs, records: list[RunRecord], code_bytes: int, recipe: dict) -> dict:
    per_seed = seed_results(records, code_bytes)
    rows = list(per_seed.values())
    bpb, bpb_std = _mean_std([r.summary["roundtrip"]["val_bpb"] for r in records])
    loss, loss_std = _mean_std([r.summary["roundtrip"]["val_loss"] for r in records])
    artifacts = [row["artifact_bytes"] for row in rows]
    train_times = [row["train_time_s"] for row in rows]
    from pgolf import __version__

    data = {
        "name": args.name, "author": args.author, "github_id": args.github,
        "blurb": args.blurb or _default_blurb(recipe, len(rows), bpb),
        "date": args.date, "track": args.track.removeprefix("track_"),
        "val_bpb": round(bpb, 8), "val_bpb_std": _round(bpb_std), "val_loss": round(loss, 8),
        "val_loss_std": _round(loss_std),
        "val_bpb_method": "mean over seeds of the roundtrip score: the artifact reloaded from disk and scored on "
                          "the validation split (the final_roundtrip_exact line of each log)",
        "bytes_total": max(row["bytes_total"] for row in rows), "bytes_code": code_bytes,
        "bytes_model": max(artifacts), "artifact_bytes_mean": round(statistics.fmean(artifacts)),
        "artifact_bytes_max": max(artifacts),
        "seeds": [r.seed for r in records], "seed_results": per_seed,
        "train_time_s_mean": round(statistics.fmean(train_times), 3),
        "hardware": args.hardware or ", ".join(sorted({row["hardware"] for row in rows})),
        "compliance": {"artifact_under_16mb": True, "receipts_audited": True,
                       "training_under_600s": max(train_times) <= TRACK_TIME_LIMIT_S},
        "config": recipe,
        "tool": f"pgolf {__version__}",
    }
    return data


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 8)


def _default_blurb(recipe: dict, n: int, bpb: float) -> str:
    cfg = config_from_dict(recipe)
    m, e = cfg.model, cfg.export
    return (f"pgolf run of {m.num_layers}x{m.model_dim}, {m.num_heads}/{m.num_kv_heads} heads, vocab {m.vocab_size}, "
            f"{e.scheme} + {e.compressor} export; {n} seed{'s' * (n > 1)}, mean roundtrip val_bpb {bpb:.5f}.")


def render_readme(sub: dict, records: list[RunRecord], recipe: dict, rescored: bool = True) -> str:
    rows = sub["seed_results"]
    kinds = [k for k in EXTRA_EVAL_KINDS if any(f"{k}_val_bpb" in row for row in rows.values())]
    std = f" ± {sub['val_bpb_std']:.8f}" if sub["val_bpb_std"] is not None else ""
    n = len(rows)
    lines = [
        f"# {sub['name']}", "", sub["blurb"], "",
        f"- Author: {sub['author']} (@{sub['github_id']}); track `{sub['track']}`; {sub['date']}",
        f"- val_bpb **{sub['val_bpb']:.8f}**{std} (mean{' ± sample std' if std else ''} over {n} seed"
        f"{'s' * (n > 1)}: {', '.join(map(str, sub['seeds']))}); val_loss {sub['val_loss']:.8f}",
        f"- Size: largest artifact + code {sub['bytes_total']:,} of {SIZE_CAP_BYTES:,} bytes (artifact "
        f"{sub['bytes_model']:,}, code {sub['bytes_code']:,} = the length of `{BUNDLE_NAME}`); every seed fits",
        f"- Hardware: {sub['hardware']}; training time per seed at most "
        f"{max(r['train_time_s'] for r in rows.values()):.1f} s",
        *([] if rescored else ["", "> **WARNING: submitted with `--no-rescore`: the scores above were not recomputed "
                                   "from the artifacts** (see Checks)."]),
        "", "## Configuration", "",
        "Differences from the official baseline (pgolf's defaults), as `CONFIG` in `train_gpt.py`:", "",
    ]
    defaults = _flatten(Config().to_dict())
    flat = _flatten(recipe)
    if flat:
        lines += ["| key | value | baseline |", "|---|---|---|"]
        lines += [f"| `{k}` | `{_show(v)}` | `{_show(defaults.get(k))}` |" for k, v in flat.items()]
    else:
        lines.append("None: this is the baseline configuration.")
    lines += ["", "## Reproduce", "", "```bash", *_commands(records, recipe), "```", "",
              "Data and tokenizer paths come from the config unless `DATA_PATH` / `TOKENIZER_PATH` are set; each run "
              "writes `runs/<RUN_ID>/` and prints `final_roundtrip_exact val_loss:... val_bpb:...` last.", "",
              "## Results per seed", ""]
    header = ["seed", "steps", "train time (s)", "pre-quant val_bpb", "roundtrip val_bpb",
              *[f"{k} val_bpb" for k in kinds], "artifact bytes", "total bytes", "hardware"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for seed, row in rows.items():
        cells = [seed, f"{row['steps']:,}", f"{row['train_time_s']:.1f}", f"{row['pre_quant_val_bpb']:.8f}",
                 f"{row['val_bpb']:.8f}", *[_cell(row.get(f"{k}_val_bpb")) for k in kinds],
                 f"{row['artifact_bytes']:,}", f"{row['bytes_total']:,}", row["hardware"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    mean_cells = ["mean", "", "", _mean_cell([r["pre_quant_val_bpb"] for r in rows.values()], n),
                  f"{sub['val_bpb']:.8f}" + (f" ± {sub['val_bpb_std']:.8f}" if std else ""),
                  *[_mean_cell([r[f"{k}_val_bpb"] for r in rows.values() if f"{k}_val_bpb" in r], n) for k in kinds],
                  f"{sub['artifact_bytes_mean']:,}", "", ""]
    lines.append("| " + " | ".join(mean_cells) + " |")
    for r in records:
        for kind, ev in r.extra_evals().items():
            settings = ", ".join(f"{k} {v}" for k, v in ev["settings"].items())
            others = (f"; the latest of {len(ev['others']) + 1} evaluations of the split, the only one counted "
                      f"(not counted: {', '.join(f'`receipts/seed{r.seed}_{o}`' for o in ev['others'])})"
                      if ev["others"] else "")
            lines.append(f"\n{kind} val_bpb of seed {r.seed}: {settings}, {ev['targets']:,} targets "
                         f"(`receipts/seed{r.seed}_{ev['receipt']}`){others}")
    lines += ["", "## Checks", ""]
    if not rescored:
        lines += ["**WARNING: the claimed scores were NOT recomputed** (`pgolf submit --no-rescore`): the receipts "
                  "below are consistent, but nothing checked that their numbers are what the artifacts score. Check "
                  "them with `pgolf audit --rescore runs/<run>/receipts/roundtrip.json` before trusting them.", ""]
    else:
        lines.append("- Each seed's roundtrip score was recomputed from its artifact (`pgolf audit --rescore`): the "
                     "artifact is the model the receipt names, and its sums are the receipt's.")
    undigested = [r.name for r in records if not (r.summary.get("size") or {}).get("artifact_sha256")]
    if undigested:
        lines.append(f"- Run{'s' * (len(undigested) > 1)} {', '.join(undigested)} predate{'s' * (len(undigested) == 1)} "
                     "recorded artifact digests: the artifact was checked by its size and its container's own "
                     "checksums, not against a sha256 recorded at export.")
    else:
        lines.append("- Every artifact's sha256 equals the one its run recorded at export, and its container reads back.")
    lines += [
              "- The claimed score is each seed's roundtrip val_bpb: the compressed artifact reloaded from disk and "
              "scored on the validation split; the sliding / TTT columns, where present, come from `pgolf eval` "
              "receipts and are shown, not claimed.",
              "- Every evaluation receipt under `receipts/` passed `pgolf audit` (each target scored once, by a "
              "model that had not trained on it; sums and val_bpb recomputed).",
              _check_line(records),
              f"- Code bytes are the length of `{BUNDLE_NAME}`; each run counted the same number, checksum included, "
              "when it exported its artifact.",
              "", "## Files", "",
              f"- `{BUNDLE_NAME}`: the whole training and evaluation program (needs torch, numpy, sentencepiece)",
              *[f"- `train_seed{r.seed}.log`: the log of run `{r.name}`" for r in records],
              "- `receipts/`: the evaluation receipts of each seed (`pgolf audit receipts/<file>`)",
              "- `submission.json`: the metadata above, per seed", ""]
    return "\n".join(lines)


def _check_line(records: list[RunRecord]) -> str:
    skipped = [f"seed {r.seed} {row.check} ({row.detail})" for r in records for row in r.checks if row.status == SKIP]
    if skipped:
        return "- `pgolf check` (README \"Legality checks\") failed no row of any seed; skipped: " + "; ".join(skipped)
    return ("- Every seed passed every `pgolf check` row (README \"Legality checks\"): causal and normalized scores "
            "probed on its artifact, one counted evaluation per number, byte counts recounted from the decoded text, "
            "no validation document in the training shards, training data read only inside the budget.")


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.8f}"


def _mean_cell(values: list[float], n_seeds: int) -> str:
    if not values:
        return ""
    mean, std = _mean_std(values)
    partial = f" ({len(values)} of {n_seeds} seeds)" if len(values) < n_seeds else ""
    return f"{mean:.8f}" + (f" ± {std:.8f}" if std is not None else "") + partial


def _commands(records: list[RunRecord], recipe: dict) -> list[str]:
    world = {r.receipts.get(ROUNDTRIP_RECEIPT, {}).get("info", {}).get("world_size", 1) for r in records}
    nproc = max(w for w in world if isinstance(w, int)) if world else 1
    launch = f"torchrun --standalone --nproc_per_node={nproc} {BUNDLE_NAME}" if nproc > 1 else f"python {BUNDLE_NAME}"
    return [f"SEED={r.seed} RUN_ID={r.name} {launch}" for r in records]


@dataclass
class SubmitArgs:
    name: str
    author: str
    github: str
    track: str = DEFAULT_TRACK
    date: str = ""
    blurb: str = ""
    hardware: str = ""


def records_folder(args: SubmitArgs, out: str | Path | None) -> Path:
    if out:
        return Path(out)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.name).strip("_.")
    if not slug:
        raise ConfigError(f"--name {args.name!r} has no letters or digits to name the records folder with")
    return Path("records") / args.track / f"{args.date}_{slug}"


def check_args(args: SubmitArgs) -> SubmitArgs:
    for label, value in (("--name", args.name), ("--author", args.author), ("--github", args.github)):
        if not value.strip():
            raise ConfigError(f"{label} must not be empty")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.track):
        raise ConfigError(f"--track {args.track!r}: use a folder name such as {DEFAULT_TRACK} or track_non_record_16mb")
    try:
        args.date = (Date.fromisoformat(args.date) if args.date else Date.today()).isoformat()
    except ValueError:
        raise ConfigError(f"--date {args.date!r}: use YYYY-MM-DD") from None
    return args


def submit(targets: list[str], args: SubmitArgs, out: str | Path | None = None, runs_dir: str | Path = "runs",
           rescore: bool = True) -> Path:
    """Check the runs and write the records folder; returns its path. Raises SubmitRefused
    (naming every run and reason) or ConfigError (bad arguments), writing nothing. rescore=False
    skips recomputing each roundtrip score from its artifact (the README then says so, loudly)."""
    args = check_args(args)
    folder = records_folder(args, out)
    records = [load_run(d) for d in find_runs(targets, runs_dir)]
    problems = recipe_problems(records)
    if problems:
        raise SubmitRefused(_refusal(problems))
    # Ship the file the runs counted: packed with the compressor they counted (a run on a machine
    # without brotli counted an lzma-packed file), from the modules their config needs.
    counted = str((records[0].summary.get("size") or {}).get("code_description", ""))
    bundle = build_bundle(records[0].config, bundle_modules(records[0].config), compressor_of(counted))
    problems = [p for r in records for p in run_problems(r, bundle, rescore)]
    if problems:
        raise SubmitRefused(_refusal(problems))
    if folder.exists():
        raise SubmitRefused(f"{folder} already exists; a records folder is never overwritten (choose another "
                            "--name, --date or --out)")
    recipe = bundle_config(records[0].config)
    sub = submission_json(args, records, len(bundle), recipe)
    sub["compliance"]["scores_recomputed"] = rescore
    files = {BUNDLE_NAME: bundle, "submission.json": (json.dumps(sub, indent=2) + "\n").encode(),
             "README.md": render_readme(sub, records, recipe, rescore).encode()}
    for r in records:
        files[f"train_seed{r.seed}.log"] = RunDir(r.run_dir).log.read_bytes()
        for file_name in r.receipts:
            files[f"receipts/seed{r.seed}_{file_name}"] = (RunDir(r.run_dir).receipts / file_name).read_bytes()
    _write_folder(folder, files)
    return folder


def _refusal(problems: list[str]) -> str:
    return "not submitted:\n  " + "\n  ".join(problems)


def _write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Write into a hidden sibling, then rename it into place: a failure leaves no partial folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    try:
        for rel, data in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if folder.exists():  # appeared meanwhile
            raise SubmitRefused(f"{folder} already exists; a records folder is never overwritten")
        os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- command line ----------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    sub_args = SubmitArgs(args.name, args.author, args.github, args.track, args.date or "", args.blurb or "",
                          args.hardware or "")
    try:
        folder = submit(args.runs, sub_args, out=args.out, runs_dir=args.runs_dir, rescore=not args.no_rescore)
    except SubmitRefused as exc:
        print(f"pgolf submit: refused: {exc}", file=sys.stderr)
        return EXIT_FAILED
    sub = read_json(folder / "submission.json")
    std = f" ± {sub['val_bpb_std']:.8f}" if sub["val_bpb_std"] is not None else ""
    if args.no_rescore:
        print("WARNING: --no-rescore: the claimed scores were not recomputed from the artifacts; the submission "
              "README says so", file=sys.stderr)
    print(f"wrote {folder}: val_bpb {sub['val_bpb']:.8f}{std} over seeds {', '.join(map(str, sub['seeds']))}; "
          f"bytes_total {sub['bytes_total']:,} (code {sub['bytes_code']:,})")
    return EXIT_OK


def register(subparsers) -> None:
    p = subparsers.add_parser("submit", help="package a group of runs (its seeds) as an official records folder")
    p.add_argument("runs", nargs="+", metavar="GROUP|RUN",
                   help="a group id (runs whose run.group is it) or run directories / run ids")
    p.add_argument("--name", required=True, help="the submission's name (also names the folder)")
    p.add_argument("--author", required=True)
    p.add_argument("--github", required=True, help="GitHub user id")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="the folder to write (default records/<track>/<date>_<name>)")
    p.add_argument("--track", default=DEFAULT_TRACK, help=f"records track folder (default {DEFAULT_TRACK})")
    p.add_argument("--date", default=None, help="YYYY-MM-DD (default today)")
    p.add_argument("--blurb", default=None, help="one-paragraph description (default: generated from the config)")
    p.add_argument("--hardware", default=None, help="e.g. '8xH100 80GB SXM' (default: device and world size "
                                                    "from the runs' receipts)")
    p.add_argument("--runs-dir", default="runs", help="where group ids are looked up (default runs)")
    p.add_argument("--no-rescore", action="store_true",
                   help="skip recomputing each seed's roundtrip score from its artifact (slow on a big model); the "
                        "submission README then warns that the scores were not recomputed")
    p.set_defaults(handler=cmd_submit)
