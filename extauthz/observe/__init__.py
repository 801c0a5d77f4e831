"""What happened: spans, the decision log and Prometheus metrics, each reading the decided
result."""
