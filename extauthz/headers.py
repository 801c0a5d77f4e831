"""Every HTTP header name extauthz reads, sets, strips or refuses to be renamed to.

One module, so that the server's settings, the generated Envoy configuration, the gRPC
response and the devstack can never disagree about a name (they did: `serve
--principal-header traceparent` was accepted while `envoy-config` refused it). Names are
lowercase, as Envoy's header maps are.
"""

from __future__ import annotations

import re

# Set by extauthz on an allowed request towards the upstream: the verified caller and the rule
# that allowed it. Only extauthz may set them; a caller's copies are stripped before ext_authz.
PRINCIPAL = "x-extauthz-principal"
RULE = "x-extauthz-rule"
TRUSTED = (PRINCIPAL, RULE)
# Set on extauthz's own denials and errors, so an operator can tell them from Envoy's.
REASON = "x-extauthz-reason"

# Credentials the identity sources read.
XFCC = "x-forwarded-client-cert"
AUTHORIZATION = "authorization"
WWW_AUTHENTICATE = "www-authenticate"
RETRY_AFTER = "retry-after"

# Trace context Envoy forwards in the CheckRequest (W3C and B3 single/multi).
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# Frameworks that let a header or a query parameter change the method the application sees.
# extauthz never honours them: one naming another method than the request's is a 403.
METHOD_OVERRIDE = ("x-http-method-override", "x-method-override", "x-http-method")
METHOD_OVERRIDE_PARAMS = ("_method",)

# Headers Envoy or extauthz itself rely on: renaming the principal (or rule) header to one of
# them would make the strip filter delete what authorization, routing or tracing needs.
RESERVED = frozenset(
    {
        "host",
        AUTHORIZATION,
        XFCC,
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
        TRACEPARENT,
        TRACESTATE,
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "te",
        REASON,
        *METHOD_OVERRIDE,
    }
)

# An HTTP header name as extauthz sets it: an RFC 9110 token, lowercase. Fixed, not user regex.
_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]{1,128}$")


def is_header_name(name: str) -> bool:
    """A lowercase RFC 9110 token (pseudo-headers such as `:path` are not)."""
    return _NAME.match(name) is not None


def settable_problem(name: str) -> str:
    """Why extauthz must not set (and so strip) header `name`; "" when it may."""
    if not is_header_name(name):
        return f"{name!r} is not a plain lowercase header name"
    if name in RESERVED:
        return (f"{name!r} is a header Envoy or extauthz relies on "
                f"(reserved: {', '.join(sorted(RESERVED))})")
    return ""
