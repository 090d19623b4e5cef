"""Who may load adapters into a running server over HTTP, and from where.

Off by default, as in vLLM (which needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``): a client that can
reach the port must not make the server read its files or pull from the Hub. When on, a source is a
store name, a folder under one of the ``--adapter-root`` folders (symlinks followed first, then
checked, for the folder and for its adapter files), or, with ``--allow-hub-pulls``, a Hub id. A
folder outside the roots and one that does not exist get the same answer, so the answer tells a
client nothing about the server's disk. Loading and unloading may need their own admin key.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from adapterhub.card import is_hub_id
from adapterhub.errors import UserError
from adapterhub.hub import store
from adapterhub.hub.adapter import CONFIG_FILE, WEIGHT_FILES
from adapterhub.hub.transfer import DEFAULT_LIMITS, PullLimits
from adapterhub.server.defaults import ENV_VAR
from adapterhub.server.errors import ApiError


@dataclass(frozen=True)
class Source:
    """Where a load request's adapter comes from: a local folder, or a Hub id to pull first."""

    folder: Path | None = None
    hub_spec: str | None = None


@dataclass(frozen=True)
class LoadingPolicy:
    enabled: bool = False
    roots: tuple[Path, ...] = ()  # resolved folders local sources must lie under
    hub_pulls: bool = False
    admin_api_key: str | None = None  # loading and unloading need this key instead of --api-key
    pull_limits: PullLimits = DEFAULT_LIMITS

    @classmethod
    def from_options(
        cls, enabled: bool, roots: tuple[str, ...], hub_pulls: bool, admin_api_key: str | None
    ) -> LoadingPolicy:
        """The policy ``serve``'s flags ask for; flags that only make sense with loading on need it."""
        if not enabled:
            given = [
                flag
                for flag, value in (
                    ("--adapter-root", roots),
                    ("--allow-hub-pulls", hub_pulls),
                    ("--admin-api-key", admin_api_key),
                )
                if value
            ]
            if given:
                raise UserError(f"{given[0]} only applies to runtime loading: add --allow-runtime-loading")
            return cls()
        resolved = []
        for root in roots:
            path = Path(root).expanduser().resolve()
            if not path.is_dir():
                raise UserError(f"--adapter-root {root} is not a folder: give an existing folder of adapters")
            resolved.append(path)
        return cls(True, tuple(resolved), hub_pulls, admin_api_key or None)

    def describe(self) -> str:
        """One line for the startup log."""
        if not self.enabled:
            return f"runtime loading: off (--allow-runtime-loading or {ENV_VAR}=1 turns it on)"
        folders = ", ".join(str(root) for root in self.roots) or "none"
        hub = "on" if self.hub_pulls else "off"
        key = "its own --admin-api-key" if self.admin_api_key else "the --api-key, if any"
        return f"runtime loading: on (store names; folders under: {folders}; Hub pulls: {hub}; key: {key})"

    def authorize(self, authorization: str | None, api_key: str | None) -> None:
        """Refuse a load or unload without the right key (401), or when loading is off (403)."""
        key = self.admin_api_key or api_key
        scheme, _, given = (authorization or "").partition(" ")
        if key and (
            scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode())
        ):
            which = "admin" if self.admin_api_key else "API"
            raise ApiError(
                401,
                f"missing or wrong {which} key: loading and unloading adapters need the header "
                f"'Authorization: Bearer <{which} key>'",
                "invalid_api_key",
            )
        if not self.enabled:
            raise ApiError(
                403,
                "loading and unloading adapters over HTTP is off on this server: start it with "
                f"--allow-runtime-loading (or {ENV_VAR}=1)",
                "runtime_loading_disabled",
            )

    def resolve(self, source: str) -> Source:
        """Where ``source`` may be loaded from under this policy; a refusal says only what is allowed."""
        if "/" not in source and store.NAME.match(source) and store.exists(source):
            return Source(folder=store.entry_path(source))
        path = Path(source).expanduser()
        candidates = [path] if path.is_absolute() else [root / path for root in self.roots]
        for candidate in candidates:
            folder = self._inside_roots(candidate)
            if folder is not None:
                return Source(folder=folder)
        if not path.is_absolute() and not source.startswith((".", "~")) and _is_hub_spec(source):
            if not self.hub_pulls:
                raise ApiError(
                    403,
                    f"'{source}' is a Hub id and Hub pulls are off on this server: start it with "
                    "--allow-hub-pulls, or load a store name or a folder under its --adapter-root",
                    "hub_pulls_disabled",
                    "source",
                )
            return Source(hub_spec=source)
        raise ApiError(
            400,
            f"source '{source}' is not a store name or an adapter folder under this server's "
            "--adapter-root: give one of those",
            "bad_adapter_source",
            "source",
        )

    def _inside_roots(self, candidate: Path) -> Path | None:
        """``candidate`` with symlinks resolved, if it is a folder under a root and so are its files."""
        folder = candidate.resolve()
        root = next((root for root in self.roots if folder.is_relative_to(root)), None)
        if root is None or not folder.is_dir():
            return None
        for name in (CONFIG_FILE, *WEIGHT_FILES):
            if (folder / name).exists() and not (folder / name).resolve().is_relative_to(root):
                return None
        return folder


def _is_hub_spec(source: str) -> bool:
    repo_id, _, _ = source.partition("@")
    return "/" in repo_id and is_hub_id(repo_id)
