"""The public API's types from a user's side: mypy (strict) checks tests/typing, never run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TYPING = Path(__file__).resolve().parent / "typing"
ROOT = TYPING.parent.parent


def test_the_public_api_type_checks_as_the_docs_use_it() -> None:
    # --strict turns on warn_unused_ignores: a line meant to be a type error that stops being
    # one fails the check too.
    command = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(TYPING)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
