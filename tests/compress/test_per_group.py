"""Layout per_group (pgolf.compress.grouping): PR #1855's per-group compression in pgolf's container.
Exact round trips over random mixed state dicts (row permutations included), the greedy L1 row
order against a plain reference, lrzip through a fake binary, errors, config and describe."""

import os
import random
import stat
import sys
import zlib

import numpy as np
import pytest
import torch

from pgolf.compress import container, grouping
from pgolf.compress.container import (ArtifactError, describe_artifact, pack_artifact, unpack_artifact,
                                      write_artifact, read_artifact)
from pgolf.compress.grouping import (MIN_OWN_STREAM_BYTES, greedy_l1_order, perm_bytes, read_perm, role_group)
from pgolf.compress.quant import QuantizedTensor, quantize_state_dict
from pgolf.config import Config, ConfigError, apply_overrides
from pgolf.config.checks import validate
from pgolf.config.resolve import check_requires
from pgolf.train.shipping import OPTIONAL_MODULES

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

HAVE_BROTLI = "brotli" in container.available_compressors()
needs_brotli = pytest.mark.skipif(not HAVE_BROTLI, reason="brotli not installed")


def assert_identical(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        x, y = a[k], b[k]
        assert (x.kind, x.bits, x.orig_dtype) == (y.kind, y.bits, y.orig_dtype), k
        assert x.data.dtype == y.data.dtype and x.data.shape == y.data.shape and torch.equal(x.data, y.data), k
        assert (x.scale is None) == (y.scale is None), k
        if x.scale is not None:
            assert x.scale.dtype == y.scale.dtype and x.scale.shape == y.scale.shape, k
            assert torch.equal(x.scale, y.scale), k


def random_qdict(seed: int) -> dict[str, QuantizedTensor]:
    """Mixed kinds over a few layers: per-row intN of several widths (2-D and 1-D), official int8
    per row and per tensor, float passthrough (fp32 / fp16 / bf16), raw ints and bools, empties."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    layers = rng.randint(1, 3)
    state = {"tok_emb.weight": torch.randn(rng.randint(2, 96), rng.choice([8, 40, 64]), generator=g)}
    for i in range(layers):
        rows = rng.randint(1, 70)
        state[f"blocks.{i}.attn.c_q.weight"] = torch.randn(rows, 48, generator=g)
        state[f"blocks.{i}.mlp.fc.weight"] = torch.randn(rng.randint(2, 130), 32, generator=g) * 0.1
        state[f"blocks.{i}.attn_scale"] = torch.randn(48, generator=g)
        state[f"blocks.{i}.mlp_scale"] = torch.randn(32, generator=g).to(torch.bfloat16)
    state["head_vector"] = torch.randn(rng.choice([70_000, 5]), generator=g)  # large 1-D: official int8
    state["step"] = torch.tensor(rng.randint(0, 99), dtype=torch.int64)
    state["flags"] = torch.tensor([True, False])
    state["empty"] = torch.zeros(0, 3)

    def bits_for(name, tensor):
        if name.startswith("tok_emb") or tensor.ndim != 2:
            return None
        return rng.choice([4, 5, 6, 7, 8, "fp16"])

    # KEEP_FLOAT_MAX_NUMEL keeps these small tensors float; quantize them per row explicitly
    qdict, _ = quantize_state_dict(state, scheme="int6", bits_for=bits_for)
    from pgolf.compress.quantizers.rows import quantize_int_per_row
    for name, t in state.items():
        if t.ndim == 2 and t.numel() and name != "empty" and qdict[name].kind == "float" and rng.random() < 0.8:
            qdict[name] = quantize_int_per_row(t, rng.choice([4, 5, 6, 7, 8]))
    one_row = torch.randint(-7, 8, (33,), generator=g, dtype=torch.int8)  # 1-D codes: one row
    qdict["blocks.0.attn.gate_codes"] = QuantizedTensor("int_per_row", one_row, torch.ones(1, dtype=torch.float16),
                                                        "float32", 4)
    return qdict


def test_role_group_joins_one_role_across_layers():
    assert role_group("blocks.3.attn.c_q.weight") == "blocks.*.attn.c_q"
    assert role_group("blocks.10.mlp.fc.weight") == "blocks.*.mlp.fc"
    assert role_group("tok_emb.weight") == "tok_emb"
    assert role_group("embed_addons.0.gate") == "embed_addons.*.gate"
    assert role_group("weight") == "weight"


def reference_order(m: np.ndarray) -> list[int]:
    """The greedy walk written plainly: from row 0, the nearest unused row by L1, lowest index on ties."""
    m = m.astype(np.int64)
    order, used = [0], {0}
    while len(order) < len(m):
        cur = m[order[-1]]
        best = min((int(np.abs(m[j] - cur).sum()), j) for j in range(len(m)) if j not in used)[1]
        order.append(best)
        used.add(best)
    return order


@pytest.mark.parametrize("seed", range(4))
def test_greedy_l1_order_matches_the_plain_walk_ties_included(seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-2, 3, (60, 5), generator=g, dtype=torch.int8)  # few values: many ties
    codes[7] = codes[3]  # exact duplicates
    expect = reference_order(codes.numpy())
    assert greedy_l1_order(codes).tolist() == expect
    assert greedy_l1_order(codes, full_matrix_max_rows=0).tolist() == expect  # one row of distances per step
    assert greedy_l1_order(codes, device="cpu").tolist() == expect
    if torch.cuda.is_available():  # exact integer sums: the same order on the GPU
        assert greedy_l1_order(codes, device="cuda").tolist() == expect
        assert greedy_l1_order(codes, full_matrix_max_rows=0, device="cuda").tolist() == expect


def test_the_blocked_distance_matrix_is_cdist():
    from pgolf.compress.grouping import _l1_matrix

    x = torch.randint(-31, 32, (50, 9), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(_l1_matrix(x, block=7), torch.cdist(x, x, p=1))


def test_greedy_l1_order_edge_shapes():
    assert greedy_l1_order(torch.zeros(0, 4, dtype=torch.int8)).tolist() == []
    assert greedy_l1_order(torch.zeros(1, 4, dtype=torch.int8)).tolist() == [0]
    wide = torch.tensor([[127] * 70_000, [-127] * 70_000, [126] * 70_000], dtype=torch.int8)  # sums past 2^24
    assert greedy_l1_order(wide).tolist() == [0, 2, 1]


def test_perm_storage_uint16_then_int32():
    small = np.random.default_rng(0).permutation(65536)
    dtype, raw = perm_bytes(small)
    assert dtype == "uint16" and len(raw) == 2 * 65536
    assert np.array_equal(read_perm(raw, {"dtype": dtype, "shape": [65536], "offset": 0, "nbytes": len(raw)}, 65536),
                          small)
    big = np.random.default_rng(1).permutation(65537)
    dtype, raw = perm_bytes(big)
    assert dtype == "int32"
    assert np.array_equal(read_perm(raw, {"dtype": dtype, "shape": [65537], "offset": 0, "nbytes": len(raw)}, 65537),
                          big)
    bad = np.array([0, 0, 2], dtype="<u2").tobytes()
    with pytest.raises(ValueError, match="not a permutation"):
        read_perm(bad, {"dtype": "uint16", "shape": [3], "offset": 0, "nbytes": 6}, 3)


@pytest.mark.parametrize("seed", range(8))
def test_per_group_roundtrip_is_exact_over_random_state_dicts(seed, monkeypatch):
    qdict = random_qdict(seed)
    rng = random.Random(100 + seed)
    # small state dicts: lower the own-stream threshold so most groups get streams (0: empty ones too)
    monkeypatch.setattr(grouping, "MIN_OWN_STREAM_BYTES", rng.choice([0, 256, 2048, MIN_OWN_STREAM_BYTES]))
    groups = sorted({role_group(n) for n, qt in qdict.items() if qt.data.dtype == torch.int8 and qt.kind != "raw"})
    row_order = rng.sample(groups, rng.randint(0, len(groups)))
    compressor = rng.choice(["zlib", "lzma", "auto"] + (["brotli"] * 2 if HAVE_BROTLI else []))
    backend = rng.choice(["zlib", "lzma"] + (["brotli"] * 2 if HAVE_BROTLI else []))
    meta = {"run_id": f"s{seed}", "config": {"x": [1, 2.5, None]}}
    blob = pack_artifact(qdict, meta, compressor=compressor, layout="per_group", row_order=row_order,
                         group_backend=backend)
    loaded, loaded_meta = unpack_artifact(blob)
    assert loaded_meta == meta
    assert_identical(qdict, loaded)
    info = describe_artifact(blob, estimate=True)
    assert info["layout"] == "per_group" and info["compressor"] == "groups"
    assert sum(info["breakdown"].values()) == len(blob)
    reordered = [n for n, qt in qdict.items() if role_group(n) in row_order and qt.data.ndim == 2
                 and qt.data.shape[0] > 1]
    assert (info["components"].get("row permutations", 0) > 0) == bool(reordered)
    # deterministic bytes
    assert blob == pack_artifact(qdict, meta, compressor=compressor, layout="per_group", row_order=row_order,
                                 group_backend=backend)


def clustered_codes(rows=256, cols=512, distinct=8, seed=0):
    """Rows that are copies of a few random rows, shuffled: ordering brings the copies together."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-31, 32, (distinct, cols), generator=g, dtype=torch.int8)
    return base[torch.randint(0, distinct, (rows,), generator=g)]


def test_row_order_stores_a_permutation_that_helps_clustered_rows():
    codes = clustered_codes()
    qdict = {"blocks.0.mlp.fc.weight": QuantizedTensor("int_per_row", codes, torch.ones(256, dtype=torch.float16),
                                                       "float32", 6)}
    plain = pack_artifact(qdict, {}, compressor="zlib", layout="per_group", group_backend="zlib")
    ordered = pack_artifact(qdict, {}, compressor="zlib", layout="per_group", group_backend="zlib",
                            row_order=["blocks.*.mlp.fc"])
    assert len(ordered) < 0.5 * len(plain)
    assert_identical(qdict, unpack_artifact(ordered)[0])
    info = describe_artifact(ordered)
    assert info["group_bytes"]["perm:uint16"] == 2 * 256
    assert [s["groups"] for s in info["streams"]][1:] == [["codes:blocks.*.mlp.fc"], ["crc32"]]


def test_small_role_groups_join_the_rest_stream():
    small = torch.randint(-7, 8, (4, 16), dtype=torch.int8)  # 64 bytes < MIN_OWN_STREAM_BYTES
    big = torch.randint(-7, 8, (MIN_OWN_STREAM_BYTES // 64, 64), dtype=torch.int8)
    qdict = {"a.small": QuantizedTensor("int_per_row", small, torch.ones(4, dtype=torch.float16), "float32", 4),
             "b.big": QuantizedTensor("int_per_row", big, torch.ones(big.shape[0], dtype=torch.float16), "float32", 4)}
    blob = pack_artifact(qdict, {}, compressor="zlib", layout="per_group", group_backend="lzma")
    streams = describe_artifact(blob)["streams"]
    assert streams[0]["groups"] == ["header+meta", "scale:float16", "codes:a.small"] and streams[0]["codec"] == "zlib"
    assert streams[1] == {**streams[1], "groups": ["codes:b.big"], "codec": "lzma"}
    assert_identical(qdict, unpack_artifact(blob)[0])


def test_default_layouts_ignore_the_new_options_and_refuse_them():
    qdict = random_qdict(0)
    for layout in ("plain", "grouped", "auto"):
        blob = pack_artifact(qdict, {"m": 1}, layout=layout)
        assert describe_artifact(blob)["compressor"] == "zlib"
        assert blob == pack_artifact(qdict, {"m": 1}, layout=layout, row_order=[], group_backend="brotli")
        with pytest.raises(ArtifactError, match="layout 'per_group' only"):
            pack_artifact(qdict, {}, layout=layout, row_order=["tok_emb"])
    with pytest.raises(ArtifactError, match="unknown compressor 'groups'"):
        pack_artifact(qdict, {}, compressor="groups")


def test_per_group_errors_are_clear():
    qdict = random_qdict(1)
    with pytest.raises(ArtifactError, match="one code per byte"):
        pack_artifact(qdict, {}, storage="packed", layout="per_group")
    with pytest.raises(ArtifactError, match="'blocks.*.mlp.proj', not a code group.*its groups: .*blocks.*mlp.fc"):
        pack_artifact(qdict, {}, layout="per_group", group_backend="zlib", row_order=["blocks.*.mlp.proj"])
    with pytest.raises(ArtifactError, match="unknown group backend 'zpaq'"):
        pack_artifact(qdict, {}, layout="per_group", group_backend="zpaq")


def test_missing_brotli_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "brotli", None)  # import brotli raises ImportError
    with pytest.raises(ArtifactError, match="pip install brotli"):
        pack_artifact(random_qdict(2), {}, compressor="zlib", layout="per_group", group_backend="brotli")


FAKE_LRZIP = """#!{python}
# a stand-in for lrzip: logs its arguments, 'compresses' with zlib behind a marker
import sys, zlib
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(" ".join(a if a.startswith("-") or a == "9" else "PATH" for a in args) + "\\n")
out, src = args[args.index("-o") + 1], args[-1]
data = open(src, "rb").read()
if "-d" in args:
    assert data[:4] == b"FLRZ"
    data = zlib.decompress(data[4:])
else:
    data = b"FLRZ" + zlib.compress(data, 9)
open(out, "wb").write(data)
"""


@pytest.fixture
def fake_lrzip(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "lrzip.log"
    exe = bindir / "lrzip"
    exe.write_text(FAKE_LRZIP.format(python=sys.executable, log=str(log)))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return log


def test_lrzip_backend_through_a_fake_binary(fake_lrzip, tmp_path, monkeypatch):
    qdict = random_qdict(3)
    blob = pack_artifact(qdict, {"k": 1}, compressor="zlib", layout="per_group", group_backend="lrzip",
                         row_order=["tok_emb"])
    calls = fake_lrzip.read_text().splitlines()
    own = [s for s in describe_artifact(blob)["streams"] if s["codec"] == "lrzip"]
    assert own and len(calls) == len(own) and set(calls) == {"-z -L 9 -o PATH PATH"}
    path = tmp_path / "m.pgolf"
    write_artifact(path, blob)
    assert_identical(qdict, read_artifact(path)[0])
    # describe_artifact and read_artifact each decompressed every lrzip stream once
    assert fake_lrzip.read_text().splitlines()[len(calls):] == ["-d -f -o PATH PATH"] * (2 * len(own))
    # the same artifact without lrzip on PATH: reading it says what is missing
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(ArtifactError, match="lrzip binary on PATH"):
        unpack_artifact(blob)


def test_lrzip_missing_is_an_explicit_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(ArtifactError, match="needs the lrzip binary on PATH.*group_backend=brotli"):
        pack_artifact(random_qdict(4), {}, layout="per_group", group_backend="lrzip")


def test_a_broken_frame_is_an_artifact_error():
    blob = pack_artifact(random_qdict(5), {}, compressor="zlib", layout="per_group", group_backend="zlib")
    _, _, payload = container._parse_outer(blob, "x")
    payload = bytearray(payload)
    with pytest.raises(ArtifactError, match="frame"):
        unpack_artifact(container._wrap("groups", bytes(payload[:-3])))  # valid sha, truncated frame
    payload[5] += 1  # stream count
    with pytest.raises(ArtifactError):
        unpack_artifact(container._wrap("groups", bytes(payload)))


def test_config_keys_validate_and_ship_the_module():
    cfg = Config()
    assert cfg.export.row_order == [] and cfg.export.group_backend == "brotli"
    validate(cfg)
    assert not OPTIONAL_MODULES["pgolf.compress.grouping"](cfg)
    apply_overrides(cfg, ["export.layout=per_group", "export.row_order=tok_emb,blocks.*.mlp.fc",
                          "export.group_backend=zlib", "export.compressor=lzma"])
    assert cfg.export.row_order == ["tok_emb", "blocks.*.mlp.fc"]
    validate(cfg)
    assert OPTIONAL_MODULES["pgolf.compress.grouping"](cfg)
    check_requires(["per_group"], "test")

    def problems(*overrides):
        c = Config()
        apply_overrides(c, list(overrides))
        with pytest.raises(ConfigError) as err:
            validate(c)
        return str(err.value)

    assert "export.row_order applies to export.layout=per_group only" in problems("export.row_order=tok_emb")
    assert "export.group_backend applies to export.layout=per_group only" in problems("export.group_backend=lzma")
    assert "unknown group backend 'zpaq' (export.group_backend); choose one of brotli, lrzip" in problems(
        "export.layout=per_group", "export.group_backend=zpaq")
    assert "one code per byte" in problems("export.layout=per_group", "export.storage=packed",
                                           "export.group_backend=zlib")
    assert "names a group twice" in problems("export.layout=per_group", "export.group_backend=zlib",
                                             "export.row_order=tok_emb,tok_emb")


def test_config_refuses_lrzip_when_absent(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    c = Config()
    apply_overrides(c, ["export.layout=per_group", "export.group_backend=lrzip"])
    with pytest.raises(ConfigError, match="lrzip binary on PATH"):
        validate(c)


def test_the_export_passes_the_keys_through():
    from types import SimpleNamespace

    from pgolf.train.export import pack_export

    cfg = Config()
    apply_overrides(cfg, ["export.layout=per_group", "export.group_backend=zlib", "export.row_order=tok_emb"])
    qdict = random_qdict(6)
    blob = pack_export(SimpleNamespace(qdict=qdict), cfg)
    info = describe_artifact(blob, estimate=True)
    assert info["layout"] == "per_group" and info["components"]["row permutations"] > 0
    assert any(k.startswith("codes:tok_emb") for k in info["breakdown"]) or \
        any("codes:tok_emb" in s["groups"] for s in info["streams"])
    assert_identical(qdict, unpack_artifact(blob)[0])


def test_the_container_crc_covers_the_streams():
    """A frame whose streams decompress fine but to other bytes (sha256 recomputed) fails the crc32."""
    from pgolf.compress.grouping import frame_streams

    qdict = {**random_qdict(7), "blocks.0.mlp.proj.weight": QuantizedTensor(
        "int_per_row", clustered_codes(), torch.ones(256, dtype=torch.float16), "float32", 6)}
    blob = pack_artifact(qdict, {}, compressor="zlib", layout="per_group", group_backend="zlib")
    payload = bytes(container._parse_outer(blob, "x")[2])
    streams, index_bytes = frame_streams(payload)
    s = streams[1]  # the role group's stream
    assert s["codec"] == "zlib" and len(streams) == 3
    raw = bytearray(zlib.decompress(payload[s["offset"]:s["offset"] + s["stored_bytes"]]))
    raw[0] ^= 1
    again = zlib.compress(bytes(raw), 9)
    index = bytearray(payload[:index_bytes])
    pos = 6  # patch the stored length of stream 1 in the index
    for k, t in enumerate(streams):
        n = index[pos]
        if k == 1:
            index[pos + 9 + n:pos + 17 + n] = len(again).to_bytes(8, "little")
        pos += 17 + n
    body = b"".join(payload[t["offset"]:t["offset"] + t["stored_bytes"]] if k != 1 else again
                    for k, t in enumerate(streams))
    with pytest.raises(ArtifactError, match="crc32 mismatch"):
        unpack_artifact(container._wrap("groups", bytes(index) + body))
