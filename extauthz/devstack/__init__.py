"""The local mesh of the demo and the end-to-end tests: certificates, Envoy processes, a
sample upstream."""
