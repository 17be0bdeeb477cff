"""The official baseline stays bit-identical: initial weights, forward, a 5-step CPU training
trajectory, the trained weights and both scores equal those recorded before the redesign."""

import json

import pytest

from tests.golden.record_baseline import GOLDEN, SAMPLE, measure


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared FineWeb sample not present")
def test_baseline_is_bit_identical_to_the_golden_record(tmp_path, one_cpu_thread):
    assert measure(tmp_path) == json.loads(GOLDEN.read_text())


def test_parameter_treatment_is_unchanged(one_cpu_thread):
    """Optimizer, lr, CUDA dtype, export storage, QAT and planner component of every parameter."""
    from tests.golden import record_treatment

    assert json.loads(json.dumps(record_treatment.measure(), sort_keys=True)) == \
        json.loads(record_treatment.GOLDEN.read_text())
