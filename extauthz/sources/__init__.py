"""Where the core's inputs come from: policy files, the revocation list, JWKS over https or
from files. The only package besides the transports and backends that does I/O for the
server."""
