"""The server as an attacker or a careless client would use it, over real HTTP on loopback.

Approvals only operators can give (never a webhook or a signal), retried deliveries after a
run ended, input that must be refused before anything is stored, and the smaller server
rules: loopback host names when open, authentication before parameter checks, run ids with
``/``, and dashboard sessions that logout revokes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from storno._serde import MAX_DEPTH
from storno._server._auth import TokenStore
from storno._server._dashboard import COOKIE
from test_cli import cli
from test_dashboard import csrf_of, signed_in
from test_http import error_of
from test_server_support import (
    OPERATOR_TOKEN,
    REFUND_API,
    WEBHOOK_TOKEN,
    serving,
    start,
    wait_status,
)

FAR = "9999-12-31T23:59:59-23:59"  # the year 10000 in UTC


def test_only_operators_give_approvals_and_the_actor_is_recorded(db_url: str):
    with serving(db_url) as s, s.client() as c, s.client(token=None) as provider:
        run_id = start(c, "approval", 40)
        wait_status(c, run_id, "waiting")
        forged = {"approved": True, "by": "cfo-maria"}
        hook = provider.post(
            f"/api/v1/webhooks/{run_id}/storno.approval",
            params={"token": WEBHOOK_TOKEN},
            json=forged,
        )
        assert "reserved for storno" in error_of(hook, 422, "reserved_signal")
        signal = c.post(f"/api/v1/runs/{run_id}/signals/storno.approval", json={"data": forged})
        assert "approve" in error_of(signal, 422, "reserved_signal")
        assert c.get(f"/api/v1/runs/{run_id}").json()["status"] == "waiting"

        page = signed_in(s.url, OPERATOR_TOKEN).get(f"/ui/runs/{run_id}").text
        assert "wait for approval" in page and "/approve" in page

        done = c.post(f"/api/v1/runs/{run_id}/approve", json={"by": "cfo-maria", "note": "ok"})
        assert done.status_code == 202, done.text
        run = wait_status(c, run_id, "completed")
        assert run["result"] == "approved by cfo-maria (via ops-alice)"
        received = [e for e in run["history"] if e["type"] == "signal_received"]
        assert received[0]["data"]["by"] == "cfo-maria (via ops-alice)"
        page = signed_in(s.url, OPERATOR_TOKEN).get(f"/ui/runs/{run_id}").text
        for shown in (str(run), page, cli("show", run_id, "--db", db_url, cwd=Path.cwd()).stdout):
            assert "storno.approval" not in shown
        assert "decided by cfo-maria (via ops-alice)" in page

        early = start(c, "shipment")  # waits for a signal, never asked for an approval
        wait_status(c, early, "waiting")
        refused = c.post(f"/api/v1/runs/{early}/approve", json={})
        assert "not waiting for an approval" in error_of(refused, 409, "run_state")


def test_a_retried_delivery_after_the_run_ended_is_a_duplicate(db_url: str, tmp_path: Path):
    with serving(db_url) as s, s.client() as c, s.client(token=None) as provider:
        run_id = start(c, "shipment")
        wait_status(c, run_id, "waiting")
        hook = f"/api/v1/webhooks/{run_id}/label_ready"
        headers = {"X-Storno-Token": WEBHOOK_TOKEN, "Webhook-Id": "msg_1"}
        first = provider.post(hook, json={"url": "https://labels/1"}, headers=headers)
        assert first.json()["delivered"] == "new", first.text
        wait_status(c, run_id, "completed")
        again = provider.post(hook, json={"url": "https://labels/1"}, headers=headers)
        assert again.status_code == 202, again.text
        assert again.json()["delivered"] == "duplicate"
        other = provider.post(hook, json={}, headers={**headers, "Webhook-Id": "msg_2"})
        error_of(other, 409, "run_state")

        api = f"/api/v1/runs/{run_id}/signals/label_ready"
        repeat = c.post(api, json={"data": {"url": "https://labels/1"}, "id": "msg_1"})
        assert repeat.status_code == 202 and repeat.json()["delivered"] == "duplicate"
        by_cli = cli(
            "signal", run_id, "label_ready", "--id", "msg_1", "--json", "--db", db_url, cwd=tmp_path
        )
        assert by_cli.returncode == 0, by_cli.stderr
        assert '"delivered": "duplicate"' in by_cli.stdout


def test_input_the_run_could_not_show_later_is_refused_before_it_is_stored(db_url: str):
    def deep(levels: int) -> Any:
        value: Any = 1
        for _ in range(levels):
            value = [value]
        return value

    with serving(db_url, worker=False) as s, s.client() as c:
        far = c.post("/api/v1/runs", json={"saga": "shipment", "start_at": FAR})
        assert "out of range" in error_of(far, 422, "validation_error")
        for levels in (150, 300, 600):
            nested = c.post("/api/v1/runs", json={"saga": "approval", "args": [deep(levels)]})
            assert f"more than {MAX_DEPTH} levels" in error_of(nested, 422, "not_serializable")
        plan = c.post("/api/v1/plans", json={"plan": [{"step": "send_sms", "args": [deep(300)]}]})
        error_of(plan, 422, "not_serializable")
        huge = c.post("/api/v1/runs", json={"saga": "shipment", "kwargs": {}, "timeout": 1e300})
        error_of(huge, 422, "validation_error")
        assert c.get("/api/v1/runs").json()["runs"] == []  # nothing above was stored

        run_id = start(c, "shipment")
        signal = c.post(f"/api/v1/runs/{run_id}/signals/label_ready", json={"data": deep(300)})
        error_of(signal, 422, "not_serializable")
        hook = c.post(f"/api/v1/webhooks/{run_id}/label_ready", json=deep(300))
        error_of(hook, 422, "not_serializable")
        assert c.get(f"/api/v1/runs/{run_id}").status_code == 200
        assert c.get("/api/v1/runs").status_code == 200
        listed = cli("list", "--json", "--db", db_url, cwd=Path.cwd())
        assert listed.returncode == 0, listed.stderr


def test_open_mode_answers_only_to_loopback_host_names(db_url: str):
    open_store = TokenStore(open=True)
    with serving(db_url, token_store=open_store, worker=False) as s, s.client(token=None) as c:
        assert c.get("/api/v1/runs").status_code == 200
        for host in ("localhost", "localhost:8080", "127.0.0.1:9", "[::1]:80"):
            assert c.get("/api/v1/runs", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example", ""):
            rebound = c.get("/api/v1/runs", headers={"host": host})
            assert "loopback" in error_of(rebound, 403, "forbidden_host"), host
        posted = c.post("/ui/runs/x/cancel", data={"reason": "x"}, headers={"host": "evil.example"})
        assert posted.status_code == 403
    with serving(db_url, worker=False) as s, s.client() as c:  # with tokens: any host name
        assert c.get("/api/v1/runs", headers={"host": "storno.example"}).status_code == 200


def test_anonymous_requests_learn_no_parameter_names(db_url: str):
    with serving(db_url, worker=False) as s, s.client(token=None) as anonymous:
        for params in ({"stauts": "waiting"}, {"limit": "many"}):
            response = anonymous.get("/api/v1/runs", params=params)
            message = error_of(response, 401, "unauthorized")
            assert "created_after" not in message and "limit" not in message
        hook = anonymous.post("/api/v1/webhooks/r/s", params={"colour": "red"}, json={})
        error_of(hook, 401, "unauthorized")
        typo = anonymous.get("/api/v1/health", params={"verbose": "1"})
        error_of(typo, 422, "unknown_parameter")  # health needs no token, so it says so


def test_run_ids_with_a_slash_are_readable_with_the_slash_encoded(db_url: str):
    with serving(db_url) as s, s.client() as c:
        for run_id in ("rs/state", "a/state/b", "x/approve", "p/3"):
            assert start(c, "shipment", run_id=run_id) == run_id
            encoded = run_id.replace("/", "%2F")
            wait_status(c, encoded, "waiting")
            shown = c.get(f"/api/v1/runs/{encoded}")
            assert shown.status_code == 200 and shown.json()["id"] == run_id, shown.text
            state = c.get(f"/api/v1/runs/{encoded}/state")
            assert state.json() == {"run_id": run_id, "name": None, "value": {}}, state.text
            sent = c.post(f"/api/v1/runs/{encoded}/signals/label_ready", json={"data": run_id})
            assert sent.status_code == 202 and sent.json()["run_id"] == run_id, sent.text
            assert wait_status(c, encoded, "completed")["result"] == run_id
        assert c.get("/api/v1/runs/p/3").json()["id"] == "p/3"  # unambiguous: as it is
        error_of(c.get("/api/v1/runs/rs%2Fnothing"), 404, "run_not_found")


def test_logout_revokes_the_dashboard_session(db_url: str):
    with serving(db_url, worker=False) as s:
        browser = signed_in(s.url, OPERATOR_TOKEN)
        cookie = browser.cookies.get(COOKIE, path="/ui")
        assert cookie and OPERATOR_TOKEN not in cookie
        assert OPERATOR_TOKEN not in str(browser.cookies.jar)
        assert browser.get("/ui/").status_code == 200
        page = browser.get("/ui/").text
        out = browser.post("/ui/logout", data={"csrf": csrf_of(page)})
        assert out.status_code == 303
        stolen = httpx.Client(base_url=s.url, timeout=10, cookies={COOKIE: cookie})
        assert stolen.get("/ui/").status_code == 303  # to the login page: the session is gone
        forged = httpx.Client(base_url=s.url, timeout=10, cookies={COOKIE: OPERATOR_TOKEN})
        assert forged.get("/ui/").status_code == 303  # the raw token is no session either


def test_a_dead_letter_retried_or_resolved_shows_the_current_truth(db_url: str):
    REFUND_API["down"] = True
    try:
        with serving(db_url) as s, s.client() as c:
            retried, resolved = (
                start(c, "booking", "ann", 9, True),
                start(c, "booking", "bo", 9, True),
            )
            for run_id in (retried, resolved):
                dead = wait_status(c, run_id, "compensation_failed")
                assert "dead letter" in dead["error"]["message"]
            REFUND_API["down"] = False
            c.post(f"/api/v1/runs/{retried}/retry", json={"note": "API back"}).raise_for_status()
            c.post(f"/api/v1/runs/{resolved}/resolve", json={"note": "refunded in the console"})
            browser = signed_in(s.url, OPERATOR_TOKEN)
            for run_id, action in ((retried, "retry by ops-alice"), (resolved, "resolve")):
                run = wait_status(c, run_id, "compensated")
                assert "calendar api refused" in run["error"]["message"]  # why it compensated
                page = browser.get(f"/ui/runs/{run_id}").text
                head = page.split('class="run-head"')[1].split("<h2>Forward path")[0]
                shown = cli("show", run_id, "--db", db_url, cwd=Path.cwd()).stdout
                # The history keeps the old failure; what the run says about itself moves on.
                for text in (str(run["error"]), head, shown.split("forward steps")[0]):
                    assert "fix the cause" not in text and "is a dead letter" not in text
                card = page.split('class="timeline compensations"')[1]
                charge = card.split("undo charge_card")[1].split('<li class="item comp')[0]
                assert "gave up:" not in charge  # not shown as the compensation's outcome
                assert f"superseded by {action.split(' by')[0]}" in charge
    finally:
        REFUND_API["down"] = False
