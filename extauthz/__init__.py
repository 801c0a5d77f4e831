"""extauthz: workload-identity authorization for Envoy meshes."""

__version__ = "0.1.0"
