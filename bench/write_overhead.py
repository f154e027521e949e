"""What the agent benchmarks share: their options, their rounds, and the line they print.

Each benchmark gives a ``one_round(folder, args)`` that returns storno's overhead per write
tool call, in seconds, one figure per run; this runs the rounds, each in a fresh folder, and
prints the median and p99 over them. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

__all__ = ["main"]

OneRound = Callable[[Path, argparse.Namespace], Awaitable[list[float]]]


def main(doc: str, one_round: OneRound, what: str, *, runs: int = 200) -> None:
    """Parse the shared options, run ``one_round`` per round, print what storno adds per
    write tool call ``what`` (e.g. "of a Pydantic AI agent (pydantic-ai-slim 2.68.0)")."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--writes", type=int, default=5)
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"])
    args = parser.parse_args()
    medians, p99s = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            per_call = sorted(asyncio.run(one_round(Path(tmp), args)))
        medians.append(statistics.median(per_call) * 1000)
        p99s.append(per_call[int(len(per_call) * 0.99) - 1] * 1000)
    label = f" {what}" if what else ""
    print(
        f"storno's overhead per write tool call{label} (SQLite, synchronous={args.synchronous}, "
        f"{args.writes} writes a run, {args.runs} runs x {args.rounds} rounds): "
        f"median {statistics.median(medians):.2f} ms (rounds {min(medians):.2f}-"
        f"{max(medians):.2f}), p99 {statistics.median(p99s):.2f} ms"
    )
