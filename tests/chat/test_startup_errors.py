"""Mistakes on the command line end in one line on stderr and exit status 1, before any model loads."""

from __future__ import annotations

import pytest

from .harness import run_piped


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        ((), "hi", "no model to chat with: pass --base MODEL, --adapter NAME or --url URL"),
        (("--url", "http://127.0.0.1:9", "--base", "x"), "hi", "--base is for local mode"),
        (("--url", "ftp://host"), "hi", "--url 'ftp://host' is not an http(s) URL"),
        (("--base", "builtin:tiny-llama"), "  \n", "standard input is empty: pipe in a question"),
    ],
)
def test_bad_command_line_is_one_line(args: tuple[str, ...], stdin: str, message: str) -> None:
    done = run_piped(*args, stdin=stdin, timeout=60)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(f"error: {message}")
    assert done.stderr.count("\n") == 1
