"""`when:` conditions: CEL expressions over the request's claims, headers and time.

CEL (https://cel.dev) is evaluated by the `common-expression-language` package (a Rust
interpreter: no Python `eval`, linear-time `matches()`, ~8 microseconds per evaluation).

Cache safety by construction: at load time every condition is scanned for the headers and
claims it reads, which must be named literally (`headers["x-tenant"]`, `claims.scope`,
`"x-debug" in headers`). At evaluation the expression only *sees* those names, and the
decision cache key carries exactly their values (see `CompiledPolicy.cache_key_part`). An
expression that reads `headers` or `claims` any other way (`headers[k]`, `size(headers)`) is
rejected, so a cached decision can never depend on a value that is not in its key.

Variables (all documented in docs/policy.md):
  request.method, request.host, request.path   normalized, as the rules see them
  headers   map of the literally named request headers that are present (lowercase names)
  claims    map of the literally named JWT claims that are present ({} for mTLS callers)
  principal the caller's principal (SPIFFE ID, or JWT `sub`)
  issuer    the JWT issuer ("" for mTLS callers)
  source    "mtls", "xfcc" or "jwt"
  now       a UTC timestamp truncated to the minute (`now.getHours()`, `now.getDayOfWeek()`)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

VARIABLES = ("request", "headers", "claims", "principal", "issuer", "source", "now")
MAX_LENGTH = 4096
TIME_GRANULARITY = 60.0  # seconds; `now` and the cache key move in whole minutes
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")  # fixed, not author-supplied
_CLAIM_NAME = re.compile(r"^[A-Za-z0-9_.:/@$-]{1,256}$")  # fixed, not author-supplied
_BINDER = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_READS = ("headers", "claims")


class ConditionError(ValueError):
    """The expression cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class Condition:
    source: str
    program: Any  # cel.Program
    headers: tuple[str, ...]  # lowercase header names the expression reads
    claims: tuple[str, ...]  # top-level claim names the expression reads
    uses_time: bool

    def evaluate(self, variables: Mapping[str, object]) -> bool | str:
        """True/False, or an error message (the caller decides how an error counts)."""
        try:
            result = self.program.execute(dict(variables))
        except KeyError as exc:  # a header or claim the request does not carry
            return self._missing(exc.args[0] if exc.args else "")
        except Exception as exc:  # the CEL runtime raises several types; none may escape
            return f"{type(exc).__name__}: {exc}"
        if not isinstance(result, bool):
            return f"the expression returned {type(result).__name__}, not a bool"
        return result


    def _missing(self, key: object) -> str:
        """What an author reads for a KeyError: which input the request lacked."""
        name = str(key)
        if name.lower() in self.headers:
            return f"header {name.lower()} is missing"
        if name in self.claims:
            return f"claim {name} is missing"
        return f"{name!r} is missing from the request"


def compile_condition(text: str) -> Condition:
    """Parse and check a `when:` expression. Raises ConditionError."""
    if len(text) > MAX_LENGTH:
        raise ConditionError(f"longer than {MAX_LENGTH} characters")
    try:
        import cel  # noqa: PLC0415 - only policies with `when` need the CEL runtime
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConditionError(
            "'when' needs the CEL runtime: pip install common-expression-language"
        ) from None
    try:
        program = cel.compile(text)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConditionError(f"invalid CEL expression: {first}") from None
    tokens = _tokens(text)
    reads = _literal_reads(tokens)
    binders = set(_BINDER.findall(text))
    unknown = [v for v in program.variables() if v not in VARIABLES and v not in binders]
    if unknown:
        raise ConditionError(
            f"unknown variable {unknown[0]!r} (available: {', '.join(VARIABLES)})"
        )
    for name in reads["headers"]:
        if not _HEADER_NAME.match(name):
            raise ConditionError(f"header name {name!r} must be a lowercase HTTP header name")
    for name in reads["claims"]:
        if not _CLAIM_NAME.match(name):
            raise ConditionError(f"claim name {name!r} is not a valid claim name")
    return Condition(
        source=text,
        program=program,
        headers=tuple(sorted(set(reads["headers"]))),
        claims=tuple(sorted(set(reads["claims"]))),
        uses_time="now" in program.variables(),
    )


# --- a small CEL tokenizer, only to find which headers and claims are read ------------------

_Token = tuple[str, str]  # (kind, text): kind is "id", "str", "op"


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif ch in "\"'" or (ch in "rRbB" and i + 1 < n and text[i + 1] in "\"'"):
            raw = ch in "rR"
            if ch not in "\"'":
                i += 1
            value, i = _string(text, i, raw)
            out.append(("str", value))
        elif ch.isalpha() or ch == "_":
            start = i
            while i < n and (text[i].isalnum() or text[i] == "_"):
                i += 1
            out.append(("id", text[start:i]))
        elif ch.isdigit():
            while i < n and (text[i].isalnum() or text[i] == "."):
                i += 1
            out.append(("num", ""))
        else:
            out.append(("op", ch))
            i += 1
    return out


def _string(text: str, i: int, raw: bool) -> tuple[str, int]:
    quote = text[i : i + 3] if text[i : i + 3] in ('"""', "'''") else text[i]
    i += len(quote)
    chars: list[str] = []
    while i < len(text):
        if text.startswith(quote, i):
            return "".join(chars), i + len(quote)
        if text[i] == "\\" and not raw:
            # Escapes are only kept verbatim: a name spelled with escapes does not match the
            # name checks, so such a read is rejected rather than guessed at.
            chars.append(text[i : i + 2])
            i += 2
            continue
        chars.append(text[i])
        i += 1
    raise ConditionError("unterminated string literal")


def _literal_reads(tokens: list[_Token]) -> dict[str, list[str]]:
    reads: dict[str, list[str]] = {name: [] for name in _READS}
    for i, (kind, text) in enumerate(tokens):
        if kind != "id" or text not in _READS:
            continue
        if i > 0 and tokens[i - 1] == ("op", "."):
            continue  # a field named `headers` of something else (e.g. request.headers)
        nxt = tokens[i + 1 : i + 4]
        if len(nxt) >= 3 and nxt[0] == ("op", "[") and nxt[1][0] == "str" and nxt[2] == ("op", "]"):
            reads[text].append(nxt[1][1])
            continue
        if (len(nxt) >= 2 and nxt[0] == ("op", ".") and nxt[1][0] == "id"
                and (len(nxt) < 3 or nxt[2] != ("op", "("))):
            reads[text].append(nxt[1][1])
            continue
        if i >= 2 and tokens[i - 1] == ("id", "in") and tokens[i - 2][0] == "str":
            reads[text].append(tokens[i - 2][1])
            continue
        raise ConditionError(
            f"{text} may only be read by a literal name, e.g. {text}[\"name\"] or "
            f"\"name\" in {text} (so that cached decisions are keyed on every value read)"
        )
    return reads
