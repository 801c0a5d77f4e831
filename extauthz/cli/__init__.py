"""The command line: one module per command family; settings and logging set up here, never at
import time."""
