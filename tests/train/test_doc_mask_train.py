"""#1855's document masking end to end on CPU: model.doc_mask (+ model.max_span) with
data.doc_packing trains, evaluates and exports, eager and compiled (fullgraph) alike."""

from pathlib import Path

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


def test_a_bos_id_the_tokenizer_does_not_use_is_refused_before_training(tmp_path):
    from pgolf.data.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match=r"model.doc_mask and data.doc_packing find documents by model.bos_id=2"
                                             r".*starts documents with id 1; set model.bos_id=1"):
        run_training(tiny_config(tmp_path, *KEYS, "model.bos_id=2"), console=False)


def test_packed_row_feeds_each_micro_batch_to_the_model_as_one_row(tmp_path, monkeypatch):
    from pgolf.model.gpt import GPT

    shapes, forward = [], GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, x, *a, **k: shapes.append(tuple(x.shape)) or forward(self, x, *a, **k))
    summary = run_training(tiny_config(tmp_path, *KEYS, "data.packed_row=true"), console=False)
    assert summary["status"] == "done"
    rows = [s for s in shapes if s[1] > 64]  # training: 1,024 tokens over 8 micro-batches; evaluation: rows of 64
    assert rows and set(rows) == {(1, 128)}


def test_packed_row_without_document_masking_is_refused():
    from pgolf.config import ConfigError

    with pytest.raises(ConfigError, match="data.packed_row=true makes each micro-batch one row; without model.doc_mask"):
        tiny_config(Path("."), "data.packed_row=true")
