"""Hub model cards for adapters: a README.md with the YAML front matter the Hugging Face Hub indexes."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from adapterhub import yamlio
from adapterhub.errors import UserError

LM_EVAL = ("lm-evaluation-harness", "https://github.com/EleutherAI/lm-evaluation-harness")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n?", re.S)


def is_hub_id(name: str) -> bool:
    """``org/model`` or ``model``: what the Hub takes as a ``base_model``; not a path or ``builtin:`` name."""
    return bool(HUB_ID.match(name)) and ".." not in name


def adapter_card(
    *,
    base_model: str,
    method: str,
    title: str,
    metrics: dict | None = None,
    recipe_yaml: str | None = None,
    curve_png: str | None = None,
    extra_tags: Sequence[str] = (),
    repo_id: str | None = None,
    evaluations: Sequence[dict] = (),
) -> str:
    """The README.md of an adapter repo: metadata for the Hub, then how to use it, its metrics and recipe.

    ``curve_png`` is the file name of a loss curve stored beside the card; ``repo_id``, when known, adds
    how to pull the adapter. A base model that is not a Hub id (a ``builtin:`` tiny model) is named in
    the text but left out of the metadata, which the Hub would reject. ``evaluations`` (the records of
    ``adapterhub eval``) become the Hub's ``model-index`` and a table.
    """
    index = model_index(repo_id or title, evaluations)
    sections = [
        _front_matter(_hub_metadata({}, base_model, method, extra_tags, index)),
        f"# {title}",
        f"A **{method}** adapter for `{base_model}`, trained and shared with "
        "[adapterhub](https://github.com/adapterhub/adapterhub).",
    ]
    if repo_id:
        sections.append(
            f"## Usage\n\n```bash\nadapterhub pull {repo_id}\n```\n\nor with PEFT:\n\n```python\n"
            f'from peft import PeftModel\n\nmodel = PeftModel.from_pretrained(base, "{repo_id}")\n```'
        )
    if metrics:
        rows = "\n".join(f"| {key} | {_format_metric(value)} |" for key, value in metrics.items())
        sections.append(f"## Metrics\n\n| metric | value |\n|---|---|\n{rows}")
    if evaluations:
        sections.append(_evaluation_table(evaluations))
    if curve_png:
        sections.append(f"## Training loss\n\n![training loss]({curve_png})")
    if recipe_yaml:
        sections.append(f"## Recipe\n\n```yaml\n{recipe_yaml.strip()}\n```")
    return "\n\n".join(sections) + "\n"


def with_hub_metadata(
    card: str, *, base_model: str, method: str, model_name: str = "", evaluations: Sequence[dict] = ()
) -> str:
    """``card`` with the metadata the Hub needs for an adapter (base model, library, method tag) put right,
    and ``evaluations`` as its ``model-index`` (named ``model_name``) when there are any.

    The text is returned unchanged when nothing is missing; PEFT's own card, for one, records the local
    path the adapter was trained from as ``base_model``.
    """
    match = FRONT_MATTER.match(card)
    metadata = (
        yamlio.loads(match.group(1), "README.md metadata (between the --- lines)") if match else None
    ) or {}
    if not isinstance(metadata, dict):
        raise UserError("README.md metadata (between the --- lines) must be a YAML mapping of key: value")
    fixed = _hub_metadata(metadata, base_model, method, (), model_index(model_name, evaluations))
    if fixed == metadata:
        return card
    body = card[match.end() :] if match else card
    return f"{_front_matter(fixed)}\n{body.lstrip(chr(10))}"


def model_index(name: str, evaluations: Sequence[dict]) -> list[dict]:
    """The Hub's ``model-index`` for ``adapterhub eval`` records (``eval/<task>.json``): one result per
    task, its lm-eval metrics as the values; empty without records."""
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index

    results = []
    for record in evaluations:
        dataset = record.get("dataset") or {}
        shots = record.get("num_fewshot")
        for metric, score in record["metrics"].items():
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=record["task"],
                    dataset_type=dataset.get("path") or record["task"],
                    dataset_name=record["task"],
                    dataset_config=dataset.get("name"),
                    dataset_split=dataset.get("split"),
                    dataset_args=None if shots is None else {"num_few_shot": shots},
                    metric_type=metric.split(",")[0],
                    metric_name=metric,
                    metric_value=score["value"],
                    source_name=LM_EVAL[0],
                    source_url=LM_EVAL[1],
                )
            )
    return eval_results_to_model_index(name, results) if results else []


def _evaluation_table(evaluations: Sequence[dict]) -> str:
    rows = []
    for record in evaluations:
        shots = record.get("num_fewshot")
        for metric, score in record["metrics"].items():
            stderr = score.get("stderr")
            value = _format_metric(score["value"]) + (f" ± {stderr:.4g}" if stderr is not None else "")
            rows.append(f"| {record['task']} | {shots if shots is not None else '-'} | {metric} | {value} |")
    header = "| task | shots | metric | value |\n|---|---|---|---|"
    return (
        "## Evaluation\n\n[lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness) "
        f"through `adapterhub eval`:\n\n{header}\n" + "\n".join(rows)
    )


def _hub_metadata(
    metadata: dict, base_model: str, method: str, extra_tags: Sequence[str], index: list[dict]
) -> dict:
    fixed = {key: value for key, value in metadata.items() if key != "base_model"}
    if is_hub_id(base_model):
        fixed = {"base_model": base_model, **fixed}
    # PEFT tags its cards base_model:adapter:<base>, which goes stale when the base is renamed.
    tags = [
        tag
        for tag in metadata.get("tags") or []
        if not str(tag).startswith("base_model:") or str(tag).endswith(f":{base_model}")
    ]
    fixed["library_name"] = "peft"
    fixed["tags"] = list(dict.fromkeys([*tags, method, "adapterhub", "peft", *extra_tags]))
    if index:  # results of this adapter's evaluations replace any older index; none keep it
        fixed["model-index"] = index
    return fixed


def _front_matter(metadata: dict) -> str:
    return f"---\n{yamlio.dumps(metadata).strip()}\n---"


def _format_metric(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)}`"
    return str(value)
