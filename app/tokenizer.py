"""Tokenizers: text <-> integer ids.

A tokenizer has a `spec` (the string stored in token files, so a reader can rebuild the
same tokenizer), a `vocab_size`, `encode(text) -> ids` and `decode(ids) -> text`.
Adding a BPE (`tokenizers`) or GPT-2 (`tiktoken`) encoder means one class and one
registry entry; its third-party import belongs inside the class so that `bytes` keeps
working without it.
"""
from typing import Protocol

import numpy as np

from app.errors import UserError


class Tokenizer(Protocol):
    spec: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """One token per UTF-8 byte: no training, no files, an exact round trip."""

    spec = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"byte token ids must be in [0, 256), got {ids.min()}..{ids.max()}")
        # A sample cut at an arbitrary token can end inside a multi-byte character.
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


_REGISTRY = {
    ByteTokenizer.spec: ByteTokenizer,
}


def get_tokenizer(spec: str) -> Tokenizer:
    try:
        return _REGISTRY[spec]()
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UserError(f"unknown tokenizer {spec!r}: expected one of {known}") from None


def known_tokenizers() -> list[str]:
    return sorted(_REGISTRY)


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned integer type that holds every id below `vocab_size`."""
    if vocab_size <= 1 << 8:
        return np.uint8
    if vocab_size <= 1 << 16:
        return np.uint16
    return np.uint32
