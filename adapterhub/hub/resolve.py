"""``resolve``: turn whatever a user typed for an adapter into a local folder that PEFT can load."""

from __future__ import annotations

import threading
from pathlib import Path

from adapterhub.errors import UserError
from adapterhub.hub import store
from adapterhub.hub.adapter import CONFIG_FILE, check_base_model, is_local_path
from adapterhub.hub.transfer import DEFAULT_LIMITS, PullLimits


def resolve(spec: str, *, strict_base: str | None = None, base_model: str | None = None) -> Path:
    """The local folder of an adapter given as a store name, a local folder, or ``REPO_ID[@REV]``.

    A Hub spec already in the store (same repo, and the same revision when one is given) is used as is;
    otherwise it is pulled. ``strict_base`` refuses an adapter trained on another base model;
    ``base_model`` only warns about one.
    """
    path = _local_folder(spec)
    if path is None:
        path = store.entry_path(spec) if store.exists(spec) else from_hub(spec)
    if strict_base:
        check_base_model(path, strict_base, strict=True)
    elif base_model:
        check_base_model(path, base_model)
    return path


def _local_folder(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    if not path.exists() and is_local_path(spec):
        raise UserError(f"no such folder: {path}: give an existing adapter folder, a store name or ORG/NAME")
    if not path.exists() or ("/" not in spec and store.exists(spec)):
        return None
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path} has no {CONFIG_FILE}: give a PEFT adapter folder, a store name or ORG/NAME")
    return path


def from_hub(
    spec: str, *, limits: PullLimits = DEFAULT_LIMITS, cancel: threading.Event | None = None
) -> Path:
    """The store entry of the Hub adapter ``REPO_ID[@REV]``: one already pulled, or a new pull.

    Unlike ``resolve`` it never looks for a local folder, so a server can take Hub ids from clients.
    """
    from adapterhub.hub.remote import pull, split_spec

    if "/" not in spec:
        raise UserError(
            f"no adapter named '{spec}' in the store{store.suggestion(spec)}: see `adapterhub list`, "
            "or give a folder or ORG/NAME"
        )
    repo_id, revision = split_spec(spec)
    for entry in store.find_source(repo_id):
        if revision is None or revision in (entry.ref, entry.revision):
            return store.entry_path(entry.name)
    return pull(spec, limits=limits, cancel=cancel).path
