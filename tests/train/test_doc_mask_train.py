"""#1855's document masking end to end on CPU: model.doc_mask (+ model.max_span) with
data.doc_packing trains, evaluates and exports, eager and compiled (fullgraph) alike."""

import pytest

from pgolf.train.run import run_training
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


KEYS = ("train.iterations=3", "model.doc_mask=true", "model.max_span=16", "data.doc_packing=true")


def test_doc_masked_packed_run_trains_evaluates_and_exports(tmp_path):
    summary = run_training(tiny_config(tmp_path, *KEYS, "run.run_id=eager"), console=False)
    assert summary["status"] == "done"


@pytest.mark.slow  # inductor compiles the masked model on CPU: minutes on a loaded 2-core machine
def test_doc_masked_packed_run_eager_and_compiled(tmp_path):
    eager = run_training(tiny_config(tmp_path, *KEYS, "run.run_id=eager"), console=False)
    compiled = run_training(tiny_config(tmp_path, *KEYS, "run.run_id=compiled", "train.compile=on"), console=False)
    assert eager["status"] == compiled["status"] == "done"
    assert compiled["pre_quant"]["val_loss"] == pytest.approx(eager["pre_quant"]["val_loss"], abs=1e-3)
