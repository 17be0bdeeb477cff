"""CaseOps ("caseops_v1", PR #1729 / #1855): a lossless case transform applied before tokenizing.

Over maximal runs of ASCII letters (A-Z, a-z; every other character, non-ASCII letters included,
passes through untouched):

* an all-lowercase word is unchanged;
* an all-capitals word of two or more letters becomes ALLCAPS + the word in lowercase;
* otherwise (a single capital, TitleCase, mixed case) the word is lowercased, with TITLE in front
  when its first letter is a capital and CAPNEXT before each later capital;
* a literal operator character in the text becomes ESC + that character.

The operators are private-use characters U+E001..U+E004; a tokenizer made for CaseOps holds them
as user-defined pieces (`pgolf data train-tokenizer --caseops`). The score stays bits per byte of
the *original* text: operator characters stand for no original bytes, so the validation split
carries a per-token byte sidecar (pgolf.data.shards) instead of the tokenizer's byte tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
_OP_BYTES = len(TITLE.encode("utf-8"))  # 3: every operator is one 3-byte UTF-8 character

# A maximal ASCII-letter run holding a capital (all-lowercase runs stay as they are) | an operator.
_ENCODE = re.compile("(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")
# In transformed text: an escaped operator | a word behind its word operator | a capital inside a
# word | a stray operator. Words with no operator are not matched at all.
_DECODE = re.compile("\ue004([\ue001-\ue004])|([\ue001\ue002])([a-z](?:\ue003?[a-z])*)|\ue003([a-z])|[\ue001-\ue004]")
_CAPNEXT = re.compile("\ue003([a-z])")


class CaseOpsError(ValueError):
    """Text that is not the output of encode()."""


def _encode_word(m: re.Match) -> str:
    w = m.group()
    if w in OPERATORS:
        return ESC + w
    rest = w[1:]
    if w[0].isupper() and (not rest or rest.islower()):  # TitleCase or a single capital
        return TITLE + w.lower()
    if w.isupper():  # two or more capitals, nothing else
        return ALLCAPS + w.lower()
    head = TITLE if w[0].isupper() else ""
    return head + w[0].lower() + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in rest)


def encode(text: str) -> str:
    """The CaseOps form of text (exactly invertible by decode)."""
    return _ENCODE.sub(_encode_word, text)


def decode(text: str) -> str:
    """The original text of encode()'s output; malformed operator use raises CaseOpsError."""
    def after_letter(m: re.Match) -> bool:
        return m.start() > 0 and text[m.start() - 1].isascii() and text[m.start() - 1].isalpha()

    def one(m: re.Match) -> str:
        escaped, op, word, capital = m.groups()
        if escaped:
            return escaped
        if capital:
            if not after_letter(m):
                raise CaseOpsError(f"CAPNEXT at offset {m.start()} does not sit inside a word")
            return capital.upper()
        if not op:
            raise CaseOpsError(f"operator U+{ord(m.group()):04X} at offset {m.start()} is not followed by "
                               f"the ASCII letter (or escaped operator) it applies to")
        if after_letter(m):
            raise CaseOpsError(f"word operator U+{ord(op):04X} at offset {m.start()} sits inside a word")
        if op == ALLCAPS:
            if CAPNEXT in word:
                raise CaseOpsError(f"CAPNEXT inside an ALLCAPS word at offset {m.start()}")
            return word.upper()
        word = _CAPNEXT.sub(lambda c: c.group(1).upper(), word) if CAPNEXT in word else word
        return word[0].upper() + word[1:]

    return _DECODE.sub(one, text)


def original_byte_counts(surfaces: Iterable[bytes | str]) -> list[int]:
    """UTF-8 bytes of the original text behind each piece of a tokenized CaseOps document.

    surfaces: the transformed text each token covers, in order (SentencePiece's piece surfaces;
    they concatenate to the transformed document). As in the record's exporter, a piece is charged
    its surface's bytes less 3 for each operator in it, except an operator escaped by a preceding
    ESC (possibly in an earlier piece), which is a literal character of the original text.
    """
    counts, escaped = [], False
    for s in surfaces:
        raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
        n = len(raw)
        if escaped or b"\xee\x80" in raw:  # the UTF-8 lead bytes of U+E000..U+E03F
            for ch in raw.decode("utf-8"):
                if escaped:
                    escaped = False
                elif ch in OPERATORS:
                    n -= _OP_BYTES
                    escaped = ch == ESC
        counts.append(n)
    if escaped:
        raise CaseOpsError("the last piece ends in an ESC operator with nothing to escape")
    return counts
