"""The owner's web page, served by the API's starlette app at `/`: now, the lineage, the review queue, people.

Plain server-rendered HTML (Jinja, autoescaped) and a little CSS; the one script is the review
page's keyboard shortcuts (REVIEW_KEYS_JS, allowed by its hash in that page's CSP; no other page
runs any). Every page needs an admin's session (api/web_auth.py: `ouro web-login` prints a one-time
link); every POST carries the session's CSRF token. The actions go through what the Telegram admin
commands use: promote and roll back through the process's learning loop (`ouro serve`, `ouro web`:
`LearningLoop.promote/rollback`, lineage/promote.py's one rule, then the hot-swap), or, in an app
built without one, through lineage/promote.py directly, as `ouro promote` does; reviews through the
store's `record_review` with an audit event, as /review and `ouro review` do; Forget and the
training opt-out through the store's `forget_user` and `set_training_opt_out`, as /forget and
/optout do; "Start a learning cycle" through `LearningLoop.start_cycle`, as /train does (the cycle
runs in its own process). A promote, rollback, forget or cycle is never done from its first page: a
confirmation page asks first (for promote and rollback it names the target and the generation active
when it was asked, and a stale confirmation changes nothing).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlencode, urlsplit

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from api.web_auth import COOKIE, OWNER_ID, SESSION_S, Session, WebAuth
from config.settings import Settings
from core.errors import OuroError
from evals.report import generation_rows
from lineage.generations import Lineage
from lineage.promote import POINTER_EVENTS, promote, rollback
from memory.store import Store
from memory.trust import policy_for
from serving.notices import cycle_progress

if TYPE_CHECKING:
    from engine.worker import InferenceWorker
    from serving.loop import LearningLoop

log = logging.getLogger(__name__)


MAX_FORM_BYTES = 64 * 1024
PAGE_ITEMS = 25
GEN_ID = re.compile(r"gen-[0-9]{4,8}")
TURN_ID = re.compile(r"[1-9][0-9]{0,17}")
PERSON_ID = re.compile(r"-?[0-9]{1,19}")
PAGE_NO = re.compile(r"[1-9][0-9]{0,5}")
# self-refinement proposals on the review page: the form's action → the stored decision
PROPOSAL_ACTIONS = {"keep": "kept", "edit": "edited", "drop": "dropped"}
PROPOSALS_SHOWN = 20
# the review filters' names, as the page shows them (memory/review_queue.py holds their SQL)
REVIEW_SOURCE_NAMES = {"correction": "✏️ corrected", "pick": "🔁 sample kept", "api": "through the API",
                       "chat": "Telegram / terminal"}
REVIEW_RATING_NAMES = {"up": "👍", "down": "👎", "none": "not rated"}
ACTIONS = {"approve": "approved", "reject": "rejected", "edit": "edited"}
LEDGER_EVENTS = (*POINTER_EVENTS, "held")   # a generation's moves the lineage page lists
HEADERS = {"content-security-policy": "default-src 'none'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
                                      "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
           "x-frame-options": "DENY", "referrer-policy": "same-origin", "cache-control": "no-store",
           "x-content-type-options": "nosniff"}
STALE = "This form is stale or was not sent from this page; reload the page and try again."
# The review page's keyboard shortcuts: the one script any page runs, allowed by its hash (CSP), no other.
REVIEW_KEYS_JS = """
(function () {
  var cards = Array.prototype.slice.call(document.querySelectorAll(".card[data-turn]"));
  var at = 0;
  function focus(i) {
    if (!cards.length) return;
    at = Math.max(0, Math.min(cards.length - 1, i));
    cards.forEach(function (c, n) { c.classList.toggle("focused", n === at); });
    cards[at].scrollIntoView({block: "nearest"});
  }
  function press(value) {
    var b = cards[at] && cards[at].querySelector("button[value=" + value + "]");
    if (b) b.click();
  }
  cards.forEach(function (c, n) { c.addEventListener("click", function () { focus(n); }); });
  document.addEventListener("keydown", function (ev) {
    var t = ev.target;
    if (ev.ctrlKey || ev.metaKey || ev.altKey || (t && /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName))) return;
    var k = ev.key;
    if (k === "j") focus(at + 1);
    else if (k === "k") focus(at - 1);
    else if (k === "a") press("approve");
    else if (k === "r") press("reject");
    else if (k === "s") press("skip");
    else if (k === "e" && cards[at]) {
      var d = cards[at].querySelector("details");
      d.open = true;
      d.querySelector("textarea").focus();
    } else return;
    ev.preventDefault();
  });
  focus(0);
  document.documentElement.dataset.keys = "on";   // the shortcuts listen from here on (tests wait for it)
})();
"""
REVIEW_KEYS_CSP = "script-src 'sha256-" + base64.b64encode(hashlib.sha256(REVIEW_KEYS_JS.encode()).digest()).decode() + "'"
NOT_LOGGED_IN = ("This page is for the bot's admins. On the machine that runs the bot, run "
                 "`ouro web-login` and open the link it prints.")


class Refused(Exception):
    """A request the page answers with a short HTML error (control flow inside api/web.py)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class WebPage:
    def __init__(self, settings: Settings, store: Store, *, serving_id: Callable[[], str],
                 learning: LearningLoop | None = None,
                 auth: WebAuth | None = None, worker: InferenceWorker | None = None) -> None:
        self.settings = settings
        self.store = store
        self.serving_id = serving_id          # () -> the generation the worker serves now
        self.learning = learning
        self.worker = worker                  # whose cached chat states a forgotten person's words leave
        self.auth = auth or WebAuth(settings)
        self.lineage = Lineage(settings.models_dir)
        self.skipped: dict[int, set[int]] = {}   # per admin, in memory (as /review): a restart brings them back
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                                      autoescape=True, undefined=jinja2.StrictUndefined)

    # --- plumbing -------------------------------------------------------------------------------
    def render(self, name: str, status: int = 200, session: Session | None = None, *, script_csp: str = "",
               **context) -> HTMLResponse:
        csrf = self.auth.csrf(session) if session else ""
        html = self.env.get_template(name).render(session=session, csrf=csrf, **context)
        headers = HEADERS
        if script_csp:   # the one inline script this page runs, by its hash
            headers = {**HEADERS, "content-security-policy": f"{HEADERS['content-security-policy']}; {script_csp}"}
        return HTMLResponse(html, status_code=status, headers=headers)

    def session_of(self, request: Request) -> Session | None:
        return self.auth.session(request.cookies.get(COOKIE))

    def page_session(self, request: Request) -> Session | Response:
        """The session of a GET, or the redirect to the login notice."""
        return self.session_of(request) or RedirectResponse("/login", status_code=303, headers=HEADERS)

    async def post_session(self, request: Request) -> tuple[Session, dict[str, str]]:
        """The session and form of a POST: an admin's session, a same-origin request, the right CSRF token."""
        session = self.session_of(request)
        if session is None:
            raise Refused(403, NOT_LOGGED_IN)
        origin = request.headers.get("origin")
        if origin is not None and not same_site(origin, request.headers.get("host", "")):
            raise Refused(403, "This form was sent from another site.")
        form = await read_form(request)
        if not self.auth.csrf_ok(session, form.get("csrf")):
            raise Refused(403, STALE)
        return session, form

    def actor(self, session: Session) -> str:
        return "owner (web page)" if session.admin_id == OWNER_ID else f"admin {session.admin_id} (web page)"

    # --- login ------------------------------------------------------------------------------------
    async def login(self, request: Request) -> Response:
        """A login link's target: spends the token, sets the session cookie, goes to the page."""
        session = self.auth.use_login(request.query_params.get("token"))
        if session is None:
            if self.session_of(request) is not None:
                return RedirectResponse("/", status_code=303, headers=HEADERS)
            return self.render("login.html", 401, message=NOT_LOGGED_IN,
                               tried="token" in request.query_params)
        self.store.log_event("web_login", user_id=session.admin_id)
        response = RedirectResponse("/", status_code=303, headers=HEADERS)
        response.set_cookie(COOKIE, session.cookie, max_age=SESSION_S, httponly=True, samesite="strict", path="/",
                            secure=served_over_https(request))
        return response

    async def logout(self, request: Request) -> Response:
        await self.post_session(request)
        response = RedirectResponse("/login", status_code=303, headers=HEADERS)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # --- now --------------------------------------------------------------------------------------
    async def now(self, request: Request) -> Response:
        session = self.page_session(request)
        if isinstance(session, Response):
            return session
        loop = self.learning
        scheduling = loop is not None and loop.scheduler.scheduler is not None   # started by `ouro serve`
        _ids, waiting = self.store.review_queue(opt_out_by_default=self.settings.training_opt_out_default, limit=1)
        return self.render("now.html", session=session, active=self.lineage.active_id(), serving=self.serving_id(),
                           training=loop.scheduler.describe() if scheduling else None,
                           schedule=("paused" if loop.scheduler.paused else "on") if scheduling
                           and loop.scheduler.enabled else None,
                           cycle=loop.cycle_status() if loop else None, waiting=waiting,
                           progress=cycle_progress(loop.cycle_status()) if loop else None,
                           can_train=loop is not None)

    async def cycle_confirm(self, request: Request) -> Response:
        """The confirmation step of "Start a learning cycle"."""
        session = self.page_session(request)
        if isinstance(session, Response):
            return session
        loop = self.needs_loop()
        status = loop.cycle_status()
        if status is not None:
            raise Refused(409, "A learning cycle is already running — " + cycle_progress(status))
        return self.render("cycle.html", session=session, active=self.lineage.active_id())

    async def cycle_start(self, request: Request) -> Response:
        """A confirmed cycle: asked of the learning loop as /train does (its own process, never this loop)."""
        session, _form = await self.post_session(request)
        loop = self.needs_loop()
        if not loop.start_cycle(self.actor(session)):
            return self.render("done.html", 409, session=session, ok=False, back="/",
                               message="A learning cycle is already running — " + cycle_progress(loop.cycle_status()))
        return RedirectResponse("/", status_code=303, headers=HEADERS)

    def needs_loop(self) -> LearningLoop:
        if self.learning is None:
            raise Refused(409, "The learning loop does not run in this process (ouro serve and ouro web run it).")
        return self.learning

    async def schedule(self, request: Request) -> Response:
        """Pause or resume scheduled training, as /pause and /resume do."""
        action = request.path_params["action"]
        if action not in ("pause", "resume"):
            raise Refused(404, "No such page.")
        session, _form = await self.post_session(request)
        loop = self.learning
        if loop is None or loop.scheduler.scheduler is None:
            raise Refused(409, "Scheduled training does not run in this process (ouro serve runs it).")
        if not (loop.scheduler.pause() if action == "pause" else loop.scheduler.resume()):
            raise Refused(409, "There is no training schedule (OURO_CYCLE_SCHEDULE is off).")
        self.store.log_event("schedule_paused" if action == "pause" else "schedule_resumed", user_id=session.admin_id)
        return RedirectResponse("/", status_code=303, headers=HEADERS)

    # --- lineage ----------------------------------------------------------------------------------
    async def lineage_page(self, request: Request) -> Response:
        session = self.page_session(request)
        if isinstance(session, Response):
            return session
        return self.render("lineage.html", session=session, rows=self.lineage_rows(),
                           active=self.lineage.active_id(), serving=self.serving_id())

    def lineage_rows(self) -> list[dict]:
        """generation_rows (as /generations) with the parent's scores and the ledger's moves of each."""
        moves: dict[str, list[dict]] = {}
        for row in self.lineage.ledger():
            if row.get("event") in LEDGER_EVENTS:
                moves.setdefault(row.get("gen_folder", ""), []).append(row)
        parents = {g.id: g.meta.get("parent_scores") or {} for g in self.lineage.generations()}
        rows = generation_rows(self.lineage)
        for row in rows:
            row["parent_scores"] = parents.get(row["id"], {})
            row["moves"] = moves.get(row["id"], [])
        return rows[::-1]   # newest first

    async def chart(self, request: Request) -> Response:
        """A chart as a PNG: the lineage chart (lineage/chart.py, as /lineage sends it), or with
        `?kind=` one of the per-generation charts (lineage/gen_charts.py)."""
        if self.session_of(request) is None:
            return Response(status_code=403, headers=HEADERS)
        from lineage.chart import lineage_chart
        from lineage.gen_charts import CHARTS, generation_chart

        kind = request.query_params.get("kind") or "lineage"
        if kind != "lineage" and kind not in CHARTS:
            return Response(f"kind must be one of: lineage, {', '.join(CHARTS)}", status_code=400,
                            media_type="text/plain", headers=HEADERS)
        ratings = self.store.ratings_by_generation() if kind == "feedback" else None

        def draw() -> bytes:
            with tempfile.TemporaryDirectory(dir=self.settings.data_dir) as tmp:
                out = Path(tmp) / "chart.png"
                if kind == "lineage":
                    return lineage_chart(self.lineage, out).read_bytes()
                return generation_chart(kind, self.lineage.generations(), out, active=self.lineage.active_id(),
                                        ratings=ratings).read_bytes()

        try:
            png = await asyncio.to_thread(draw)
        except ValueError:   # no generations yet
            return Response(status_code=404, headers=HEADERS)
        return Response(png, media_type="image/png", headers=HEADERS)

    async def lineage_get(self, request: Request) -> Response:
        """GET /lineage/…: a generation's own page (/lineage/gen-0001), or promote/rollback's confirmation."""
        if GEN_ID.fullmatch(request.path_params["action"]):
            return await self.generation_page(request)
        return await self.confirm(request)

    async def generation_page(self, request: Request) -> Response:
        """One generation: its data, its scores against its parent's (measured in the same eval run),
        the gate's decision and reasons, its cycle's stage times, its ratings in live use, and every
        ledger row about it (who promoted or rolled back, and why)."""
        session = self.page_session(request)
        if isinstance(session, Response):
            return session
        gen = self.known_generation(request.path_params["action"])
        meta = gen.meta
        own, parent = meta.get("scores") or {}, meta.get("parent_scores") or {}
        scores = []
        for key in ("recall", "generalization", "style_drift", "format", "contamination", "refusal_style"):
            if key in own or key in parent:
                a, b = own.get(key), parent.get(key)
                delta = round(a - b, 4) if isinstance(a, int | float) and isinstance(b, int | float) else None
                better = None if delta is None or delta == 0 else (delta < 0 if key in ("style_drift", "contamination", "refusal_style")
                                                                   else delta > 0)
                scores.append({"name": key, "own": a, "parent": b, "delta": delta, "better": better})
        stage_s = {k: v for k, v in (meta.get("stage_s") or {}).items() if isinstance(v, int | float)}
        data = {k: v for k, v in (meta.get("data") or {}).items() if not isinstance(v, dict | list)}
        ledger = [row for row in self.lineage.ledger() if row.get("gen_folder") == gen.id]
        live = self.store.ratings_by_generation().get(gen.id, {"answered": 0, "up": 0, "down": 0})
        rated = live["up"] + live["down"]
        return self.render("generation.html", session=session, gen=gen, meta=meta, scores=scores, data=data,
                           train={k: v for k, v in (meta.get("train") or {}).items() if not isinstance(v, dict | list)},
                           stage_s=stage_s, stage_total=round(sum(stage_s.values()), 1), ledger=ledger, live=live,
                           down_share=f"{live['down'] / rated:.0%}" if rated else None,
                           active=self.lineage.active_id(),
                           children=[g.id for g in self.lineage.generations() if g.parent_id == gen.id])

    async def confirm(self, request: Request) -> Response:
        """The confirmation step of promote and rollback: what moves where, and a form to do it."""
        session = self.page_session(request)
        if isinstance(session, Response):
            return session
        action = self.lineage_action(request)
        active = self.lineage.active_id()
        gen_id = request.query_params.get("gen") or ""
        if action == "rollback" and not gen_id:
            try:
                gen_id = self.lineage.active().parent_id or ""
            except OuroError:
                gen_id = ""
            if not gen_id:
                raise Refused(400, f"{active} has no parent to roll back to.")
        gen = self.known_generation(gen_id)
        if gen.id == active:
            raise Refused(400, f"{gen.id} is already the active generation.")
        note = None
        if gen.meta.get("status") not in ("promoted", "held", "base"):
            note = f"the gate marked it {gen.meta.get('status')}: " + "; ".join(gen.meta.get("reasons", []))
        return self.render("confirm.html", session=session, action=action, gen=gen, active=active, note=note)

    async def act(self, request: Request) -> Response:
        """A confirmed promote or rollback: checked against the generation active when it was asked."""
        action = self.lineage_action(request)
        session, form = await self.post_session(request)
        gen = self.known_generation(form.get("gen", ""))
        asked_active = form.get("active", "")
        reason = " ".join(form.get("reason", "").split())[:200]
        active = self.lineage.active_id()
        if active != asked_active:
            return self.render("done.html", 409, session=session, ok=False,
                               message=f"Not done: the active generation is now {active}. Ask again.")
        actor = self.actor(session)
        why = f"{action} by {actor}" + (f": {reason}" if reason else "")
        try:
            if self.learning is not None:
                if action == "promote":
                    swap = await self.learning.promote(gen.id, actor=actor, why=why, expect=asked_active)
                else:
                    _was, _to, swap = await self.learning.rollback(gen.id, actor=actor, why=why)
            else:
                if action == "promote":
                    if not await asyncio.to_thread(promote, self.settings, self.store, gen.id, actor=actor, why=why,
                                                   expect=asked_active):
                        raise OuroError(f"the active generation changed to {self.lineage.active_id()} meanwhile")
                else:
                    await asyncio.to_thread(rollback, self.settings, self.store, gen.id, actor=actor, why=why)
                swap = None
        except OuroError as exc:
            return self.render("done.html", 409, session=session, ok=False,
                               message=f"Not done: {str(exc).splitlines()[0]}")
        served = self.serving_id()
        verb = "Promoted" if action == "promote" else "Rolled back"
        message = f"{verb}: {asked_active} → {gen.id}. Now serving {served}. Nothing was deleted."
        if swap is not None and not swap.ok:
            message += f" The hot-swap failed ({swap.reason}); {served} keeps serving."
        return self.render("done.html", session=session, ok=True, message=message)

    @staticmethod
    def lineage_action(request: Request) -> str:
        action = request.path_params["action"]
        if action not in ("promote", "rollback"):
            raise Refused(404, "No such page.")
        return action

    def known_generation(self, gen_id: str):
        if not GEN_ID.fullmatch(gen_id):
            raise Refused(404, "No such generation.")
        try:
            return self.lineage.generation(gen_id)
        except OuroError:
            raise Refused(404, f"There is no {gen_id}.") from None

    # --- review -----------------------------------------------------------------------------------
    async def review(self, request: Request) -> Response:
        """The review queue, many turns a page, in /review's order; `?person=ID`, `?source=…` and
        `?rating=…` narrow it, `?page=N` pages through it; the filters ride in every link and form."""
        session = self.page_session(request)
        if isinstance(session, Response):
            return session
        user_id, source, rating, page = self.review_filters(request)
        opt = self.settings.training_opt_out_default
        skipped = self.skipped.get(session.admin_id, set())
        ids, waiting = self.store.review_queue(opt_out_by_default=opt, skip=skipped, user_id=user_id, source=source,
                                               rating=rating, limit=PAGE_ITEMS, offset=(page - 1) * PAGE_ITEMS)
        if not ids and waiting and page > 1:   # verdicts emptied this page: show the last one that has turns
            page = -(-waiting // PAGE_ITEMS)
            ids, waiting = self.store.review_queue(opt_out_by_default=opt, skip=skipped, user_id=user_id,
                                                   source=source, rating=rating, limit=PAGE_ITEMS,
                                                   offset=(page - 1) * PAGE_ITEMS)
        counts = self.store.review_filter_counts(opt_out_by_default=opt, skip=skipped, user_id=user_id,
                                                 source=source, rating=rating)
        items = [item for item in (self.store.review_item(i) for i in ids) if item is not None]
        pages = max(1, -(-waiting // PAGE_ITEMS))
        return self.render("review.html", session=session, items=items, waiting=waiting, person=user_id,
                           source=source, rating=rating, counts=counts, sources=REVIEW_SOURCE_NAMES,
                           ratings=REVIEW_RATING_NAMES, page=page, pages=pages,
                           prev_url=self.review_url(user_id, source, rating, page - 1) if page > 1 else None,
                           next_url=self.review_url(user_id, source, rating, page + 1) if page < pages else None,
                           people=self.store.review_people(opt_out_by_default=opt), skipped=len(skipped),
                           back=self.review_url(user_id, source, rating, page), keys_js=REVIEW_KEYS_JS,
                           proposals=self.store.pending_proposals(opt_out_by_default=opt, limit=PROPOSALS_SHOWN),
                           script_csp=REVIEW_KEYS_CSP)

    @staticmethod
    def review_filters(request: Request) -> tuple[int | None, str | None, str | None, int]:
        """The review page's filters from its query string; anything but the known values is a 400."""
        query = request.query_params
        person = query.get("person") or None
        if person is not None and not PERSON_ID.fullmatch(person):
            raise Refused(400, "person must be a user id.")
        source = query.get("source") or None
        if source is not None and source not in REVIEW_SOURCE_NAMES:
            raise Refused(400, "source must be one of: " + ", ".join(REVIEW_SOURCE_NAMES) + ".")
        rating = query.get("rating") or None
        if rating is not None and rating not in REVIEW_RATING_NAMES:
            raise Refused(400, "rating must be one of: " + ", ".join(REVIEW_RATING_NAMES) + ".")
        raw_page = query.get("page") or "1"
        if not PAGE_NO.fullmatch(raw_page):
            raise Refused(400, "page must be a page number.")
        return (int(person) if person is not None else None), source, rating, int(raw_page)

    async def verdict(self, request: Request) -> Response:
        """approve / reject / edit (with the better reply) / skip one turn; back to the queue."""
        session, form = await self.post_session(request)
        raw, action = request.path_params["turn_id"], form.get("action", "")
        back = form.get("back", "/review")
        if not back.startswith("/review") or "//" in back or "\\" in back:
            back = "/review"
        if raw == "skipped" and action == "unskip":
            self.skipped.pop(session.admin_id, None)
            return RedirectResponse(back, status_code=303, headers=HEADERS)
        if not TURN_ID.fullmatch(raw):
            raise Refused(404, "No such turn.")
        turn_id = int(raw)
        if action == "skip":
            self.skipped.setdefault(session.admin_id, set()).add(turn_id)
            return RedirectResponse(back, status_code=303, headers=HEADERS)
        if action not in ACTIONS:
            raise Refused(400, "Unknown action.")
        text = form.get("text", "").strip() if action == "edit" else None
        if action == "edit" and not text:
            raise Refused(400, "Write the reply it should have given, then press Edit.")
        if text is not None and len(text) > self.settings.max_input_chars:
            raise Refused(400, f"That reply is longer than {self.settings.max_input_chars} characters.")
        if self.store.review_item(turn_id, context_turns=0) is None:
            raise Refused(404, "That turn is gone (forgotten at its author's request, or never answered).")
        verdict = ACTIONS[action]
        if not self.store.record_review(turn_id, session.admin_id, verdict, text):
            existing = self.store.review_verdict(turn_id) or "gone"
            return self.render("done.html", 409, session=session, ok=False, back=back,
                               message=f"Turn {turn_id} is already {existing}; the first verdict stands.")
        self.store.log_event("review", user_id=session.admin_id,
                             detail={"turn_id": turn_id, "verdict": verdict, "via": "web"})
        return RedirectResponse(back, status_code=303, headers=HEADERS)

    async def proposal_verdict(self, request: Request) -> Response:
        """keep / edit (with the better reply) / drop one self-refinement proposal, as /review's buttons do
        (memory/proposals.py: the first decision stands); back to the queue."""
        session, form = await self.post_session(request)
        raw, action = request.path_params["proposal_id"], form.get("action", "")
        if not TURN_ID.fullmatch(raw):
            raise Refused(404, "No such proposal.")
        if action not in PROPOSAL_ACTIONS:
            raise Refused(400, "Unknown action.")
        proposal_id = int(raw)
        text = form.get("text", "").strip() if action == "edit" else None
        if action == "edit" and not text:
            raise Refused(400, "Write the reply it should have given, then press Edit.")
        if text is not None and len(text) > self.settings.max_input_chars:
            raise Refused(400, f"That reply is longer than {self.settings.max_input_chars} characters.")
        proposal = self.store.proposal(proposal_id)
        if proposal is None:
            raise Refused(404, "No such proposal.")
        verdict = PROPOSAL_ACTIONS[action]
        if not self.store.decide_proposal(proposal_id, session.admin_id, verdict, text):
            return self.render("done.html", 409, session=session, ok=False, back="/review",
                               message=f"Proposal {proposal_id} is already {proposal.status}; the first decision stands.")
        self.store.log_event("proposal", user_id=session.admin_id,
                             detail={"proposal_id": proposal_id, "verdict": verdict, "via": "web"})
        return RedirectResponse("/review", status_code=303, headers=HEADERS)

    # --- conversations ------------------------------------------------------------------------------
    async def conversations(self, request: Request) -> Response:
        """Search what people said and what the bot answered: the owner only (what /privacy promises:
        only the bot's owner reads the database), not every admin."""
        session = self.page_session(request)
        if isinstance(session, Response):
            return session
        if session.admin_id != OWNER_ID:
            raise Refused(403, "Only the owner (logged in with `ouro web-login`, no --admin) can search "
                               "conversations: they are what people said to the bot.")
        query = " ".join((request.query_params.get("q") or "").split())
        if len(query) > 200:
            raise Refused(400, "Search for at most 200 characters.")
        rows = self.store.search_turns(query, limit=PAGE_ITEMS * 2) if query else []
        for row in rows:
            row["author"] = f"@{row['username']}" if row["username"] else row["first_name"] or str(row["user_id"])
        return self.render("conversations.html", session=session, query=query, rows=rows)

    # --- people ---------------------------------------------------------------------------------------
    async def people(self, request: Request) -> Response:
        """Everyone the store knows: what is kept about them, their training choice, their tier."""
        session = self.page_session(request)
        if isinstance(session, Response):
            return session
        policy = policy_for(self.settings, self.store)
        default_out = self.settings.training_opt_out_default
        rows = self.store.people()
        for row in rows:
            row["name"] = self.store.display_name(row["user_id"])
            row["tier"] = policy.tier(row["user_id"])
            chosen = row["training_opt_out"]
            row["opted_out"] = default_out if chosen is None else bool(chosen)
            row["choice"] = "default" if chosen is None else ("opted out" if chosen else "opted in")
        return self.render("people.html", session=session, rows=rows)

    def known_person(self, raw: str | None) -> dict:
        if not raw or not PERSON_ID.fullmatch(raw):
            raise Refused(404, "No such person.")
        user_id = int(raw)
        rows = self.store.people(1, user_id=user_id)
        if not rows:
            raise Refused(404, "Nothing is stored about that person (forgotten already, or never seen).")
        row = rows[0]
        row["name"] = self.store.display_name(user_id)
        return row

    async def forget_confirm(self, request: Request) -> Response:
        """The confirmation step of Forget: who, and how much goes."""
        session = self.page_session(request)
        if isinstance(session, Response):
            return session
        person = self.known_person(request.query_params.get("person"))
        return self.render("forget.html", session=session, person=person,
                           counts=self.store.user_data_counts(person["user_id"]))

    async def forget(self, request: Request) -> Response:
        """A confirmed Forget: the store's forget_user, as /forget does (one transaction, a tombstone
        without content), then the model's cached state of their chats is dropped."""
        session, form = await self.post_session(request)
        person = self.known_person(form.get("person"))
        counts, chats = await asyncio.to_thread(self.store.forget_user, person["user_id"])
        if self.worker is not None and chats:
            worker = self.worker
            try:   # the model's cached state of those chats holds their words too
                await worker.run(lambda engine: worker.forget(chats), bounded=False)
            except Exception:
                log.warning("could not drop the cached model state of %d chat(s)", len(chats), exc_info=True)
        # who asked, not whom: the person's own events went with them
        self.store.log_event("forget_by_admin", user_id=session.admin_id, detail={"via": "web", "counts": counts})
        log.info("forgot a person (asked on the web page): %s", counts)
        return self.render("done.html", session=session, ok=True, back="/people",
                           message=f"Forgotten: {counts.get('turns', 0)} messages with their replies, "
                                   f"{counts.get('ratings', 0)} ratings, {counts.get('corrections', 0)} corrections "
                                   "deleted. Generations already trained keep what they learned; no new one "
                                   "learns from it.")

    async def opt_out(self, request: Request) -> Response:
        """Keep a person's chats out of training (or let them back in), as /optout and /optin do. An
        admin may opt anyone out, but may not opt back in someone who chose /optout themselves."""
        session, form = await self.post_session(request)
        person = self.known_person(form.get("person"))
        value = form.get("value", "")
        if value not in ("out", "in"):
            raise Refused(400, "Unknown choice.")
        user_id, out = person["user_id"], value == "out"
        if not out and person["training_opt_out"] and self.store.opt_out_chosen_by_person(user_id):
            raise Refused(409, f"{person['name']} chose /optout themselves; only they can /optin.")
        self.store.set_training_opt_out(user_id, out)
        self.store.log_event("training_opt_out" if out else "training_opt_in", user_id=user_id,
                             detail={"by": self.actor(session), "via": "web"})
        return RedirectResponse("/people", status_code=303, headers=HEADERS)

    @staticmethod
    def review_url(user_id: int | None = None, source: str | None = None, rating: str | None = None,
                   page: int = 1) -> str:
        """The review page with these filters (what `back` and the page links carry)."""
        query = {k: v for k, v in (("person", user_id), ("source", source), ("rating", rating),
                                   ("page", page if page > 1 else None)) if v is not None}
        return "/review" + (f"?{urlencode(query)}" if query else "")

    # --- errors -----------------------------------------------------------------------------------
    def refused(self, request: Request, exc: Refused) -> Response:
        return self.render("done.html", exc.status, session=self.session_of(request), ok=False, message=exc.message)


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form (what HTML forms send), refused past MAX_FORM_BYTES before it is all read;
    a field sent twice keeps its first value."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":   # no form, so no CSRF token: as forged as a form without one
        raise Refused(403, STALE)
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_FORM_BYTES):
        raise Refused(413, "That form is too large.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Refused(413, "That form is too large.")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "That form could not be read.") from None
    return {k: v[0] for k, v in fields.items()}


def web_routes(page: WebPage) -> list[Route]:
    def guarded(handler):
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except Refused as exc:
                return page.refused(request, exc)
        return run

    return [
        Route("/", guarded(page.now), methods=["GET"]),
        Route("/login", guarded(page.login), methods=["GET"]),
        Route("/logout", guarded(page.logout), methods=["POST"]),
        Route("/schedule/{action:str}", guarded(page.schedule), methods=["POST"]),
        Route("/cycle/start", guarded(page.cycle_confirm), methods=["GET"]),
        Route("/cycle/start", guarded(page.cycle_start), methods=["POST"]),
        Route("/people", guarded(page.people), methods=["GET"]),
        Route("/people/forget", guarded(page.forget_confirm), methods=["GET"]),
        Route("/people/forget", guarded(page.forget), methods=["POST"]),
        Route("/people/optout", guarded(page.opt_out), methods=["POST"]),
        Route("/lineage", guarded(page.lineage_page), methods=["GET"]),
        Route("/lineage/chart.png", guarded(page.chart), methods=["GET"]),
        Route("/lineage/{action:str}", guarded(page.lineage_get), methods=["GET"]),
        Route("/lineage/{action:str}", guarded(page.act), methods=["POST"]),
        Route("/review", guarded(page.review), methods=["GET"]),
        Route("/conversations", guarded(page.conversations), methods=["GET"]),
        Route("/review/proposal/{proposal_id:str}", guarded(page.proposal_verdict), methods=["POST"]),
        Route("/review/{turn_id:str}", guarded(page.verdict), methods=["POST"]),
    ]


def same_site(origin: str, host: str) -> bool:
    """Whether a POST's Origin is this page's own host and port. The scheme is not compared: behind a
    TLS proxy that does not say so (`X-Forwarded-Proto`) the page sees http while the browser says https;
    the CSRF token is what proves the form is the page's own."""
    try:
        return bool(host) and urlsplit(origin).netloc.lower() == host.lower()
    except ValueError:
        return False


def served_over_https(request: Request) -> bool:
    """The cookie is `Secure` when the browser reached the page over TLS: directly, or through a proxy
    that says so (a header only ever making the cookie stricter, so it needs no trust)."""
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"
