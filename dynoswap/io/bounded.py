"""Bounded reading of untrusted documents: JSON and YAML with size, depth and expansion caps.

A file dynoswap did not write may be crafted to cost memory or time out of all
proportion to its size: gigabytes of JSON, nesting a hundred thousand levels deep,
a YAML alias bomb. Every reader of such a document goes through this module, which
refuses these before they are parsed or expanded, with one line naming the file and
what was too large. The caps are module constants (see the README's "What dynoswap
guarantees").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import DynoswapError

#: Largest JSON document (recipe.json, manifest.json, a run marker) read, in bytes.
MAX_JSON_BYTES = 1 << 20
#: Largest line of a training log (log.jsonl), in bytes.
MAX_LOG_LINE_BYTES = 1 << 20
#: Largest training log read, in bytes.
MAX_LOG_BYTES = 256 << 20
#: Deepest nesting of lists and mappings in any document.
MAX_DEPTH = 32
#: Largest YAML document (a --config preset), in bytes.
MAX_YAML_BYTES = 1 << 20
#: Most nodes a YAML document may stand for once every alias is expanded.
MAX_YAML_NODES = 100_000


def read_capped(path: str | os.PathLike[str], limit: int, error: type[DynoswapError], what: str = "file") -> bytes:
    """Read at most ``limit`` bytes of ``path``; a larger file is refused without reading it whole.

    Raises:
        error: The file is larger than ``limit`` or cannot be read (the message names it).
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise error(f"{path}: the {what} is larger than {limit} bytes, the most dynoswap reads; refusing it")
    return data


def depth(value: Any) -> int:
    """Return how deeply lists, tuples and mappings nest in ``value`` (iteratively: any depth is safe)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def check_depth(value: Any, where: str, error: type[DynoswapError], limit: int = MAX_DEPTH) -> Any:
    """Return ``value``, refusing it when it nests deeper than ``limit``."""
    if depth(value) > limit:
        raise error(f"{where}: nested deeper than {limit} levels; refusing it")
    return value


def loads_json(data: str | bytes, where: str, error: type[DynoswapError], limit: int = MAX_DEPTH) -> Any:
    """Parse a JSON document, refusing invalid JSON and nesting deeper than ``limit`` (one ``error`` line)."""
    try:
        value = json.loads(data)
    except RecursionError as exc:
        raise error(f"{where}: nested deeper than {limit} levels; refusing it") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{where}: not valid JSON ({exc})") from exc
    return check_depth(value, where, error, limit)


def read_json(path: str | os.PathLike[str], error: type[DynoswapError], limit: int = MAX_JSON_BYTES) -> Any:
    """Read a JSON file of at most ``limit`` bytes and :data:`MAX_DEPTH` levels."""
    return loads_json(read_capped(path, limit, error, "JSON document"), str(path), error)


# -- YAML -----------------------------------------------------------------------------
def _loader(where: str, error: type[DynoswapError]) -> Any:
    """Return a YAML safe loader class that counts nodes with aliases expanded and refuses deep nesting."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self._weight: dict[int, int] = {}
            self._level = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self._level += 1
            try:
                if self._level > MAX_DEPTH:
                    raise error(f"{where}: nested deeper than {MAX_DEPTH} levels; refusing it")
                node = super().compose_node(parent, index)
            finally:
                self._level -= 1
            weight = self._weight.get(id(node))
            if weight is None:
                weight = 1
                if isinstance(node, yaml.SequenceNode):
                    weight += sum(self._weight.get(id(child), 1) for child in node.value)
                elif isinstance(node, yaml.MappingNode):
                    weight += sum(self._weight.get(id(k), 1) + self._weight.get(id(v), 1) for k, v in node.value)
                self._weight[id(node)] = weight
            if weight > MAX_YAML_NODES:
                raise error(
                    f"{where}: stands for more than {MAX_YAML_NODES} values once its aliases are expanded "
                    "(an alias bomb?); refusing it"
                )
            return node

    return BoundedLoader


def loads_yaml(text: str, where: str, error: type[DynoswapError], *, syntax_errors: bool = True) -> Any:
    """Parse YAML with the safe loader, within :data:`MAX_YAML_NODES` expanded nodes and :data:`MAX_DEPTH` levels.

    Args:
        text: The document.
        where: Named in every message (a file, an option).
        error: Exception type raised.
        syntax_errors: Turn invalid YAML into ``error`` too (False: let ``yaml.YAMLError`` through).

    Raises:
        error: Too large, too deep, an alias expansion over the budget or (``syntax_errors``) invalid YAML.
    """
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise error(f"{where}: larger than {MAX_YAML_BYTES} bytes, the most dynoswap reads; refusing it")
    loader = _loader(where, error)(text)
    try:
        return loader.get_single_data()
    except RecursionError as exc:
        raise error(f"{where}: nested deeper than {MAX_DEPTH} levels; refusing it") from exc
    except yaml.YAMLError as exc:
        if not syntax_errors:
            raise
        raise error(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from exc
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike[str], error: type[DynoswapError]) -> Any:
    """Read a YAML file of at most :data:`MAX_YAML_BYTES` bytes through :func:`loads_yaml`."""
    data = read_capped(path, MAX_YAML_BYTES, error, "YAML document")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid YAML ({exc})") from exc
    return loads_yaml(text, str(Path(path)), error)
