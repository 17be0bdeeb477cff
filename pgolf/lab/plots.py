"""Plots of runs (matplotlib, Agg backend, PNG): training and validation curves from each run's
metrics.jsonl, val_bpb against step and against training wall-clock, and a bar chart of groups
with error bars (mean ± sample std of the roundtrip val_bpb)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from pgolf.runs import RunDir, read_json, read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, safe in worker processes
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Curves:
    label: str
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_seconds: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_bpb: list[float] = field(default_factory=list)
    final: tuple[int, float, float] | None = None  # (step, train seconds, roundtrip val_bpb)


def run_curves(run_dir: Path, label: str | None = None) -> Curves:
    """The run's logged train losses and validations, and its final roundtrip score."""
    curves = Curves(label or run_dir.name)
    for e in read_metrics(run_dir):
        if e.get("event") == "train":
            curves.train_steps.append(e["step"])
            curves.train_loss.append(e["train_loss"])
        elif e.get("event") == "val":
            curves.val_steps.append(e["step"])
            curves.val_seconds.append(e.get("train_time_ms", 0.0) / 1000)
            curves.val_loss.append(e["val_loss"])
            curves.val_bpb.append(e["val_bpb"])
    summary_path = RunDir(run_dir).summary
    if summary_path.exists():
        s = read_json(summary_path)
        if s.get("roundtrip"):
            curves.final = (s["steps"], s["train_time_ms"] / 1000, s["roundtrip"]["val_bpb"])
    return curves


def plot_losses(runs: list[tuple[Curves, str]], path: Path) -> Path:
    """Train loss and validation loss (nats per token) against step, one line per run."""
    plt = _pyplot()
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for c, color in runs:
        if c.train_steps:
            ax_train.plot(c.train_steps, c.train_loss, color=color, alpha=0.8, lw=1, label=c.label)
        if c.val_steps:
            ax_val.plot(c.val_steps, c.val_loss, "o-", color=color, ms=3, lw=1, label=c.label)
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set(title=title, xlabel="step", ylabel="loss (nats / token)")
        ax.grid(alpha=0.3)
    _legend(ax_train, runs)
    return _save(fig, path)


def plot_val_bpb(runs: list[tuple[Curves, str]], path: Path) -> Path:
    """val_bpb against step and against training wall-clock; x marks the final roundtrip score."""
    plt = _pyplot()
    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for c, color in runs:
        for ax, xs, final_x in ((ax_step, c.val_steps, 0), (ax_time, c.val_seconds, 1)):
            if xs:
                ax.plot(xs, c.val_bpb, "o-", color=color, ms=3, lw=1, label=c.label)
            if c.final is not None:
                ax.plot([c.final[final_x]], [c.final[2]], "x", color=color, ms=8)
    ax_step.set(title="val_bpb by step (x: roundtrip)", xlabel="step", ylabel="val_bpb")
    ax_time.set(title="val_bpb by training wall-clock (x: roundtrip)", xlabel="training time (s)", ylabel="val_bpb")
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
    _legend(ax_step, runs)
    return _save(fig, path)


def bar_chart(labels: list[str], means: list[float], stds: list[float], path: Path, title: str,
              ylabel: str = "val_bpb (roundtrip)", colors: list[str] | None = None,
              notes: list[str] | None = None) -> Path:
    """One bar per group: mean with a ± sample-std error bar; the y-axis zooms on the values."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.5))
    xs = list(range(len(labels)))
    ax.bar(xs, means, yerr=stds, capsize=4, color=colors or "tab:blue", alpha=0.85)
    finite = [(m, 0.0 if math.isnan(s) else s) for m, s in zip(means, stds) if not math.isnan(m)]
    if finite:
        low = min(m - s for m, s in finite)
        high = max(m + s for m, s in finite)
        pad = max((high - low) * 0.15, 1e-4)
        ax.set_ylim(low - pad, high + 2.5 * pad)  # room for the labels
    for x, m, s, note in zip(xs, means, stds, notes or [""] * len(labels)):
        if not math.isnan(m):  # above the error bar: the value, and the note (n, or a sweep's decision)
            ax.annotate(f"{m:.4f}" + (f"\n{note}" if note else ""), (x, m + (0.0 if math.isnan(s) else s)), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(xs, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _legend(ax, runs: list) -> None:
    if 0 < len(runs) <= 12:
        ax.legend(fontsize=7)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_targets(targets: list[str], runs_dir: str | Path, out_dir: Path) -> list[Path]:
    """Curves of every run of the targets (groups, run ids or directories), one color per target,
    and, for two or more targets or any group, a bar chart of their roundtrip val_bpb."""
    from pgolf.lab.experiments import resolve_runs, scored
    from pgolf.lab.ledger import ensure_run
    from pgolf.lab.stats import summarize

    resolved = [(target, resolve_runs(target, runs_dir)) for target in targets]  # bad names fail before drawing
    runs, bars = [], []
    for i, (target, dirs) in enumerate(resolved):
        color = f"C{i % 10}"
        for d in dirs:
            seed = read_json(RunDir(d).config)["config"]["train"]["seed"]
            runs.append((run_curves(d, d.name if len(dirs) == 1 else f"{target} s{seed}"), color))
        values = [r["val_bpb"] for r in scored([ensure_run(d) for d in dirs])]
        if values:
            s = summarize(values)
            bars.append((target, s.mean, s.std, color, f"n={s.n}"))
    written = [plot_losses(runs, out_dir / "loss_curves.png"), plot_val_bpb(runs, out_dir / "val_bpb.png")]
    if bars and (len(bars) > 1 or any(len(dirs) > 1 for _, dirs in resolved)):
        labels, means, stds, colors, notes = (list(x) for x in zip(*bars))
        written.append(bar_chart(labels, means, stds, out_dir / "compare_val_bpb.png",
                                 "roundtrip val_bpb, mean ± std over seeds", colors=colors, notes=notes))
    return written


def cmd_plot(args: argparse.Namespace) -> int:
    for path in plot_targets(args.targets, args.runs_dir, Path(args.out)):
        print(path)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="PNG plots: loss curves, val_bpb by step and time, group bar chart")
    p.add_argument("targets", nargs="+", help="groups, run ids or run directories (a comma list plots as one)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--runs-dir", default="runs", help="where runs and ledger.sqlite live (default runs)")
    p.set_defaults(handler=cmd_plot)
