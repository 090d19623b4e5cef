"""The one place adapterhub reads (and writes) YAML: recipes, overrides, an adapter's recipe.yaml, cards.

Two things differ from ``yaml.safe_load``:

- Floats follow YAML 1.2: ``5e-3``, ``1e-4`` and ``2E-5`` are numbers (YAML 1.1, which PyYAML implements,
  reads them as strings because they lack a dot). Writing uses the same rule, so a string that looks like
  such a number is quoted and reads back as a string.
- Anchors and aliases are bounded. An alias is a reference, so a few lines of nested aliases (a
  "billion laughs" document) stand for billions of nodes; anything that later walks the data (a schema
  check, a dump) would expand them. A document with more than ``MAX_ALIASES`` aliases, or one that
  stands for more than ``MAX_NODES`` nodes once expanded, is refused before it is turned into Python data.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from adapterhub.errors import UserError

MAX_ALIASES = 100
MAX_NODES = 100_000  # a recipe has a few hundred; a large model card's metadata a few thousand

# The YAML 1.2 core schema's float, minus what YAML 1.1 already reads: a number with an exponent and no dot.
_FLOAT_1_2 = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$")


class _TooLarge(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` with YAML 1.2 floats that counts aliases as it composes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise _TooLarge(f"more than {MAX_ALIASES} aliases (*name)")
        return super().compose_node(parent, index)


class _Dumper(yaml.SafeDumper):
    """``SafeDumper`` that quotes strings the loader would read as YAML 1.2 floats."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+.0123456789"))


def loads(text: str, source: str) -> Any:
    """Parse one YAML document; any problem is a ``UserError`` that names ``source``."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node)
        return loader.construct_document(node)
    except _TooLarge as err:
        raise UserError(
            f"{source}: refused: the YAML has {err}; write the values out instead of nesting anchors"
        ) from err
    except RecursionError as err:
        raise UserError(f"{source}: refused: the YAML is nested too deeply") from err
    except yaml.YAMLError as err:
        raise UserError(f"{source}: not valid YAML: {_first_line(err)}") from err
    finally:
        loader.dispose()


def load_file(path: Path) -> Any:
    """``loads`` of a file's text; a file that can't be read is a ``UserError`` too."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({err.__class__.__name__}: {err})") from err
    return loads(text, str(path))


def dumps(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the nodes ``root`` stands for with every alias expanded, stopping past ``MAX_NODES``.

    Each distinct node is visited once (sizes are memoised), so this costs as much as the text, not the
    expansion. A node that contains itself (``&a [*a]``) is refused too: it expands forever.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise _TooLarge("an anchor that contains itself")
        on_path.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        on_path.discard(key)
        if total > MAX_NODES:
            raise _TooLarge(f"more than {MAX_NODES:,} values once its aliases are expanded")
        sizes[key] = total
        return total

    size(root)


def _first_line(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(err).splitlines()[0] if str(err) else type(err).__name__
