"""Text from a model or a server, made safe to print on a terminal.

A reply may hold escape sequences that clear the screen, recolour it, retitle the window (OSC 0) or
write the clipboard (OSC 52), whether a model produced them or a hostile server sent them. Whole
sequences are removed; any other C0/C1 control character (tabs and newlines aside) is shown as
U+FFFD. Rich's own styling is added after this, so the only escapes reaching the terminal are its.
"""

from __future__ import annotations

import re

# Bounded, so a sequence that stays unfinished is treated the same in every prefix of a stream.
MAX_SEQUENCE = 256
_SEQUENCE = re.compile(
    rf"""
      \x1b\[[0-?]{{0,64}}[ -/]{{0,8}}[@-~]                            # CSI: colours, cursor, clear screen
    | \x9b[0-?]{{0,64}}[ -/]{{0,8}}[@-~]                              # the same, 8-bit
    | [\x1b][\]PX^_][^\x07\x1b\x9c]{{0,{MAX_SEQUENCE}}}(?:\x07|\x1b\\|\x9c)  # OSC/DCS/SOS/PM/APC .. BEL or ST
    | [\x90\x98\x9d\x9e\x9f][^\x07\x1b\x9c]{{0,{MAX_SEQUENCE}}}(?:\x07|\x1b\\|\x9c)  # the same, 8-bit
    | \x1b(?![\[\]PX^_])[ -/]{{0,8}}[0-~]                           # ESC c (reset), ESC 7, ESC ( B ...
    """,
    re.VERBOSE,
)
_INTRODUCER = re.compile(r"[\x1b\x90\x98\x9b\x9d\x9e\x9f]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str, *, final: bool = True) -> str:
    """``text`` without escape sequences or control characters.

    While a reply is still streaming (``final=False``) a sequence that may not have fully arrived is
    held back, so the result is always the start of what the finished text will give.
    """
    text = _SEQUENCE.sub("", text.replace("\r\n", "\n"))
    if not final:
        unfinished = _INTRODUCER.search(text, max(0, len(text) - MAX_SEQUENCE - 80))
        if unfinished is not None:
            text = text[: unfinished.start()]
    return _CONTROL.sub("\ufffd", text)
