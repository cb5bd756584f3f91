"""The owner's web page (api/web.py) on a real uvicorn server: in a real browser (Debian's chromium,
driven by playwright) and with plain httpx for the security cases and hostile input. The lineage is
tiny and fake, and the hot-swap loads fake engines: no model inference."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time

import httpx
import pytest

from api.web import MAX_FORM_BYTES
from api.web_auth import COOKIE, LOGIN_S, SESSION_S, WebAuth
from config.settings import load_settings
from memory.export import reviewed_since
from ouro.cli import main
from tests.helpers.fault_helpers import paused_cycle_command
from tests.helpers.web import ADMIN, start_web

CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


@pytest.fixture
def web(tmp_path, monkeypatch):
    monkeypatch.setenv("OURO_ADMIN_IDS", str(ADMIN))
    server = start_web(tmp_path)
    yield server
    server.close()


def login_link(web, capsys, *args: str) -> str:
    """What `ouro web-login` prints for this server."""
    port = web.base_url.rsplit(":", 1)[1]
    capsys.readouterr()
    assert main(["--data-dir", str(web.settings.data_dir), "web-login", "--port", port, *args]) == 0
    link = capsys.readouterr().out.strip()
    assert link.startswith(f"{web.base_url}/login?token=")
    return link


def logged_in(web, capsys) -> httpx.Client:
    client = httpx.Client(base_url=web.base_url, follow_redirects=False, timeout=20)
    reply = client.get(login_link(web, capsys, "--admin", str(ADMIN)).removeprefix(web.base_url))
    assert reply.status_code == 303 and reply.headers["location"] == "/"
    return client


def csrf_of(client: httpx.Client, path: str = "/review") -> str:
    return CSRF.search(client.get(path).text).group(1)


def example_texts(web) -> str:
    return reviewed_since(web.store, persona="P", since=None).to_jsonl()


# --- in a real browser ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    # no skip: `make test` installs both (.ci/chromium, the dev extra); a missing browser fails here
    from playwright import sync_api

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is not installed: `make test` installs it (.ci/chromium), or apt-get install chromium"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()


def chart_width(page) -> int:
    """The chart's width once loaded (polled from here: the page's CSP allows no script to wait with)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        width = page.locator("#chart").evaluate("img => img.complete ? img.naturalWidth : -1")
        if width >= 0:
            return width
        time.sleep(0.1)
    return -1


def test_browser_logs_in_sees_the_lineage_and_promotes_with_confirmation(web, page, capsys):
    page.goto(login_link(web, capsys))                                  # as the owner
    assert page.url == f"{web.base_url}/" and page.inner_text("#active") == "gen-0000"
    cookie = next(c for c in page.context.cookies() if c["name"] == COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    page.click("text=Lineage")
    page.wait_for_url(f"{web.base_url}/lineage")    # a click does not wait for the page it opens (flaked under load)
    page.wait_for_selector("#generations")
    rows = page.locator("#generations tr[id^=row-]")
    assert rows.count() == 3
    one = page.inner_text("#row-gen-0001")
    assert "gen-0000" in one and "37 examples, 4 pairs" in one and "0.93 (parent 0.91)" in one
    refused = page.inner_text("#row-gen-0002")
    assert "refused" in refused and "recall 0.70 < 0.90 <script>alert(1)</script>" in refused   # shown, as text
    assert "base by system" in page.inner_text("#row-gen-0000")
    assert chart_width(page) > 100                                      # the chart, drawn as a PNG

    page.click("#promote-gen-0001")
    assert "Promote from gen-0000 to gen-0001?" in page.inner_text("#question")
    assert web.lineage.active_id() == "gen-0000"                         # nothing happens before confirming
    page.fill("input[name=reason]", "better recall")
    page.click("#confirm")
    assert "Promoted: gen-0000 → gen-0001. Now serving gen-0001." in page.inner_text("#result")
    assert web.lineage.active_id() == "gen-0001"
    assert web.worker.engine.generation_id == "gen-0001"                # hot-swapped by the learning loop
    last = web.lineage.ledger()[-1]
    assert (last["event"], last["gen_folder"], last["actor"]) == ("promote", "gen-0001", "owner (web page)")
    assert last["reason"] == "promote by owner (web page): better recall"
    assert web.store.last_event(("promote",))["kind"] == "promote"

    page.goto(f"{web.base_url}/lineage")
    assert "promote by owner (web page)" in page.inner_text("#row-gen-0001")
    page.click("#rollback")                                              # back to gen-0001's parent
    assert "Rollback from gen-0001 to gen-0000?" in page.inner_text("#question")
    page.click("#confirm")
    assert "Rolled back: gen-0001 → gen-0000" in page.inner_text("#result")
    assert web.lineage.active_id() == "gen-0000" and web.lineage.ledger()[-1]["event"] == "rollback"


def test_browser_reviews_the_queue_and_approval_makes_a_training_example(web, page, capsys):
    ann, bob = web.turns
    page.goto(login_link(web, capsys, "--admin", str(ADMIN)))
    page.goto(f"{web.base_url}/review")
    assert "2 waiting" in page.inner_text("#waiting")
    card = page.locator(f"#turn-{ann}")
    assert "from Ann" in card.inner_text() and "served answer 0 <b>bold?</b>" in card.inner_text()
    assert "question 0 from Ann" not in example_texts(web)

    card.locator("button[value=approve]").click()
    page.wait_for_selector(f"#turn-{ann}", state="detached")
    assert "1 waiting" in page.inner_text("#waiting")
    assert web.store.review_verdict(ann) == "approved"
    assert "served answer 0" in example_texts(web)                      # a training example now
    assert web.store.last_event(("review",))["user_id"] == ADMIN

    page.select_option("select[name=person]", str(1002))                # the filter by person
    page.click("text=Filter")
    card = page.locator(f"#turn-{bob}")
    card.locator("summary").click()
    card.locator("textarea[name=text]").fill("a much better answer, Bob")
    card.locator("button[value=edit]").click()
    page.wait_for_selector("#empty")
    assert web.store.review_verdict(bob) == "edited"
    assert "a much better answer, Bob" in example_texts(web)


def test_browser_review_keys_record_verdicts_on_the_focused_item(web, page, capsys):
    ann, bob = web.turns
    page.goto(login_link(web, capsys, "--admin", str(ADMIN)))
    page.goto(f"{web.base_url}/review")
    assert "focused" in page.get_attribute(f"#turn-{ann}", "class")   # the first item has the focus
    page.keyboard.press("j")                                          # move to Bob's
    assert "focused" in page.get_attribute(f"#turn-{bob}", "class")
    page.keyboard.press("r")
    page.wait_for_selector(f"#turn-{bob}", state="detached")
    page.wait_for_selector("html[data-keys=on]")                    # the reloaded page's shortcuts listen
    assert web.store.review_verdict(bob) == "rejected" and web.store.review_verdict(ann) is None
    page.keyboard.press("k")                                          # at the top already: stays on Ann's
    page.keyboard.press("a")
    page.wait_for_selector("#empty")
    assert web.store.review_verdict(ann) == "approved"
    assert web.store.last_event(("review",))["user_id"] == ADMIN


def test_browser_review_key_e_opens_the_editor_and_typing_there_presses_nothing(web, page, capsys):
    ann, _bob = web.turns
    page.goto(login_link(web, capsys, "--admin", str(ADMIN)))
    page.goto(f"{web.base_url}/review")
    page.keyboard.press("e")
    textarea = page.locator(f"#turn-{ann} textarea[name=text]")
    assert textarea.is_visible() and textarea.evaluate("t => t === document.activeElement")
    page.keyboard.type("a reply with a, r, s and j in it")           # keys typed in the editor are text
    page.locator(f"#turn-{ann} button[value=edit]").click()
    page.wait_for_selector(f"#turn-{ann}", state="detached")
    assert web.store.review_verdict(ann) == "edited" and "a reply with a, r, s and j in it" in example_texts(web)
    assert web.store.review_verdict(web.turns[1]) is None


def test_browser_forgets_a_person_after_confirmation(web, page, capsys):
    ann, bob = web.turns
    web.store.rate(ann, 1001, 1)
    page.goto(login_link(web, capsys))                                  # as the owner
    page.click("text=People")
    row = page.inner_text("#person-1001")
    assert "Ann" in row and "other" in row and "may train" in row
    assert page.inner_text("#person-1001 .messages") == "1"
    page.click("#forget-1001")
    assert "Forget Ann?" in page.inner_text("h1") and "1 messages" in page.inner_text("#question")
    assert web.store.turn(ann) is not None                               # nothing happens before confirming
    page.click("#confirm")
    assert "Forgotten: 1 messages" in page.inner_text("#result")
    assert web.store.turn(ann) is None and web.store.user_data_counts(1001) == {
        "messages": 0, "ratings": 0, "corrections": 0, "picks": 0}
    assert web.store.turn(bob) is not None                               # only Ann
    assert len(web.store.tombstones()) == 1                              # /forget's audit trail
    assert web.store.last_event(("forgotten",)) is not None
    assert web.store.last_event(("forget_by_admin",))["user_id"] == 0
    page.goto(f"{web.base_url}/people")
    assert page.locator("#person-1001").count() == 0 and page.locator("#person-1002").count() == 1


def test_people_shows_each_tier(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OURO_ADMIN_IDS", str(ADMIN))
    web = start_web(tmp_path, people=((1001, "Ann"), (1002, "Bob"), (ADMIN, "Boss")), trusted_user_ids=[1002])
    try:
        text = logged_in(web, capsys).get("/people").text
        tiers = dict(re.findall(r'id="person-(\d+)">.*?<td class="tier">(\w+)</td>', text, re.S))
        assert tiers == {"1001": "other", "1002": "trusted", str(ADMIN): "admin"}
    finally:
        web.close()


def test_people_posts_need_csrf_and_the_opt_out_follows_optout(web, capsys):
    ann = web.turns[0]
    with httpx.Client(base_url=web.base_url, follow_redirects=False) as anon:
        assert anon.get("/people").status_code == 303
        assert anon.post("/people/forget", data={"person": "1001"}).status_code == 403
    client = logged_in(web, capsys)
    page = client.get("/people")
    assert page.status_code == 200 and 'id="person-1001"' in page.text and "<script" not in page.text
    token = CSRF.search(page.text).group(1)
    other = logged_in(web, capsys)
    forged = [client.post("/people/forget", data={"person": "1001"}),                       # no token
              client.post("/people/forget", data={"person": "1001", "csrf": "0" * 64}),
              other.post("/people/forget", data={"person": "1001", "csrf": token}),          # another session's
              client.post("/people/forget", data={"person": "1001", "csrf": token},
                          headers={"origin": "http://evil.example"}),
              client.post("/people/forget", json={"person": "1001", "csrf": token}),
              client.post("/people/optout", data={"person": "1001", "value": "out"})]
    assert [r.status_code for r in forged] == [403] * 6
    assert web.store.turn(ann) is not None and web.store.training_opt_out(1001) is None
    for person in ("x", "1 OR 1=1", "9" * 30, "555"):
        assert client.get("/people/forget", params={"person": person}).status_code == 404, person
        assert client.post("/people/forget", data={"person": person, "csrf": token}).status_code == 404, person

    assert client.post("/people/optout", data={"person": "1001", "value": "out", "csrf": token}).status_code == 303
    assert web.store.training_opt_out(1001) is True and "kept out" in client.get("/people").text
    event = web.store.last_event(("training_opt_out",))
    assert event["user_id"] == 1001 and f"admin {ADMIN} (web page)" in event["detail"]
    assert client.post("/people/optout", data={"person": "1001", "value": "in", "csrf": token}).status_code == 303
    assert web.store.training_opt_out(1001) is False
    web.store.set_training_opt_out(1002, True)                          # Bob's own /optout
    web.store.log_event("training_opt_out", user_id=1002)
    refused = client.post("/people/optout", data={"person": "1002", "value": "in", "csrf": token})
    assert refused.status_code == 409 and "only they can /optin" in refused.text
    assert web.store.training_opt_out(1002) is True


def test_browser_starts_a_cycle_with_confirmation_and_shows_its_stage(web, page, capsys):
    web.learning.runner.command = paused_cycle_command("export")       # a real cycle process, held at export
    try:
        page.goto(login_link(web, capsys))
        assert "no learning cycle running" in page.inner_text("#cycle")
        page.click("#start-cycle")
        assert "Start a learning cycle?" in page.inner_text("h1")
        assert web.learning.cycle_status() is None                        # nothing happens before confirming
        page.click("#confirm")
        assert page.url == f"{web.base_url}/"
        deadline = time.monotonic() + 60
        while page.get_attribute("#cycle", "data-stage") != "export" and time.monotonic() < deadline:
            time.sleep(0.3)
            page.reload()
        assert page.get_attribute("#cycle", "data-stage") == "export"
        assert "cycle running (started by owner (web page)" in page.inner_text("#cycle")
        assert web.learning.runner.running and web.learning.runner.actor == "owner (web page)"
        assert web.store.last_event(("cycle_started",)) is not None    # as /train: the loop's own record
        assert page.locator("#start-cycle").count() == 0
        page.goto(f"{web.base_url}/cycle/start")                           # a second one is refused
        assert "already running" in page.inner_text("#result")
    finally:
        web.in_server_loop(web.learning.stop())                          # kills the held cycle process
        if web.learning.runner.proc is not None:
            web.in_server_loop(asyncio.wait_for(web.learning.runner.proc.wait(), 30))
    assert not web.learning.runner.running


def test_start_cycle_needs_csrf_and_a_learning_loop(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OURO_ADMIN_IDS", str(ADMIN))
    web = start_web(tmp_path, with_loop=False)
    try:
        client = logged_in(web, capsys)
        assert "start-cycle" not in client.get("/").text
        assert client.get("/cycle/start").status_code == 409
        assert client.post("/cycle/start", data={"csrf": csrf_of(client, "/")}).status_code == 409
        assert client.post("/cycle/start", data={}).status_code == 403
        assert not web.learning.runner.running
    finally:
        web.close()


def test_browser_without_a_session_gets_the_login_notice(web, page, capsys):
    reply = page.goto(f"{web.base_url}/lineage")
    assert page.url == f"{web.base_url}/login" and reply.status == 401
    assert "ouro web-login" in page.inner_text("#login-notice")
    assert page.locator("#generations").count() == 0
    link = login_link(web, capsys)
    page.goto(link)
    assert page.url == f"{web.base_url}/"
    page.context.clear_cookies()
    reply = page.goto(link)                                             # a link works once
    assert reply.status == 401 and page.locator("#login-failed").count() == 1


def test_browser_form_without_its_csrf_token_is_refused(web, page, capsys):
    page.goto(login_link(web, capsys))
    page.goto(f"{web.base_url}/lineage/promote?gen=gen-0001")
    page.locator("main input[name=csrf]").evaluate("e => e.remove()")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.click("#confirm")
    assert posted.value.status == 403
    assert "stale" in page.inner_text("#result")
    assert web.lineage.active_id() == "gen-0000" and web.lineage.ledger()[-1]["event"] == "base"


# --- plain HTTP: sessions, CSRF, hostile input ------------------------------------------------------
def test_no_session_is_sent_to_the_login_notice_and_refused_on_post(web):
    with httpx.Client(base_url=web.base_url, follow_redirects=False) as client:
        for path in ("/", "/lineage", "/review", "/lineage/promote?gen=gen-0001"):
            reply = client.get(path)
            assert reply.status_code == 303 and reply.headers["location"] == "/login", path
        assert client.get("/login").status_code == 401
        assert client.get("/lineage/chart.png").status_code == 403
        for path in ("/lineage/promote", "/review/1", "/logout"):
            assert client.post(path, data={"gen": "gen-0001", "action": "approve"}).status_code == 403
    forged_cookie = {COOKIE: f"{ADMIN}.9999999999.AAAAAAAAAAAAAAAA.{'0' * 64}"}
    with httpx.Client(base_url=web.base_url, follow_redirects=False, cookies=forged_cookie) as client:
        assert client.get("/lineage").status_code == 303
        assert client.post("/lineage/promote", data={"gen": "gen-0001", "active": "gen-0000"}).status_code == 403
    assert web.lineage.active_id() == "gen-0000" and web.store.review_verdict(1) is None


def test_posts_need_the_sessions_csrf_token_and_the_same_origin(web, capsys):
    client = logged_in(web, capsys)
    token = csrf_of(client)
    ann = web.turns[0]
    assert client.post(f"/review/{ann}", data={"action": "approve"}).status_code == 403
    assert client.post(f"/review/{ann}", data={"action": "approve", "csrf": "0" * 64}).status_code == 403
    other = logged_in(web, capsys)                                     # another session's token
    assert other.post(f"/review/{ann}", data={"action": "approve", "csrf": token}).status_code == 403
    evil = client.post(f"/review/{ann}", data={"action": "approve", "csrf": token},
                       headers={"origin": "http://evil.example"})
    assert evil.status_code == 403 and web.store.review_verdict(ann) is None
    for origin in ("null", "https://evil.example:443", "http://[::1"):
        assert client.post(f"/review/{ann}", data={"action": "approve", "csrf": token},
                           headers={"origin": origin}).status_code == 403, origin
    assert client.post(f"/review/{ann}", data={"action": "approve", "csrf": "é" * 64}).status_code == 403
    # behind a TLS proxy that does not say so, the browser's Origin is https while the page sees http
    host = web.base_url.split("://", 1)[1]
    ok = client.post(f"/review/{ann}", data={"action": "approve", "csrf": token}, headers={"origin": f"https://{host}"})
    assert ok.status_code == 303 and web.store.review_verdict(ann) == "approved"
    again = client.post(f"/review/{ann}", data={"action": "reject", "csrf": token})
    assert again.status_code == 409 and web.store.review_verdict(ann) == "approved"   # the first verdict stands
    stale = client.post("/lineage/promote", data={"gen": "gen-0001", "active": "gen-0002", "csrf": token})
    assert stale.status_code == 409 and web.lineage.active_id() == "gen-0000"
    assert client.post("/logout", data={"csrf": token}).status_code == 303
    assert COOKIE not in client.cookies and client.get("/review").status_code == 303


def test_the_session_cookie_is_secure_when_a_proxy_says_the_browser_came_over_tls(web, capsys):
    for proto, secure in (("https", True), (None, False)):
        client = httpx.Client(base_url=web.base_url, follow_redirects=False, timeout=20)
        link = login_link(web, capsys, "--admin", str(ADMIN)).removeprefix(web.base_url)
        reply = client.get(link, headers={"x-forwarded-proto": proto} if proto else {})
        cookie = reply.headers["set-cookie"].lower()
        assert reply.status_code == 303 and "httponly" in cookie and ("; secure" in cookie) == secure


def test_pages_send_security_headers_and_escape_what_people_wrote(web, capsys):
    client = logged_in(web, capsys)
    web.store.complete_turn(web.turns[1], reply_text='<img src=x onerror="alert(1)">', generation_id="gen-0000",
                            prompt_tokens=1, completion_tokens=1, latency_s=0.1, ttft_s=0.1,
                            context_start_turn_id=web.turns[1])
    page = client.get("/review")
    assert page.status_code == 200 and '<img src=x onerror' not in page.text
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page.text
    csp = page.headers["content-security-policy"]                      # one script: the keys, by its hash
    assert re.search(r"; script-src 'sha256-[A-Za-z0-9+/]{43}='$", csp) and "unsafe-inline" not in csp.split("script-src")[1]
    assert "script-src" not in client.get("/lineage").headers["content-security-policy"]   # no script at all
    assert page.headers["x-frame-options"] == "DENY" and page.headers["referrer-policy"] == "same-origin"
    lineage = client.get("/lineage").text
    assert "<script>alert(1)</script>" not in lineage and "&lt;script&gt;alert(1)&lt;/script&gt;" in lineage


def test_hostile_ids_and_bodies_are_refused_without_a_500(web, capsys):
    client = logged_in(web, capsys)
    token = csrf_of(client)
    for gen in ("../../etc/passwd", "gen-0001/../../x", "gen-0001%00", "gen-99999999999", "ACTIVE", "gen-0009"):
        assert client.get("/lineage/promote", params={"gen": gen}).status_code == 404, gen
        posted = client.post("/lineage/promote", data={"gen": gen, "active": "gen-0000", "csrf": token})
        assert posted.status_code == 404, gen
    assert client.get("/lineage/delete?gen=gen-0001").status_code == 404
    for turn in ("..%2F..%2Fetc", "0", "-1", "9" * 40, "1e3", web.turns[0] + 1000):
        reply = client.post(f"/review/{turn}", data={"action": "approve", "csrf": token})
        assert reply.status_code == 404, turn
    assert client.get("/review", params={"person": "1 OR 1=1"}).status_code == 400
    big = client.post(f"/review/{web.turns[0]}", content=b"csrf=" + b"a" * (MAX_FORM_BYTES + 10),
                      headers={"content-type": "application/x-www-form-urlencoded"})
    assert big.status_code == 413

    def chunks():   # no content-length: refused once it passes the limit, not after reading it all
        for _ in range(100):
            yield b"a" * 4096

    streamed = client.post(f"/review/{web.turns[0]}", content=chunks(),
                           headers={"content-type": "application/x-www-form-urlencoded"})
    assert streamed.status_code == 413
    as_json = client.post(f"/review/{web.turns[0]}", json={"action": "approve", "csrf": token})
    assert as_json.status_code == 403
    edit = client.post(f"/review/{web.turns[0]}", data={"action": "edit", "text": "x" * 100_000, "csrf": token})
    assert edit.status_code == 413
    empty = client.post(f"/review/{web.turns[0]}", data={"action": "edit", "text": "  ", "csrf": token})
    assert empty.status_code == 400
    assert web.store.review_verdict(web.turns[0]) is None and web.lineage.active_id() == "gen-0000"


def test_now_shows_the_schedule_and_pauses_it_as_pause_does(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OURO_ADMIN_IDS", str(ADMIN))
    web = start_web(tmp_path, scheduled=True, cycle_schedule="daily")
    try:
        client = logged_in(web, capsys)
        now = client.get("/").text
        assert '<td id="active">gen-0000</td>' in now and "next cycle" in now and "2 waiting" in now
        token = CSRF.search(now).group(1)
        assert client.post("/schedule/pause", data={}).status_code == 403          # no CSRF token
        assert not web.learning.scheduler.paused
        assert client.post("/schedule/pause", data={"csrf": token}).status_code == 303
        assert web.learning.scheduler.paused and "paused" in client.get("/").text
        assert web.store.last_event(("schedule_paused",))["user_id"] == ADMIN
        assert client.post("/schedule/resume", data={"csrf": token}).status_code == 303
        assert not web.learning.scheduler.paused
        assert client.post("/schedule/explode", data={"csrf": token}).status_code == 404
    finally:
        web.close()


def test_without_the_schedule_in_this_process_now_says_so(web, capsys):
    client = logged_in(web, capsys)
    assert "runs in `ouro serve`" in client.get("/").text
    assert client.post("/schedule/pause", data={"csrf": csrf_of(client, "/")}).status_code == 409


def test_without_a_learning_loop_the_page_moves_the_pointer_as_ouro_promote_does(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OURO_ADMIN_IDS", str(ADMIN))
    web = start_web(tmp_path, with_loop=False)
    try:
        client = logged_in(web, capsys)
        token = csrf_of(client, "/lineage/rollback?gen=gen-0001")
        done = client.post("/lineage/rollback", data={"gen": "gen-0001", "active": "gen-0000", "csrf": token})
        assert done.status_code == 200 and "Rolled back: gen-0000 → gen-0001" in done.text
        assert web.lineage.active_id() == "gen-0001" and web.worker.engine.generation_id == "gen-0000"   # not swapped here
        last = web.lineage.ledger()[-1]
        assert (last["event"], last["actor"]) == ("rollback", f"admin {ADMIN} (web page)")
    finally:
        web.close()


def test_only_the_owner_searches_conversations(web, capsys):
    admin = logged_in(web, capsys)
    assert admin.get("/conversations", params={"q": "question"}).status_code == 403
    owner = httpx.Client(base_url=web.base_url, follow_redirects=False, timeout=20)
    assert owner.get(login_link(web, capsys).removeprefix(web.base_url)).status_code == 303
    found = owner.get("/conversations", params={"q": "QUESTION 1"})
    assert found.status_code == 200 and f'id="turn-{web.turns[1]}"' in found.text
    assert f'id="turn-{web.turns[0]}"' not in found.text and "from Bob" in found.text
    for literal in ("%", "_", "\\", "' OR 1=1 --"):                       # no wildcards, no injection
        assert 'class="card turn"' not in owner.get("/conversations", params={"q": literal}).text, literal
    assert owner.get("/conversations", params={"q": "x" * 201}).status_code == 400


def test_login_tokens_and_sessions_expire_and_follow_the_admin_list(tmp_path, caplog):
    settings = load_settings(data_dir=tmp_path / "data", admin_ids=[ADMIN])
    clock = [1_000_000.0]
    auth = WebAuth(settings, clock=lambda: clock[0])
    token = auth.create_login(ADMIN)
    clock[0] += LOGIN_S + 1
    assert auth.use_login(token) is None                              # an old link
    clock[0] = 1_000_000.0
    with caplog.at_level(logging.DEBUG):
        session = auth.use_login(auth.create_login(ADMIN))
    assert session is not None and auth.session(session.cookie) == session
    assert not [r for r in caplog.records if session.cookie in r.getMessage()]
    assert not list((settings.data_dir / "web" / "logins").iterdir())   # used links are gone
    assert (settings.data_dir / "web" / "secret").stat().st_mode & 0o077 == 0
    forged = session.cookie.replace(f"{ADMIN}.", "4243.", 1)
    assert auth.session(forged) is None                               # the id is signed
    clock[0] += SESSION_S + 1
    assert auth.session(session.cookie) is None                       # 12 hours later
    clock[0] = 1_000_000.0
    demoted = WebAuth(load_settings(data_dir=tmp_path / "data", admin_ids=[]), clock=lambda: clock[0])
    assert demoted.session(session.cookie) is None                    # no longer an admin: logged out
    with pytest.raises(ValueError):
        auth.create_login(1234)


def test_web_login_refuses_someone_who_is_not_an_admin(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OURO_ADMIN_IDS", str(ADMIN))
    assert main(["--data-dir", str(tmp_path), "web-login", "--admin", "77"]) == 1
    assert "not one of the admins" in capsys.readouterr().err


# --- per-generation charts, the generation page, the review filters ---------------------------------
def image_width(page, selector: str) -> int:
    """An image's natural width once loaded (0: broken; -1: never finished loading)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        width = page.locator(selector).evaluate("img => img.complete ? img.naturalWidth : -1")
        if width >= 0:
            return width
        time.sleep(0.1)
    return -1


def test_browser_shows_the_per_generation_charts_and_a_generations_page(web, page, capsys):
    ann, bob = web.turns
    web.store.rate(ann, 1001, -1)                                       # gen-0000 served both: one 👎 of one rated
    web.lineage.append_ledger({"GEN_ID": "gen-0002", "event": "rollback", "actor": "admin 4242 (telegram)",
                               "reason": "rollback by admin 4242: it forgot <b>names</b>"})
    page.goto(login_link(web, capsys))
    page.click("text=Lineage")
    page.wait_for_selector("#chart-stages")
    for chart in ("#chart-evals", "#chart-feedback", "#chart-stages"):
        assert image_width(page, chart) > 300, chart                    # loaded and decoded as an image
    client = logged_in(web, capsys)
    for kind in ("evals", "feedback", "stages"):
        png = client.get("/lineage/chart.png", params={"kind": kind})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG") and len(png.content) > 5_000, kind
    assert client.get("/lineage/chart.png", params={"kind": "../x"}).status_code == 400
    assert httpx.get(f"{web.base_url}/lineage/chart.png?kind=evals").status_code == 403   # no session, no chart

    page.click("#detail-gen-0001")
    assert page.url == f"{web.base_url}/lineage/gen-0001"
    assert "promoted" in page.inner_text("#gate")
    data = page.inner_text("#data")
    assert "new_examples\t37" in data and "contributors\t3" in data
    recall = page.inner_text("#score-recall")
    assert "0.93" in recall and "0.91" in recall and "+0.02" in recall
    drift = page.locator("#score-style_drift td").nth(3)
    assert drift.inner_text() == "-1" and drift.get_attribute("class") == "ok"   # less drift is better
    stages = page.inner_text("#stages")
    assert "sft\t42.0" in stages and "total\t62.0" in stages
    page.click("text=gen-0000")                                         # its parent's page
    assert page.url == f"{web.base_url}/lineage/gen-0000"
    assert "2 replies served · 👍 0 · 👎 1 · 👎 share 100%" in page.inner_text("#live")
    assert "base" in page.inner_text("#ledger")
    page.goto(f"{web.base_url}/lineage/gen-0002")
    assert "recall 0.70 < 0.90 <script>alert(1)</script>" in page.inner_text("#summary")   # as text
    ledger = page.inner_text("#ledger")
    assert "rollback" in ledger and "admin 4242 (telegram)" in ledger and "it forgot <b>names</b>" in ledger
    for bad in ("gen-0009", "gen-00%2F01", "gen-0001%00"):
        assert client.get(f"/lineage/{bad}").status_code == 404, bad


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """Four waiting turns, one per source and rating: Ann ✏️-corrected hers (unrated), Bob kept a 🔁
    sample and rated it 👎, Cat rated 👍, an API key's person sent one (unrated)."""
    from memory.api_keys import API_USER_BASE

    monkeypatch.setenv("OURO_ADMIN_IDS", str(ADMIN))
    api_person = API_USER_BASE - 7
    server = start_web(tmp_path, people=((1001, "Ann"), (1002, "Bob"), (1003, "Cat"), (api_person, "Key")))
    ann, bob, cat, key = server.turns
    store = server.store
    store.await_correction(1001, 1001, ann)
    assert store.take_correction(1001, 1001, "the reply Ann wanted") == ann
    alt = store.add_alternative(bob, "a second sample", "gen-0000")
    assert store.pick(bob, alt, 1002, keep_alternative=True)
    store.rate(bob, 1002, -1)
    store.rate(cat, 1003, 1)
    yield server, {"ann": ann, "bob": bob, "cat": cat, "key": key}
    server.close()


def shown_turns(html: str) -> set[int]:
    return {int(t) for t in re.findall(r'data-turn="([0-9]+)"', html)}


def option_count(html: str, name: str, value: str) -> int:
    select = re.search(rf'<select name="{name}">(.*?)</select>', html, re.S).group(1)
    return int(re.search(rf'<option value="{value}"[^>]*>[^<]*\(([0-9]+)\)</option>', select).group(1))


def test_review_filter_by_source_keeps_one_kind_and_survives_a_verdict(sources, capsys):
    web, t = sources
    client = logged_in(web, capsys)
    everyone = client.get("/review").text
    assert shown_turns(everyone) == set(t.values())
    assert [option_count(everyone, "source", s) for s in ("correction", "pick", "api", "chat")] == [1, 1, 1, 3]
    for source, expected in (("correction", {t["ann"]}), ("pick", {t["bob"]}), ("api", {t["key"]}),
                             ("chat", {t["ann"], t["bob"], t["cat"]})):
        html = client.get("/review", params={"source": source}).text
        assert shown_turns(html) == expected, source
        assert f'<option value="{source}" selected>' in html
        assert f'{len(expected)} waiting under these filters' in html
    # the filter rides in each card's form: a verdict comes back to the same filtered queue
    html = client.get("/review", params={"source": "chat"}).text
    assert 'name="back" value="/review?source=chat"' in html
    reply = client.post(f"/review/{t['cat']}", data={"action": "approve", "back": "/review?source=chat",
                                                     "csrf": CSRF.search(html).group(1)})
    assert reply.status_code == 303 and reply.headers["location"] == "/review?source=chat"
    after = client.get(reply.headers["location"]).text
    assert shown_turns(after) == {t["ann"], t["bob"]} and option_count(after, "source", "chat") == 2


def test_review_filter_by_rating_counts_each_and_pages_with_the_filters(sources, capsys, monkeypatch):
    web, t = sources
    client = logged_in(web, capsys)
    everyone = client.get("/review").text
    assert [option_count(everyone, "rating", r) for r in ("up", "down", "none")] == [1, 1, 2]
    for rating, expected in (("up", {t["cat"]}), ("down", {t["bob"]}), ("none", {t["ann"], t["key"]})):
        assert shown_turns(client.get("/review", params={"rating": rating}).text) == expected, rating
    both = client.get("/review", params={"rating": "none", "source": "chat"}).text   # filters combine
    assert shown_turns(both) == {t["ann"]} and option_count(both, "rating", "none") == 1
    assert option_count(both, "source", "api") == 1                     # each menu counts under the other filter

    monkeypatch.setattr("api.web.PAGE_ITEMS", 1)                        # one turn a page: paging keeps the filter
    first = client.get("/review", params={"rating": "none"}).text
    assert shown_turns(first) == {t["ann"]} and "page 1 of 2" in first
    assert 'href="/review?rating=none&amp;page=2"' in first
    second = client.get("/review?rating=none&page=2").text
    assert shown_turns(second) == {t["key"]} and 'href="/review?rating=none"' in second
    assert 'name="back" value="/review?rating=none&amp;page=2"' in second
    reply = client.post(f"/review/{t['key']}", data={"action": "reject", "back": "/review?rating=none&page=2",
                                                     "csrf": CSRF.search(second).group(1)})
    assert reply.headers["location"] == "/review?rating=none&page=2"
    emptied = client.get(reply.headers["location"]).text                # page 2 is gone: the last page shows
    assert shown_turns(emptied) == {t["ann"]}


def test_review_filters_refuse_junk_with_a_400(sources, capsys):
    web, _t = sources
    client = logged_in(web, capsys)
    for params in ({"source": "thumbs"}, {"source": "correction' OR 1=1 --"}, {"source": "<script>"},
                   {"rating": "1"}, {"rating": "UP"}, {"rating": "none;DROP TABLE turns"}, {"page": "0"},
                   {"page": "-1"}, {"page": "2.5"}, {"page": "9" * 40}, {"page": "abc"}, {"person": "x", "source": "api"}):
        reply = client.get("/review", params=params)
        assert reply.status_code == 400, params
        assert "<script>" not in reply.text
    assert client.get("/review", params={"source": "", "rating": "", "page": ""}).status_code == 200   # blank: no filter
    assert client.get("/review", params={"page": "999"}).status_code == 200                # past the end: the last page


def test_review_page_keeps_and_drops_self_refinement_proposals_as_telegram_does(web, capsys):
    keep = web.store.add_proposal("scenario", prompt="Will you write my essay?", served="As an AI, I cannot.",
                                  critique="Assistant voice.", refined="I choose not to; it is yours to write.",
                                  generation_id="gen-0000")
    drop = web.store.add_proposal("scenario", prompt="Tell me a secret.", served="I'd be happy to help!",
                                  critique="Too eager.", refined="Secrets stay secret, friend.",
                                  generation_id="gen-0000")
    client = logged_in(web, capsys)
    page = client.get("/review").text
    assert f'id="proposal-{keep}"' in page and "I choose not to; it is yours to write." in page
    token = csrf_of(client)
    origin = {"Origin": web.base_url}
    forged = client.post(f"/review/proposal/{keep}", data={"action": "keep"}, headers=origin)
    assert forged.status_code == 403
    assert client.post(f"/review/proposal/{keep}", data={"csrf": token, "action": "keep"},
                       headers=origin).status_code == 303
    assert client.post(f"/review/proposal/{drop}", data={"csrf": token, "action": "drop"},
                       headers=origin).status_code == 303
    again = client.post(f"/review/proposal/{drop}", data={"csrf": token, "action": "keep"}, headers=origin)
    assert again.status_code == 409 and "already dropped" in again.text
    assert client.post(f"/review/proposal/{keep}", data={"csrf": token, "action": "nuke"},
                       headers=origin).status_code == 400
    assert client.post("/review/proposal/../1", data={"csrf": token, "action": "keep"},
                       headers=origin).status_code in (400, 404)
    pairs = [p for p in reviewed_since(web.store, persona="P", since=None).pairs if p.source == "refine"]
    assert [(p.chosen, p.rejected) for p in pairs] == [("I choose not to; it is yours to write.", "As an AI, I cannot.")]
    assert f'id="proposal-{keep}"' not in client.get("/review").text
