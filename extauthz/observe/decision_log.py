"""The decision log: one JSON line per decision, versioned schema, never a credential.

Schema: `docs/decision-log.schema.json`, version 1.2. `schema_version` in every line is the
*major* version (1): it changes only when a field is removed, renamed or retyped. A minor
version only appends fields (1.1: `route`, `presented_principal`, `allow_rule`, `subject`,
`peer`, `notes`; `identity_source` also names the failed credential's source on a 401;
1.2: `condition`, with the reason `condition_not_met`);
readers of major 1 ignore fields they do not know, and a 1.0 line still validates against the
1.1 schema.

Cost on the check path is an append of references to a bounded deque (about a microsecond);
a writer thread formats and writes the lines, flushing every `flush_interval` seconds (or
sooner when many are waiting). When the queue is full a line is dropped and counted
(`dropped`, exported as a metric), the check is never delayed. Allowed decisions can be
sampled (`sample_allowed`); denials and dry-run "would deny" decisions are always logged.

Destinations: `stdout`, `none`, or a file path (opened for append). Rotation: the writer
checks the path about once a second and reopens it when the file was renamed or removed
(logrotate `create`, or any rename-and-create tool; its `postrotate` SIGHUP is not needed);
`copytruncate` also works since writes are appends.

Safety: only the fields below are written, no header, token, query string or certificate;
every value is truncated and control/non-ASCII characters escaped (`clean`), and the line is
JSON-encoded with `ensure_ascii`, so no value (a 10 KB subject, CRLF, NUL) can split a line.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from extauthz.decide.pipeline import CheckResult
from extauthz.identity.resolver import NOTES_CLAIM
from extauthz.memo import Memo
from extauthz.model import Decision, Identity, IdentitySource, Reason, Request

log = logging.getLogger("extauthz.decision_log")

SCHEMA_VERSION = 1  # major: written in every line
SCHEMA_MINOR = 2  # fields added compatibly since 1.0 (documented in the schema, not per line)
# The context_extensions key under which Envoy's route names itself (envoy_config.py sets it).
ROUTE_KEY = "route"
# 401 reasons for which the identity that was presented is logged (it was verified, then
# refused): the access review needs to know *who* presented a revoked or foreign identity.
PRESENTED_REASONS = frozenset((Reason.REVOKED, Reason.UNTRUSTED_TRUST_DOMAIN))
DEFAULT_LIMIT = 256
TRUNCATED = "..."


def clean(value: str, limit: int = DEFAULT_LIMIT) -> str:
    """`value` made safe for any output: at most `limit` characters (`...` marks a cut) and
    every control or non-ASCII character shown as a Python-style escape (`\\r`, `\\x00`).

    Ordinary values (printable ASCII, short) are returned as they are, at the cost of three
    C-level checks.
    """
    if len(value) <= limit and value.isascii() and value.isprintable():
        return value
    if len(value) > limit * 4:
        value = value[: limit * 4]  # bound the escaping work for huge inputs
    if not (value.isascii() and value.isprintable()):
        value = value.encode("unicode_escape").decode("ascii")
    if len(value) > limit:
        value = value[: max(0, limit - len(TRUNCATED))] + TRUNCATED
    return value


def safe_path(request: Request, result: CheckResult) -> str:
    """The path as the policy saw it (normalized by the check, never again here), never with
    its query or fragment; the raw path without them when it did not normalize."""
    path = result.path
    if path is None:
        path = request.path.split("?", 1)[0].split("#", 1)[0]
    return clean(path, 1024)


def safe_host(request: Request, result: CheckResult) -> str:
    """The host as the policy saw it (lowercase, no port); the raw one when malformed."""
    host = result.host
    return clean(host if host is not None else request.host, 255)


def _time(ts: float) -> str:
    """RFC 3339 UTC with microseconds (formatted in the writer thread, off the check path)."""
    sec = int(ts)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(sec))}.{int((ts - sec) * 1e6):06d}Z"


def token_lifetime(identity: Identity | None) -> int | None:
    """A JWT's `exp - iat` in seconds (what `extauthz review --max-token-lifetime` checks)."""
    if identity is None or identity.source is not IdentitySource.JWT:
        return None
    exp, iat = identity.claims.get("exp"), identity.claims.get("iat")
    if type(exp) in (int, float) and type(iat) in (int, float):
        return max(0, int(exp - iat))  # type: ignore[operator]
    return None


def route_of(request: Request | None) -> str | None:
    """Envoy's route name, from the check's `context_extensions` (None when not set)."""
    if request is None:
        return None
    extensions = request.context_extensions
    route = extensions.get(ROUTE_KEY) if extensions else None
    return clean(route) if route else None


def presented_of(decision: Decision) -> str | None:
    """For a 401 `revoked` / `untrusted_trust_domain`: the identity that was presented.

    Read with getattr: `Decision.presented_principal` is carried by the pipeline (model.py);
    until it is, this is None."""
    if decision.reason not in PRESENTED_REASONS:
        return None
    presented = getattr(decision, "presented_principal", "")
    return clean(presented, 512) if presented else None


def allow_rule_of(decision: Decision) -> str | None:
    """For a dry-run decision: the enforced rule that actually allowed the request (the
    `rule` field names the dry-run rule that would deny). None when there is none."""
    if not decision.dry_run:
        return None
    rule = getattr(decision, "allow_rule", "")
    return clean(rule) if rule else None


def notes_of(result: CheckResult) -> list[str] | None:
    """What identity resolution noted for this request (e.g. an XFCC header ignored because
    the peer is not a trusted proxy): the decision says so."""
    identity = result.identity or result.decision.identity
    notes = identity.claims.get(NOTES_CLAIM) if identity is not None else None
    if not notes or not isinstance(notes, tuple | list):
        return None
    return [clean(str(n), 256) for n in notes[:4]]


def condition_of(decision: Decision) -> str | None:
    """For `condition_not_met`: which condition of the named rule failed (the pipeline's
    detail, which names headers and expressions but never a header's value)."""
    if decision.reason is not Reason.CONDITION_NOT_MET or not decision.detail:
        return None
    return clean(decision.detail, 512)


def source_of(decision: Decision) -> str | None:
    """mtls / xfcc / jwt: of the verified identity, or of the credential that failed (401)."""
    if decision.identity is not None:
        return decision.identity.source.value
    failed = getattr(decision, "failure_source", None)
    return failed.value if failed is not None else None


def peer_of(request: Request | None, decision: Decision) -> str | None:
    """The mTLS peer when it is not itself the principal (a proxy forwarding XFCC, a workload
    forwarding a JWT-SVID): who made the hop."""
    if request is None or not request.source_principal:
        return None
    if decision.identity is not None and decision.identity.principal == request.source_principal:
        return None
    return clean(request.source_principal, 512)


def record(
    ts: float,
    request: Request | None,
    result: CheckResult,
    seconds: float,
    *,
    trace_id: str = "",
    span_id: str = "",
) -> dict[str, Any]:
    """The decision-log entry for one check (a dict in schema order)."""
    decision = result.decision
    identity = decision.identity
    http = request is not None and request.is_http
    return {
        "schema_version": SCHEMA_VERSION,
        "time": _time(ts),
        "trace_id": trace_id or None,
        "span_id": span_id or None,
        "principal": clean(identity.principal, 512) if identity else None,
        "identity_source": source_of(decision),
        "trust_domain": clean(identity.trust_domain) if identity and identity.trust_domain
        else None,
        "issuer": clean(identity.issuer, 512) if identity and identity.issuer else None,
        "method": clean(request.method, 32) if request is not None and http else None,
        "host": safe_host(request, result) if request is not None and http else None,
        "path": safe_path(request, result) if request is not None and http else None,
        "decision": "allow" if decision.allowed else "deny",
        "status": decision.outcome.http_status,
        "reason": decision.reason.value,
        "rule": clean(decision.rule) if decision.rule else None,
        "policy_version": clean(decision.policy_version, 64) if decision.policy_version
        else None,
        "cache_hit": result.cache_hit,
        "dry_run": decision.dry_run,
        "ratelimit_remaining": result.limit.remaining if result.limit is not None else None,
        "latency_us": max(0, round(seconds * 1e6)),
        "token_lifetime_s": token_lifetime(identity),
        # 1.1
        "route": route_of(request),
        "presented_principal": presented_of(decision),
        "allow_rule": allow_rule_of(decision),
        "subject": clean(identity.subject, 512) if identity and identity.subject else None,
        "peer": peer_of(request, decision),
        "notes": notes_of(result),
        # 1.2
        "condition": condition_of(decision),
    }


_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii


def format_line(entry: dict[str, Any]) -> bytes:
    return (_ENCODER.encode(entry) + "\n").encode("ascii")


def _str(value: str | None) -> str:
    return "null" if value is None else _quote(value)


# (time, request, result, seconds, trace_id, span_id): what the check path queues.
_Item = tuple[float, Request | None, CheckResult, float, str, str]


# A decision's own fields (everything that depends on the Decision and its Identity alone),
# rendered once. A cache hit returns the very Decision object it stored, so on the hot path the
# writer thread formats only the request's and the moment's fields.
_Fragments = tuple[str, str, str, str]
FRAGMENT_MEMO_SIZE = 4096


def _fragments(d: Decision) -> _Fragments:
    i = d.identity
    who = "".join((
        ',"principal":', _str(clean(i.principal, 512) if i else None),
        ',"identity_source":', _str(source_of(d)),
        ',"trust_domain":', _str(clean(i.trust_domain) if i and i.trust_domain else None),
        ',"issuer":', _str(clean(i.issuer, 512) if i and i.issuer else None),
    ))
    what = "".join((
        ',"decision":', '"allow"' if d.allowed else '"deny"',
        ',"status":', str(d.outcome.http_status),
        ',"reason":', _quote(d.reason.value),
        ',"rule":', _str(clean(d.rule) if d.rule else None),
        ',"policy_version":', _str(clean(d.policy_version, 64) if d.policy_version else None),
    ))
    why = "".join((
        ',"presented_principal":', _str(presented_of(d)),
        ',"allow_rule":', _str(allow_rule_of(d)),
        ',"subject":', _str(clean(i.subject, 512) if i and i.subject else None),
    ))
    return who, what, why, _str(condition_of(d))


FragmentMemo = Memo[int, tuple[Decision, _Fragments]]


def fast_line(item: _Item, memo: FragmentMemo | None = None) -> str:
    """`format_line(record(...))` without the intermediate dict, with each decision's own
    fields rendered once when a `memo` is given (the writer thread's hot loop). Tests hold
    the two to the same output."""
    ts, request, result, seconds, trace_id, span_id = item
    d = result.decision
    if memo is None:
        who, what, why, condition = _fragments(d)
    else:
        # Keyed by identity and checked with `is`: the entry holds the Decision, so its id
        # cannot be reused by another object while the entry lives.
        hit = memo.get(id(d))
        if hit is not None and hit[0] is d:
            who, what, why, condition = hit[1]
        else:
            who, what, why, condition = memo.put(id(d), (d, _fragments(d)))[1]
    http = request is not None and request.is_http
    limit = result.limit
    return "".join((
        '{"schema_version":', str(SCHEMA_VERSION),
        ',"time":"', _time(ts),
        '","trace_id":', _str(trace_id or None),
        ',"span_id":', _str(span_id or None),
        who,
        ',"method":', _str(clean(request.method, 32) if request is not None and http else None),
        ',"host":', _str(safe_host(request, result) if request is not None and http else None),
        ',"path":', _str(safe_path(request, result) if request is not None and http else None),
        what,
        ',"cache_hit":', "true" if result.cache_hit else "false",
        ',"dry_run":', "true" if d.dry_run else "false",
        ',"ratelimit_remaining":', "null" if limit is None else str(int(limit.remaining)),
        ',"latency_us":', str(max(0, round(seconds * 1e6))),
        ',"token_lifetime_s":', "null" if (life := token_lifetime(d.identity)) is None
        else str(life),
        ',"route":', _str(route_of(request)),
        why,
        ',"peer":', _str(peer_of(request, d)),
        ',"notes":', "null" if (notes := notes_of(result)) is None else _ENCODER.encode(notes),
        ',"condition":', condition,
        "}\n",
    ))


class DecisionLog:
    """A CheckObserver writing one line per decision; see the module docstring."""

    def __init__(
        self,
        target: str = "stdout",
        *,
        sample_allowed: float = 1.0,
        max_queue: int = 10_000,
        flush_interval: float = 0.25,
        wake_at: int = 256,
        stream: IO[bytes] | None = None,
        rand: Callable[[], float] = random.random,
        reopen_check_interval: float = 1.0,
    ) -> None:
        if not 0.0 <= sample_allowed <= 1.0:
            raise ValueError("decision_log_sample_allowed must be between 0 and 1")
        self.target = target
        self._sample = sample_allowed
        self._rand = rand
        self._max = max(1, max_queue)
        self._wake_at = max(1, min(wake_at, self._max))
        self._flush_interval = flush_interval
        self._reopen_check_interval = reopen_check_interval
        self._queue: collections.deque[_Item] = collections.deque()
        # Each decision's own line fragments; touched by the writer (under _lock) only.
        self._fragments: FragmentMemo = Memo(FRAGMENT_MEMO_SIZE)
        self._wake = threading.Event()
        self._stopping = False
        self._reopen = False
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._inode: tuple[int, int] | None = None
        self._last_check = 0.0
        self._error_logged = 0.0
        # Counters (one writer each: the event loop for the first three, the writer thread
        # for the rest); exported as metrics.
        self.enqueued = 0
        self.dropped = 0
        self.sampled_out = 0
        self.written = 0
        self.write_errors = 0
        self.reopens = 0
        if stream is not None:
            self._stream: IO[bytes] | None = stream
        elif target == "stdout":
            self._stream = sys.stdout.buffer
        else:
            self._stream = None
            self._open()  # fail at start-up, not at the first decision
        self._thread = threading.Thread(target=self._run, name="extauthz-decision-log",
                                        daemon=True)
        self._thread.start()

    # -- the check path -------------------------------------------------------------------------

    def observe(
        self,
        request: Request | None,
        result: CheckResult,
        seconds: float,
        trace_id: str = "",
        span_id: str = "",
    ) -> None:
        decision = result.decision
        if self._sample < 1.0 and decision.allowed and not decision.dry_run \
                and self._rand() >= self._sample:
            self.sampled_out += 1
            return
        queue = self._queue
        if len(queue) >= self._max:
            self.dropped += 1
            return
        queue.append((time.time(), request, result, seconds, trace_id, span_id))
        self.enqueued += 1
        if len(queue) == self._wake_at:
            self._wake.set()

    # -- control ----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    def reopen(self) -> None:
        """Reopen the file before the next write (e.g. from a SIGHUP handler)."""
        self._reopen = True
        self._wake.set()

    def flush(self) -> None:
        """Write everything queued so far (blocking; tests and shutdown)."""
        self._write_pending()

    def close(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(10.0)
        self._write_pending()
        with self._lock:
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None

    # -- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            try:
                self._write_pending()
            except Exception:  # pragma: no cover - _write_pending handles OSError itself
                log.exception("decision log writer failed", extra={"event": "decision_log_error"})

    def _open(self) -> None:
        path = self.target
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        self._file = os.fdopen(fd, "ab", buffering=64 * 1024)
        self._inode = (st.st_dev, st.st_ino)

    def _check_rotation(self) -> None:
        """Reopen when asked to, or when the path now names another file (or none)."""
        now = time.monotonic()
        if not self._reopen and now - self._last_check < self._reopen_check_interval \
                and self._file is not None:
            return
        self._last_check = now
        try:
            st = os.stat(self.target)
            moved = (st.st_dev, st.st_ino) != self._inode
        except FileNotFoundError:
            moved = True
        if moved or self._reopen or self._file is None:
            self._reopen = False
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None
            self._open()
            self.reopens += 1

    def _write_pending(self) -> None:
        with self._lock:
            queue = self._queue
            if not queue:
                return
            lines: list[str] = []
            memo = self._fragments
            while queue:
                item = queue.popleft()
                try:
                    lines.append(fast_line(item, memo))
                except Exception:
                    self.write_errors += 1
                    log.exception("cannot format a decision-log line",
                                  extra={"event": "decision_log_error"})
            try:
                if self._stream is not None:
                    out: IO[bytes] = self._stream
                else:
                    self._check_rotation()
                    assert self._file is not None
                    out = self._file
                out.write("".join(lines).encode("ascii"))
                out.flush()
                self.written += len(lines)
            except (OSError, ValueError) as exc:
                self.write_errors += len(lines)
                now = time.monotonic()
                if now - self._error_logged > 60:
                    self._error_logged = now
                    log.error("cannot write the decision log: %s", exc,
                              extra={"event": "decision_log_error", "target": self.target})
                if self._stream is None:
                    self._reopen = True


def open_decision_log(target: str, sample_allowed: float) -> DecisionLog | None:
    if target in ("", "none"):
        return None
    return DecisionLog(target, sample_allowed=sample_allowed)
