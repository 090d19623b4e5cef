"""The local adapter store: one folder per adapter under ``$ADAPTERHUB_HOME/adapters``, each with a manifest.

An entry appears only by an atomic rename of a fully written and validated temp folder, so readers never
see a half-pulled adapter; names starting with a dot are temp folders and locks and are never listed.
Writers of one name (pull, train's ``output.store_name``, rm) hold ``lock(name)`` from their checks
to their final rename, so a second writer fails at once instead of overwriting the first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from adapterhub.errors import UserError, did_you_mean
from adapterhub.eval.results import EVAL_DIR
from adapterhub.hub.adapter import ADAPTER_FILES, AdapterSummary, inspect_adapter
from adapterhub.paths import atomic_dir, exclusive_lock, home, restore_orphaned

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


def lock(name: str) -> contextlib.AbstractContextManager[None]:
    """Exclusive right to write the entry ``name``; a second writer gets a one-line error at once."""
    return exclusive_lock(
        root() / f".{check_name(name)}.lock",
        f"store name '{name}'",
        "wait for it to finish, or use another name",
    )


def exists(name: str) -> bool:
    if NAME.match(name) is None:
        return False
    restore_orphaned(root() / name)
    return (root() / name / MANIFEST).is_file()


def names() -> list[str]:
    if not root().is_dir():
        return []
    return [path.name for path in sorted(root().iterdir()) if exists(path.name)]


def suggestion(name: str) -> str:
    """A "did you mean" for a store name that is not there, else ``""``."""
    return did_you_mean(name, names())


def not_stored(name: str) -> UserError:
    return UserError(f"no adapter named '{name}' in the store{suggestion(name)}: see `adapterhub list`")


def read(name: str) -> Manifest:
    restore_orphaned(entry_path(name))
    path = entry_path(name) / MANIFEST
    if not path.is_file():
        raise not_stored(name)
    known = {item.name for item in fields(Manifest)}
    try:
        data = json.loads(path.read_text())
        return Manifest(**{key: value for key, value in data.items() if key in known})
    except (ValueError, TypeError) as err:
        raise UserError(
            f"the manifest of '{name}' is unreadable: `adapterhub rm {name}` and add it again"
        ) from err


def entries() -> list[Manifest]:
    if root().is_dir():
        for old in root().glob(".*.old-*"):
            restore_orphaned(root() / old.name[1:].rsplit(".old-", 1)[0])
    return [read(name) for name in names()]


def find_source(source: str, subfolder: str | None = None) -> list[Manifest]:
    return [entry for entry in entries() if entry.source == source and entry.subfolder == subfolder]


def remove(name: str) -> None:
    """Delete an entry, even one whose manifest is unreadable."""
    with lock(name):
        if not exists(name):
            raise not_stored(name)
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
    with lock(name):
        if exists(name) and not replace:
            raise UserError(
                f"store name '{name}' is taken: choose another name or `adapterhub rm {name}` first"
            )
        with atomic_dir(entry_path(name), replace=True) as tmp:
            for file_name in ADAPTER_FILES:
                if (folder / file_name).is_file():
                    shutil.copy2(folder / file_name, tmp / file_name)
            if (folder / EVAL_DIR).is_dir():  # adapterhub eval's results travel with the adapter
                shutil.copytree(folder / EVAL_DIR, tmp / EVAL_DIR, ignore=shutil.ignore_patterns(".*"))
            manifest = write_manifest(
                tmp, summary, name=name, source=str(folder), revision=None, origin="local"
            )
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
