"""The `autotune` command line: one module per command, each `add_parser` + `run`. Commands call
the library and render its results and logs; no logic lives here that the library lacks.

May import: anything in autotune.
"""
from .main import main

__all__ = ["main"]
