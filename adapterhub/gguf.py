"""GGUF files as base models, converted once into a cached transformers folder keyed by the file's hash.

A base named ``path/to/model.gguf`` or ``gguf:path/to/model.gguf`` is read with transformers' GGUF
support (every weight dequantized to float; the tokenizer and chat template come from the file's
metadata) and saved as a plain transformers folder under ``$ADAPTERHUB_HOME/gguf/<sha256>``. Every
later load reads that folder, which takes a second instead of dequantizing again.

An adapter trained on a GGUF records it as ``gguf:<file name>@sha256:<hash>``: the base is matched by
content, wherever the file lives, and a recorded base is found again in the cache without the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adapterhub.errors import UserError
from adapterhub.paths import atomic_dir, home

PREFIX = "gguf:"
SUFFIX = ".gguf"
SOURCE_FILE = "gguf_source.json"  # written last: a folder holding it is a complete conversion
_RECORDED = re.compile(r"^(?P<path>.+)@sha256:(?P<sha256>[0-9a-f]{64})$")
# (resolved path, size, mtime) -> sha256, so one process hashes a file once however often it is named.
_digests: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class GgufSource:
    """One GGUF file as a base model: its name, its content hash and where it lies (if it is at hand)."""

    file_name: str
    sha256: str
    path: Path | None

    @property
    def id(self) -> str:
        """What adapters record as their base model."""
        return f"{PREFIX}{self.file_name}@sha256:{self.sha256}"


def is_gguf(name: str) -> bool:
    """``gguf:PATH``, a recorded ``gguf:FILE@sha256:HASH``, or a path ending in ``.gguf``."""
    return name.startswith(PREFIX) or name.lower().endswith(SUFFIX)


def cache_dir(sha256: str) -> Path:
    return home() / "gguf" / sha256


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def source(name: str) -> GgufSource:
    """The GGUF a base name means; a recorded hash must match the file when the file is given too."""
    spec = name.removeprefix(PREFIX)
    recorded = _RECORDED.match(spec)
    path = Path(recorded["path"] if recorded else spec).expanduser()
    if path.is_file():
        actual = file_sha256(path)
        if recorded and recorded["sha256"] != actual:
            raise UserError(
                f"GGUF base '{name}': {path} has sha256 {actual[:12]}…, not the recorded "
                f"{recorded['sha256'][:12]}…: pass the original file, or name it without @sha256"
            )
        return GgufSource(path.name, actual, path)
    if recorded:
        return GgufSource(path.name, recorded["sha256"], None)
    raise UserError(f"GGUF file '{path}' not found: give the path of a .gguf file")


def resolve(name: str) -> Path:
    """The converted transformers folder of GGUF base ``name``, converting the file on first use."""
    gguf = source(name)
    folder = cache_dir(gguf.sha256)
    if (folder / SOURCE_FILE).is_file():
        return folder
    if gguf.path is None:
        raise UserError(
            f"GGUF base '{name}' is not converted on this machine: pass --base (or model.name) as the "
            f"path of {gguf.file_name}, the file with sha256 {gguf.sha256[:12]}…"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Two processes may convert one file at once (parallel tests, torchrun ranks): one does, one waits.
    with open(folder.parent / f".{gguf.sha256}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / SOURCE_FILE).is_file():
            with atomic_dir(folder, replace=True) as tmp:
                convert(gguf, tmp)
    return folder


def convert(gguf: GgufSource, out: Path) -> None:
    """Dequantize ``gguf`` into a transformers folder at ``out``: weights, config, tokenizer, template."""
    from rich.console import Console
    from transformers import AutoConfig, AutoTokenizer, GgufConfig

    from adapterhub.models import auto_class

    assert gguf.path is not None
    folder, file = str(gguf.path.parent), gguf.path.name
    architecture = architecture_of(gguf.path)
    # The console holds the real stderr: _quiet() swaps sys.stderr out while transformers loads.
    status = Console(file=sys.stderr).status(f"converting {file} into a transformers folder (once)")
    with status, _quiet():
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=file)
            model = auto_class(config).from_pretrained(
                folder, gguf_file=file, quantization_config=GgufConfig(dequantize=True)
            )
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        except (ValueError, KeyError, NotImplementedError, TypeError, RuntimeError) as err:
            import transformers

            raise UserError(
                f"GGUF file {gguf.path} ({architecture} architecture) cannot be loaded by "
                f"transformers {transformers.__version__}: {_first_line(err)}; use a GGUF of an "
                "architecture transformers supports (llama, mistral, qwen2, qwen3, …) or a "
                "transformers folder"
            ) from err
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    record = {"file_name": gguf.file_name, "sha256": gguf.sha256, "architecture": architecture}
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def architecture_of(path: Path) -> str:
    """``general.architecture`` from the file's header; a file that is not GGUF is refused here."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
        return str(field.contents())
    except (ValueError, KeyError, OSError) as err:
        raise UserError(f"{path} is not a readable GGUF file ({_first_line(err)}): check the file") from err


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bars; our one status line stands for them."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
