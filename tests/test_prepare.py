import argparse
import datetime
import json
import re

import h5py
import numpy as np
import pytest

from app import prepare as prepare_cmd
from app.errors import UserError
from app.prepare import prepare


def stream(path) -> bytes:
    with h5py.File(path, "r") as f:
        return f["train"][:].tobytes() + f["val"][:].tobytes()


def cli(argv) -> int:
    parser = argparse.ArgumentParser()
    prepare_cmd.add_arguments(parser)
    return prepare_cmd.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def embedded_h5(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded") / "sub" / "embedded.h5"
    assert cli(["--out", str(out)]) == 0  # no --input: the embedded corpus
    return out


def test_single_file(tmp_path):
    text = "héllo wörld\n" * 50
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    summary = prepare([tmp_path / "a.txt"], tmp_path / "a.h5", val_fraction=0.2)
    assert stream(tmp_path / "a.h5") == text.encode()
    n = len(text.encode())
    assert summary["val_tokens"] == round(0.2 * n)
    assert summary["train_tokens"] + summary["val_tokens"] == n


def test_directory_sorted_txt_only_not_recursive(tmp_path):
    docs = tmp_path / "docs"
    (docs / "nested").mkdir(parents=True)
    (docs / "b.txt").write_text("second", encoding="utf-8")
    (docs / "a.txt").write_text("first", encoding="utf-8")
    (docs / "notes.md").write_text("ignored", encoding="utf-8")
    (docs / "nested" / "c.txt").write_text("ignored too", encoding="utf-8")
    summary = prepare([docs], tmp_path / "d.h5")
    assert stream(tmp_path / "d.h5") == b"first\n\nsecond"
    assert [s["name"] for s in summary["sources"]] == [str(docs / "a.txt"), str(docs / "b.txt")]


def test_multiple_inputs_in_given_order(tmp_path):
    (tmp_path / "x.txt").write_text("xxxx", encoding="utf-8")
    (tmp_path / "y.txt").write_text("yyyy", encoding="utf-8")
    prepare([tmp_path / "y.txt", tmp_path / "x.txt"], tmp_path / "m.h5")
    assert stream(tmp_path / "m.h5") == b"yyyy\n\nxxxx"


def test_embedded_corpus_file(embedded_h5, capsys):
    with h5py.File(embedded_h5, "r") as f:
        attrs = dict(f.attrs)
        train, val = f["train"], f["val"]
        total = len(train) + len(val)
        assert 300_000 < total < 1_000_000
        for ds in (train, val):
            assert ds.dtype == np.uint8
            assert ds.compression == "gzip"
            assert ds.chunks is not None and ds.chunks[0] <= 1 << 16
            assert ds.attrs["description"]
        assert len(val) == round(0.1 * total)
    assert attrs["format"] == "gpt-tokens" and attrs["format_version"] == 1
    assert attrs["tokenizer"] == "bytes" and attrs["vocab_size"] == 256
    assert attrs["train_tokens"] == len(train) and attrs["val_tokens"] == len(val)
    assert attrs["description"]
    (source,) = json.loads(attrs["sources"])
    assert source["name"].startswith("embedded") and source["bytes"] == total
    assert len(source["sha256"]) == 64
    created = datetime.datetime.fromisoformat(attrs["created"])
    assert created.utcoffset() == datetime.timedelta(0)
    assert stream(embedded_h5) == prepare_cmd.embedded_corpus().encode()


def test_run_prints_one_summary_line(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("abc" * 100, encoding="utf-8")
    out = tmp_path / "new" / "dir" / "a.h5"
    assert cli(["--input", str(tmp_path / "a.txt"), "--out", str(out),
                "--val-fraction", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "150 train" in lines[0] and "150 val" in lines[0]
    assert str(out) in lines[0]


def test_no_temporary_file_left(tmp_path):
    (tmp_path / "a.txt").write_text("abc" * 100, encoding="utf-8")
    prepare([tmp_path / "a.txt"], tmp_path / "out" / "a.h5")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.h5"]


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("abc" * 100, encoding="utf-8")
    out = tmp_path / "a.h5"
    prepare([tmp_path / "a.txt"], out)
    before = out.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(prepare_cmd, "_write_split", boom)
    with pytest.raises(RuntimeError):
        prepare([tmp_path / "a.txt"], out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "a.txt"]


def test_missing_input(tmp_path):
    with pytest.raises(UserError, match="nope.txt"):
        prepare([tmp_path / "nope.txt"], tmp_path / "o.h5")


def test_directory_without_txt(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match=r"empty.*\*\.txt"):
        prepare([tmp_path / "empty"], tmp_path / "o.h5")


def test_invalid_utf8_names_the_file(tmp_path):
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(UserError, match=r"bad\.txt.*UTF-8"):
        prepare([tmp_path], tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists()


def test_empty_corpus(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"a\.txt.*b\.txt\) is empty"):
        prepare([tmp_path], tmp_path / "o.h5")


def test_corpus_of_one_token(tmp_path):
    (tmp_path / "one.txt").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match=r"one\.txt.*1 token"):
        prepare([tmp_path / "one.txt"], tmp_path / "o.h5")


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan")])
def test_bad_val_fraction(tmp_path, fraction):
    with pytest.raises(UserError, match=f"val_fraction {fraction!r}"):
        prepare(["embedded"], tmp_path / "o.h5", val_fraction=fraction)


def test_unknown_tokenizer(tmp_path):
    with pytest.raises(UserError, match="'nope'"):
        prepare(["embedded"], tmp_path / "o.h5", tokenizer="nope")


def test_output_is_a_directory(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path))):
        prepare(["embedded"], tmp_path)


def test_datasets_repeat_the_essentials_for_h5ls(tmp_path):
    """`h5ls -v` shows dataset attributes only, so each split names its format and tokenizer."""
    src = tmp_path / "a.txt"
    src.write_text("hello world, hello tokens", encoding="utf-8")
    prepare([src], tmp_path / "t.h5", val_fraction=0.2)
    with h5py.File(tmp_path / "t.h5") as f:
        for split in ("train", "val"):
            attrs = f[split].attrs
            assert attrs["format"] == "gpt-tokens" and attrs["tokenizer"] == "bytes"
            assert attrs["vocab_size"] == 256 and attrs["tokens"] == f[split].shape[0]


def test_each_split_records_its_largest_id(tmp_path):
    """The loader checks `max_token` against the vocabulary when it opens the file."""
    src = tmp_path / "a.txt"
    src.write_text("plain ascii first, and then some more of it: 数据 🙂", encoding="utf-8")
    prepare([src], tmp_path / "t.h5", val_fraction=0.3)
    with h5py.File(tmp_path / "t.h5") as f:
        for split in ("train", "val"):
            assert f[split].attrs["max_token"] == f[split][:].max()
        assert f["val"].attrs["max_token"] > 127 > f["train"].attrs["max_token"]
