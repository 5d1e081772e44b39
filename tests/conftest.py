"""Shared fixtures: `tiny_h5`, a small prepared token file; a time limit on MPI tests."""
import faulthandler
import os

import numpy as np
import pytest

from app.prepare import prepare

WORDS = ("the", "model", "reads", "tokens", "from", "a", "file", "and", "learns",
         "café", "naïve", "Grüße", "→", "数据", "\n")


def corpus_text(n_words: int = 2000, seed: int = 0) -> str:
    """Deterministic pseudo-text of a few KB, with multi-byte characters."""
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n_words))


@pytest.fixture
def tiny_h5(tmp_path):
    """Path of a prepared byte-token file (~10 KB of text, val_fraction 0.1)."""
    source = tmp_path / "tiny.txt"
    source.write_text(corpus_text(), encoding="utf-8")
    out = tmp_path / "tiny.h5"
    prepare([source], out, tokenizer="bytes", val_fraction=0.1)
    return out


MPI_TEST_TIMEOUT_S = float(os.environ.get("MPI_TEST_TIMEOUT_S", 180))


@pytest.fixture(autouse=True)
def mpi_time_limit(request):
    """An MPI test that overruns dumps every thread's stack and exits its rank; mpiexec then
    ends the other ranks, so a rank stuck in a collective fails the run instead of hanging it."""
    if request.node.get_closest_marker("mpi") is None:
        yield
        return
    faulthandler.dump_traceback_later(MPI_TEST_TIMEOUT_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
