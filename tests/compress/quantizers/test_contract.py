"""The contract every registered quantizer kind keeps, found from the registry on its own:
quantize -> container pack -> read -> dequantize round-trips shape and dtype, within the kind's
own error bound; its format label shows in describe_artifact; unknown kinds are refused."""
import pytest
import torch

from pgolf.compress.container import ArtifactError, describe_artifact, pack_artifact, unpack_artifact
from pgolf.compress.quant import KINDS, dequantize_tensor
from pgolf.compress.quantizers.registry import (QUANTIZERS, Quantizer, QuantizedTensor, component_label,
                                                dtype_name, format_label, get_quantizer, register_quantizer)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ENTRIES = sorted(QUANTIZERS)
MADE = [(k, spec) for k in ENTRIES if QUANTIZERS[k].quantize is not None for spec in QUANTIZERS[k].specs]


def samples():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 37, generator=g) * 0.05
    w[3, 5] = 0.9   # an outlier: clip and clip search matter
    w[7] = 0.0      # an all-zero row: the scale floor
    return {
        "fp32 2-D": w,
        "bf16 2-D": (torch.randn(16, 40, generator=g) * 0.02).to(torch.bfloat16),
        "fp16 2-D": torch.randn(8, 33, generator=g).half(),
        "fp32 3-D": torch.randn(3, 5, 7, generator=g),
        "fp32 1-D": torch.randn(50, generator=g),
        "int64 1-D": torch.arange(-5, 12),
        "bool 2-D": torch.rand(4, 6, generator=g) > 0.5,
    }


def accepted(kind, spec):
    """(sample name, tensor, quantized) for every sample the kind's quantize takes."""
    out = []
    for name, x in samples().items():
        try:
            qt = QUANTIZERS[kind].quantize(x, spec)
        except ValueError:  # not this kind's business (e.g. per-row int8 of a 3-D tensor)
            continue
        out.append((name, x, qt))
    return out


def test_every_kind_is_complete_and_visible():
    assert set(KINDS) == set(ENTRIES)
    assert {"int8_per_row", "int8_per_tensor", "int_per_row", "float", "raw"} <= set(ENTRIES)
    for kind, entry in QUANTIZERS.items():
        assert entry.kind == kind and callable(entry.dequantize) and entry.part and entry.rank in (0, 2, 3)
        if entry.quantize is not None:
            assert entry.specs and entry.error_bound is not None, kind


@pytest.mark.parametrize("kind,spec", MADE, ids=[f"{k}-{s}" for k, s in MADE])
@pytest.mark.parametrize("storage,layout", [("bytes", "plain"), ("packed", "grouped")])
def test_round_trip_through_the_container(kind, spec, storage, layout):
    entry = QUANTIZERS[kind]
    cases = accepted(kind, spec)
    assert cases, f"{kind} ({spec!r}) accepts none of the samples"
    for name, x, qt in cases:
        assert qt.kind == kind, name
        qdict = {"t": qt, "other": QuantizedTensor("raw", torch.arange(3), None, "int64")}
        blob = pack_artifact(qdict, {"case": name}, compressor="zlib", storage=storage, layout=layout)
        read, meta = unpack_artifact(blob)
        assert meta == {"case": name} and list(read) == ["t", "other"]
        back = dequantize_tensor(read["t"])
        assert back.shape == x.shape and back.dtype == x.dtype, name
        assert torch.equal(back, dequantize_tensor(qt)), f"{name}: the container is not lossless"
        # the kind's bound, float32 arithmetic slack, then one rounding to the original dtype
        err = (back.double() - x.double()).abs()
        bound = entry.error_bound(x, qt).double()
        slack = 1e-5 * bound + 1e-6 * x.double().abs() + 1e-9
        if back.is_floating_point():
            slack = slack + back.double().abs() * torch.finfo(back.dtype).eps / 2
        assert bool((err <= bound + slack).all()), f"{name}: max excess {float((err - bound - slack).max())}"
        # its format label and size line are what describe_artifact reports
        info = describe_artifact(blob)
        fmt = format_label(kind, qt.bits, dtype_name(qt.data.dtype))
        assert info["params"].get(fmt, 0) >= x.numel(), (name, fmt, info["params"])
        assert component_label(kind, qt.bits, dtype_name(qt.data.dtype)) in info["components"]


def test_quantize_refuses_specs_it_does_not_take():
    x = torch.randn(20, 30)
    with pytest.raises(ValueError, match="bits"):
        QUANTIZERS["int_per_row"].quantize(x, 9)
    with pytest.raises(ValueError, match="float spec"):
        QUANTIZERS["float"].quantize(x, "fp8")
    with pytest.raises(ValueError, match="2-D"):
        QUANTIZERS["int8_per_row"].quantize(x.flatten(), 8)


def test_unknown_kinds_are_refused_clearly(monkeypatch):
    for bad in ("int3_per_row", "", None):
        with pytest.raises(ValueError, match="unknown quantized tensor kind .*known: "):
            get_quantizer(bad)
    with pytest.raises(ValueError, match="unknown quantized tensor kind 'int3_per_row'"):
        QuantizedTensor("int3_per_row", torch.zeros(2, dtype=torch.int8), None, "float32")
    with pytest.raises(ValueError, match="registered twice"):
        register_quantizer(QUANTIZERS["raw"])
    # an artifact naming a kind this pgolf does not know (written while one was registered)
    fake = Quantizer("future_kind", lambda qt: qt.data, lambda bits, dtype: "future", "tensors", rank=3)
    monkeypatch.setitem(QUANTIZERS, "future_kind", fake)
    blob = pack_artifact({"t": QuantizedTensor("future_kind", torch.arange(4), None, "int64")}, compressor="zlib")
    assert describe_artifact(blob)["params"] == {"future": 4}
    monkeypatch.delitem(QUANTIZERS, "future_kind")
    with pytest.raises(ArtifactError, match="unknown quantized tensor kind 'future_kind'"):
        unpack_artifact(blob)
    with pytest.raises(ArtifactError, match="unknown quantized tensor kind 'future_kind'"):
        describe_artifact(blob)
