"""How Envoy asks: the gRPC ext_authz edge, TLS on the authz port, worker processes."""
