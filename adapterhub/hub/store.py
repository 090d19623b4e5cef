"""The local adapter store: one folder per adapter under ``$ADAPTERHUB_HOME/adapters``, each with a manifest.

An entry appears only by an atomic rename of a fully written and validated temp folder, so readers never
see a half-pulled adapter; names starting with a dot are temp folders and are never listed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from adapterhub.errors import UserError
from adapterhub.eval.results import EVAL_DIR
from adapterhub.hub.adapter import ADAPTER_FILES, AdapterSummary, inspect_adapter
from adapterhub.paths import atomic_dir, home

MANIFEST = "manifest.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass
class Manifest:
    name: str
    source: str  # Hub repo id, or the folder it was added from
    revision: str | None  # resolved commit sha of a pulled adapter
    method: str
    base_model: str
    rank: int | None
    num_virtual_tokens: int | None
    params: int
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    size: int = 0  # bytes of the adapter files
    added_at: str = ""  # ISO 8601 UTC: when it was pulled or trained
    origin: str = "pulled"  # pulled | local
    ref: str | None = None  # the tag, branch or sha asked for
    subfolder: str | None = None

    @property
    def source_at_revision(self) -> str:
        return f"{self.source}@{self.revision[:12]}" if self.revision else self.source


def root() -> Path:
    return home() / "adapters"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise UserError(
            f"invalid store name '{name}': "
            "use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


def entry_path(name: str) -> Path:
    return root() / check_name(name)


def exists(name: str) -> bool:
    return NAME.match(name) is not None and (root() / name / MANIFEST).is_file()


def read(name: str) -> Manifest:
    path = entry_path(name) / MANIFEST
    if not path.is_file():
        raise UserError(f"no adapter named '{name}' in the store: see `adapterhub list`")
    known = {item.name for item in fields(Manifest)}
    try:
        data = json.loads(path.read_text())
        return Manifest(**{key: value for key, value in data.items() if key in known})
    except (ValueError, TypeError) as err:
        raise UserError(
            f"the manifest of '{name}' is unreadable: `adapterhub rm {name}` and add it again"
        ) from err


def entries() -> list[Manifest]:
    if not root().is_dir():
        return []
    return [read(path.name) for path in sorted(root().iterdir()) if exists(path.name)]


def find_source(source: str, subfolder: str | None = None) -> list[Manifest]:
    return [entry for entry in entries() if entry.source == source and entry.subfolder == subfolder]


def remove(name: str) -> None:
    """Delete an entry, even one whose manifest is unreadable."""
    if not exists(name):
        raise UserError(f"no adapter named '{name}' in the store: see `adapterhub list`")
    path = entry_path(name)
    # Rename first so the entry disappears at once even if deleting its files is slow or interrupted.
    doomed = path.with_name(f".{name}.rm")
    path.rename(doomed)
    shutil.rmtree(doomed)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, summary: AdapterSummary, **fields) -> Manifest:
    """Hash the adapter files in ``folder`` and write its manifest there."""
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.name != MANIFEST)
    manifest = Manifest(
        method=summary.method,
        base_model=summary.base_model,
        rank=summary.rank,
        num_virtual_tokens=summary.num_virtual_tokens,
        params=summary.params,
        files={path.name: sha256(path) for path in files},
        size=sum(path.stat().st_size for path in files),
        added_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
    )
    (folder / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return manifest


def add_folder(folder: Path, name: str, *, replace: bool = False) -> Manifest:
    """Copy a local adapter (a training output dir) into the store under ``name``, validated first."""
    folder = Path(folder).resolve()
    summary = inspect_adapter(folder)
    if exists(name) and not replace:
        raise UserError(f"store name '{name}' is taken: choose another name or `adapterhub rm {name}` first")
    with atomic_dir(entry_path(name), replace=True) as tmp:
        for file_name in ADAPTER_FILES:
            if (folder / file_name).is_file():
                shutil.copy2(folder / file_name, tmp / file_name)
        if (folder / EVAL_DIR).is_dir():  # adapterhub eval's results travel with the adapter
            shutil.copytree(folder / EVAL_DIR, tmp / EVAL_DIR, ignore=shutil.ignore_patterns(".*"))
        manifest = write_manifest(tmp, summary, name=name, source=str(folder), revision=None, origin="local")
    return manifest


def verify(name: str) -> list[str]:
    """Names of the entry's files whose bytes no longer match the sha256 recorded in its manifest."""
    manifest = read(name)
    path = entry_path(name)
    return [
        file_name
        for file_name, digest in manifest.files.items()
        if not (path / file_name).is_file() or sha256(path / file_name) != digest
    ]
