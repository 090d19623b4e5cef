"""Hub model cards for adapters: a README.md with the YAML front matter the Hugging Face Hub indexes."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import yaml

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


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
) -> str:
    """The README.md of an adapter repo: metadata for the Hub, then how to use it, its metrics and recipe.

    ``curve_png`` is the file name of a loss curve stored beside the card; ``repo_id``, when known, adds
    how to pull the adapter. A base model that is not a
    Hub id (a ``builtin:`` tiny model) is named in the text but left out of the metadata, which the Hub
    would reject.
    """
    tags = list(dict.fromkeys([method, "adapterhub", "peft", *extra_tags]))
    metadata: dict = {"library_name": "peft", "tags": tags}
    if is_hub_id(base_model):
        metadata = {"base_model": base_model, **metadata}
    front_matter = yaml.safe_dump(metadata, sort_keys=False).strip()
    sections = [
        f"---\n{front_matter}\n---",
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
    if curve_png:
        sections.append(f"## Training loss\n\n![training loss]({curve_png})")
    if recipe_yaml:
        sections.append(f"## Recipe\n\n```yaml\n{recipe_yaml.strip()}\n```")
    return "\n\n".join(sections) + "\n"


def _format_metric(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)}`"
    return str(value)
