"""One round of one workload on one system, in a process of its own.

    python -m bench.child SYSTEM WORKLOAD '{"n": 500, ...}'

Prints the result as one line (``BENCH-RESULT {...}``) on stdout; anything else it prints is
progress. Each round gets a fresh database (and, for Restate and Temporal, a fresh server).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import common

MODULES = {
    "storno-sqlite": "bench.storno_app",
    "storno-postgres": "bench.storno_app",
    "dbos-sqlite": "bench.peers.dbos_app",
    "dbos-postgres": "bench.peers.dbos_app",
    "restate": "bench.peers.restate_app",
    "temporal-activities": "bench.peers.temporal_app",
    "temporal-local": "bench.peers.temporal_app",
    "floor": "bench.floor",
}


def run(system: str, workload: str, params: dict[str, Any]) -> dict[str, Any]:
    module = importlib.import_module(MODULES[system])
    warmup = int(params.get("warmup", 20))
    if workload == "w1seq":
        return dict(asyncio.run(module.w1_seq(system, int(params["n"]), warmup)))
    if workload == "w1conc":
        n, in_flight = int(params["n"]), int(params["in_flight"])
        return dict(asyncio.run(module.w1_conc(system, n, in_flight, warmup)))
    if workload == "w2":
        return dict(asyncio.run(module.w2_seq(system, int(params["n"]), warmup)))
    if workload == "w3":
        with tempfile.TemporaryDirectory(prefix="bench-w3-") as tmp:
            return dict(module.w3(system, int(params["n"]), Path(tmp)))
    if workload == "scale":
        marks = [int(m) for m in params["marks"]]
        wakeups, limit = int(params["wakeups"]), float(params["park_limit"])
        return dict(asyncio.run(module.scale(system, marks, wakeups, limit)))
    if workload == "floor":
        return dict(module.measure(params))
    if workload == "w4":
        from bench import w4

        return w4.run(system, params)
    raise ValueError(f"unknown workload {workload!r}")


def main() -> int:
    system, workload = sys.argv[1], sys.argv[2]
    params = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    t0 = time.perf_counter()
    try:
        result = run(system, workload, params)
    except Exception as exc:
        traceback.print_exc()
        common.emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    result["wall_s"] = time.perf_counter() - t0
    common.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
