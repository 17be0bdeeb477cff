"""CaseOps: the lossless case transform of the 1.06108 record, its exact inverse, and how the
bytes of the original text are attributed to the pieces of its transformed form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgolf.data import caseops
from pgolf.data.caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsError, decode, encode, original_byte_counts

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fineweb_sp1024_sample"


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"FineWeb sample not found at {SAMPLE}")
def test_round_trip_on_every_sample_document():
    n = 0
    for name in ("docs_val.jsonl", "docs_train.jsonl"):
        with open(SAMPLE / name, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                coded = encode(text)
                assert decode(coded) == text
                assert not any("A" <= c <= "Z" for c in coded)  # every capital became an operator
                n += 1
    assert n == 3100


@pytest.mark.parametrize("text, coded", [
    ("hello world", "hello world"),
    ("Hello", TITLE + "hello"),
    ("NASA", ALLCAPS + "nasa"),
    ("A", TITLE + "a"),  # one capital is TitleCase, not ALLCAPS (ALLCAPS needs two or more)
    ("I am A B", TITLE + "i am " + TITLE + "a " + TITLE + "b"),
    ("OK", ALLCAPS + "ok"),
    ("iPhone", "i" + CAPNEXT + "phone"),
    ("McDonald", TITLE + "mc" + CAPNEXT + "donald"),
    ("HeLLo", TITLE + "he" + CAPNEXT + "l" + CAPNEXT + "lo"),
    ("aBC", "a" + CAPNEXT + "b" + CAPNEXT + "c"),
    ("USA2024Today", ALLCAPS + "usa2024" + TITLE + "today"),  # a digit ends the ASCII-letter run
    ("don't STOP", "don't " + ALLCAPS + "stop"),
    ("Émile Zola", "Émile " + TITLE + "zola"),  # non-ASCII letters untouched, and they end a run
    ("ÀBC", "À" + ALLCAPS + "bc"),
    ("ÀB", "À" + TITLE + "b"),  # the ASCII run is the single capital B
    ("straße STRASSE", "straße " + ALLCAPS + "strasse"),
    ("ΑΒΓ Ωmega", "ΑΒΓ Ω" + "mega"),  # Greek capitals are not ASCII: no operator
    (TITLE, ESC + TITLE),  # literal operator characters are escaped
    (ESC + ESC, ESC + ESC + ESC + ESC),
    ("x" + CAPNEXT + "Y", "x" + ESC + CAPNEXT + TITLE + "y"),
    ("\ue000Big", "\ue000" + TITLE + "big"),  # other private-use characters pass through
    ("", ""),
    ("\n\t  ", "\n\t  "),
])
def test_hand_made_cases(text, coded):
    assert encode(text) == coded
    assert decode(coded) == text


@pytest.mark.parametrize("bad", [
    TITLE,  # an operator at the end
    TITLE + " x",  # an operator not followed by a letter
    "ab" + TITLE + "c",  # a word operator inside a word
    CAPNEXT + "a",  # CAPNEXT at the start of a word
    "a" + CAPNEXT,
    ALLCAPS + "a" + CAPNEXT + "b",
    ESC,  # nothing to escape
    ESC + "a",  # only operators are escaped
])
def test_malformed_text_is_refused(bad):
    with pytest.raises(CaseOpsError):
        decode(bad)


def test_original_byte_counts_charge_operators_nothing():
    # "The NASA é" -> TITLE the ALLCAPS nasa é, cut into pieces as a tokenizer might.
    pieces = [TITLE, "the", " " + ALLCAPS + "na", "sa", " é"]
    assert "".join(pieces) == encode("The NASA é")
    assert original_byte_counts(pieces) == [0, 3, 3, 2, 3]
    assert sum(original_byte_counts(pieces)) == len("The NASA é".encode())
    # An escaped literal operator is text: 3 bytes, also when ESC ends the previous piece.
    text = "a" + TITLE + "b"
    pieces = ["a", ESC, TITLE, "b"]
    assert "".join(pieces) == encode(text) and original_byte_counts(pieces) == [1, 0, 3, 1]
    assert original_byte_counts([b"x" + ESC.encode() + ESC.encode() + b"y"]) == [5]  # bytes surfaces too
    with pytest.raises(CaseOpsError, match="ESC"):
        original_byte_counts(["a", ESC])
    assert caseops.OPERATORS == ("\ue001", "\ue002", "\ue003", "\ue004")
