"""The one exception type for mistakes a user can fix.

Library code raises ``UserError`` with a single line that names the bad input and the fix;
the CLI prints it without a traceback and exits non-zero.
"""


class UserError(Exception):
    """An expected mistake in the user's input or environment."""
