"""``storno outbox``, ``storno correlation``, ``storno relay`` and what ``storno show`` says of
events, run for real in subprocesses against SQLite and PostgreSQL.

``storno relay`` runs as a process of its own with the test choreography's application
(``events_app:make_app``). Its broker is in that process's memory, so the test watches the
outbox rows the relay marks sent or dead in the database; with ``STORNO_TEST_NATS_URL`` set
(and ``storno.events.nats`` present) one test relays to a real NATS JetStream and reads the
stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_for
from events_app import enqueue, make_app, make_dead, order
from storno._store import open_store
from storno.events import MemoryBroker
from test_cli import ENV, cli
from test_server_support import wait_until

TESTS = Path(__file__).resolve().parent


def run_choreography(db_url: str, run_id: str) -> None:
    async def go() -> None:
        app = make_app(db_url, MemoryBroker())
        async with app, app.worker(poll_interval=0.05):
            handle = await app.start(order.options(run_id=run_id), "A1")
            await handle.result(timeout=20)

            async def sent() -> bool:
                return (await app.store.outbox.stats()).pending == 0

            await wait_for(sent)

    asyncio.run(go())


def with_dead_letters(db_url: str, *events: tuple[str, str, str | None, Any], dead: list[str]):
    async def go() -> None:
        async with make_app(db_url, None) as app:  # creates the schema
            enqueue(db_url, *events, source="orders-service")
            await make_dead(app.store, dead)

    asyncio.run(go())


def create_schema(db_url: str) -> None:
    async def go() -> None:
        async with make_app(db_url, None):
            pass

    asyncio.run(go())


def all_sent(db_url: str) -> bool:
    return {r.status for r in outbox_rows(db_url).values()} == {"sent"}


def outbox_rows(db_url: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        store = open_store(db_url)
        await store.open()
        try:
            return {r.message.event_id: r for r in await store.outbox.rows(limit=1000)}
        finally:
            await store.close()

    return asyncio.run(go())


# --- storno show and storno correlation ------------------------------------------------------


def test_show_and_correlation_tell_what_events_did(db_url: str, tmp_path: Path) -> None:
    run_choreography(db_url, "ord-1")
    paid = "ord-1/1@charge"

    shown = cli("show", "ord-1", "--db", db_url, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "  correlation ord-1\n" in out
    assert "  #1 emitted slot.reserved (key A1) -> event ord-1/1\n" in out
    assert "  #3 emitted order.done (key A1) -> event ord-1/3\n" in out
    assert (
        f"#2 signal 'paid' received: {{'amount': 40, 'slot': 'A1'}} (sent by event {paid}/0 "
        f"(payment.charged) from run {paid})"
    ) in out
    child = cli("show", paid, "--db", db_url, cwd=tmp_path).stdout
    assert "  started by event ord-1/1 (slot.reserved) from run ord-1, handler charge\n" in child
    assert f"  #0 emitted payment.charged (key A1) -> event {paid}/0\n" in child

    text = cli("correlation", "ord-1", "--db", db_url, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "correlation ord-1: 2 runs"
    assert "run ord-1  saga order  status completed" in lines
    assert f"run {paid}  saga payment  status completed" in lines
    timeline = lines[lines.index("timeline (UTC)") + 1 :]
    said = [re.sub(r"^  \S+ \S+  \S+\s+", "", line) for line in timeline]
    assert said == [
        "started",
        f"#1 emitted slot.reserved (key A1) -> event ord-1/1; taken by run {paid}",
        "started by event ord-1/1 (slot.reserved) from run ord-1",
        f"#0 emitted payment.charged (key A1) -> event {paid}/0; taken by run ord-1",
        "ended completed",
        f"signal 'paid' from event {paid}/0 (payment.charged) from run {paid}",
        "#3 emitted order.done (key A1) -> event ord-1/3",
        "ended completed",
    ]
    as_json = json.loads(cli("correlation", "ord-1", "--json", "--db", db_url, cwd=tmp_path).stdout)
    assert [r["run"]["id"] for r in as_json["runs"]] == ["ord-1", paid]
    assert as_json["runs"][1]["cause"]["consumer"] == "charge"
    assert as_json["runs"][1]["run"]["correlation_id"] == "ord-1"

    unknown = cli("correlation", "nobody", "--db", db_url, cwd=tmp_path)
    assert unknown.returncode == 1 and "no run with correlation id 'nobody'" in unknown.stderr
    missing = cli("correlation", "x", "--db", f"sqlite:///{tmp_path / 'none.db'}", cwd=tmp_path)
    assert missing.returncode == 1 and "no storno database" in missing.stderr
    assert not (tmp_path / "none.db").exists()


# --- storno outbox ---------------------------------------------------------------------------

EVENTS = [
    ("o/1", "order.placed", "o-1", {"order": 1}),
    ("o/2", "order.placed", "o-2", {"order": 2}),
    ("o/3", "order.paid", "o-2", {"order": 2}),
    ("o/4", "order.placed", "o-4", {"order": 4}),
]


def test_outbox_status_list_retry_and_discard(db_url: str, tmp_path: Path) -> None:
    with_dead_letters(db_url, *EVENTS, dead=["o/2", "o/4"])

    status = cli("outbox", "status", "--db", db_url, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[:2] == ["pending  2", "dead     2"]
    assert lines[2].startswith("lag      ") and "(oldest unsent since " in lines[2]
    state = json.loads(cli("outbox", "status", "--json", "--db", db_url, cwd=tmp_path).stdout)
    assert state["pending"] == 2 and state["dead"] == 2 and state["lag_seconds"] >= 0

    listed = cli("outbox", "list", "--db", db_url, cwd=tmp_path).stdout.splitlines()
    assert listed[0].split() == [
        "EVENT",
        "TOPIC",
        "KEY",
        "STATUS",
        "TRIES",
        "CREATED",
        "(UTC)",
        "SOURCE",
    ]
    assert [line.split()[0] for line in listed[1:] if not line.startswith("  ")] == [
        "o/4", "o/3", "o/2", "o/1",
    ]  # fmt: skip
    assert "  refused: too big" in listed
    page = cli("outbox", "list", "--limit", "1", "--offset", "1", "--db", db_url, cwd=tmp_path)
    assert page.stdout.splitlines()[-1] == (
        "(1 of 4 shown: rows 2-2, newest first; --offset 2 shows the next)"
    )
    dead = cli("outbox", "list", "--status", "dead", "--json", "--db", db_url, cwd=tmp_path)
    body = json.loads(dead.stdout)
    assert [r["event_id"] for r in body["rows"]] == ["o/4", "o/2"] and body["total"] == 2
    assert body["rows"][0]["last_error"] == "refused: too big"
    assert body["rows"][0]["source"] == "orders-service" and body["truncated"] is False
    bad = cli("outbox", "list", "--status", "lost", "--db", db_url, cwd=tmp_path)
    assert bad.returncode == 2 and "'lost' is not one of" in bad.stderr

    # retry: the dead letters among the ids are retried, the rest named, exit 1.
    env = {**ENV, "STORNO_ACTOR": "dana"}
    mixed = cli("outbox", "retry", "o/4", "o/1", "nope", "--db", db_url, cwd=tmp_path, env=env)
    assert mixed.returncode == 1
    assert mixed.stdout == "retried: event o/4 (order.placed, key o-4) by dana\n"
    assert "'o/1' (pending), 'nope' (no such event)" in mixed.stderr
    assert "left as they are" in mixed.stderr
    nobody = cli("outbox", "discard", "o/2", "--db", db_url, cwd=tmp_path)
    assert nobody.returncode == 2 and "Missing option '--by'" in nobody.stderr
    gone = cli("outbox", "discard", "o/2", "--by", "erin", "--json", "--db", db_url, cwd=tmp_path)
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout) == {
        "action": "discard",
        "by": "erin",
        "changed": ["o/2"],
        "refused": {},
    }
    again = cli("outbox", "discard", "o/2", "--by", "erin", "--db", db_url, cwd=tmp_path)
    assert again.returncode == 1 and "'o/2' (discarded)" in again.stderr
    rows = outbox_rows(db_url)
    assert {i: r.status for i, r in rows.items()} == {
        "o/1": "pending",
        "o/2": "discarded",
        "o/3": "pending",
        "o/4": "pending",
    }
    assert rows["o/4"].attempts == 0
    empty = cli("outbox", "list", "--status", "dead", "--db", db_url, cwd=tmp_path)
    assert empty.stdout == "(no dead rows)\n"


# --- storno relay ----------------------------------------------------------------------------


def relay(db_url: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "storno", "relay", "--app", "events_app:make_app", "--db", db_url],
        cwd=TESTS,
        env={**ENV, **env},
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(process: subprocess.Popen[str], how: int = signal.SIGTERM) -> str:
    process.send_signal(how)
    try:
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    return err


def test_relay_refuses_an_app_without_a_broker_and_a_bad_app(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    args = ("relay", "--app", "events_app:make_app", "--db", db)
    none = cli(*args, cwd=TESTS, env={**ENV, "EVENTS_APP_NO_BROKER": "1"})
    assert none.returncode == 1
    assert "events_app:make_app has no broker: storno relay sends the outbox" in none.stderr
    assert not (tmp_path / "r.db").exists()
    missing = cli("relay", "--app", "nosuchmodule:app", cwd=tmp_path)
    assert missing.returncode == 2 and "no module named 'nosuchmodule'" in missing.stderr
    needed = cli("relay", cwd=tmp_path)
    assert needed.returncode == 2 and "Missing option '--app'" in needed.stderr
    (tmp_path / "pinned.py").write_text(
        "import storno\nfrom storno.events import MemoryBroker\n"
        "app = storno.Storno('sqlite:///a.db', broker=MemoryBroker())\n"
    )
    pinned = cli("relay", "--app", "pinned:app", "--db", db, cwd=tmp_path)
    assert pinned.returncode == 1
    assert "pinned:app names its database in its code (sqlite:///a.db)" in pinned.stderr


def test_relay_sends_the_outbox_keeps_a_dead_letter_and_stops_cleanly(db_url: str) -> None:
    create_schema(db_url)
    first = relay(db_url, EVENTS_APP_REFUSE="order.paid")
    try:
        assert first.stderr is not None
        started = first.stderr.readline()
        assert " INFO relay relay:" in started and "(broker memory)" in started, started
        enqueue(
            db_url,
            ("e/1", "order.placed", "k1", {"n": 1}),
            ("e/2", "order.paid", "k2", {"n": 2}),  # refused: a dead letter after 2 attempts
            ("e/3", "order.placed", "k2", {"n": 3}),  # waits behind it
            ("e/4", "order.placed", None, {"n": 4}),
        )

        def settled() -> bool:
            rows = outbox_rows(db_url)
            return {r.status for i, r in rows.items() if i != "e/3"} == {"sent", "dead"}

        wait_until(settled, timeout=20, what="three rows sent or dead")
    finally:
        err = stop(first, signal.SIGINT)
    assert "dead letter after 2 attempts" in err
    assert err.rstrip().endswith(
        "stopped: 2 sent, 1 refused and to be retried, 1 dead letters, 0 outages"
    )
    rows = outbox_rows(db_url)
    assert {i: r.status for i, r in rows.items()} == {
        "e/1": "sent",
        "e/2": "dead",
        "e/3": "pending",
        "e/4": "sent",
    }

    retried = cli("outbox", "retry", "e/2", "--by", "ops", "--db", db_url, cwd=TESTS)
    assert retried.returncode == 0, retried.stderr
    second = relay(db_url)  # the broker takes the topic now
    try:
        wait_until(lambda: all_sent(db_url), timeout=20, what="every row sent")
    finally:
        stop(second)
    rows = outbox_rows(db_url)
    assert rows["e/2"].sent_at is not None and rows["e/3"].sent_at is not None
    assert rows["e/2"].sent_at <= rows["e/3"].sent_at  # the key's order held


def test_relay_to_a_real_nats_stream(db_url: str) -> None:
    url = os.environ.get("STORNO_TEST_NATS_URL")
    if not url:
        pytest.skip("needs STORNO_TEST_NATS_URL (e.g. nats://127.0.0.1:4222)")
    pytest.importorskip("storno.events.nats", reason="needs storno.events.nats (storno[nats])")
    nats = pytest.importorskip("nats")
    stream = f"t{uuid.uuid4().hex[:12]}"

    async def add_stream() -> None:
        from nats.js.api import StreamConfig

        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"]))
        finally:
            await nc.close()

    async def messages() -> list[Any]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(stream)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                out.append(json.loads((await js.get_msg(stream, seq)).data))
            return out
        finally:
            await nc.close()

    asyncio.run(add_stream())
    create_schema(db_url)
    process = relay(db_url, EVENTS_APP_NATS=f"{url} {stream} {stream}.")
    try:
        assert process.stderr is not None
        assert "(broker nats)" in process.stderr.readline()
        enqueue(db_url, *[(f"n/{i}", "order.placed", "k", {"n": i}) for i in range(5)])
        wait_until(lambda: all_sent(db_url), timeout=20, what="every row sent")
    finally:
        stop(process)
    assert [m["n"] for m in asyncio.run(messages())] == list(range(5))
