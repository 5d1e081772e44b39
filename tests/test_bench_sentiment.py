"""bench/sentiment.py: the whole demo on `tiny` for a few steps, on a small synthetic
labelled corpus (its own `mpiexec -n 2` pre-train and fine-tunes, then the baselines)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from app.checkpoint import load_params
from app.classify_data import ClassifyData, prepare_classify
from app.config import load_config
from app_util import ENV, MPIEXEC, ROOT
from bench.sentiment import write_train_texts
from models import gpt


def write_reviews(path, rows=160, seed=0):
    """JSONL reviews of words and Chinese characters; "pos" exactly when "好" appears."""
    rng = np.random.default_rng(seed)
    words = ["the", "item", "arrived", "box", "价格", "质量", "快递", "ok"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            text = list(rng.choice(words, rng.integers(3, 8)))
            if i % 2:
                text.insert(rng.integers(len(text)), "好")
            f.write(json.dumps({"text": " ".join(text), "label": "pos" if i % 2 else "neg"},
                               ensure_ascii=False) + "\n")
    return path


def test_lm_corpus_is_the_train_texts(tmp_path):
    prepare_classify(write_reviews(tmp_path / "r.jsonl"), tmp_path / "r.h5", max_len=16)
    data = ClassifyData(tmp_path / "r.h5")
    assert write_train_texts(data, tmp_path / "lm.txt") == len(data.split("train").labels)
    lines = (tmp_path / "lm.txt").read_text(encoding="utf-8").splitlines()
    rows = data.split("train")
    assert len(lines) == len(rows.labels)
    for line, ids, length in zip(lines, rows.tokens, rows.lengths):
        raw = line.encode("utf-8")  # a character cut at max_len is dropped, nothing else
        assert raw == bytes(ids[:length])[:len(raw)] and length - len(raw) < 3
    assert "\ufffd" not in "".join(lines)


def test_driver_prints_the_table(tmp_path):
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    reviews = write_reviews(tmp_path / "reviews.jsonl")
    result = subprocess.run(
        [sys.executable, "-m", "bench.sentiment", "--input", str(reviews), "--config", "tiny",
         "--pretrain-steps", "3", "--finetune-steps", "3", "--log-interval", "1",
         "--out", str(tmp_path / "out"), "--timeout", "60"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    table = {line.split("|")[1].strip(): line for line in
             result.stdout.splitlines() if line.startswith("| ") and "model" not in line}
    assert set(table) == {"fine-tuned, pre-trained, mean pool", "fine-tuned, from scratch, "
                          "mean pool", "fine-tuned, pre-trained, last pool", "majority class",
                          "byte-bigram naive Bayes"}
    for line in table.values():
        accuracy, f1 = (float(cell) for cell in line.split("|")[2:4])
        assert 0 <= accuracy <= 1 and 0 <= f1 <= 1
    assert result.stdout.count("the pre-trained fine-tune (mean pool) ") == 3
    assert result.stdout.count("pooling, pre-trained: mean ") == 1
    assert (tmp_path / "out" / "labelled.h5").is_file()
    for run, pool in (("finetune", "mean"), ("scratch", "mean"), ("finetune-last", "last")):
        assert (tmp_path / "out" / run / "best.h5").is_file()
        assert f'pool = "{pool}"' in (tmp_path / "out" / run / "config.toml").read_text()
    # "from scratch" starts from the trainer's random initialisation (seed 1337), unmoved
    untrained, _ = load_params(tmp_path / "out" / "untrained" / "params.h5")
    initial = gpt.init_params(load_config("tiny", {}).model_config(), 1337, np, np.float64)
    for name, value in initial.items():
        np.testing.assert_allclose(untrained[name], value, rtol=0, atol=1e-6, err_msg=name)
