"""Plots of runs (matplotlib, Agg backend, PNG): training and validation curves from each run's
metrics.jsonl, val_bpb against step and against training wall-clock, and a bar chart of groups
with error bars (mean ± sample std of the roundtrip val_bpb).

The validation series end with the final pre-quantization score (summary.json's pre_quant, at
the last step), and every axis is scaled to the points drawn on it."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from pgolf.rules import EXIT_OK
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
    # (step, train seconds, val_loss, val_bpb) of the final pre-quantization validation
    pre_quant: tuple[int, float, float, float] | None = None


@dataclass
class ValSeries:
    """One run's validation points as drawn: the logged validations, then the final pre-quant one."""
    steps: list[int]
    seconds: list[float]
    loss: list[float]
    bpb: list[float]


def val_series(c: Curves) -> ValSeries:
    """The validation points of a run's panels: its logged validations followed by the final
    pre-quant score at the last step (training validates at the top of a step, so the last
    step is never among the logged ones; were it there, the final score replaces it)."""
    out = ValSeries(list(c.val_steps), list(c.val_seconds), list(c.val_loss), list(c.val_bpb))
    if c.pre_quant is not None:
        step, seconds, loss, bpb = c.pre_quant
        while out.steps and out.steps[-1] >= step:
            for xs in (out.steps, out.seconds, out.loss, out.bpb):
                xs.pop()
        out.steps.append(step)
        out.seconds.append(seconds)
        out.loss.append(loss)
        out.bpb.append(bpb)
    return out


def axis_limits(values: list[float], margin: float = 0.05, min_span: float = 0.0) -> tuple[float, float] | None:
    """Limits that show every value with a small margin; a single value (or equal ones) gets a
    window of min_span, or of 2% of its size when min_span is 0. None when there are no values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    low, high = min(finite), max(finite)
    span = high - low
    if span <= 0:
        half = (min_span or max(abs(low) * 0.02, 1e-3)) / 2
        return low - half, high + half
    pad = max(span * margin, min_span / 2 if min_span > span else 0.0)
    return low - pad, high + pad


def _scale(ax, xs: list[float], ys: list[float], x_span: float = 0.0) -> None:
    for limits, setter in ((axis_limits(xs, min_span=x_span), ax.set_xlim), (axis_limits(ys), ax.set_ylim)):
        if limits is not None:
            setter(*limits)


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
        if s.get("pre_quant"):
            pre = s["pre_quant"]
            curves.pre_quant = (s["steps"], s["train_time_ms"] / 1000, pre["val_loss"], pre["val_bpb"])
    return curves


def loss_figure(runs: list[tuple[Curves, str]]):
    """Train loss and validation loss (nats per token, ending with the final pre-quant score)
    against step, one line per run; the figure, for plot_losses to save."""
    plt = _pyplot()
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    train_x, train_y, val_x, val_y = [], [], [], []
    for c, color in runs:
        if c.train_steps:
            ax_train.plot(c.train_steps, c.train_loss, color=color, alpha=0.8, lw=1, label=c.label)
            train_x += c.train_steps
            train_y += c.train_loss
        v = val_series(c)
        if v.steps:
            ax_val.plot(v.steps, v.loss, "o-", color=color, ms=3, lw=1, label=c.label)
            val_x += v.steps
            val_y += v.loss
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss (last: final pre-quant)")):
        ax.set(title=title, xlabel="step", ylabel="loss (nats / token)")
        ax.grid(alpha=0.3)
    _scale(ax_train, train_x, train_y, x_span=2)
    _scale(ax_val, val_x, val_y, x_span=2)
    _legend(ax_train, runs)
    return fig


def plot_losses(runs: list[tuple[Curves, str]], path: Path) -> Path:
    return _save(loss_figure(runs), path)


def val_bpb_figure(runs: list[tuple[Curves, str]]):
    """val_bpb against step and against training wall-clock, each run's line ending with its final
    pre-quant score at the last step; x marks the final roundtrip score. Axes fit the points."""
    plt = _pyplot()
    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = {ax_step: ([], []), ax_time: ([], [])}
    for c, color in runs:
        v = val_series(c)
        for ax, xs, final_x in ((ax_step, v.steps, 0), (ax_time, v.seconds, 1)):
            if xs:
                ax.plot(xs, v.bpb, "o-", color=color, ms=3, lw=1, label=c.label)
                drawn[ax][0].extend(xs)
                drawn[ax][1].extend(v.bpb)
            if c.final is not None:
                ax.plot([c.final[final_x]], [c.final[2]], "x", color=color, ms=8)
                drawn[ax][0].append(c.final[final_x])
                drawn[ax][1].append(c.final[2])
    ax_step.set(title="val_bpb by step (last dot: final pre-quant; x: roundtrip)", xlabel="step", ylabel="val_bpb")
    ax_time.set(title="val_bpb by training wall-clock (x: roundtrip)", xlabel="training time (s)",
                ylabel="val_bpb")
    _scale(ax_step, *drawn[ax_step], x_span=2)  # a single step still gets a window of +-1 step
    _scale(ax_time, *drawn[ax_time], x_span=1.0)
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
    _legend(ax_step, runs)
    return fig


def plot_val_bpb(runs: list[tuple[Curves, str]], path: Path) -> Path:
    return _save(val_bpb_figure(runs), path)


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
    return EXIT_OK


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="PNG plots: loss curves, val_bpb by step and time, group bar chart")
    p.add_argument("targets", nargs="+", help="groups, run ids or run directories (a comma list plots as one)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--runs-dir", default="runs", help="where runs and ledger.sqlite live (default runs)")
    p.set_defaults(handler=cmd_plot)
