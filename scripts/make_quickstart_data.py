"""Regenerate recipes/data/quickstart.jsonl: a synthetic 3-label sentiment task (no third-party text)."""

from pathlib import Path

from adapterhub.synthetic import sentiment_rows, write_jsonl

if __name__ == "__main__":
    write_jsonl(
        sentiment_rows(480, seed=7), Path(__file__).parent.parent / "recipes" / "data" / "quickstart.jsonl"
    )
