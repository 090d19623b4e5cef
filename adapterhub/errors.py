"""The one exception type for mistakes a user can fix.

Library code raises ``UserError`` with a single line that names the bad input and the fix;
the CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """An expected mistake in the user's input or environment."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'max_steps'?)"`` for the ``choices`` closest to a misspelt ``word``, else ``""``."""
    close = difflib.get_close_matches(word, [str(choice) for choice in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
