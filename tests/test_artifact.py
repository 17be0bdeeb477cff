import hashlib
import struct
from pathlib import Path

import pytest
import torch

import pgolf
from pgolf import artifact
from pgolf.artifact import (MAGIC, SIZE_CAP_BYTES, ArtifactError, check_size, code_bytes_of_package,
                            pack_artifact, read_artifact, size_report, unpack_artifact, write_artifact)
from pgolf.quant import QuantizedTensor, dequantize_state_dict, quantize_state_dict


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


def test_code_bytes_of_package_is_exact():
    root = Path(pgolf.__file__).resolve().parent
    expected = 0
    for dirpath in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        for f in dirpath.iterdir():
            if f.is_file() and f.suffix == ".py":
                with open(f, "rb") as fh:
                    expected += len(fh.read())
    n, desc = code_bytes_of_package()
    assert n == expected > 0
    assert "pgolf" in desc and ".py" in desc
    r = size_report(10)
    assert r.code_bytes == expected and r.total_bytes == 10 + expected
    assert artifact.code_bytes_of_package()[0] == n
