"""Report text ↔ target tokens of the report drafter.

The decoder of :mod:`dicom_node.infer.report` writes target tokens: lower-cased words,
punctuation, the special tokens below and slot tokens (``<f1.diam>``) whose values come from
:func:`dicom_node.infer.report_input.encode_input`. ``tokenize`` makes the training targets
(models/report-drafter/train.py); ``detokenize`` and ``render`` turn decoded tokens back into
text with the slots filled, for the draft and for the checks of
:mod:`dicom_node.infer.report_check`; ``read_vocabulary`` reads a card's vocabulary file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

#: Special tokens: padding, unknown, begin and end of the target, start of the impression.
PAD, UNK, BOS, EOS, IMP = "<pad>", "<unk>", "<bos>", "<eos>", "<imp>"

_TOKEN_RE = re.compile(r"<[a-z0-9_.]+>|[a-z0-9]+(?:['-][a-z0-9]+)*|[.,;:()]")
_UPPER = {"ct": "CT", "ai": "AI", "pa": "PA", "ap": "AP"}


def tokenize(text: str) -> list[str]:
    """Lower-cased words, punctuation and slot tokens of a report text."""
    return _TOKEN_RE.findall(text.lower())


def detokenize(tokens: Sequence[str], slots: Mapping[str, str]) -> str:
    """Text from tokens: punctuation attached, slots filled, sentences capitalised."""
    words = [_UPPER.get(t, t) for t in tokens if t not in (PAD, BOS, EOS, IMP, UNK)]
    text = " ".join(words)
    text = re.sub(r" ([.,;:)])", r"\1", text).replace("( ", "(")
    text = re.sub(r"<[a-z0-9_.]+>", lambda m: slots.get(m.group(0), m.group(0)), text)
    # "a <f1.diam> nodule" becomes "an 8 mm nodule", "an 11 mm nodule"
    text = re.sub(r"\b([Aa]) (?=(?:8|11|18)(?:[ .]|\d*(?:\.\d+)? mm)|8\d)", r"\1n ", text)
    return re.sub(r"(^|[.;:]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def read_vocabulary(path: Path) -> tuple[str, ...]:
    tokens = tuple(path.read_text(encoding="utf-8").split("\n"))
    return tokens[:-1] if tokens and tokens[-1] == "" else tokens


#: Decoded target tokens of one case: (findings section, impression section).
Sections = tuple[list[str], list[str]]


def render(sections: Sections, slots: Mapping[str, str]) -> tuple[str, str]:
    """(findings text, impression text) of decoded token sections."""
    return detokenize(sections[0], slots), detokenize(sections[1], slots)
