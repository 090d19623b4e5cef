"""Printing result tables that never cut a value.

Rich shortens a cell that does not fit its column to ``prefix_tuni…``. Here a cell that does not fit
wraps onto more lines instead (``fold``), and when the output is not a terminal (a pipe, a file) the
table is printed at its natural width, so every name and number stays whole on its line and ``grep``
finds it.
"""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

NATURAL_WIDTH_LIMIT = 10_000


def print_table(table: Table, console: Console | None = None) -> None:
    console = console or Console()
    for column in table.columns:
        column.overflow = "fold"
    if console.is_terminal:
        console.print(table)
        return
    measurer = Console(file=io.StringIO(), width=NATURAL_WIDTH_LIMIT)
    natural = measurer.measure(table).maximum
    saved = console.width
    console.width = max(saved, natural)
    try:
        console.print(table)
    finally:
        console.width = saved
