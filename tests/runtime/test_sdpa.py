"""Attention kernel choice (pgolf.runtime.sdpa): CPU is untouched; the CUDA branch's choice and flags."""

from __future__ import annotations

import pytest
import torch

from pgolf.runtime import sdpa
from pgolf.config import ConfigError
from pgolf.config.resolve import resolve_config

SHAPE = sdpa.AttentionShape(batch=1, heads=2, kv_heads=1, seq_len=16, head_dim=8)


def flags():
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.cudnn_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled())


def test_cpu_is_a_no_op():
    before = flags()
    for setting in ("auto", "flash", "math"):
        with sdpa.sdpa_backend(setting, torch.device("cpu"), SHAPE) as chosen:
            assert chosen is None and flags() == before


def test_pick_fastest_skips_unavailable_kernels():
    def timer(name):
        if name == "cudnn":
            raise RuntimeError("No available kernel")
        return {"flash": 3.0, "efficient": 2.0}[name]

    assert sdpa.pick_fastest(timer) == ("efficient", {"flash": 3.0, "cudnn": None, "efficient": 2.0})

    def none(name):
        raise RuntimeError("No available kernel")

    assert sdpa.pick_fastest(none)[0] == "math"


def test_time_backend_runs_forward_and_backward_and_refuses_missing_kernels():
    assert sdpa.time_backend("math", SHAPE, torch.device("cpu"), torch.float32, repeats=1) > 0
    with pytest.raises(RuntimeError):
        sdpa.time_backend("cudnn", SHAPE, torch.device("cpu"), torch.float32, repeats=1)


def test_cuda_branch_enters_the_choice_with_math_fallback_and_restores(monkeypatch):
    monkeypatch.setattr(sdpa, "time_backend", lambda name, *a, **k: {"flash": 2.0, "cudnn": 1.0}.get(name) or
                        (_ for _ in ()).throw(RuntimeError("n/a")))
    before, lines, agreed = flags(), [], []
    cuda = torch.device("cuda")

    def agree(choice):
        agreed.append(choice)
        return choice

    with sdpa.sdpa_backend("auto", cuda, SHAPE, lines.append, agree) as chosen:
        assert chosen == "cudnn" and flags() == (False, True, False, True)
    assert flags() == before
    assert agreed == [("cudnn", {"flash": 2.0, "cudnn": 1.0, "efficient": None})]
    assert lines == ["sdpa_backend: cudnn (fastest of flash 2.00ms, cudnn 1.00ms, efficient n/a) + math fallback"]
    with sdpa.sdpa_backend("efficient", cuda, SHAPE) as chosen:  # a named backend is not timed
        assert chosen == "efficient" and flags() == (False, False, True, True)
    with sdpa.sdpa_backend("math", cuda, SHAPE):
        assert flags() == (False, False, False, True)


def test_attention_shape_and_config():
    cfg, _ = resolve_config("baseline", [], env={})
    assert sdpa.attention_shape(cfg) == sdpa.AttentionShape(64, 8, 4, 1024, 64)
    assert cfg.train.sdpa_backend == "auto"
    with pytest.raises(ConfigError, match="train.sdpa_backend must be auto, flash, cudnn, efficient or math"):
        resolve_config(None, ["train.sdpa_backend=fa3"], env={})
