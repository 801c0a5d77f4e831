"""Read Envoy config documents into the typed classes of `envoy-data-plane`, the way Envoy does.

Envoy's own loader is more forgiving than a strict protobuf JSON parser, and operators rely on
that: enum names in any case (`codec_type: auto`, `lb_policy: round_robin`), enums as numbers or
numeric strings, `'true'` for a bool, camelCase JSON names, `TypedStruct`-wrapped extensions,
and (older Envoys) `typed_config: {}`. betterproto2's `from_dict` refuses all of those, so the
document is first walked along the message schema (`_conform`) and rewritten into the one
spelling betterproto2 reads. The same walk is the place to say precisely which field is wrong:
an error names its JSONPath, so a user never has to guess from a library message.

betterproto2 unpacks a `google.protobuf.Any` only when its message class is registered, which
happens when the module is imported; so each `@type` is resolved to its module and imported. A
type the library does not know (a contrib or private extension) is swapped for a marker, so
the rest of the config still parses, and the analysis reports it where it matters. A field the
library does not know is dropped and reported (`config.unknown_field`).
"""

from __future__ import annotations

import contextlib
import importlib
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import betterproto2  # envoy-data-plane's runtime: importing the doctor needs the [envoy] extra
import pydantic_core

_PKG = "envoy_data_plane"
_URL_PREFIX = "type.googleapis.com/"
_TYPED_STRUCTS = ("xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct")
_UNKNOWN_MARK = "extauthz-doctor-unknown-type:"
_STRING_VALUE = _URL_PREFIX + "google.protobuf.StringValue"
_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


class DoctorError(ValueError):
    """The input is not an Envoy config the doctor can read (the message names the field)."""


@dataclass(slots=True)
class ParseNotes:
    """What the reader skipped: (JSONPath, what) for unknown fields; kept for the findings."""

    unknown_fields: list[tuple[str, str]] = field(default_factory=list)


def message_name(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


def _import(module: str) -> Any:
    """Import a generated module quietly: envoy-data-plane's classes trip pydantic's
    deprecation warnings at import time, which are no concern of an operator (or a test run
    with warnings as errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module)


def _pool() -> Any:
    return _import(f"{_PKG}.message_pool").default_message_pool


def message_class(type_url: str) -> Any:
    """The registered class for `type_url` (importing its module), or None."""
    pool = _pool()
    url = _URL_PREFIX + message_name(type_url)
    if url in pool.url_to_type:
        return pool.url_to_type[url]
    name = message_name(type_url)
    if not _SAFE_NAME.match(name):
        return None
    try:
        _import(f"{_PKG}.{name.rsplit('.', 1)[0]}")
    except ImportError:
        return None
    return pool.url_to_type.get(url)


def _snake(key: str) -> str:
    return _CAMEL.sub(lambda m: "_" + m.group(1).lower(), key)


def _is_wkt(cls: Any) -> bool:
    """google.protobuf types with their own JSON form (Duration, Struct, wrappers...)."""
    return str(getattr(cls, "__module__", "")).endswith("google.protobuf")


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


@dataclass(slots=True)
class _Conformer:
    notes: ParseNotes

    def message(self, cls: Any, node: object, path: str) -> object:
        if _is_wkt(cls):
            return node  # their own from_dict reads strings, numbers and bools
        if not isinstance(node, Mapping):
            raise DoctorError(f"{path}: expected {cls.__name__} (a mapping), got {_kind(node)}")
        meta_by_name = cls._betterproto.meta_by_field_name
        cls_by_field = cls._betterproto.cls_by_field
        out: dict[str, object] = {}
        for key, value in node.items():
            name = _snake(str(key))
            fpath = f"{path}.{name}"
            if name not in meta_by_name:
                self.notes.unknown_fields.append((fpath, f"{cls.__name__} has no field {key!r}"))
                continue
            if value is None:
                continue  # YAML null: the field is unset, as for Envoy
            meta = meta_by_name[name]
            fcls = cls_by_field[name]
            if meta.proto_type == "map":
                if not isinstance(value, Mapping):
                    raise DoctorError(f"{fpath}: expected a mapping, got {_kind(value)}")
                vcls = cls_by_field.get(f"{name}.value")
                vmeta = meta.map_meta[1]
                conv = {
                    str(k): self.value(vmeta, vcls, v, f'{fpath}["{k}"]') for k, v in value.items()
                }
                out[name] = {k: v for k, v in conv.items() if v is not _DROP}
            elif meta.repeated:
                items = value if isinstance(value, list) else None
                if items is None:
                    raise DoctorError(f"{fpath}: expected a list, got {_kind(value)}")
                conv_list = [self.value(meta, fcls, v, f"{fpath}[{i}]")
                             for i, v in enumerate(items)]
                out[name] = [v for v in conv_list if v is not _DROP]
            else:
                converted = self.value(meta, fcls, value, fpath)
                if converted is not _DROP:
                    out[name] = converted
        return out

    def value(self, meta: Any, cls: Any, value: object, path: str) -> object:
        kind = meta.proto_type
        if kind == "message":
            if meta.unwrap is not None:
                return self.wrapped(cls, value, path)
            if getattr(cls, "__name__", "") == "Any" and _is_wkt(cls):
                return self.any(value, path)
            return self.message(cls, value, path)
        if kind == "enum":
            return self.enum(cls, value, path)
        if kind == "bool":
            return _boolean(value, path)
        if kind in ("int32", "int64", "uint32", "uint64", "sint32", "sint64", "fixed32",
                    "fixed64", "sfixed32", "sfixed64"):
            return _integer(value, path)
        if kind == "string" and not isinstance(value, str):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise DoctorError(f"{path}: expected a string, got {_kind(value)}")
            return str(value)
        return value

    def wrapped(self, cls: Any, value: object, path: str) -> object:
        """BoolValue/UInt32Value/Duration...: JSON gives the bare value."""
        if cls is bool:
            return _boolean(value, path)
        if cls is int:
            return _integer(value, path)
        return value

    def enum(self, cls: Any, value: object, path: str) -> object:
        names: dict[str, int] = {m.name.upper(): int(m.value) for m in cls if m.name}
        renamed = cls.betterproto_renamed_proto_names_to_value()
        names.update({str(k).upper(): int(v) for k, v in renamed.items()})
        if isinstance(value, bool):
            raise DoctorError(f"{path}: expected a {cls.__name__} name, got a boolean")
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, int):
            if value not in {int(m.value) for m in cls}:
                raise DoctorError(f"{path}: {value} is not a {cls.__name__} value")
            return value
        if isinstance(value, str) and value.upper() in names:
            return names[value.upper()]
        allowed = ", ".join(sorted(n for n in names if n))
        raise DoctorError(f"{path}: unknown value {value!r} (one of {allowed})")

    def any(self, value: object, path: str) -> object:
        if not isinstance(value, Mapping):
            raise DoctorError(f"{path}: expected a typed config with '@type', got {_kind(value)}")
        if not value:
            return _DROP  # `typed_config: {}`: older Envoys read it as "no config"
        out = {str(k): v for k, v in value.items()}
        url = out.get("@type")
        if not isinstance(url, str) or not url:
            raise DoctorError(f"{path}: a typed config needs an '@type'")
        if message_name(url) in _TYPED_STRUCTS:
            inner = out.get("type_url", out.get("typeUrl"))
            body = out.get("value") or {}
            if isinstance(inner, str) and isinstance(body, Mapping):
                out = {"@type": inner, **{str(k): v for k, v in body.items()}}
                url = inner
        cls = message_class(url)
        if cls is None:
            return {"@type": _STRING_VALUE, "value": _UNKNOWN_MARK + url}
        body_in = {k: v for k, v in out.items() if k != "@type"}
        canonical = _URL_PREFIX + message_name(url)
        if _is_wkt(cls):
            return {"@type": canonical, **body_in}
        conformed = self.message(cls, body_in, path)
        assert isinstance(conformed, dict)
        return {"@type": canonical, **conformed}


_DROP = object()


def _boolean(value: object, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DoctorError(f"{path}: expected true or false, got {value!r}")


def _integer(value: object, path: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise DoctorError(f"{path}: expected an integer, got {value!r}")


_VALIDATORS: dict[type, Any] = {}


@contextlib.contextmanager
def _reused_validators() -> Iterator[None]:
    """betterproto2 validates each message with pydantic on every pack and unpack, building a
    new `SchemaValidator` from the class's schema each time: most of the doctor's run time on
    a large config (13 s for 2,000 routes). Within the doctor's own parse/unpack calls the
    validator of each class is built once and reused; the checks made are the same."""
    original = betterproto2.Message._validate

    def validate(self: Any) -> None:
        kind = type(self)
        validator = _VALIDATORS.get(kind)
        if validator is None:
            validator = pydantic_core.SchemaValidator(kind.__pydantic_core_schema__)
            _VALIDATORS[kind] = validator
        values = self.__dict__.copy()
        del values["_unknown_fields"]
        validator.validate_python(values)

    betterproto2.Message._validate = validate  # type: ignore[method-assign]
    try:
        yield
    finally:
        betterproto2.Message._validate = original  # type: ignore[method-assign]


def parse_message(cls: Any, raw: object, path: str, notes: ParseNotes) -> Any:
    """`raw` (plain YAML/JSON data) as a typed `cls`, or DoctorError naming the bad field."""
    conformed = _Conformer(notes).message(cls, raw, path)
    with warnings.catch_warnings(), _reused_validators():
        warnings.simplefilter("ignore")  # deprecated fields warn on construction
        try:
            return cls.from_dict(conformed)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise DoctorError(
                f"{path}: not a valid {cls.__name__}: {message} "
                "(`envoy --mode validate -c FILE` shows where)"
            ) from None


def api_class(module: str, name: str) -> Any:
    return getattr(_import(f"{_PKG}.{module}"), name)


def type_of(any_msg: Any) -> str:
    """The message name inside an Any (the original one for types the library lacks)."""
    if any_msg is None:
        return ""
    url = str(any_msg.type_url)
    if url == _STRING_VALUE:
        inner = _unpack_raw(any_msg)
        if inner is not None and str(inner.value).startswith(_UNKNOWN_MARK):
            return message_name(str(inner.value)[len(_UNKNOWN_MARK) :])
    return message_name(url)


def _unpack_raw(any_msg: Any) -> Any:
    with warnings.catch_warnings(), _reused_validators():
        warnings.simplefilter("ignore")
        return any_msg.unpack()


def unpack(any_msg: Any) -> Any:
    """The typed message inside an Any, or None when it is absent or of an unknown type."""
    if any_msg is None or not any_msg.type_url:
        return None
    msg = _unpack_raw(any_msg)
    if str(any_msg.type_url) == _STRING_VALUE and str(msg.value).startswith(_UNKNOWN_MARK):
        return None
    return msg
