"""Reading a policy file: YAML with the line of every key, and a field-path-aware walker.

Every error a policy author can make is reported as `file: field.path: message (line N)`.
`load_yaml` records where each mapping and key was written; `Reader` walks one mapping and
turns a bad value into a `PolicyError` naming the file, the field path and that line. The
document parser, connection rules and the `extauthz test` case files all read through it, so
they report errors the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml


class PolicyError(ValueError):
    """A policy that cannot be loaded; names the file, the field and (when known) the line."""

    def __init__(self, source: str, field_path: str, message: str, line: int | None = None):
        self.source = source
        self.field_path = field_path
        self.message = message
        self.line = line
        if field_path:
            text = f"{source}: {field_path}: {message}"
            if line is not None:
                text += f" (line {line})"
        else:
            text = f"{source}:{line}: {message}" if line is not None else f"{source}: {message}"
        super().__init__(text)

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source



# --- YAML with line numbers ------------------------------------------------------------------


class LineMap(dict[str, Any]):
    """A YAML mapping that remembers where it and each of its keys were written."""

    line: int | None = None
    key_lines: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.key_lines = {}


# libyaml's parser (CSafeLoader) is ~10x faster on a 10,000-rule policy; the constructors,
# and so the safety of what is built, are the same Python SafeConstructor either way.
_SafeBase: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LineLoader(_SafeBase):  # type: ignore[misc]
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineMap:
    loader.flatten_mapping(node)
    result = LineMap()
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool) or key is None:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be strings", key_node.start_mark
            )
        key = str(key)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: bytes | str, source: str) -> object:
    """Parse one YAML document; mappings come back as `LineMap`. Raises PolicyError."""
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", exc)
        raise PolicyError(source, "", f"invalid YAML: {problem}", line) from None
    except UnicodeDecodeError:
        raise PolicyError(source, "", "file is not UTF-8 text") from None


def line_of(data: object, key: str | None = None) -> int | None:
    if not isinstance(data, LineMap):
        return None
    if key is not None and key in data.key_lines:
        return data.key_lines[key]
    return data.line


@dataclass(slots=True)
class Reader:
    """Walks one mapping, remembering the field path (and lines) for error messages."""

    source: str
    path: str
    data: Mapping[str, object]
    line: int | None = None
    lines: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, source: str, path: str, data: Mapping[str, object]) -> Reader:
        if isinstance(data, LineMap):
            return cls(source, path, data, data.line, data.key_lines)
        return cls(source, path, data)

    def error(self, key: str, message: str) -> PolicyError:
        where = f"{self.path}.{key}" if self.path else key
        return PolicyError(self.source, where, message, self.lines.get(key, self.line))

    def reject_unknown(self, allowed: set[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.error(str(key), f"unknown field (allowed: {', '.join(sorted(allowed))})")

    def string(self, key: str, *, required: bool = True, default: str = "") -> str:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "is required")
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, "must be a non-empty string")
        return value

    def string_list(
        self, key: str, *, required: bool = False, list_only: bool = False
    ) -> tuple[str, ...]:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "is required")
            return ()
        if isinstance(value, str):
            if list_only:  # who may call is never a bare word: `allow: checkout` is a typo
                raise self.error(key, f"must be a list: write [{value}]")
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, "must be a list of non-empty strings")
        return tuple(value)

    def child(self, key: str, value: object, index: int | None = None) -> Reader:
        where = f"{self.path}.{key}" if self.path else key
        if index is not None:
            where = f"{where}[{index}]"
        if not isinstance(value, Mapping):
            line = self.lines.get(key, self.line)
            raise PolicyError(self.source, where, "must be a mapping", line)
        reader = Reader.of(self.source, where, value)
        if reader.line is None:
            reader.line = self.lines.get(key, self.line)
        return reader

