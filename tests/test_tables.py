"""Result tables never cut a value: folded on a narrow terminal, at full width in a pipe."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from adapterhub.tables import print_table
from tests.table_text import column_texts, squeezed


def bench_train_table() -> Table:
    from adapterhub.train.bench import results_table

    row = {
        "method": "prefix_tuning",
        "total_params": 1_230_564_352,
        "trainable_params": 983_040,
        "peak_memory_mib": 3430.2,
        "train_it_s": 4.92,
        "eval_it_s": 9.0,
        "accuracy": "n/a",
        "baseline_train_it_s": 2.41,
        "speedup": 2.04,
    }
    return results_table({"device": "NVIDIA H200", "results": [row]})


def test_a_wide_table_folds_at_80_columns_and_keeps_every_header_whole() -> None:
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    print_table(bench_train_table(), console)
    rendered = console.file.getvalue()
    headers, columns = column_texts(rendered)
    assert "…" not in rendered and max(len(line) for line in rendered.splitlines()) <= 80
    assert headers[-2:] == ["baseline_train_it_s", "speedup"] and columns[0] == "prefix_tuning"
    assert columns[1] == "1,230,564,352"


def test_in_a_pipe_each_row_is_one_line_at_its_natural_width() -> None:
    console = Console(file=io.StringIO(), width=80)
    table = Table()
    for name in ("name", "source"):
        table.add_column(name)
    source = "/a/rather/long/folder/that/would/never/fit/in/eighty/columns/of/a/terminal/adapter"
    table.add_row("prefix_tuning-support-style", source)
    print_table(table, console)
    rendered = console.file.getvalue()
    assert any("prefix_tuning-support-style" in line and source in line for line in rendered.splitlines())
    assert console.width == 80, "the console's own width is left as it was"
    assert column_texts(rendered)[1] == [squeezed(["prefix_tuning-support-style"]), squeezed([source])]
