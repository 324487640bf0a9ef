"""A small, real T5 tokenizer built offline, for the tiny and embedded SD3 / FLUX pipelines.

T5's tokenizer is a sentencepiece Unigram model; transformers' ``T5Tokenizer`` builds one from a list of
``(piece, log-probability)``. The vocabulary here is T5's special tokens at T5's ids (``<pad>`` 0, ``</s>`` 1,
``<unk>`` 2), each given word as one whole-word piece (``▁word``) and every letter and digit as a fallback
piece, so any lower-case ASCII caption tokenizes. Pipelines save and load it like any T5 tokenizer.
"""
from __future__ import annotations

import string
from typing import Iterable

#: what a T5 tokenizer says about its length (T5 v1.1 / the SD3 and FLUX pipelines' limit)
T5_MAX_LENGTH = 512


def t5_vocab(words: Iterable[str]) -> list:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    for w in words:
        piece = "▁" + w.lower()
        if piece not in seen:
            pieces.append((piece, -1.0 - 0.01 * len(pieces)))  # whole words beat their letters
            seen.add(piece)
    for ch in string.ascii_letters + string.digits + string.punctuation:
        for piece in (ch, "▁" + ch):
            if piece not in seen:
                pieces.append((piece, -10.0))
                seen.add(piece)
    return pieces


def build_t5_tokenizer(words: Iterable[str], model_max_length: int = T5_MAX_LENGTH):
    """A ``T5Tokenizer`` over ``words`` (whole-word pieces) plus letters, digits and punctuation."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_vocab(words), extra_ids=0, model_max_length=model_max_length)
