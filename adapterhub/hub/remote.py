"""Push adapters (and merged models) to the Hugging Face Hub and pull adapters from it into the store.

The endpoint and token are read at call time (``HF_ENDPOINT``, ``HF_TOKEN`` or the saved login) and
passed explicitly, because huggingface_hub freezes ``HF_ENDPOINT`` when it is first imported.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from tqdm.auto import tqdm

from adapterhub.card import adapter_card, is_hub_id, with_hub_metadata
from adapterhub.errors import UserError
from adapterhub.eval.results import EVAL_DIR, read_evaluations
from adapterhub.hub import store
from adapterhub.hub.adapter import (
    ADAPTER_FILES,
    CONFIG_FILE,
    WEIGHT_FILES,
    check_base_model,
    has_adapter,
    inspect_adapter,
    is_local_path,
    one_line,
    warn,
)
from adapterhub.hub.reach import endpoint
from adapterhub.hub.transfer import (
    DEFAULT_LIMITS,
    PullLimits,
    TransferBudget,
    check_listing,
)
from adapterhub.paths import atomic_dir

# Remote files a push replaces, per kind: an adapter push leaves other files in the repo alone.
REPLACED_FILES = {"adapter": [*ADAPTER_FILES, f"{EVAL_DIR}/*.json"], "model": ["*"]}


def _transport_errors() -> tuple[type[Exception], ...]:
    """Connection failures of the HTTP client huggingface_hub uses: httpx2 from 2.x, httpx before."""
    found = []
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(name).TransportError)
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()
KINDS = ("adapter", "model")


@dataclass(frozen=True)
class PushResult:
    url: str
    commit: str
    no_op: bool  # nothing changed: the repo already held these exact files
    repo_id: str
    revision: str  # the tag, branch or "main" the URL points at


@dataclass(frozen=True)
class PullResult:
    name: str
    path: Path
    revision: str
    no_op: bool  # the store already held this exact revision
    manifest: store.Manifest


def hub_api() -> HfApi:
    from importlib.metadata import version

    return HfApi(endpoint=endpoint(), library_name="adapterhub", library_version=version("adapterhub"))


def split_spec(spec: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); the revision is ``None`` when not given."""
    repo_id, _, revision = spec.partition("@")
    if not is_hub_id(repo_id) or "/" not in repo_id:
        raise UserError(f"'{spec}' is not a Hub repo id: write it as ORG/NAME or ORG/NAME@REVISION")
    return repo_id, revision or None


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn the Hub client's exceptions into one-line ``UserError``s that say what to do."""
    where = endpoint()
    try:
        yield
    except RevisionNotFoundError as err:
        raise UserError(
            f"revision '{revision}' not found in {repo_id}: give an existing tag, branch or commit sha"
        ) from err
    except RepositoryNotFoundError as err:
        raise UserError(
            f"repo {repo_id} not found on {where}, or your token cannot see it: check the id and HF_TOKEN"
        ) from err
    except LocalEntryNotFoundError as err:
        raise UserError(f"cannot reach the Hub at {where}: check your network and HF_ENDPOINT") from err
    except EntryNotFoundError as err:
        raise UserError(
            f"a file listed in {repo_id}@{revision} is missing on {where}: push it again"
        ) from err
    except OfflineModeIsEnabled as err:
        raise UserError(
            "HF_HUB_OFFLINE=1 is set: unset it to reach the Hub, or use a store name or local folder"
        ) from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            from huggingface_hub import get_token

            if get_token() is None:
                message = f"{where} needs a token for this (401) and none is set"
                raise UserError(f"{message}: set HF_TOKEN or run `hf auth login`") from err
            raise UserError(f"{where} rejected the token (401): set HF_TOKEN or run `hf auth login`") from err
        if status == 403:
            raise UserError(
                f"no permission for {repo_id} on {where} (403): use your own namespace "
                "or a token with write access"
            ) from err
        raise UserError(f"{where} answered {status} for {repo_id}: {one_line(err)}") from err
    except TRANSPORT_ERRORS as err:
        raise UserError(f"cannot reach the Hub at {where}: check your network and HF_ENDPOINT") from err


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    tag: str | None = None,
    branch: str | None = None,
    private: bool = False,
    message: str | None = None,
    kind: str = "adapter",
    base_model: str | None = None,
) -> PushResult:
    """Upload an adapter folder (or, with ``kind="model"``, a full model folder) to ``repo_id``.

    Adapters are uploaded with their companions (recipe, metrics, loss curve) and a model card, written
    only when the folder has none (an existing card only gets its Hub metadata put right). A local-path
    ``base_model_name_or_path`` is rewritten to the Hub id (``base_model``, else the recipe's model).
    Pushing unchanged files is a no-op; an existing ``tag`` is accepted only if it already points at
    exactly these files.
    """
    folder = Path(folder)
    split_spec(repo_id)
    if kind not in KINDS:
        raise UserError(f"unknown push kind '{kind}': use one of {', '.join(KINDS)}")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: give a training output dir or a store name")
    api = hub_api()
    with tempfile.TemporaryDirectory(prefix="adapterhub-push-") as tmp:
        if kind == "adapter":
            upload_from = _stage_adapter(folder, Path(tmp), repo_id, base_model)
        else:
            _check_model_folder(folder)
            upload_from = folder
        with hub_errors(repo_id, branch):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch:
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            revision = branch or "main"
            head = api.repo_info(repo_id, revision=revision).sha
            tagged = _tag_commit(api, repo_id, tag)
            if tagged is not None and (
                tagged != head or not _remote_matches(api, repo_id, head, upload_from, REPLACED_FILES[kind])
            ):
                raise UserError(
                    f"tag '{tag}' already exists on {repo_id} at another version: choose a new tag"
                )
            try:
                commit = api.upload_folder(
                    repo_id=repo_id,
                    folder_path=upload_from,
                    revision=branch,
                    commit_message=message or f"Upload {kind} with adapterhub",
                    ignore_patterns=[".*", "**/.*"],
                    delete_patterns=REPLACED_FILES[kind],
                )
            except ValueError as err:  # how huggingface_hub reports a rejected model card or LFS batch
                raise UserError(f"{endpoint()} refused the upload to {repo_id}: {one_line(err)}") from err
            if tag and tagged is None:
                api.create_tag(repo_id, tag=tag, revision=commit.oid, tag_message=message)
    shown = tag or revision
    return PushResult(
        url=f"{endpoint()}/{repo_id}/tree/{shown}",
        commit=commit.oid,
        no_op=commit.oid == head,
        repo_id=repo_id,
        revision=shown,
    )


def _stage_adapter(folder: Path, stage: Path, repo_id: str, base_model: str | None) -> Path:
    """Copy the shareable files of an adapter into ``stage``, with a Hub base model and a model card."""
    if not has_adapter(folder):
        raise UserError(
            f"{folder} holds no adapter ({CONFIG_FILE} and {' or '.join(WEIGHT_FILES)}): "
            "give a training output dir or a store name"
        )
    summary = inspect_adapter(folder)
    for name in ADAPTER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, stage / name)
    evaluations = read_evaluations(folder)  # adapterhub eval's results, shown on the card
    if evaluations:
        shutil.copytree(folder / EVAL_DIR, stage / EVAL_DIR, ignore=shutil.ignore_patterns(".*"))
    hub_base = _hub_base_model(folder, summary.base_model, base_model)
    if hub_base != summary.base_model:
        config = json.loads((stage / CONFIG_FILE).read_text())
        config["base_model_name_or_path"] = hub_base
        (stage / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    card = stage / "README.md"
    if card.exists():
        text = card.read_text()
        fixed = with_hub_metadata(
            text, base_model=hub_base, method=summary.method, model_name=repo_id, evaluations=evaluations
        )
        if fixed != text:
            card.write_text(fixed)
    else:
        card.write_text(
            adapter_card(
                base_model=hub_base,
                method=summary.method,
                title=repo_id,
                metrics=_read_json(stage / "metrics.json"),
                recipe_yaml=_read_text(stage / "recipe.yaml"),
                curve_png="loss_curve.png" if (stage / "loss_curve.png").exists() else None,
                repo_id=repo_id,
                evaluations=evaluations,
            )
        )
    return stage


def _hub_base_model(folder: Path, recorded: str, override: str | None) -> str:
    """The base model as others can load it: ``override``, the recorded id, or the recipe's model."""
    if override:
        return override
    if recorded and not is_local_path(recorded) and not Path(recorded).exists():
        return recorded
    recipe_model = _recipe_model(folder)
    if recipe_model and not is_local_path(recipe_model) and not Path(recipe_model).exists():
        return recipe_model
    raise UserError(
        f"the adapter's base model '{recorded or '?'}' is a local path, not a Hub id: "
        "pass --base-model ORG/NAME (or set model.name in recipe.yaml)"
    )


def _recipe_model(folder: Path) -> str | None:
    from adapterhub import yamlio

    path = folder / "recipe.yaml"
    if not path.is_file():
        return None
    recipe = yamlio.load_file(path) or {}
    model = recipe.get("model") if isinstance(recipe, dict) else None
    return model.get("name") if isinstance(model, dict) else None


def _check_model_folder(folder: Path) -> None:
    weights = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
    if not (folder / "config.json").is_file() or not weights:
        raise UserError(
            f"{folder} is not a model folder (config.json and weights): save the merged model first"
        )


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _read_json(path: Path) -> dict | None:
    text = _read_text(path)
    return json.loads(text) if text else None


def _tag_commit(api: HfApi, repo_id: str, tag: str | None) -> str | None:
    if not tag:
        return None
    refs = api.list_repo_refs(repo_id)
    return next((ref.target_commit for ref in refs.tags if ref.name == tag), None)


def _remote_matches(api: HfApi, repo_id: str, revision: str, folder: Path, replaced: list[str]) -> bool:
    """Whether uploading ``folder`` to the repo at ``revision`` would change nothing.

    That is: the repo holds exactly the folder's (non-hidden) files, and no other file that the upload
    would delete (one matching ``replaced``).
    """
    from huggingface_hub.utils.sha import git_hash

    local = {
        path.relative_to(folder).as_posix(): path
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    }
    remote = {
        entry.path: entry
        for entry in api.list_repo_tree(repo_id, revision=revision, recursive=True)
        if hasattr(entry, "blob_id")
        and entry.path != ".gitattributes"
        and (entry.path in local or any(fnmatch.fnmatch(entry.path, pattern) for pattern in replaced))
    }
    if remote.keys() != local.keys():
        return False
    for name, path in local.items():
        data = path.read_bytes()
        entry = remote[name]
        if entry.lfs is not None:
            if hashlib.sha256(data).hexdigest() != entry.lfs.sha256:
                return False
        elif git_hash(data) != entry.blob_id:
            return False
    return True


def default_name(repo_id: str) -> str:
    return repo_id.rsplit("/", 1)[-1]


def pull(
    spec: str,
    *,
    name: str | None = None,
    subfolder: str | None = None,
    base_model: str | None = None,
    strict_base: bool = False,
    limits: PullLimits = DEFAULT_LIMITS,
    cancel: threading.Event | None = None,
) -> PullResult:
    """Download the adapter at ``REPO_ID[@REVISION]`` into the store, validated, under ``name``.

    Only the adapter files are fetched, into a temp folder that is renamed into the store once they have
    been validated, so a failure or interrupt leaves the store as it was. Pulling the revision the entry
    already holds is a no-op; a new revision replaces the entry only once it has fully succeeded.
    ``limits`` bound the bytes and the time the pull may take; setting ``cancel`` stops it. The store
    name is locked from the first check to the final rename: a second pull to it fails at once.
    """
    repo_id, ref = split_spec(spec)
    name = store.check_name(name or default_name(repo_id))
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    api = hub_api()
    with store.lock(name):
        with hub_errors(repo_id, ref):
            info = api.model_info(repo_id, revision=ref, files_metadata=True)
        held = store.read(name) if store.exists(name) else None
        if held is not None and (held.source, held.subfolder) != (repo_id, subfolder):
            raise UserError(
                f"store name '{name}' already holds {held.source_at_revision}: "
                f"pass --name to pull {repo_id} under another name, or `adapterhub rm {name}`"
            )
        if held is not None and held.revision == info.sha:
            if base_model:
                check_base_model(store.entry_path(name), base_model, strict=strict_base)
            return PullResult(name, store.entry_path(name), info.sha, True, held)
        sizes = {
            sibling.rfilename.removeprefix(prefix): sibling.size
            for sibling in info.siblings or []
            if sibling.rfilename.startswith(prefix)
        }
        wanted = {file_name: sizes[file_name] for file_name in ADAPTER_FILES if file_name in sizes}
        if CONFIG_FILE not in wanted:
            hint = "a full model, not an adapter" if "config.json" in sizes else "not a PEFT adapter"
            raise UserError(f"{repo_id}@{ref or 'main'} has no {prefix}{CONFIG_FILE}: it is {hint}")
        listed = None if None in wanted.values() else sum(wanted.values())
        where = f"{repo_id}@{ref or 'main'}"
        check_listing(where, listed, limits, store.root())
        budget = TransferBudget(where, listed, limits, cancel)
        entry = store.entry_path(name)
        with atomic_dir(entry, replace=True) as tmp:
            _download(api, repo_id, info.sha, prefix, wanted, tmp, budget)
            summary = inspect_adapter(tmp, label=where)
            if base_model:
                check_base_model(tmp, base_model, strict=strict_base)
            if is_local_path(summary.base_model):
                warn(f"{repo_id} names a local path as its base model ('{summary.base_model}')")
            manifest = store.write_manifest(
                tmp, summary, name=name, source=repo_id, revision=info.sha, ref=ref, subfolder=subfolder
            )
            budget.check()  # a cancel that came during validation still leaves the store as it was
    return PullResult(name, store.entry_path(name), info.sha, False, manifest)


def _download(
    api: HfApi,
    repo_id: str,
    commit: str,
    prefix: str,
    sizes: dict[str, int | None],
    into: Path,
    budget: TransferBudget,
) -> None:
    """Fetch ``sizes``' files of ``repo_id`` at ``commit`` flat into ``into``, with one rich progress bar."""
    scratch = into / ".download"
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    progress_bar = Progress(*columns, console=Console(stderr=True), transient=True)
    with progress_bar as progress, hub_errors(repo_id, commit):
        task = progress.add_task(f"pulling {repo_id}", total=sum(size or 0 for size in sizes.values()))
        for file_name in sizes:
            budget.check()
            path = hf_hub_download(
                repo_id,
                f"{prefix}{file_name}",
                revision=commit,
                local_dir=scratch,
                endpoint=api.endpoint,
                tqdm_class=_progress_bridge(progress, task, budget),
            )
            Path(path).rename(into / file_name)
    shutil.rmtree(scratch)


def _progress_bridge(progress: Progress, task: int, budget: TransferBudget) -> type[tqdm]:
    """A silent tqdm class that forwards huggingface_hub's byte counts to our rich progress bar and
    the pull's budget; huggingface_hub reports each chunk before writing it, so the budget's
    exception cuts the transfer there."""

    class Bridge(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n: float | None = 1) -> bool | None:
            progress.advance(task, n or 0)
            budget.take(n or 0)
            return None

    return Bridge
