"""``adapterhub bench``: benchmark commands that print JSON (never timed asserts in tests)."""

from __future__ import annotations

import click

from adapterhub.cli import LazyGroup

BENCHES: dict[str, str] = {
    "train": "adapterhub.train.bench:bench_train",
    "serve": "adapterhub.runtime.bench:bench_serve",
    "http": "adapterhub.server.bench:bench_http",
}


@click.group(cls=LazyGroup, lazy_commands=BENCHES)
def bench() -> None:
    """Measure training and serving speed, memory and accuracy."""
