"""Chat transcripts as JSONL: one ``{"role", "content"}`` object a line, the system prompt first if any.

Assistant lines also carry ``"adapter"``: the adapter that wrote them.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from adapterhub.errors import UserError

ROLES = ("system", "user", "assistant")
LINE_FORMAT = 'one JSON object a line like {"role": "user", "content": "hi"}'


@dataclass
class Transcript:
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)


def save_transcript(transcript: Transcript, path: Path) -> None:
    """Write the transcript beside ``path`` first and rename it, so a failed save leaves no half file."""
    path = Path(path)
    lines = [{"role": "system", "content": transcript.system}] if transcript.system else []
    lines += transcript.messages
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"cannot write transcript {path}: {err.strerror or err}") from err


def load_transcript(path: Path) -> Transcript:
    """Read and check a whole transcript; any bad line raises before anything is returned."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read transcript {path}: {getattr(err, 'strerror', None) or err}") from err
    transcript = Transcript()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        message = parse_line(line, f"transcript {path} line {number}")
        if message["role"] != "system":
            transcript.messages.append(message)
        elif transcript.messages or transcript.system is not None:
            raise UserError(f"transcript {path} line {number}: the system prompt may only be the first line")
        else:
            transcript.system = message["content"]
    return transcript


def parse_line(line: str, where: str) -> dict[str, str]:
    try:
        message = json.loads(line)
    except ValueError as err:
        raise UserError(f"{where} is not JSON: write {LINE_FORMAT}") from err
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise UserError(f"{where} needs a role of {', '.join(ROLES)}: write {LINE_FORMAT}")
    if not isinstance(message.get("content"), str):
        raise UserError(f"{where} needs a text content: write {LINE_FORMAT}")
    kept = {"role": message["role"], "content": message["content"]}
    if message["role"] == "assistant" and isinstance(message.get("adapter"), str):
        kept["adapter"] = message["adapter"]
    return kept
