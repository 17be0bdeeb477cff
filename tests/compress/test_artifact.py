import hashlib
import struct

import pytest
import torch

from pgolf.compress import container as artifact
from pgolf.compress.accounting import SIZE_CAP_BYTES, check_size, size_report
from pgolf.train.export import counted_code_bytes
from pgolf.compress.container import MAGIC, ArtifactError, pack_artifact, read_artifact, unpack_artifact, write_artifact
from pgolf.compress.quant import QuantizedTensor, dequantize_state_dict, quantize_state_dict

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # small tensors, shared cores


def gpt_like_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return {
        "tok_emb.weight": (r(512, 160) * 0.02).to(torch.bfloat16),
        "blocks.0.attn.c_qkv.weight": r(384, 192) * 0.05,
        "blocks.0.mlp.fc.weight": (r(192, 384) * 0.05).to(torch.bfloat16),
        "blocks.0.attn_scale": r(192),
        "blocks.0.mlp_scale": r(192).to(torch.bfloat16),
        "blocks.0.resid_mix": r(2, 192),
        "blocks.0.attn.q_gain": r(4),
        "skip_weights": r(2, 192),
        "final_norm.weight": r(192).to(torch.bfloat16),
        "big_vector": r(70_000),
        "step": torch.tensor(7, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


@pytest.fixture(scope="module")
def qdict():
    return quantize_state_dict(gpt_like_state_dict())[0]


@pytest.fixture(scope="module")
def blob(qdict):
    return pack_artifact(qdict, {"run_id": "r1", "config": {"num_layers": 9, "lr": 0.04}})


def assert_same_dequant(a, b):
    da, db = dequantize_state_dict(a), dequantize_state_dict(b)
    assert list(da) == list(db)
    for k in da:
        assert da[k].dtype == db[k].dtype and da[k].shape == db[k].shape, k
        assert torch.equal(da[k], db[k]), k


def test_roundtrip_through_file_is_bit_exact(tmp_path, qdict, blob):
    path = tmp_path / "model.pgolf"
    n = write_artifact(path, blob)
    assert n == len(blob) == path.stat().st_size
    loaded, meta = read_artifact(path)
    assert meta == {"run_id": "r1", "config": {"num_layers": 9, "lr": 0.04}}
    for k, qt in qdict.items():
        lt = loaded[k]
        assert (lt.kind, lt.orig_dtype) == (qt.kind, qt.orig_dtype)
        assert lt.data.dtype == qt.data.dtype and torch.equal(lt.data, qt.data), k
        assert (lt.scale is None) == (qt.scale is None)
        if qt.scale is not None:
            assert lt.scale.dtype == qt.scale.dtype and torch.equal(lt.scale, qt.scale)
    assert_same_dequant(loaded, qdict)
    report = size_report(path.stat().st_size, code_bytes=1000, code_description="test")
    assert report.model_bytes == len(path.read_bytes())


def test_pack_is_deterministic(qdict, blob):
    assert pack_artifact(qdict, {"run_id": "r1", "config": {"num_layers": 9, "lr": 0.04}}) == blob


def test_outer_header_layout(blob):
    assert blob.startswith(MAGIC)
    name_len = blob[10]
    assert blob[11:11 + name_len] == b"zlib"
    pos = 11 + name_len
    (payload_len,) = struct.unpack_from("<Q", blob, pos)
    payload = blob[pos + 8 + 32:]
    assert len(payload) == payload_len
    assert hashlib.sha256(payload).digest() == blob[pos + 8:pos + 40]


def test_every_single_byte_flip_is_detected(blob):
    positions = list(range(0, 64)) + [len(blob) // 2, len(blob) - 1]  # whole outer header
    positions += list(range(0, len(blob), max(1, len(blob) // 50)))
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(ArtifactError):
            unpack_artifact(bytes(bad))


def test_error_messages(blob, tmp_path):
    with pytest.raises(ArtifactError, match="not a pgolf artifact"):
        unpack_artifact(b"PK\x03\x04" + blob[4:])
    bad = bytearray(blob)
    bad[8] = 99
    with pytest.raises(ArtifactError, match="unsupported format version 99"):
        unpack_artifact(bytes(bad))
    bad = bytearray(blob)
    bad[-1] ^= 0xFF
    path = tmp_path / "bad.pgolf"
    path.write_bytes(bytes(bad))
    with pytest.raises(ArtifactError, match=r"bad\.pgolf is corrupt: sha256 mismatch; re-export"):
        read_artifact(path)
    bad = bytearray(blob)
    bad[11:15] = b"zzzz"
    with pytest.raises(ArtifactError, match="unknown compressor 'zzzz'"):
        unpack_artifact(bytes(bad))


@pytest.mark.parametrize("cut", [0, 3, 9, 12, 30, 60, -1000, -1])
def test_truncation_detected(blob, cut):
    with pytest.raises(ArtifactError, match="truncated|not a pgolf"):
        unpack_artifact(blob[:cut])


def test_trailing_bytes_detected(blob):
    with pytest.raises(ArtifactError, match="trailing"):
        unpack_artifact(blob + b"\x00")


def test_overwrite_refused(tmp_path, blob):
    path = tmp_path / "sub" / "m.pgolf"
    write_artifact(path, blob)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_artifact(path, b"other")
    assert path.read_bytes() == blob
    write_artifact(path, blob[:-1] + b"x", overwrite=True)
    assert path.read_bytes() == blob[:-1] + b"x"
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pgolf"]  # no temp files left


@pytest.mark.parametrize("compressor", ["zlib", "zstd", "lzma"])
def test_each_compressor_roundtrips(qdict, compressor):
    if compressor == "zstd":
        pytest.importorskip("zstandard")
    b = pack_artifact(qdict, {"c": compressor}, compressor=compressor)
    loaded, meta = unpack_artifact(b)
    assert meta == {"c": compressor}
    assert_same_dequant(loaded, qdict)


def test_unknown_compressor(qdict):
    with pytest.raises(ArtifactError, match="unknown compressor 'brotli9'"):
        pack_artifact(qdict, {}, compressor="brotli9")


def test_zstd_missing_message(monkeypatch, qdict):
    import builtins
    real_import = builtins.__import__

    def no_zstd(name, *a, **k):
        if name == "zstandard":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_zstd)
    with pytest.raises(ArtifactError, match=r"pip install zstandard.*compressor=zlib"):
        pack_artifact(qdict, {}, compressor="zstd")


def test_meta_must_be_json(qdict):
    with pytest.raises(ArtifactError, match="JSON"):
        pack_artifact(qdict, {"x": object()})


def test_bf16_bit_patterns_preserved():
    x = torch.tensor([1.0, -0.0, float("inf"), 3.140625, 1e-40], dtype=torch.bfloat16)
    q = {"x": QuantizedTensor("raw", x, None, "bfloat16")}
    y = unpack_artifact(pack_artifact(q, {}))[0]["x"].data
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.view(torch.int16), x.view(torch.int16))


def test_size_report_arithmetic_and_cap():
    r = size_report(15_000_000, code_bytes=999_999, code_description="train_gpt.py")
    assert (r.total_bytes, r.fits, r.cap) == (15_999_999, True, SIZE_CAP_BYTES)
    assert check_size(r) is r
    assert str(r).splitlines() == [
        "artifact model bytes: 15,000,000",
        "code bytes: 999,999 (train_gpt.py)",
        "total: 15,999,999 / 16,000,000 (fits)",
    ]
    assert size_report(15_000_000, code_bytes=1_000_000).fits  # exactly at the cap fits
    over = size_report(15_950_000, code_bytes=50_123, code_description="x")
    assert not over.fits and over.overage == 123
    assert over.lines()[-1] == "total: 16,000,123 / 16,000,000 (OVER by 123)"
    with pytest.raises(ArtifactError, match=r"OVER .* by 123 bytes.*fewer layers.*lower-bit.*compressor"):
        check_size(over)


def test_code_bytes_are_the_length_of_the_shipped_train_gpt():
    """Counted code bytes are the length of the single-file train_gpt.py (tests/test_bundle.py
    checks what it holds); without a config, the default config's."""
    from pgolf.train.bundle import build_bundle
    from pgolf.config import Config

    n, desc = counted_code_bytes()
    assert n == len(build_bundle(Config())) and "train_gpt.py" in desc and "sha256:" in desc


# ---------------------------------------------------------------- intN storage, layouts, compressors

import json
import re
import zlib

from pgolf.compress.container import (COMPRESSOR_ORDER, FORMAT_VERSION, available_compressors, check_compressor,
                            describe_artifact)
from pgolf.compress.quant import quantize_rows

ALL_COMPRESSORS = ["zlib", "zstd", "lzma", "brotli"]


def need(compressor):
    if compressor == "zstd":
        pytest.importorskip("zstandard")
    if compressor == "brotli":
        pytest.importorskip("brotli")


def mixed_qdict(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05
    out = {}
    for bits, shape in ((8, (24, 40)), (6, (7, 13)), (5, (9, 11)), (4, (5, 9)), (4, (3, 1)), (6, (0, 4))):
        w = r(*shape)
        q, s = quantize_rows(w, bits)
        out[f"int{bits}_{shape[0]}x{shape[1]}"] = QuantizedTensor("int_per_row", q, s, "bfloat16", bits)
    q, s = quantize_rows(r(1, 33), 5)
    out["int5_vector"] = QuantizedTensor("int_per_row", q.reshape(33), s, "float32", 5)
    qd, _ = quantize_state_dict({"official_rows": r(300, 256), "official_flat": r(70_001)})
    out.update(qd)
    out["fp16"] = QuantizedTensor("float", r(17, 3).half(), None, "bfloat16")
    out["fp32"] = QuantizedTensor("float", r(11), None, "float32")
    out["bf16_raw"] = QuantizedTensor("raw", r(5).to(torch.bfloat16), None, "bfloat16")
    out["i64"] = QuantizedTensor("raw", torch.arange(7), None, "int64")
    out["mask"] = QuantizedTensor("raw", torch.tensor([True, False, True]), None, "bool")
    return out


@pytest.fixture(scope="module")
def mixed():
    return mixed_qdict()


def assert_same_qdict(a, b):
    assert list(a) == list(b)
    for k, qt in b.items():
        lt = a[k]
        assert (lt.kind, lt.orig_dtype, lt.bits) == (qt.kind, qt.orig_dtype, qt.bits), k
        assert lt.data.dtype == qt.data.dtype and lt.data.shape == qt.data.shape, k
        if qt.data.dtype == torch.bfloat16:
            assert torch.equal(lt.data.view(torch.int16), qt.data.view(torch.int16)), k
        else:
            assert torch.equal(lt.data, qt.data), k
        assert (lt.scale is None) == (qt.scale is None), k
        if qt.scale is not None:
            assert lt.scale.dtype == qt.scale.dtype and torch.equal(lt.scale, qt.scale), k
    assert_same_dequant(a, b)


@pytest.mark.parametrize("compressor", ALL_COMPRESSORS)
@pytest.mark.parametrize("storage", ["bytes", "packed"])
@pytest.mark.parametrize("layout", ["plain", "grouped"])
def test_mixed_roundtrip_every_choice(mixed, compressor, storage, layout):
    need(compressor)
    blob = pack_artifact(mixed, {"k": [1, "x"]}, compressor=compressor, storage=storage, layout=layout)
    loaded, meta = unpack_artifact(blob)
    assert meta == {"k": [1, "x"]}
    assert_same_qdict(loaded, mixed)
    info = describe_artifact(blob)
    assert (info["compressor"], info["storage"], info["layout"]) == (compressor, storage, layout)
    assert info["version"] == FORMAT_VERSION and info["file_bytes"] == len(blob)
    assert info["outer_header_bytes"] + info["compressed_payload_bytes"] == len(blob)
    assert sum(info["components"].values()) == info["raw_payload_bytes"]


def test_packed_storage_sizes(mixed):
    info_b = describe_artifact(pack_artifact(mixed, {}, storage="bytes", layout="plain"))
    info_p = describe_artifact(pack_artifact(mixed, {}, storage="packed", layout="plain"))
    n = {b: sum(qt.data.numel() for qt in mixed.values() if qt.kind == "int_per_row" and qt.bits == b)
         for b in (6, 5, 4)}
    for b in (6, 5, 4):
        assert info_b["components"][f"int{b} codes"] == n[b]
    # each tensor is packed on its own, so its bytes round up separately
    per = lambda b: sum((qt.data.numel() * b + 7) // 8 for qt in mixed.values()
                        if qt.kind == "int_per_row" and qt.bits == b)
    for b in (6, 5, 4):
        assert info_p["components"][f"int{b} codes"] == per(b)
    assert info_p["params"]["int4"] == n[4] and info_p["params"]["fp16"] == 51
    assert info_p["components"]["int8 codes"] == 24 * 40 + 300 * 256 + 70_001


def test_grouped_layout_uses_byte_planes(mixed):
    blob = pack_artifact(mixed, {}, storage="packed", layout="grouped")
    raw = zlib.decompress(blob[11 + 4 + 8 + 32:])
    (hlen,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(raw[8:8 + hlen])
    keys = [g["key"] for g in header["groups"]]
    assert keys[:5] == ["int8", "int6p", "int5p", "int4p", "scale:float16"]  # codes first, then scales
    assert keys.index("scale:float16") < keys.index("float:float16") < keys.index("raw:bfloat16")
    fp16 = header["groups"][keys.index("float:float16")]
    assert fp16["planes"] and fp16["itemsize"] == 2
    start = 8 + hlen + sum(g["nbytes"] for g in header["groups"][:keys.index("float:float16")])
    stored = raw[start:start + fp16["nbytes"]]
    expected = mixed["fp16"].data.numpy().view("u1").reshape(-1, 2)
    assert stored[:51] == expected[:, 1].tobytes() and stored[51:] == expected[:, 0].tobytes()  # high bytes first
    assert struct.unpack("<I", raw[-4:])[0] == zlib.crc32(raw[:-4])


def test_auto_is_smallest_and_deterministic(mixed):
    trials = []
    blob = pack_artifact(mixed, {"m": 1}, compressor="auto", storage="auto", layout="auto", trials=trials)
    assert pack_artifact(mixed, {"m": 1}, compressor="auto", storage="auto", layout="auto", jobs=1) == blob
    avail = available_compressors()
    assert len(trials) == len(avail) * 4
    assert [t["compressor"] for t in trials[::4]] == list(avail)
    chosen = [t for t in trials if t["chosen"]]
    assert len(chosen) == 1 and chosen[0]["bytes"] == len(blob) == min(t["bytes"] for t in trials)
    first_min = next(t for t in trials if t["bytes"] == len(blob))
    assert first_min is chosen[0]  # ties go to the earlier candidate
    info = describe_artifact(blob)
    assert (info["compressor"], info["storage"], info["layout"]) == \
        (chosen[0]["compressor"], chosen[0]["storage"], chosen[0]["layout"])
    assert_same_qdict(unpack_artifact(blob)[0], mixed)


def test_auto_storage_without_low_bit_tensors(qdict):
    trials = []
    pack_artifact(qdict, {}, compressor="zlib", trials=trials)
    assert [(t["storage"], t["layout"]) for t in trials] == [("bytes", "plain"), ("bytes", "grouped")]


def repack_payload(blob, payload):
    """Replace the compressed payload and fix length + sha256, as a consistent writer would."""
    pos = 11 + blob[10]
    return blob[:pos] + struct.pack("<Q", len(payload)) + hashlib.sha256(payload).digest() + payload


@pytest.mark.parametrize("compressor", ALL_COMPRESSORS)
def test_corrupt_payload_rejected_under_every_compressor(mixed, compressor):
    need(compressor)
    blob = pack_artifact(mixed, {}, compressor=compressor, storage="packed", layout="grouped")
    payload = blob[11 + blob[10] + 40:]
    bad = bytearray(blob)
    bad[len(blob) - len(payload) // 2] ^= 0x10
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        unpack_artifact(bytes(bad))
    # a payload that passes the sha256: rejected, unless the flipped bit is one the
    # decompressor ignores (e.g. padding after deflate's last block) and the data is intact
    rejected = 0
    for pos in sorted({0, 1, 5, len(payload) // 3, len(payload) // 2, len(payload) - 5, len(payload) - 1}):
        for flip in (0x01, 0x80):
            p = bytearray(payload)
            p[pos] ^= flip
            try:
                loaded, _ = unpack_artifact(repack_payload(blob, bytes(p)))
            except ArtifactError as e:
                assert re.search("corrupt|malformed", str(e)), str(e)
                rejected += 1
            else:
                assert_same_qdict(loaded, mixed)
    assert rejected >= 10
    for cut in (len(payload) // 2, len(payload) - 1):
        with pytest.raises(ArtifactError, match="corrupt|malformed"):
            unpack_artifact(repack_payload(blob, payload[:cut]))
    with pytest.raises(ArtifactError, match=f"does not decompress with {compressor}"):
        unpack_artifact(repack_payload(blob, b"\xff" * 64))


def test_crc_catches_silent_decompression(mixed):
    # a writer whose raw bytes differ from what its crc covers is caught after decompression
    good = pack_artifact(mixed, {}, compressor="zlib", storage="bytes", layout="plain")
    raw = bytearray(zlib.decompress(good[11 + 4 + 40:]))
    raw[-10] ^= 1
    with pytest.raises(ArtifactError, match="crc32 mismatch"):
        unpack_artifact(repack_payload(good, zlib.compress(bytes(raw))))


def test_brotli_missing_message(monkeypatch, mixed):
    import builtins
    real_import = builtins.__import__

    def no_brotli(name, *a, **k):
        if name == "brotli":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_brotli)
    with pytest.raises(ArtifactError, match=r"pip install brotli"):
        pack_artifact(mixed, {}, compressor="brotli")
    with pytest.raises(ArtifactError, match=r"pip install brotli"):
        check_compressor("brotli")
    assert "brotli" not in available_compressors()
    trials = []
    pack_artifact(mixed, {}, compressor="auto", storage="bytes", layout="plain", trials=trials)
    assert "brotli" not in {t["compressor"] for t in trials}


def test_unknown_choices(mixed):
    with pytest.raises(ArtifactError, match="unknown storage 'nibbles'"):
        pack_artifact(mixed, {}, storage="nibbles")
    with pytest.raises(ArtifactError, match="unknown layout 'x'"):
        pack_artifact(mixed, {}, layout="x")
    check_compressor("auto")
    assert COMPRESSOR_ORDER == ("zlib", "zstd", "lzma", "brotli")


def test_out_of_range_codes_refused():
    bad = QuantizedTensor("int_per_row", torch.tensor([[8, 0]], dtype=torch.int8), torch.ones(1).half(), "float32", 4)
    with pytest.raises(ArtifactError, match="int4 codes outside"):
        pack_artifact({"w": bad}, {})
    bad = QuantizedTensor("int_per_row", torch.tensor([[-8, 0]], dtype=torch.int8), torch.ones(1).half(), "float32", 4)
    with pytest.raises(ArtifactError, match="int4 codes outside"):
        pack_artifact({"w": bad}, {})


def pack_v1(qdict, meta):
    """The version-1 writer, as shipped before intN storage."""
    entries, chunks, offset = [], [], 0

    def add(t):
        nonlocal offset
        dtype, data = artifact._tensor_bytes(t)
        spec = {"dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": len(data)}
        chunks.append(data)
        offset += len(data)
        return spec

    for name, qt in qdict.items():
        entry = {"name": name, "kind": qt.kind, "orig_dtype": qt.orig_dtype, **add(qt.data)}
        entry["scale"] = add(qt.scale) if qt.scale is not None else None
        entries.append(entry)
    header = json.dumps({"format": "pgolf-artifact", "tensors": entries, "meta": meta},
                        sort_keys=True, separators=(",", ":")).encode()
    payload = zlib.compress(struct.pack("<Q", len(header)) + header + b"".join(chunks), 9)
    return (MAGIC + struct.pack("<H", 1) + bytes([4]) + b"zlib" + struct.pack("<Q", len(payload))
            + hashlib.sha256(payload).digest() + payload)


def test_version_1_artifacts_still_load(qdict):
    old = pack_v1(qdict, {"run_id": "old"})
    loaded, meta = unpack_artifact(old)
    assert meta == {"run_id": "old"}
    assert_same_qdict(loaded, qdict)
    info = describe_artifact(old)
    assert (info["version"], info["storage"], info["layout"]) == (1, "bytes", "plain")


def test_file_length_equals_accounted_bytes_and_breakdown(tmp_path, mixed):
    blob = pack_artifact(mixed, {"run_id": "r"}, compressor="auto")
    path = tmp_path / "m.pgolf"
    write_artifact(path, blob)
    info = describe_artifact(path.read_bytes(), estimate=True)
    bd = info["breakdown"]
    assert sum(bd.values()) == len(blob) == path.stat().st_size
    assert set(bd) >= {"outer header", "header+meta", "int4 codes", "int8 codes", "scales", "fp16 passthrough"}
    report = size_report(path.stat().st_size, code_bytes=100, code_description="t", breakdown=bd)
    assert report.model_bytes == len(blob) and report.total_bytes == len(blob) + 100
    lines = report.lines()
    assert lines[0] == f"artifact model bytes: {len(blob):,}"
    assert lines[1] == f"  outer header: {bd['outer header']:,}"
    assert lines[1 + len(bd)].startswith("code bytes: 100")
