"""A worker process of a W3 round: ``python -m bench.worker MODULE ARGS...`` imports the
adapter module by its name (so that every system registers its functions once, under their
module's real name) and hands it the arguments."""

from __future__ import annotations

import importlib
import sys

if __name__ == "__main__":
    module = importlib.import_module(sys.argv[1])
    module.main(sys.argv[2:])
