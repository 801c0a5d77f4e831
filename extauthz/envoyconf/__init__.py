"""The Envoy side: typed envoy-data-plane configuration and the sidecar bootstrap. Not named
`envoy`, which is the top-level package of Envoy's API protos."""
