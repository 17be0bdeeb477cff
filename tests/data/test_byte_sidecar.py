"""CaseOps shards and the validation byte sidecar: a tokenizer trained here, sidecar counts that sum
to the UTF-8 bytes of every original document, refusal of a sidecar that does not belong to its
shard, where val_bpb's bytes come from, and the validation-split safety of `pgolf data tokenize`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.cli import main as cli_main
from pgolf.config import Config, ConfigError
from pgolf.config.resolve import resolve_config
from pgolf.data import caseops
from pgolf.data.build import check_val_docs, tokenize_to_shards, train_tokenizer
from pgolf.data.shards import (HEADER_BYTES, ShardError, load_byte_sidecar, read_shard, resolve_shards, sidecar_path,
                               validation_bytes, write_shard)
from pgolf.data.tokenizer import SentencePieceTokenizer

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fineweb_sp1024_sample"
pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"FineWeb sample not found at {SAMPLE}")


def sample_docs(n: int | None = None) -> list[str]:
    with open(SAMPLE / "docs_val.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    return docs[:n]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Tiny SentencePiece BPE tokenizers trained on the sample documents: CaseOps and plain."""
    d = tmp_path_factory.mktemp("tok")
    docs = SAMPLE / "docs_val.jsonl"
    return {"caseops": SentencePieceTokenizer(train_tokenizer(docs, d / "co.model", 400, caseops=True, threads=1)),
            "plain": SentencePieceTokenizer(train_tokenizer(docs, d / "plain.model", 400, threads=1))}


@pytest.fixture(scope="module")
def caseops_dir(tmp_path_factory, tokenizers):
    """The 300 sample documents in CaseOps form: 200 val documents over several small val shards."""
    out = tmp_path_factory.mktemp("caseops")
    stats = tokenize_to_shards(SAMPLE / "docs_val.jsonl", tokenizers["caseops"], out, 200, shard_tokens=100_000,
                               caseops=True)
    return out, stats


def test_trained_tokenizer_holds_the_operators_and_is_lossless(tokenizers):
    sp = tokenizers["caseops"].sp
    assert [sp.piece_to_id(op) for op in caseops.OPERATORS] == [4, 5, 6, 7]  # after pad, bos, eos, unk
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    for text in sample_docs(50):
        assert caseops.decode(sp.decode(sp.encode(caseops.encode(text)))) == text
        assert tokenizers["plain"].sp.decode(tokenizers["plain"].encode(text)) == text


def test_caseops_sidecar_counts_every_original_byte_exactly(caseops_dir, tokenizers):
    out, stats = caseops_dir
    docs, tok = sample_docs(), tokenizers["caseops"]
    val_files = resolve_shards(out / "fineweb_val_*.bin")  # the sidecars match the glob too; left out
    assert len(val_files) == stats["files_val"] >= 3 and all(sidecar_path(f).is_file() for f in val_files)
    assert not list(out.glob("fineweb_train_bytes_*"))  # sidecars are for the validation split only
    tokens = np.concatenate([read_shard(f) for f in val_files])
    counts = load_byte_sidecar(val_files, tokens.size).numpy()
    assert counts.size == tokens.size
    assert int(counts.sum()) == stats["bytes_val"] == sum(len(d.encode("utf-8")) for d in docs[:200])
    starts = np.flatnonzero(tokens == tok.bos_id)
    assert len(starts) == 200 and (counts[starts] == 0).all()
    ops = [tok.sp.piece_to_id(op) for op in caseops.OPERATORS[:3]]
    for i, (lo, hi) in enumerate(zip(starts, list(starts[1:]) + [tokens.size])):
        ids = tokens[lo + 1:hi]
        assert ids.tolist() == tok.encode(caseops.encode(docs[i]))
        assert int(counts[lo:hi].sum()) == len(docs[i].encode("utf-8"))  # per document, exactly
        assert caseops.decode(tok.decode(ids)) == docs[i]
        assert not counts[lo + 1:hi][np.isin(ids, ops)].any()  # operators stand for no bytes
    # The byte tables would charge each operator 3 bytes: more bytes than the text has.
    luts = tok.byte_luts()
    assert luts.count_bytes(tokens[:-1], tokens[1:]) > int(counts[1:].sum())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_sidecar_that_does_not_match_its_shard_is_refused(caseops_dir, tmp_path):
    out = _copy(caseops_dir[0], tmp_path / "d")
    val = resolve_shards(out / "fineweb_val_*.bin")
    n = sum(read_shard(f).size for f in val)
    good = load_byte_sidecar(val, n)

    # Another length: refused, naming both files and the fix.
    side = sidecar_path(val[1])
    counts = read_shard(side)
    write_shard(side, counts[:-1], overwrite=True)
    with pytest.raises(ShardError) as err:
        load_byte_sidecar(val, n)
    assert str(side) in str(err.value) and str(val[1]) in str(err.value) and "rebuild" in str(err.value)

    # A record-format sidecar (no pgolf header fields) of the right length is read as it is.
    write_shard(side, counts, overwrite=True)
    assert torch.equal(load_byte_sidecar(val, n), good)

    # Same length, other tokens: the recorded crc32 of the shard's tokens differs.
    shutil.copy(caseops_dir[0] / side.name, side)
    tokens = read_shard(val[1]).copy()
    tokens[5] ^= 1
    write_shard(val[1], tokens, overwrite=True)
    with pytest.raises(ShardError, match="crc32") as err:
        load_byte_sidecar(val, n)
    assert str(side) in str(err.value) and str(val[1]) in str(err.value)
    shutil.copy(caseops_dir[0] / val[1].name, val[1])

    # A damaged count: the sum recorded in the header differs.
    raw = bytearray(side.read_bytes())
    raw[HEADER_BYTES + 2] ^= 1
    side.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="sum"):
        load_byte_sidecar(val, n)
    shutil.copy(caseops_dir[0] / side.name, side)

    # One validation shard without its sidecar while the others have one.
    side.unlink()
    with pytest.raises(ShardError, match=f"{val[1].name} has no byte sidecar"):
        load_byte_sidecar(val, n)


def _cfg(data_dir: Path, tokenizer: SentencePieceTokenizer, *overrides: str) -> Config:
    cfg, _ = resolve_config(None, [f"data.data_path={data_dir}", f"data.tokenizer_path={tokenizer.path}",
                                   f"model.vocab_size={tokenizer.vocab_size}", *overrides], env={})
    return cfg


def test_where_val_bpb_bytes_come_from(caseops_dir, tokenizers, tmp_path):
    out = _copy(caseops_dir[0], tmp_path / "d")
    co, plain = tokenizers["caseops"], tokenizers["plain"]
    n = sum(read_shard(f).size for f in resolve_shards(out / "fineweb_val_*.bin"))
    got = validation_bytes(_cfg(out, co, "data.caseops=true"), co, n)
    assert isinstance(got, torch.Tensor) and int(got.sum()) == caseops_dir[1]["bytes_val"]
    assert isinstance(validation_bytes(_cfg(out, co), co, n), torch.Tensor)  # auto: sidecars found
    with pytest.raises(ShardError, match="CaseOps text"):  # a CaseOps tokenizer never falls back to its tables
        validation_bytes(_cfg(out, co, "data.byte_sidecar=off"), co, n)
    with pytest.raises(ShardError, match="no CaseOps operator pieces"):
        validation_bytes(_cfg(out, plain, "data.caseops=true"), plain, n)
    with pytest.raises(ConfigError, match="data.byte_sidecar must be auto or on"):
        _cfg(out, co, "data.caseops=true", "data.byte_sidecar=off")
    with pytest.raises(ConfigError, match="data.byte_sidecar must be auto, on or off"):
        _cfg(out, co, "data.byte_sidecar=maybe")
    for side in out.glob("fineweb_val_bytes_*.bin"):
        side.unlink()
    with pytest.raises(ShardError, match="fineweb_val_bytes_000000.bin.*pgolf data tokenize"):
        validation_bytes(_cfg(out, co), co, n)
    assert isinstance(validation_bytes(_cfg(out, plain), plain, n), tuple)  # plain data: the byte tables
    with pytest.raises(ShardError, match="data.byte_sidecar=on"):
        validation_bytes(_cfg(out, plain, "data.byte_sidecar=on"), plain, n)


def test_official_tokenizer_sidecar_counts_the_raw_text(tmp_path):
    """The official sp1024 tokenizer normalizes (nmt_nfkc): its byte tables count 960,879 bytes for
    the sample's validation documents, the sidecar the 960,871 of the raw text (README.md there)."""
    tok = SentencePieceTokenizer(SAMPLE / "fineweb_1024_bpe.model")
    stats = tokenize_to_shards(SAMPLE / "docs_val.jsonl", tok, tmp_path / "a", 300, byte_sidecar=True)
    assert stats["bytes_val"] == 960_871
    assert (tmp_path / "a" / "fineweb_val_000000.bin").read_bytes() == (SAMPLE / "fineweb_val_000000.bin").read_bytes()
    assert int(load_byte_sidecar(tmp_path / "a" / "fineweb_val_*.bin", 392_385).sum()) == 960_871
    # A tokenizer that drops text (leading whitespace here) cannot have an exact sidecar.
    with pytest.raises(ValueError, match="document 1: its tokens cover 5 bytes of its 7-byte text"):
        tokenize_to_shards(["Fine.", "  hello"], tok, tmp_path / "b", 2, byte_sidecar=True)
    assert not list((tmp_path / "b").glob("*.bin"))
    with pytest.raises(ValueError, match="no pieces for the CaseOps operators"):
        tokenize_to_shards(["Fine."], tok, tmp_path / "c", 1, caseops=True)


def test_validation_split_count_is_checked(tmp_path):
    docs = tmp_path / "docs_selected.jsonl"
    docs.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(6)))
    # The official document list: 50,000 validation documents unless its manifest says otherwise.
    with pytest.raises(ValueError, match="--val-docs 3 differs from the 50,000 validation documents expected.*leak"):
        check_val_docs(3, docs, tmp_path / "out")
    (tmp_path / "docs_selected.source_manifest.json").write_text(json.dumps({"num_docs": 6, "docs_val": 4}))
    assert check_val_docs(None, docs, tmp_path / "out") == 4
    assert check_val_docs(4, docs, tmp_path / "out") == 4
    with pytest.raises(ValueError, match=r"--val-docs 2 differs from the 4 validation documents expected \(as .*"
                                         r"source_manifest.json states \(docs_val\)\).*--force-val-docs"):
        check_val_docs(2, docs, tmp_path / "out")
    assert check_val_docs(2, docs, tmp_path / "out", force=True) == 2
    # Documents of one's own: any split, but it must be named; an official dataset name expects 50,000.
    own = tmp_path / "mine.jsonl"
    own.write_text(docs.read_text())
    assert check_val_docs(2, own, tmp_path / "out") == 2
    with pytest.raises(ValueError, match="pass --val-docs N"):
        check_val_docs(None, own, tmp_path / "out")
    with pytest.raises(ValueError, match="fineweb10B_sp8192 is named like an official dataset"):
        check_val_docs(2, own, tmp_path / "fineweb10B_sp8192")

    # Through the command line: refused (exit 1, nothing written), then forced.
    out = tmp_path / "shards"
    argv = ["data", "tokenize", str(docs), "--tokenizer", "byte260", "--out", str(out), "--val-docs", "2"]
    assert cli_main(argv) == 1 and not out.exists()
    assert cli_main(argv + ["--force-val-docs"]) == 0
    assert read_shard(out / "fineweb_val_000000.bin")[0] == 1 and len(list(out.glob("*.bin"))) == 2
    assert cli_main(argv[:-2] + ["--overwrite"]) == 0  # the manifest's 4
    assert (read_shard(out / "fineweb_val_000000.bin") == 1).sum() == 4


def test_train_tokenizer_and_tokenize_commands(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_docs(60)))
    model = tmp_path / "tok" / "fineweb_320_caseops.model"
    assert cli_main(["data", "train-tokenizer", str(docs), "--vocab-size", "320", "--out", str(model),
                     "--caseops", "--skip-docs", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 320 and model.with_suffix(".vocab").is_file()
    out = tmp_path / "shards"
    assert cli_main(["data", "tokenize", str(docs), "--tokenizer", str(model), "--out", str(out),
                     "--val-docs", "20", "--caseops"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["bytes_val"] == sum(len(t.encode()) for t in sample_docs(20))
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin",
                                                     "fineweb_val_bytes_000000.bin"]
