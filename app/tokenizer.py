"""Tokenizers: text <-> integer ids.

A tokenizer has a `spec` (the string stored in token files, so a reader can rebuild the
same tokenizer), a `vocab_size`, `encode(text) -> ids`, `decode(ids) -> text` and
`stream_decoder()`, for ids that arrive one at a time.
Adding a BPE (`tokenizers`) or GPT-2 (`tiktoken`) encoder means one class and one
registry entry; its third-party import belongs inside the class so that `bytes` keeps
working without it.
"""
import codecs
from typing import Callable, Protocol

import numpy as np

from app.errors import UserError


class Tokenizer(Protocol):
    spec: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...

    def stream_decoder(self) -> Callable[..., str]:
        """A function `(ids, final=False) -> text` for consecutive pieces of one sequence:
        the texts of all calls, the last one final, join to `decode(all ids)`."""


class ByteTokenizer:
    """One token per UTF-8 byte: no training, no files, an exact round trip."""

    spec = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        # A sample cut at an arbitrary token can end inside a multi-byte character.
        return self._bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        # Holds back the first bytes of a character until its last one arrives.
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids, final=False: utf8.decode(self._bytes(ids), final)

    def _bytes(self, ids) -> bytes:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"byte token ids must be in [0, 256), got {ids.min()}..{ids.max()}")
        return ids.astype(np.uint8).tobytes()


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
