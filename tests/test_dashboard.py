"""The dashboard: login, escaping, server-side refusal of actions, and a real browser.

The browser test drives Debian's chromium through Playwright (never a downloaded browser):
it loads the run list, opens a compensated run and reads its compensations in reverse order,
resolves a dead letter with an operator token, and finds the resolve button absent (and the
action refused by the server) with a read-only token. ``STORNO_UPDATE_SCREENSHOT=1`` also
saves the run page to ``docs/dashboard.png``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from test_server_support import (
    NOTICE_API,
    OPERATOR_TOKEN,
    READ_TOKEN,
    REFUND_API,
    WEBHOOK_TOKEN,
    serving,
    start,
    wait_status,
)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def signed_in(url: str, token: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=10)
    response = client.post("/ui/login", data={"token": token, "next": "/ui/"})
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/ui/"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    return client


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "no form token on the page"
    return found.group(1)


def test_pages_need_a_token_and_escape_everything(db_url: str):
    with serving(db_url) as s, s.client() as api:
        hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
        run_id = start(api, "booking", hostile, 5, True)
        wait_status(api, run_id, "compensated")
        anonymous = httpx.Client(base_url=s.url, timeout=10)
        to_login = anonymous.get(f"/ui/runs/{run_id}")
        assert to_login.status_code == 303
        assert to_login.headers["location"].startswith("/ui/login?next=%2Fui%2Fruns%2F")
        assert anonymous.get("/").headers["location"] == "/ui/"
        refused = anonymous.post("/ui/login", data={"token": WEBHOOK_TOKEN})
        assert refused.status_code == 401 and "not valid" in refused.text
        assert "set-cookie" not in refused.headers

        reader = signed_in(s.url, READ_TOKEN)
        page = reader.get(f"/ui/runs/{run_id}")
        assert page.status_code == 200
        assert "<script>alert" not in page.text and "<img src=x" not in page.text
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        listing = reader.get("/ui/")
        assert run_id in listing.text and "viewer · read-only" in listing.text
        for html in (page.text, listing.text):
            assert not re.search(r'(src|href)="(https?:)?//', html), "an external asset"
        assert reader.get("/ui/static/storno.js").status_code == 200
        assert reader.get("/ui/static/storno.css").status_code == 200
        assert reader.get("/ui/runs/no-such-run").status_code == 404
        assert reader.get("/ui/", params={"status": "bogus"}).status_code == 422


def test_actions_are_refused_on_the_server_without_an_operator(db_url: str):
    REFUND_API["down"] = True
    try:
        with serving(db_url) as s, s.client() as api:
            run_id = start(api, "booking", "eve", 5, True)
            wait_status(api, run_id, "compensation_failed")
            reader = signed_in(s.url, READ_TOKEN)
            page = reader.get(f"/ui/runs/{run_id}").text
            assert "/resolve" not in page and "Sign in with an operator token" in page
            action = f"/ui/runs/{run_id}/resolve"
            forged = reader.post(action, data={"note": "x", "csrf": "0" * 40})
            assert forged.status_code == 403 and "stale or forged" in forged.text
            own = reader.post(action, data={"note": "x", "csrf": csrf_of(reader.get("/ui/").text)})
            assert own.status_code == 403 and "operator token" in own.text
            assert reader.get("/ui/dead-letters").text.count("/resolve") == 0

            operator = signed_in(s.url, OPERATOR_TOKEN)
            no_token = operator.post(action, data={"note": "refunded by hand"})
            assert no_token.status_code == 403
            assert wait_status(api, run_id, "compensation_failed")  # unchanged
            token = csrf_of(operator.get(f"/ui/runs/{run_id}").text)
            done = operator.post(action, data={"note": "refunded by hand", "csrf": token})
            assert done.status_code == 303 and "notice=" in done.headers["location"]
            run = wait_status(api, run_id, "compensated")
            assert run["history"][-1]["data"]["by"] == "ops-alice"
    finally:
        REFUND_API["down"] = False


def test_a_run_that_needs_attention_can_be_compensated_or_resolved_from_its_page(db_url: str):
    NOTICE_API["down"] = True
    try:
        with serving(db_url) as s, s.client() as api:
            first, second = start(api, "announce", "ann"), start(api, "announce", "bo")
            wait_status(api, first, "needs_attention")
            wait_status(api, second, "needs_attention")
            operator = signed_in(s.url, OPERATOR_TOKEN)
            page = operator.get(f"/ui/runs/{first}").text
            assert "Needs attention" in page and f"/ui/runs/{first}/compensate" in page
            assert 'value="post_notice"' in page  # the step of unknown outcome, to confirm
            token = csrf_of(page)
            done = operator.post(
                f"/ui/runs/{first}/compensate",
                data={"not_applied": "post_notice", "note": "not in the channel", "csrf": token},
            )
            assert done.status_code == 303, done.text
            wait_status(api, first, "compensated")
            closed = operator.post(
                f"/ui/runs/{second}/resolve",
                data={"note": "posted by hand", "outcome": "completed", "csrf": token},
            )
            assert closed.status_code == 303, closed.text
            assert "Marked+completed+by+hand" in closed.headers["location"]
            wait_status(api, second, "completed")
            refused = operator.post(f"/ui/runs/{second}/compensate", data={"csrf": token})
            assert refused.status_code == 409
    finally:
        NOTICE_API["down"] = False


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium (apt-get install -y chromium; .ci/run installs it)",
)
def test_browser_walkthrough(tmp_path: Path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (dev extra)")
    db_url = f"sqlite:///{tmp_path / 'storno.db'}"
    with serving(db_url) as s, s.client() as api:
        compensated = start(api, "booking", "alice", 49, True, run_id="booking-42")
        wait_status(api, compensated, "compensated")
        REFUND_API["down"] = True
        try:
            dead = [start(api, "booking", name, 20, True) for name in ("bob", "carol")]
            for run_id in dead:
                wait_status(api, run_id, "compensation_failed")
        finally:
            REFUND_API["down"] = False
        waiting = start(api, "approval", 300)
        wait_status(api, waiting, "waiting")

        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1180, "height": 900})
                page.on("dialog", lambda dialog: dialog.accept())
                page.goto(f"{s.url}/ui/")
                assert "/ui/login" in page.url
                page.fill("input[name=token]", OPERATOR_TOKEN)
                page.click("button[type=submit]")
                page.wait_for_url(f"{s.url}/ui/")

                # The list: every run, with counts per status.
                rows = page.locator("table.runs tbody tr[data-run]")
                assert rows.count() == 4
                chip = page.locator("a.chip[data-status=compensation_failed] b")
                assert chip.inner_text() == "2"

                # A compensated run: compensations in reverse order of the steps.
                page.click(f"a:text-is('{compensated}')")
                page.wait_for_url(f"{s.url}/ui/runs/{compensated}")
                order = page.locator("ol.compensations > li").evaluate_all(
                    "items => items.map(li => Number(li.dataset.position))"
                )
                assert order == [2, 1, 0]
                undo = page.locator("ol.compensations b.name").all_inner_texts()
                assert undo == ["undo send_sms", "undo charge_card", "undo book_slot"]
                assert "read-back by key: it landed" in page.inner_text("ol.forward")
                assert page.locator("form[action$='/resolve']").count() == 0
                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                if os.environ.get("STORNO_UPDATE_SCREENSHOT") == "1":
                    shutil.copy(shot, ROOT / "docs" / "dashboard.png")

                # Resolve a dead letter as an operator.
                page.goto(f"{s.url}/ui/dead-letters")
                row = page.locator(f"tr[data-run='{dead[0]}']")
                row.locator("form[action$='/resolve'] input[name=note]").fill("refunded by hand")
                row.locator("button.resolve").click()
                page.wait_for_selector("p.notice")
                assert "Marked compensated by hand." in page.inner_text("p.notice")
                assert page.locator(f"tr[data-run='{dead[0]}']").count() == 0
                assert wait_status(api, dead[0], "compensated")

                # Read-only: no resolve button, and the server refuses a forged post.
                page.click("button.link")  # sign out
                page.wait_for_url(re.compile(r".*/ui/login"))
                page.fill("input[name=token]", READ_TOKEN)
                page.click("button[type=submit]")
                page.goto(f"{s.url}/ui/runs/{dead[1]}")
                assert page.locator("form[action$='/resolve']").count() == 0
                assert page.locator("button.resolve").count() == 0
                status: Any = page.evaluate(
                    """async (url) => {
                        const r = await fetch(url, {method: "POST", body: "note=x&csrf=0",
                            headers: {"content-type": "application/x-www-form-urlencoded"}});
                        return r.status;
                    }""",
                    f"{s.url}/ui/runs/{dead[1]}/resolve",
                )
                assert status == 403
                assert wait_status(api, dead[1], "compensation_failed")
            finally:
                browser.close()
