"""The dashboard's outbox and correlation pages, and what the run page shows of events:
sign-in, escaping, the operator forms' server-side checks, and a real browser."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from events_app import RELAY_OPTIONS, charge, confirm, enqueue, order, payment
from storno.events import MemoryBroker
from test_dashboard import BROWSER_ARGS, CHROMIUM, csrf_of, signed_in
from test_http_events import ROWS, dead_letters
from test_server_support import OPERATOR_TOKEN, READ_TOKEN, serving, start, wait_status

HOSTILE = '<script>alert("x")</script>'


def test_the_outbox_page_shows_the_state_and_lets_only_operators_act(db_url: str):
    with serving(db_url, worker=False) as s:
        rows = [*ROWS, ("hostile/1", "order.placed", "o-9", {"note": HOSTILE})]
        enqueue(db_url, *rows, source=HOSTILE)
        dead_letters(db_url, ["orders/2/placed", "hostile/1"])
        anonymous = signed_in(s.url, READ_TOKEN)
        anonymous.cookies.clear()
        assert anonymous.get("/ui/outbox").status_code == 303  # to the login page

        reader = signed_in(s.url, READ_TOKEN)
        page = reader.get("/ui/outbox")
        assert page.status_code == 200, page.text
        html = page.text
        assert 'href="/ui/outbox" aria-current="page"' in html
        assert re.search(r'data-stat="pending">3<', html) and re.search(
            r'data-stat="dead">2<', html
        )
        assert html.count('<tr data-event="orders/2/placed">') == 2  # dead letters, and recent
        assert "<script>alert" not in html and "&lt;script&gt;" in html
        assert "/discard" not in html and "Sign in with an operator token" in html
        assert reader.get("/ui/outbox", params={"status": "lost"}).status_code == 422
        only = reader.get("/ui/outbox", params={"status": "pending"}).text
        assert 'data-event="orders/1/placed"' in only and 'data-event="orders/3/placed"' in only
        assert 'data-event="orders/2/placed"' not in only.split("Recent events")[1]
        action = "/ui/outbox/orders/2/placed/discard"
        forged = reader.post(action, data={"csrf": "0" * 40})
        assert forged.status_code == 403 and "stale or forged" in forged.text
        own = reader.post(action, data={"csrf": csrf_of(html)})
        assert own.status_code == 403 and "operator token" in own.text

        operator = signed_in(s.url, OPERATOR_TOKEN)
        html = operator.get("/ui/outbox").text
        assert 'action="/ui/outbox/orders/2/placed/retry"' in html
        token = csrf_of(html)
        assert operator.post(action, data={}).status_code == 403
        done = operator.post(action, data={"csrf": token, "note": "poison"})
        assert done.status_code == 303 and done.headers["location"].startswith("/ui/outbox?notice=")
        retried = operator.post("/ui/outbox/hostile%2F1/retry", data={"csrf": token})
        assert retried.status_code == 303, retried.text
        after = operator.get("/ui/outbox").text
        assert "No dead letters." in after
        again = operator.post(action, data={"csrf": token})
        assert again.status_code == 409 and "discarded, not a dead letter" in again.text
        missing = operator.post("/ui/outbox/no/such/retry", data={"csrf": token})
        assert missing.status_code == 404
        assert (
            operator.post("/ui/outbox/orders/1/placed/send", data={"csrf": token}).status_code
            == 404
        )


def test_the_run_page_links_its_correlation_whose_page_shows_one_timeline(db_url: str):
    events = {
        "broker": MemoryBroker(),
        "handlers": [charge, confirm],
        "relay_options": RELAY_OPTIONS,
    }
    with (
        serving(db_url, app_options=events, extra_sagas=(order, payment)) as s,
        s.client() as api,
    ):
        run_id = start(api, "order", HOSTILE, run_id="ord/7")
        wait_status(api, "ord%2F7", "completed")
        reader = signed_in(s.url, READ_TOKEN)
        page = reader.get("/ui/runs/ord/7").text
        assert '<a class="mono" href="/ui/correlations/ord/7">ord/7</a>' in page
        assert (
            "emitted <b>slot.reserved</b>" in page
            and '→ event <span class="mono">ord/7/1</span>' in page
        )
        assert "<script>alert" not in page
        assert "sent by event" in page and 'href="/ui/runs/ord/7/1%40charge"' in page
        child = reader.get("/ui/runs/ord%2F7%2F1@charge").text
        assert 'started by event <span class="mono">ord/7/1</span> (slot.reserved)' in child
        assert 'from run <a class="mono" href="/ui/runs/ord/7">ord/7</a>' in child
        assert "handler <b>charge</b>" in child
        assert 'href="/ui/correlations/ord/7"' in child

        found = reader.get("/ui/correlations/ord%2F7")
        assert found.status_code == 200, found.text
        html = found.text
        assert "<script>alert" not in html and "&lt;script&gt;" in html
        rows = re.findall(r'<tr data-run="([^"]+)">', html)
        assert rows == [run_id, "ord/7/1@charge"]
        kinds = re.findall(r'data-kind="(\w+)" data-run="([^"]+)"', html)
        assert kinds[0] == ("started", run_id) and kinds[-1] == ("ended", run_id)
        assert ("signalled", run_id) in kinds and ("started", "ord/7/1@charge") in kinds
        assert "taken by" in html
        assert reader.get("/ui/correlations/ord/7").text == html
        assert reader.get("/ui/correlations/nobody").status_code == 404
        plain = start(api, "shipment", run_id="quiet-1")
        wait_status(api, plain, "waiting")
        assert "/ui/correlations/" not in reader.get("/ui/runs/quiet-1").text


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium (apt-get install -y chromium; .ci/run installs it)",
)
def test_browser_discards_a_dead_letter_and_follows_a_correlation(tmp_path: Path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (dev extra)")
    db_url = f"sqlite:///{tmp_path / 'storno.db'}"
    broker = MemoryBroker()
    events = {
        "broker": broker,
        "handlers": [charge, confirm],
        "relay_options": RELAY_OPTIONS,
    }
    with (
        serving(db_url, app_options=events, extra_sagas=(order, payment)) as s,
        s.client() as api,
    ):
        run_id = start(api, "order", "B2", run_id="ord-9")
        wait_status(api, run_id, "completed")
        broker.refuse = lambda m: ValueError("too big") if m.topic == "poison.x" else None
        enqueue(db_url, ("p-9", "poison.x", "k9", {"n": 1}))
        deadline = time.monotonic() + 15
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            try:
                page = browser.new_page()
                page.on("dialog", lambda dialog: dialog.accept())
                page.goto(f"{s.url}/ui/login")
                page.fill("input[name=token]", OPERATOR_TOKEN)
                page.click("button[type=submit]")
                page.wait_for_url(f"{s.url}/ui/")
                page.click("nav a:text-is('Outbox')")
                page.wait_for_url(f"{s.url}/ui/outbox")
                while page.locator("table.dead tr[data-event='p-9']").count() == 0:
                    assert time.monotonic() < deadline, "the poison event never became dead"
                    page.wait_for_timeout(100)
                    page.reload()
                row = page.locator("table.dead tr[data-event='p-9']")
                row.locator("form[action$='/discard'] input[name=note]").fill("poison, dropped")
                row.locator("button.reject").click()
                page.wait_for_selector("p.notice")
                assert "Discarded." in page.inner_text("p.notice")
                assert page.locator("table.dead tr[data-event='p-9']").count() == 0
                assert page.inner_text("b[data-stat=dead]") == "0"

                page.goto(f"{s.url}/ui/runs/{run_id}")
                page.click(f"p.correlation a:text-is('{run_id}')")
                page.wait_for_url(f"{s.url}/ui/correlations/{run_id}")
                kinds = page.locator("ol.correlation > li").evaluate_all(
                    "items => items.map(li => li.dataset.kind + ' ' + li.dataset.run)"
                )
                assert kinds[0] == f"started {run_id}" and kinds[-1] == f"ended {run_id}"
                assert f"started {run_id}/1@charge" in kinds
            finally:
                browser.close()
