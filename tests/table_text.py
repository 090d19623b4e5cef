"""Reading a rich table back from its rendered text, to check that no value was cut."""

from __future__ import annotations

import re


def column_texts(rendered: str) -> tuple[list[str], list[str]]:
    """Each column's header and body text, its lines joined in order with all whitespace removed.

    A cell that wrapped over several lines reads back whole this way, whatever the row boundaries;
    comparing with the expected values (whitespace removed too) shows that nothing was cut.
    """
    headers: list[str] = []
    bodies: list[str] = []
    for line in rendered.splitlines():
        for separator, texts in (("┃", headers), ("│", bodies)):
            if line.count(separator) >= 2:
                fragments = line.split(separator)[1:-1]
                texts.extend([""] * (len(fragments) - len(texts)))
                for index, fragment in enumerate(fragments):
                    texts[index] += re.sub(r"\s+", "", fragment)
    return headers, bodies


def squeezed(values: list[str]) -> str:
    return "".join(re.sub(r"\s+", "", value) for value in values)
