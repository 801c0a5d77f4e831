"""Who may share a listening port, and how a refused bind is reported.

gRPC (and asyncio with `reuse_port=True`) bind with SO_REUSEPORT, which the kernel grants to
any process of the same user: a second `extauthz serve` would join the first one's port and
take half its connections, silently. Only the workers of one `--workers` supervisor share a
port; every other server binds exclusively, so a port in use is a start-up error.
"""

from __future__ import annotations

import os

# Set by the supervisor in each worker's environment: "<supervisor pid>". A worker shares its
# port only when its parent is that supervisor, so an `extauthz serve` started by hand never
# joins another instance's port, whatever its environment says.
SUPERVISOR_ENV = "EXTAUTHZ_SUPERVISOR_PID"


class BindError(RuntimeError):
    """A listen address the host refused at start-up (a runtime failure: exit 1, not 2)."""


def reuse_port() -> bool:
    """Whether this process may bind with SO_REUSEPORT: only as a supervisor's worker."""
    owner = os.environ.get(SUPERVISOR_ENV, "")
    return owner.isdigit() and int(owner) == os.getppid()
