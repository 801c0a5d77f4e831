"""Shared state outside the process: the Redis rate limiter."""
