"""Turning a recipe's data section into tokenized train and validation examples.

Three row formats are understood: ``{"prompt", "completion"}`` (loss on the completion),
``{"messages": [...]}`` (chat template applied, loss on assistant turns only) and ``{"text"}``.
Files are read row by row and reading stops at ``data.max_samples``; a malformed row is reported
with its line number.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from adapterhub.errors import UserError
from adapterhub.recipe import DataArgs

FORMAT_COLUMNS = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}
MAX_LABELS = 32  # at most this many distinct completions make a dataset "label-style" (accuracy is reported)
IGNORE = -100
Collator = Callable[[list[dict[str, Any]]], Mapping[str, torch.Tensor]]
Row = tuple[str, dict[str, Any]]  # where the row is ("line 12", "row 3"), and the row


@dataclass
class Splits:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    format: str

    @property
    def labels(self) -> list[str] | None:
        """The distinct completions when the task is classification-like, else None."""
        if self.format != "prompt_completion":
            return None
        values = {row["completion"] for row in self.train + self.validation}
        return sorted(values) if len(values) <= MAX_LABELS else None


def read_file(path: Path) -> Iterator[Row]:
    """The rows of a data file, read as they are needed: ``(where, row)`` with ``where`` its line."""
    if not path.exists() or path.is_dir():
        raise UserError(f"data file {path} not found: fix data.path in the recipe")
    suffix = path.suffix.lower()
    readers = {".jsonl": _json_lines, ".json": _json_file, ".csv": _csv_rows, ".parquet": _parquet_rows}
    if suffix not in readers:
        raise UserError(f"data file {path}: unsupported type '{suffix}': use .jsonl, .json, .csv or .parquet")
    return readers[suffix](path)


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered lines of a UTF-8 file (a leading byte-order mark dropped), one at a time."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"data file {path} line {number} is not UTF-8 text ({err.reason})") from err
            yield number, line


def _json_lines(path: Path, lines: Iterator[tuple[int, str]] | None = None) -> Iterator[Row]:
    for number, line in lines if lines is not None else _text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
            raise UserError(
                f"data file {path} line {number} is not valid JSON ({reason}): fix or remove that line"
            ) from err
        if not isinstance(row, dict):
            raise UserError(
                f"data file {path} line {number} is a JSON {type(row).__name__}, not an object: "
                "write one {...} object per line"
            )
        yield f"line {number}", row


def _json_file(path: Path) -> Iterator[Row]:
    """A ``.json`` file: one JSON array of objects (read whole), or JSON Lines (streamed)."""
    lines = _text_lines(path)
    first = next(((number, line) for number, line in lines if line.strip()), None)
    if first is None:
        return
    number, line = first
    if not line.lstrip().startswith("["):
        yield from _json_lines(path, itertools.chain([(number, line)], lines))
        return
    text = line + "".join(rest for _, rest in lines)
    try:
        items = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        where = f"line {err.lineno + number - 1}" if isinstance(err, json.JSONDecodeError) else "its nesting"
        raise UserError(f"data file {path} is not valid JSON at {where}: fix the file") from err
    for index, row in enumerate(items):
        if not isinstance(row, dict):
            raise UserError(f"data file {path} item {index} is not a JSON object: write a list of {{...}}")
        yield f"item {index}", row


def _csv_rows(path: Path) -> Iterator[Row]:
    reader = csv.reader((line for _, line in _text_lines(path)), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise UserError(
                    f"data file {path} line {reader.line_num} has {len(fields)} fields but the header has "
                    f"{len(header)}: quote fields that contain commas"
                )
            yield f"line {reader.line_num}", dict(zip(header, fields, strict=True))
    except csv.Error as err:
        raise UserError(f"data file {path} line {reader.line_num} is not valid CSV ({err})") from err


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"row {index}", row
                index += 1
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"data file {path} could not be read: {str(err).splitlines()[0]}") from err


def read_hub_dataset(name: str, config: str | None, split: str) -> Iterator[Row]:
    from adapterhub.hub.reach import go_offline_if_unreachable, unreachable_hint

    if not Path(name).exists():
        go_offline_if_unreachable()
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types for a missing id, config or split
        hint = unreachable_hint()
        if hint is not None:
            raise UserError(
                f"dataset '{name}' could not be loaded: {hint}: check your network and HF_ENDPOINT, "
                "or train on a local file with data.path=FILE"
            ) from err
        raise UserError(
            f"dataset '{name}' (config {config}, split {split}) could not be loaded: "
            f"{str(err).splitlines()[0][:160]}"
        ) from err
    return ((f"row {index}", row) for index, row in enumerate(dataset))


def read_rows(args: DataArgs, *, validation: bool = False) -> Iterator[Row]:
    if validation:
        if args.validation_path:
            return read_file(Path(args.validation_path))
        return read_hub_dataset(args.dataset, args.config, args.validation_split)
    if args.path:
        return read_file(Path(args.path))
    return read_hub_dataset(args.dataset, args.config, args.split)


def detect_format(row: dict[str, Any], where: str) -> str:
    for name, columns in FORMAT_COLUMNS.items():
        if all(column in row for column in columns):
            return name
    raise UserError(
        f"{where}: rows need columns prompt+completion, messages or text (found "
        f"{', '.join(row)}): map yours with data.columns"
    )


def normalize(rows: Iterable[Row], args: DataArgs, where: str) -> tuple[list[dict[str, Any]], str]:
    """Rename mapped columns, apply label names and the prompt template, and check every row.

    Rows are read one at a time and reading stops at ``data.max_samples``, so a large file costs
    only the rows used.
    """
    mapping = {source: target for target, source in args.columns.items()}
    fmt = None if args.format == "auto" else args.format
    out: list[dict[str, Any]] = []
    for label, raw in itertools.islice(rows, args.max_samples):
        row = {mapping.get(key, key): value for key, value in raw.items()}
        fmt = fmt or detect_format(row, where)
        required = FORMAT_COLUMNS[fmt]
        missing = [column for column in required if row.get(column) in (None, "")]
        if missing:
            raise UserError(
                f"{where}: {label} has no '{missing[0]}' column (format {fmt}); map yours with data.columns"
            )
        if fmt == "prompt_completion":
            completion = row["completion"]
            if args.label_names is not None and str(completion).isdigit():  # CSV gives "2", JSON gives 2
                completion = label_name(args.label_names, int(completion), where, label)
            prompt = args.prompt_template.format(**{**row, "prompt": row["prompt"]})
            out.append({"prompt": str(prompt), "completion": str(completion)})
        else:
            out.append({column: row[column] for column in required})
    if fmt is None or not out:
        raise UserError(f"{where}: the dataset is empty")
    return out, fmt


def label_name(names: list[str], label: int, where: str, row: str) -> str:
    if label >= len(names):
        raise UserError(f"{where}: {row} has label {label} but data.label_names has {len(names)} names")
    return names[label]


def load_splits(args: DataArgs) -> Splits:
    where = args.path or args.dataset
    train, fmt = normalize(read_rows(args), args, where)
    if args.validation_path or args.validation_split:
        validation, _ = normalize(read_rows(args, validation=True), args, f"{where} (validation)")
    else:
        shuffled = train[:]
        random.Random(args.split_seed).shuffle(shuffled)
        cut = max(1, int(len(shuffled) * args.validation_fraction)) if len(shuffled) > 1 else 0
        validation, train = shuffled[:cut], shuffled[cut:]
    return Splits(train, validation, fmt)


class Tokenize:
    """Row -> ``{"input_ids", "attention_mask", "labels"}`` for a causal or a seq2seq model."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, args: DataArgs, *, seq2seq: bool) -> None:
        self.tokenizer, self.args, self.seq2seq = tokenizer, args, seq2seq

    def __call__(self, row: dict[str, Any], fmt: str) -> dict[str, list[int]]:
        if fmt == "prompt_completion":
            return self.prompt_completion(row["prompt"], row["completion"])
        if fmt == "messages":
            return self.messages(row["messages"])
        if self.seq2seq:
            raise UserError("data.format text needs a causal LM; seq2seq models need prompt/completion rows")
        ids = self.tokenizer(row["text"], truncation=True, max_length=self.args.max_length).input_ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

    def prompt_completion(self, prompt: str, completion: str) -> dict[str, list[int]]:
        tok, args = self.tokenizer, self.args
        # The target always ends in EOS so the model learns where to stop, whatever the tokenizer adds.
        target = [
            *tok(completion, add_special_tokens=False).input_ids[: args.max_target_length - 1],
            tok.eos_token_id,
        ]
        if self.seq2seq:
            ids = tok(prompt, truncation=True, max_length=args.max_length).input_ids
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": target}
        prompt_ids = tok(prompt).input_ids[: max(1, args.max_length - len(target))]
        ids = prompt_ids + target
        return {
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "labels": [IGNORE] * len(prompt_ids) + target,
        }

    def messages(self, messages: list[dict[str, str]]) -> dict[str, list[int]]:
        tok = self.tokenizer
        if self.seq2seq:
            *context, last = messages
            prompt = tok.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
            return self.prompt_completion(prompt, last["content"])
        text = tok.apply_chat_template(messages, tokenize=False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(tok.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True))
            end = len(tok.apply_chat_template(messages[: index + 1], tokenize=False))
            spans.append((start, end))
        encoded = tok(
            text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            truncation=True,
            max_length=self.args.max_length,
        )
        labels = [
            token if any(s <= begin and end <= e for s, e in spans) and end > begin else IGNORE
            for token, (begin, end) in zip(encoded.input_ids, encoded.offset_mapping, strict=True)
        ]
        ids = encoded.input_ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


@dataclass
class FixedShapeCollator:
    """Right-pads every batch to the same lengths, so a compiled training step is traced for one shape."""

    pad_token_id: int
    input_length: int
    label_length: int

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        def padded(key: str, length: int, value: int) -> torch.Tensor:
            return torch.tensor([row[key][:length] + [value] * (length - len(row[key])) for row in rows])

        return {
            "input_ids": padded("input_ids", self.input_length, self.pad_token_id),
            "attention_mask": padded("attention_mask", self.input_length, 0),
            "labels": padded("labels", self.label_length, IGNORE),
        }


def collator_for(
    tokenizer: PreTrainedTokenizerBase, args: DataArgs, *, seq2seq: bool, fixed_shape: bool
) -> Collator:
    """Pad to the longest row of each batch, or (``fixed_shape``) to the recipe's maximum lengths."""
    if not fixed_shape:
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    label_length = args.max_target_length if seq2seq else args.max_length
    return FixedShapeCollator(pad, args.max_length, label_length)
