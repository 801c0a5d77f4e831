"""Offline tools that reuse the core: explain, lint, policy tests, inventory, review,
doctor."""
