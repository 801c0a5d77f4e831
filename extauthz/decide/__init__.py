"""One pass per check: guards, the decision cache, the compiled policy, rate limits. Pure:
transports call it, observers read its result."""
