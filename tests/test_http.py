"""The HTTP API over real HTTP on loopback, against a real store (SQLite and PostgreSQL).

Each test starts the server (uvicorn, in a thread, with a worker) on the test's database and
talks to it with httpx: start runs (idempotent by id), read them, list and filter, signal,
approve, reject, cancel, retry and resolve dead letters, webhooks; auth and every 4xx.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from test_server_support import (
    NOTICE_API,
    OPERATOR_TOKEN,
    READ_TOKEN,
    REFUND_API,
    WEBHOOK_TOKEN,
    make_old_run,
    serving,
    start,
    wait_status,
    wait_until,
)


def error_of(response: Any, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["type"] == kind, body
    assert body["error"]["message"]
    return str(body["error"]["message"])


def test_start_read_and_list_runs(db_url: str):
    with serving(db_url) as s, s.client() as c:
        assert c.get("/api/v1/health").json()["status"] == "ok"
        body = {"saga": "booking", "args": ["ada", 49], "kwargs": {"fail": True}, "run_id": "b-1"}
        first = c.post("/api/v1/runs", json=body)
        assert first.status_code == 201, first.text
        assert first.json()["created"] is True and first.json()["run"]["id"] == "b-1"
        again = c.post("/api/v1/runs", json=body)
        assert again.status_code == 200 and again.json()["created"] is False
        other = c.post("/api/v1/runs", json={**body, "args": ["ada", 50]})
        message = error_of(other, 409, "run_conflict")
        assert "49" in message and "50" in message

        run = wait_status(c, "b-1", "compensated")
        assert [s["name"] for s in run["steps"]] == [
            "book_slot",
            "charge_card",
            "send_sms",
            "sync_calendar",
        ]
        charge = run["steps"][1]
        assert charge["verified"] == [True] and charge["idempotency_key"].startswith("st-")
        assert charge["compensation"]["status"] == "completed"
        types = [e["type"] for e in run["history"]]
        assert types[0] == "run_created" and types[-1] == "run_compensated"
        assert run["stuck"] is False and run["stuck_reason"] is None

        done = start(c, "approval", 5)
        wait_status(c, done, "waiting")
        listed = c.get("/api/v1/runs").json()
        assert [r["id"] for r in listed["runs"]] == [done, "b-1"]
        assert "history" not in listed["runs"][0] and "steps" not in listed["runs"][0]
        only = c.get("/api/v1/runs", params={"status": "compensated"}).json()["runs"]
        assert [r["id"] for r in only] == ["b-1"]
        assert c.get("/api/v1/runs", params={"saga": "approval"}).json()["runs"][0]["id"] == done
        page = c.get("/api/v1/runs", params={"limit": 1}).json()
        assert len(page["runs"]) == 1 and page["next_offset"] == 1
        last = c.get("/api/v1/runs", params={"limit": 1, "offset": 1}).json()
        assert last["runs"][0]["id"] == "b-1" and last["next_offset"] is None
        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        assert c.get("/api/v1/runs", params={"created_after": future}).json()["runs"] == []
        assert len(c.get("/api/v1/runs", params={"created_after": past}).json()["runs"]) == 2
        assert c.get("/api/v1/runs", params={"created_before": past}).json()["runs"] == []
        stats = c.get("/api/v1/stats").json()
        assert stats["by_status"]["compensated"] == 1 and stats["by_status"]["waiting"] == 1
        assert stats["by_saga"]["booking"] == {"compensated": 1}


def test_auth_tokens_and_roles(db_url: str):
    with serving(db_url) as s:
        with s.client(token=None) as anonymous:
            response = anonymous.get("/api/v1/runs")
            error_of(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
            assert anonymous.get("/api/v1/health").status_code == 200
            assert anonymous.get("/openapi.json").status_code == 200
            error_of(anonymous.get("/metrics"), 401, "unauthorized")
        with s.client(token="wrong-token-0123456789") as wrong:
            assert "not valid" in error_of(wrong.get("/api/v1/runs"), 401, "unauthorized")
        with s.client(token=READ_TOKEN) as reader:
            assert reader.get("/api/v1/runs").status_code == 200
            assert reader.get("/metrics").status_code == 200
            refused = reader.post("/api/v1/runs", json={"saga": "approval", "args": [1]})
            assert "read-only" in error_of(refused, 403, "forbidden")
            error_of(reader.post("/api/v1/runs/x/cancel", json={"reason": "r"}), 403, "forbidden")
            assert reader.get("/api/v1/runs").json()["runs"] == []  # nothing was started
        with s.client(token=WEBHOOK_TOKEN) as hook:
            error_of(hook.get("/api/v1/runs"), 403, "forbidden")
        with s.client() as operator:
            run_id = start(operator, "approval", 7)
            wait_status(operator, run_id, "waiting")
            response = operator.post(f"/api/v1/runs/{run_id}/approve", json={"note": "fine"})
            assert response.status_code == 202 and response.json()["by"] == "ops-alice"
            run = wait_status(operator, run_id, "completed")
            assert run["result"] == "approved by ops-alice"
            text = str(run["history"])
            assert OPERATOR_TOKEN not in text and READ_TOKEN not in text


def test_every_bad_input_gets_a_named_4xx(db_url: str):
    with serving(db_url, app_options={"max_payload_bytes": 1024}) as s, s.client() as c:
        assert "nope" in error_of(
            c.post("/api/v1/runs", json={"saga": "nope"}), 422, "unknown_saga"
        )
        error_of(c.post("/api/v1/runs", json={"saga": "storno.plan"}), 422, "unknown_saga")
        bad_args = c.post("/api/v1/runs", json={"saga": "approval", "args": [1, 2, 3]})
        assert "approval" in error_of(bad_args, 422, "bad_arguments")
        error_of(
            c.post(
                "/api/v1/runs", content=b'{"saga": ', headers={"content-type": "application/json"}
            ),
            400,
            "malformed_json",
        )
        wrong_type = c.post("/api/v1/runs", json={"saga": "approval", "args": "1"})
        assert "args" in error_of(wrong_type, 422, "validation_error")
        extra = c.post("/api/v1/runs", json={"saga": "approval", "colour": "red"})
        assert "colour" in error_of(extra, 422, "validation_error")
        error_of(c.post("/api/v1/runs", json={"saga": "a\x00b"}), 422, "validation_error")
        error_of(
            c.post("/api/v1/runs", json={"saga": "approval", "args": [1], "timeout": -1}),
            422,
            "validation_error",
        )
        big = c.post("/api/v1/runs", json={"saga": "approval", "args": ["x" * 2000]})
        assert "1,024 bytes" in error_of(big, 413, "payload_too_large")
        huge = c.post("/api/v1/runs", content=b"x" * 200_000)
        error_of(huge, 413, "payload_too_large")
        assert c.get("/api/v1/runs").json()["runs"] == []  # nothing above started a run

        error_of(c.get("/api/v1/runs/no-such-run"), 404, "run_not_found")
        error_of(c.post("/api/v1/runs/no-such-run/signals/x", json={}), 404, "run_not_found")
        error_of(c.get("/api/v1/runs/a%01b"), 422, "invalid_run_id")
        error_of(c.get("/api/v1/runs", params={"status": "bogus"}), 422, "validation_error")
        error_of(c.get("/api/v1/runs", params={"limit": 0}), 422, "validation_error")
        typo = c.get("/api/v1/runs", params={"stauts": "waiting"})
        assert "'stauts'" in error_of(typo, 422, "unknown_parameter")
        error_of(c.get("/api/v1/nowhere"), 404, "not_found")
        error_of(c.delete("/api/v1/runs"), 405, "method_not_allowed")

        plan = c.post(
            "/api/v1/plans",
            json={"plan": [{"step": "send_sms", "args": ["x"]}, {"step": "missing"}]},
        )
        assert "missing" in error_of(plan, 422, "plan_invalid")

        run_id = start(c, "approval", 1)
        wait_status(c, run_id, "waiting")
        error_of(c.post(f"/api/v1/runs/{run_id}/retry", json={}), 409, "run_state")
        error_of(c.post(f"/api/v1/runs/{run_id}/resolve", json={"note": "x"}), 409, "run_state")
        error_of(c.post(f"/api/v1/runs/{run_id}/resolve", json={}), 422, "validation_error")
        error_of(c.post(f"/api/v1/runs/{run_id}/reject", json={}), 422, "validation_error")
        c.post(f"/api/v1/runs/{run_id}/reject", json={"reason": "no"}).raise_for_status()
        wait_status(c, run_id, "compensated")
        ended = c.post(f"/api/v1/runs/{run_id}/signals/late", json={"data": 1})
        assert "ended" in error_of(ended, 409, "run_state")
        error_of(c.post(f"/api/v1/runs/{run_id}/cancel", json={"reason": "x"}), 409, "run_state")
        error_of(c.get(f"/api/v1/runs/{run_id}/state/nothing"), 404, "not_published")


def test_signals_approval_cancel_queries(db_url: str):
    with serving(db_url) as s, s.client() as c:
        ship = start(c, "shipment")
        wait_status(c, ship, "waiting")
        url = f"/api/v1/runs/{ship}/signals/label_ready"
        first = c.post(url, json={"data": {"url": "https://x/1"}, "id": "evt-1"})
        assert first.status_code == 202 and first.json()["delivered"] == "new"
        second = c.post(url, json={"data": {"url": "https://x/2"}, "id": "evt-1"})
        assert second.json()["delivered"] == "duplicate"
        assert wait_status(c, ship, "completed")["result"] == {"url": "https://x/1"}

        decide = start(c, "approval", 10)
        wait_status(c, decide, "waiting")
        assert c.get(f"/api/v1/runs/{decide}/state").json()["value"] == {
            "phase": "waiting for a manager"
        }
        phase = c.get(f"/api/v1/runs/{decide}/state/phase").json()
        assert phase == {"run_id": decide, "name": "phase", "value": "waiting for a manager"}
        c.post(f"/api/v1/runs/{decide}/reject", json={"reason": "over budget", "by": "maria"})
        run = wait_status(c, decide, "compensated")
        assert "rejected by maria (via ops-alice): over budget" in run["error"]["message"]

        waiting = start(c, "shipment")
        wait_status(c, waiting, "waiting")
        response = c.post(f"/api/v1/runs/{waiting}/cancel", json={"reason": "customer left"})
        assert response.status_code == 202 and response.json()["action"] == "cancel"
        wait_status(c, waiting, "cancelled")

        parent = start(c, "conference", ["ada", "grace"])
        run = wait_status(c, parent, "completed")
        children = [step["child_run_id"] for step in run["steps"]]
        assert children == [f"{parent}/0", f"{parent}/1"]
        child = c.get(f"/api/v1/runs/{children[0]}").json()
        assert child["parent_run_id"] == parent and child["status"] == "completed"
        plan = c.post(
            "/api/v1/plans",
            json={"plan": {"steps": [{"step": "book_slot", "args": ["ada"]}]}, "run_id": "p-1"},
        )
        assert plan.status_code == 201, plan.text
        assert wait_status(c, "p-1", "completed")["result"] == ["slot for ada"]


def test_dead_letter_retry_and_resolve(db_url: str):
    REFUND_API["down"] = True
    try:
        with serving(db_url) as s, s.client() as c:
            run_id = start(c, "booking", "bob", 20, True)
            wait_status(c, run_id, "compensation_failed")
            letters = c.get("/api/v1/dead-letters").json()["runs"]
            assert [r["id"] for r in letters] == [run_id]
            assert "refund API is down" in letters[0]["error"]["message"]
            retried = c.post(f"/api/v1/runs/{run_id}/retry", json={"note": "try again"})
            assert retried.status_code == 202, retried.text
            wait_until(
                lambda: (
                    len(
                        [
                            e
                            for e in c.get(f"/api/v1/runs/{run_id}").json()["history"]
                            if e["type"] == "run_compensation_failed"
                        ]
                    )
                    == 2
                ),
                what="the retried compensation to fail again",
            )
            resolved = c.post(
                f"/api/v1/runs/{run_id}/resolve", json={"note": "refunded by hand", "by": "oncall"}
            )
            assert resolved.status_code == 200, resolved.text
            assert resolved.json()["run"]["status"] == "compensated"
            actions = [
                e["data"]
                for e in c.get(f"/api/v1/runs/{run_id}").json()["history"]
                if e["type"] == "operator_action"
            ]
            assert [(a["action"], a["by"]) for a in actions] == [
                ("retry", "ops-alice"),
                ("resolve", "oncall (via ops-alice)"),
            ]
            assert c.get("/api/v1/dead-letters").json()["runs"] == []
    finally:
        REFUND_API["down"] = False


def test_a_run_that_needs_attention_is_retried_compensated_or_resolved(db_url: str):
    NOTICE_API["down"] = True
    try:
        with serving(db_url) as s, s.client() as c:
            first, second = start(c, "announce", "ann"), start(c, "announce", "bo")
            wait_status(c, first, "needs_attention")
            wait_status(c, second, "needs_attention")
            shown = c.get(f"/api/v1/runs/{first}").json()
            assert "post_notice" in shown["error"]["message"]
            assert shown["steps"][1]["status"] == "unknown"
            refused = c.post(f"/api/v1/runs/{first}/compensate", json={})
            error_of(refused, 409, "run_state")
            assert "post_notice=not_applied" in refused.json()["error"]["message"]
            unsaid = c.post(f"/api/v1/runs/{first}/resolve", json={"note": "checked"})
            error_of(unsaid, 422, "invalid")
            done = c.post(
                f"/api/v1/runs/{first}/compensate",
                json={"not_applied": ["post_notice"], "note": "no notice in the channel"},
            )
            assert done.status_code == 202, done.text
            wait_status(c, first, "compensated")
            NOTICE_API["down"] = False
            retried = c.post(f"/api/v1/runs/{second}/retry", json={"note": "channel is back"})
            assert retried.status_code == 202, retried.text
            wait_status(c, second, "completed")
            actions = [
                e["data"]
                for e in c.get(f"/api/v1/runs/{first}").json()["history"]
                if e["type"] == "operator_action"
            ]
            assert actions[0]["action"] == "compensate" and actions[0]["by"] == "ops-alice"
            assert actions[0]["not_applied"] == [1]
    finally:
        NOTICE_API["down"] = False


def test_webhook_turns_callbacks_into_signals_once(db_url: str):
    with serving(db_url) as s, s.client() as c, s.client(token=None) as provider:
        run_id = start(c, "shipment")
        wait_status(c, run_id, "waiting")
        hook = f"/api/v1/webhooks/{run_id}/label_ready"
        error_of(provider.post(hook, json={}), 401, "unauthorized")
        error_of(provider.post(hook, json={}, params={"token": READ_TOKEN}), 403, "forbidden")
        bad = provider.post(
            hook,
            content=b"{oops",
            headers={"content-type": "application/json", "X-Storno-Token": WEBHOOK_TOKEN},
        )
        error_of(bad, 400, "malformed_json")
        delivered = provider.post(
            hook,
            json={"url": "https://labels/1"},
            params={"token": WEBHOOK_TOKEN},
            headers={"Webhook-Id": "msg_1"},
        )
        assert delivered.status_code == 202, delivered.text
        assert delivered.json() == {
            "run_id": run_id,
            "signal": "label_ready",
            "delivered": "new",
            "id": "msg_1",
        }
        repeat = provider.post(
            hook,
            json={"url": "https://labels/2"},
            headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}", "Webhook-Id": "msg_1"},
        )
        assert repeat.json()["delivered"] == "duplicate"
        assert wait_status(c, run_id, "completed")["result"] == {"url": "https://labels/1"}
        history = c.get(f"/api/v1/runs/{run_id}").json()["history"]
        assert WEBHOOK_TOKEN not in str(history)
        error_of(provider.post(hook, params={"token": WEBHOOK_TOKEN}), 409, "run_state")

        form = start(c, "shipment")
        wait_status(c, form, "waiting")
        sent = provider.post(
            f"/api/v1/webhooks/{form}/label_ready",
            params={"token": WEBHOOK_TOKEN, "id_field": "id"},
            content=b"id=evt_9&status=paid&status=shipped",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert sent.json()["id"] == "evt_9", sent.text
        result = wait_status(c, form, "completed")["result"]
        assert result == {"id": "evt_9", "status": ["paid", "shipped"]}
        missing = provider.post(
            f"/api/v1/webhooks/{form}/label_ready",
            params={"token": WEBHOOK_TOKEN, "id_field": "event.id"},
            json={"event": {}},
        )
        error_of(missing, 422, "missing_event_id")
        error_of(
            provider.post(
                "/api/v1/webhooks/no-such-run/x", params={"token": WEBHOOK_TOKEN}, json={}
            ),
            404,
            "run_not_found",
        )


def test_stuck_runs(db_url: str):
    make_old_run(db_url, "orphan", "old-pending", 7200)
    make_old_run(db_url, "orphan", "young-pending", 60)
    make_old_run(db_url, "orphan", "scheduled", 7200, start_delay=timedelta(hours=5))
    make_old_run(db_url, "conference", "old-conference", 120, args=[[]])
    with serving(db_url, worker=False) as s, s.client() as c:
        found = c.get("/api/v1/stuck").json()
        ids = [r["id"] for r in found["runs"]]
        assert ids == ["old-pending", "old-conference"]  # least recently changed first
        assert "not picked up" in found["runs"][0]["stuck_reason"]
        assert found["runs"][1]["stuck_threshold_seconds"] == 60  # conference's stuck_after
        tighter = c.get("/api/v1/stuck", params={"older_than": 30}).json()
        assert {r["id"] for r in tighter["runs"]} == {
            "old-pending",
            "young-pending",
            "old-conference",
        }
        assert c.get("/api/v1/stats").json()["stuck"] == 2
        run = c.get("/api/v1/runs/old-pending").json()
        assert run["stuck"] is True and "2.0h" in run["stuck_reason"]
        listed = {r["id"]: r["stuck"] for r in c.get("/api/v1/runs").json()["runs"]}
        assert listed == {
            "old-pending": True,
            "young-pending": False,
            "scheduled": False,
            "old-conference": True,
        }
        metrics = c.get("/metrics").text
        assert 'storno_stuck_runs{saga="orphan"} 1.0' in metrics
        assert 'storno_stuck_runs{saga="conference"} 1.0' in metrics
        assert time.time() > 0
