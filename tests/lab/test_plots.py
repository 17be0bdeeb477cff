"""Plots: curves read from metrics.jsonl, PNG files for runs and groups."""

import json

import pytest

from pgolf.cli import main as cli_main
from pgolf.lab.plots import bar_chart, plot_targets, run_curves
from pgolf.runs import read_metrics
from pgolf.train.run import run_training
from tests.train.test_train import tiny_config

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_cpu_thread):
    tmp = tmp_path_factory.mktemp("plots")
    common = ("model.num_layers=2", "train.iterations=4", "train.val_loss_every=2", "train.warmup_steps=0")
    for group, seed in (("a", 1), ("a", 2), ("b", 1)):
        run_training(tiny_config(tmp, *common, f"run.group={group}", f"train.seed={seed}"), console=False)
    return tmp


def test_curves_follow_the_metrics(runs):
    run_dir = next(p for p in (runs / "runs").iterdir() if (p / "summary.json").exists())
    curves = run_curves(run_dir)
    events = read_metrics(run_dir)
    assert curves.train_steps == [1, 2, 3, 4]
    assert curves.train_loss == [e["train_loss"] for e in events if e["event"] == "train"]
    assert curves.val_steps == [0, 2]
    assert curves.val_bpb == [e["val_bpb"] for e in events if e["event"] == "val"]
    assert curves.val_seconds == [e["train_time_ms"] / 1000 for e in events if e["event"] == "val"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert curves.final == (4, summary["train_time_ms"] / 1000, summary["roundtrip"]["val_bpb"])


def test_plot_groups_writes_pngs(runs, tmp_path, capsys):
    paths = plot_targets(["a", "b"], runs / "runs", tmp_path / "out")
    assert [p.name for p in paths] == ["loss_curves.png", "val_bpb.png", "compare_val_bpb.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    # One run alone: curves, no bar chart.
    one = next(p.name for p in (runs / "runs").iterdir() if p.is_dir() and p.name != "sweeps")
    assert cli_main(["plot", one, "--runs-dir", str(runs / "runs"), "--out", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["loss_curves.png", "val_bpb.png"]
    assert str(tmp_path / "one" / "val_bpb.png") in capsys.readouterr().out
    assert cli_main(["plot", "nope", "--runs-dir", str(runs / "runs"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_bar_chart(tmp_path):
    path = bar_chart(["x", "y"], [1.21, 1.19], [0.004, 0.0], tmp_path / "bars.png", "t", notes=["keep", ""])
    assert path.read_bytes()[:8] == PNG


def _line(ax, label):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_val_panels_end_with_the_final_pre_quant_point(runs):
    """#17 item 13: the val panels end at the last step with the pre-quant val_bpb, and the axes
    fit the points drawn."""
    from pgolf.lab.plots import val_bpb_figure, val_series

    run_dir = next(p for p in (runs / "runs").iterdir() if (p / "summary.json").exists())
    summary = json.loads((run_dir / "summary.json").read_text())
    pre = summary["pre_quant"]
    curves = run_curves(run_dir, "r")
    series = val_series(curves)
    assert series.steps == [0, 2, 4]
    assert series.bpb[-1] == pre["val_bpb"] and series.loss[-1] == pre["val_loss"]
    assert series.seconds[-1] == summary["train_time_ms"] / 1000
    fig = val_bpb_figure([(curves, "C0")])
    try:
        ax_step, ax_time = fig.axes
        step_line, time_line = _line(ax_step, "r"), _line(ax_time, "r")
        assert list(step_line.get_xdata()) == [0, 2, 4]
        assert list(step_line.get_ydata())[-1] == pre["val_bpb"]
        assert list(time_line.get_xdata())[-1] == summary["train_time_ms"] / 1000
        assert list(time_line.get_ydata())[-1] == pre["val_bpb"]
        # Scaled to the data: every point inside, with a margin of a few percent, not more.
        lo, hi = ax_step.get_xlim()
        assert -0.5 < lo < 0 and 4 < hi < 4.5
        ys = list(step_line.get_ydata()) + [summary["roundtrip"]["val_bpb"]]
        lo, hi = ax_step.get_ylim()
        span = max(ys) - min(ys)
        assert lo < min(ys) and hi > max(ys) and hi - lo < 1.2 * span
    finally:
        fig.clf()


def test_a_single_point_gets_a_sensible_window():
    from pgolf.lab.plots import Curves, axis_limits, val_bpb_figure

    assert axis_limits([]) is None
    assert axis_limits([3.0], min_span=2) == (2.0, 4.0)
    lo, hi = axis_limits([1.5])
    assert lo < 1.5 < hi and hi - lo < 0.1
    only_step0 = Curves("s", val_steps=[0], val_seconds=[0.0], val_loss=[6.9], val_bpb=[4.1])
    fig = val_bpb_figure([(only_step0, "C0")])
    try:
        ax_step, ax_time = fig.axes
        assert ax_step.get_xlim() == (-1.0, 1.0)
        lo, hi = ax_step.get_ylim()
        assert lo < 4.1 < hi and hi - lo < 0.2
    finally:
        fig.clf()
