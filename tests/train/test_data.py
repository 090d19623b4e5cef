import contextlib
import json
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adapterhub.errors import UserError
from adapterhub.models import load_tokenizer
from adapterhub.recipe import DataArgs
from adapterhub.train.data import IGNORE, Tokenize, collator_for, load_splits

ROWS = [{"sentence": f"the food was good {i}", "label": i % 3} for i in range(20)]


def write(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    elif suffix == ".csv":
        path.write_text("sentence,label\n" + "".join(f"{r['sentence']},{r['label']}\n" for r in ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_files_map_columns_labels_and_template(tmp_path: Path, suffix: str) -> None:
    args = DataArgs(
        path=str(write(tmp_path, suffix)),
        columns={"prompt": "sentence", "completion": "label"},
        label_names=["negative", "neutral", "positive"],
        prompt_template="Review: {prompt}\nSentiment:",
    )
    splits = load_splits(args)
    assert splits.labels == ["negative", "neutral", "positive"]
    assert splits.format == "prompt_completion"
    assert len(splits.validation) == 2 and len(splits.train) == 18
    assert all(row["prompt"].startswith("Review: the food") for row in splits.train)


def test_validation_carve_out_is_fixed_by_its_seed(tmp_path: Path) -> None:
    path = str(write(tmp_path, ".jsonl"))
    args = {"path": path, "columns": {"prompt": "sentence", "completion": "label"}}
    first = load_splits(DataArgs(**args, split_seed=1)).validation
    assert first == load_splits(DataArgs(**args, split_seed=1)).validation
    assert first != load_splits(DataArgs(**args, split_seed=2)).validation


def test_explicit_validation_file(tmp_path: Path) -> None:
    path = str(write(tmp_path, ".jsonl"))
    splits = load_splits(
        DataArgs(path=path, validation_path=path, columns={"prompt": "sentence", "completion": "label"})
    )
    assert len(splits.train) == len(splits.validation) == 20


def test_hub_dataset_offline_is_one_clear_error() -> None:
    with pytest.raises(UserError, match=r"dataset 'nobody/no-such-dataset' .* could not be loaded"):
        load_splits(DataArgs(dataset="nobody/no-such-dataset"))


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(UserError, match=r"unsupported type '\.txt'"):
        load_splits(DataArgs(path=str(path)))


def test_label_beyond_label_names(tmp_path: Path) -> None:
    args = DataArgs(
        path=str(write(tmp_path, ".jsonl")),
        columns={"prompt": "sentence", "completion": "label"},
        label_names=["negative", "positive"],
    )
    with pytest.raises(UserError, match=r"line 3 has label 2 but data\.label_names has 2 names"):
        load_splits(args)


@pytest.mark.parametrize("seq2seq", [False, True], ids=["causal", "seq2seq"])
def test_fixed_shape_batches_pad_to_the_recipe_lengths(tiny_llama: Path, seq2seq: bool) -> None:
    args = DataArgs(path="unused", max_length=24, max_target_length=5)
    tokenizer = load_tokenizer("builtin:tiny-llama")
    tokenize = Tokenize(tokenizer, args, seq2seq=seq2seq)
    rows = [
        tokenize({"prompt": p, "completion": c}, "prompt_completion")
        for p, c in [("hi", "a b"), ("x y z", "c")]
    ]
    fixed = collator_for(tokenizer, args, seq2seq=seq2seq, fixed_shape=True)(rows)
    longest = collator_for(tokenizer, args, seq2seq=seq2seq, fixed_shape=False)(rows)

    assert fixed["input_ids"].shape == (2, 24)
    assert fixed["labels"].shape == (2, 5 if seq2seq else 24)
    for key, pad in (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0), ("labels", IGNORE)):
        width = longest[key].shape[1]
        assert fixed[key][:, :width].tolist() == longest[key].tolist(), key
        assert (fixed[key][:, width:] == pad).all(), key


def test_reading_stops_at_max_samples_and_never_sees_later_rows(tmp_path: Path) -> None:
    """An endless stream through a named pipe: the reader takes its rows and hangs up."""
    pipe = tmp_path / "endless.jsonl"
    os.mkfifo(pipe)
    written = []

    def write_until_hung_up() -> None:
        with contextlib.suppress(BrokenPipeError), pipe.open("w") as handle:
            for index in range(1_000_000):
                handle.write(json.dumps({"prompt": f"p{index}", "completion": "c"}) + "\n")
                written.append(index)

    writer = threading.Thread(target=write_until_hung_up)
    writer.start()
    splits = load_splits(DataArgs(path=str(pipe), max_samples=10, validation_fraction=0.2))
    writer.join(60)
    assert not writer.is_alive()
    assert sorted(row["prompt"] for row in splits.train + splits.validation) == sorted(
        f"p{index}" for index in range(10)
    )
    assert len(written) < 1_000_000, "the reader hung up long before the writer was done"


@pytest.mark.parametrize(
    ("suffix", "text", "message"),
    [
        (".jsonl", '{"text": "a"}\n\n{"text": "b"}\n{"text" oops}\n', r"line 4 is not valid JSON"),
        (".jsonl", '{"text": "a"}\n["text", "b"]\n', r"line 2 is a JSON list, not an object"),
        (".json", '{"text": "a"}\n{"text": \n', r"line 2 is not valid JSON"),
        (".json", '[{"text": "a"},\n "b"]', r"item 1 is not a JSON object"),
        (".csv", 'text,extra\na,1\n"b, c",2\nd,3,4\n', r"line 4 has 3 fields but the header has 2"),
        (".csv", 'text\na\n"never closed\n', r"line 3 is not valid CSV"),
    ],
)
def test_malformed_rows_are_named_by_line(tmp_path: Path, suffix: str, text: str, message: str) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_splits(DataArgs(path=str(path)))
    assert load_splits(DataArgs(path=str(path), max_samples=1)).train  # the rows before it are fine


def test_text_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"line 2 is not UTF-8 text"):
        load_splits(DataArgs(path=str(path)))


def test_parquet_is_read_in_batches_up_to_max_samples(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    rows = [{"prompt": f"p{index}", "completion": "c"} for index in range(5000)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)
    splits = load_splits(DataArgs(path=str(path), max_samples=2500))
    taken = sorted(int(row["prompt"][1:]) for row in splits.train + splits.validation)
    assert taken == list(range(2500))
