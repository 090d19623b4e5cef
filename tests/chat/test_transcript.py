from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub.chat.session import parse_settings
from adapterhub.chat.transcript import Transcript, load_transcript, save_transcript
from adapterhub.errors import UserError
from adapterhub.runtime.api import SamplingParams


def test_transcript_round_trips(tmp_path: Path) -> None:
    transcript = Transcript(
        system="be brief",
        messages=[
            {"role": "user", "content": "héllo\nthere"},
            {"role": "assistant", "content": "hi", "adapter": "lora"},
        ],
    )
    path = tmp_path / "nested" / "chat.jsonl"
    save_transcript(transcript, path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"role": "system", "content": "be brief"}
    assert load_transcript(path) == transcript
    assert [p.name for p in path.parent.iterdir()] == ["chat.jsonl"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"role": "user", "content": "a"}\nnot json\n', "line 2 is not JSON"),
        ('["user", "a"]\n', "line 1 needs a role"),
        ('{"role": "user"}\n', "line 1 needs a text content"),
        ('{"role": "user", "content": 3}\n', "line 1 needs a text content"),
        (
            '{"role": "user", "content": "a"}\n{"role": "system", "content": "b"}\n',
            "may only be the first line",
        ),
    ],
)
def test_malformed_transcripts_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_transcript(path)


def test_undecodable_transcript_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="cannot read transcript"):
        load_transcript(path)


def test_settings_parse_and_check_values() -> None:
    params = parse_settings(["temperature=0.7", "top_p=0.9", "max_tokens=5", "seed=3"], SamplingParams())
    assert (params.temperature, params.top_p, params.max_tokens, params.seed) == (0.7, 0.9, 5, 3)
    assert parse_settings(["seed=none"], params).seed is None
    for bad, message in (
        ("temperature=3", "temperature must be a number from 0 to 2"),
        ("top_p=0", "top_p must be a number above 0"),
        ("max_tokens=1.5", "max_tokens must be a whole number"),
        ("temperature", "write NAME=VALUE"),
        ("top_k=4", "cannot set 'top_k=4'"),
    ):
        with pytest.raises(UserError, match=message):
            parse_settings([bad], params)
