"""The HTTP app: the owner's web page at `/` (api/web.py) and the OpenAI-compatible API:
`/v1/models`, `/v1/chat/completions` (whole or streamed as server-sent events) and `/v1/feedback`
(👍/👎/✏️ on a completion), over serving's Conversation.

This module only speaks HTTP. A request's last user message is a turn like a Telegram message:
stored before the model sees it (`Conversation.receive`), bounded per key by the same flood limit
and per-chat queue as Telegram (serving/limits.py), answered on the inference worker. The
conversation before it is the one the client sent (`Conversation.follow`). Each key is a person
(memory/api_keys.py) whose private chat holds its turns, so opt-out, /forget, trust and the caps
apply as they do to Telegram users. A completion's id names its stored turn: `chatcmpl-ouro-<turn>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from api.errors import ApiError
from api.keys import key_owner
from api.requests import ChatRequest, parse_chat
from api.web import WebPage, web_routes
from api.web_auth import WebAuth
from config.settings import Settings
from memory.api_keys import is_api_user
from serving.conversation import FAILED, TOO_LONG, Conversation, Outcome, Speaker
from serving.limits import ADMIT, NOTICE, ChatQueues, FloodLimit

if TYPE_CHECKING:
    from serving.loop import LearningLoop

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20          # 1 MiB: far more than max_input_chars of text and a long history
OWNER = "ouroboros"
ALIAS = "ouro"                    # always the active generation, whichever it is
COMPLETION_ID = re.compile(r"chatcmpl-ouro-([1-9][0-9]{0,17})")
LIMITED = "Too many requests for this key: at most {} per {:.0f} s. Wait a little and send it again."
QUEUE_FULL = "This key already has requests waiting for a reply; send this one again once they are answered."
STATUS = {"busy": 503, "refused": 400, "failed": 500}   # an outcome that is no reply → HTTP status
GONE = "this conversation was deleted while the reply was written; nothing of it was kept"
RETRY_S = 5                       # Retry-After for "busy" answers: a reply or two later
NO_RETRY = {"x-should-retry": "false"}   # the openai client retries a 500 unless told: each try a new stored turn


class Api:
    def __init__(self, settings: Settings, conversation: Conversation, *, flood: FloodLimit | None = None) -> None:
        self.settings = settings
        self.conversation = conversation
        self.flood = flood or FloodLimit(settings.flood_messages, settings.flood_window_s)
        self.queues = ChatQueues(settings.chat_queue_max)
        self._replies: set[asyncio.Task] = set()   # answers under way, kept alive if their client leaves

    # --- routes ---------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        """The served models: the alias and the active generation's id."""
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model(m) for m in self._model_ids()]})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        model_id = request.path_params["model_id"]
        if model_id not in self._model_ids():
            raise _no_model(model_id)
        return JSONResponse(self._model(model_id))

    async def chat(self, request: Request) -> Response:
        """One turn: stored, bounded, answered; the reply whole or streamed."""
        name, user_id = self._authorize(request)
        req = parse_chat(await _read_json(request))
        if req.model not in self._model_ids():
            raise _no_model(req.model)
        conv = self.conversation
        who = Speaker(chat_id=user_id, user_id=user_id, first_name=name)
        history = conv.follow(who, req.exchanges)
        received = conv.receive(who, req.text)
        if received.kind != "pending":   # empty or too long: stored as refused
            raise _outcome_error(received)
        turn_id = received.turn_id
        verdict = self.flood.check(user_id)
        if verdict != ADMIT:
            limited = self._limited(user_id)
            conv.mark_limited(turn_id, limited.message if verdict == NOTICE else None)
            raise limited
        queue = self.queues.join(user_id)
        if queue is None:
            conv.mark_busy(turn_id, QUEUE_FULL)
            raise ApiError(429, QUEUE_FULL, code="too_many_requests_waiting", headers={"retry-after": str(RETRY_S)})

        pieces: asyncio.Queue[str | Outcome] = asyncio.Queue()
        cancelled = threading.Event()   # set when a streaming client hangs up: the reply stops being written

        async def reply() -> Outcome:
            try:
                async with queue:
                    outcome = await conv.answer(turn_id, history=history, max_tokens=req.max_tokens,
                                                temperature=req.temperature, seed=req.seed, cancelled=cancelled,
                                                stop=req.stop,
                                                on_text=pieces.put_nowait if req.stream else None)
            except Exception as exc:   # the store failing under it (answer stores every model failure itself)
                log.exception("API turn %s could not be answered", turn_id)
                with contextlib.suppress(Exception):
                    conv.mark_failed(turn_id, FAILED)
                outcome = Outcome(kind="failed", turn_id=turn_id, text=FAILED, error=exc)
            pieces.put_nowait(outcome)   # a stream waiting for its end gets one, however the reply ended
            return outcome

        task = asyncio.create_task(reply())
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)
        if req.stream:
            return StreamingResponse(self._events(req, turn_id, pieces, cancelled), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        outcome = await asyncio.shield(task)
        if outcome.kind != "answered":
            raise _outcome_error(outcome)
        completion = outcome.completion
        assert completion is not None
        return JSONResponse({
            "id": _completion_id(turn_id), "object": "chat.completion", "created": int(time.time()),
            "model": self._answered_by(turn_id), "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text, "refusal": None},
                         "logprobs": None, "finish_reason": completion.finish_reason}],
            "usage": _usage(outcome)})

    async def feedback(self, request: Request) -> Response:
        """👍 (+1), 👎 (-1) and ✏️ (a better reply) on one of this key's completions: the same store
        calls as Telegram's buttons, so the same trust and review rules follow."""
        _name, user_id = self._authorize(request)
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        raw_id = body.get("completion_id")
        match = COMPLETION_ID.fullmatch(raw_id) if isinstance(raw_id, str) else None
        if match is None:
            raise ApiError(400, "completion_id must be the id a chat completion returned (chatcmpl-ouro-<number>)",
                           param="completion_id", code="invalid_completion_id")
        rating, correction = body.get("rating"), body.get("correction")
        if rating is not None and (isinstance(rating, bool) or rating not in (1, -1)):
            raise ApiError(400, "rating must be 1 or -1", param="rating")
        if correction is not None and (not isinstance(correction, str) or not correction.strip()):
            raise ApiError(400, "correction must be the reply you would have liked, as text", param="correction")
        if correction is not None and len(correction) > self.settings.max_input_chars:
            raise ApiError(400, TOO_LONG, param="correction", code="correction_too_long")
        if rating is None and correction is None:
            raise ApiError(400, "give a rating (1 or -1), a correction, or both", param="rating")
        conv = self.conversation
        turn = conv.turn(int(match.group(1)))
        if turn is None or turn.user_id != user_id or turn.status != "answered":
            raise ApiError(404, f"no completion {raw_id} of this key", param="completion_id",
                           code="completion_not_found")
        if correction is not None and self.flood.check(user_id) != ADMIT:
            # a correction is a message to learn from, stored like one: the same per-key limit as chat
            # (a rating only ever changes one row per completion and needs none)
            raise self._limited(user_id)
        result: dict = {"id": raw_id, "object": "feedback"}
        if rating is not None:
            result["rating"] = conv.rate(turn.id, user_id, rating)
        if correction is not None:   # ✏️ then the better answer, as in Telegram
            conv.ask_for_correction(turn.chat_id, user_id, turn.id)
            stored = conv.receive(Speaker(chat_id=turn.chat_id, user_id=user_id), correction.strip())
            if stored.kind != "correction":
                raise RuntimeError(f"correction of turn {turn.id} was not taken: {stored.kind}")
            result["correction"] = "stored"
        return JSONResponse(result)

    # --- pieces -----------------------------------------------------------------------------------
    async def _events(self, req: ChatRequest, turn_id: int, pieces: asyncio.Queue,
                      cancelled: threading.Event) -> AsyncIterator[str]:
        """OpenAI's chunks as server-sent events: the role, the text as it comes, the finish reason
        (then usage, when asked for), `[DONE]`. A failure after the start is an `error` event. A
        client that hangs up before the end (a Stop button) stops the reply (`cancelled`), which frees
        the model and the key's queue for its next request."""
        head = {"id": _completion_id(turn_id), "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.conversation.worker.engine.generation_id, "system_fingerprint": None}

        def event(delta: dict, finish: str | None = None) -> str:
            return _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        ended = False
        try:
            yield event({"role": "assistant", "content": ""})
            while True:
                item = await pieces.get()
                if isinstance(item, str):
                    yield event({"content": item})
                    continue
                ended = True
                if item.kind != "answered":
                    yield _sse(_outcome_error(item).body())
                    break
                assert item.completion is not None
                yield event({}, item.completion.finish_reason)
                if req.include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(item)})
                break
            yield "data: [DONE]\n\n"
        finally:
            if not ended:   # the response was closed under us: its client is gone
                cancelled.set()

    def _limited(self, user_id: int) -> ApiError:
        """Over the key's flood limit: a 429 saying when its oldest message leaves the window."""
        return ApiError(429, LIMITED.format(self.flood.messages, self.flood.window_s), code="rate_limit_exceeded",
                        headers={"retry-after": str(self.flood.retry_after(user_id))})

    def _authorize(self, request: Request) -> tuple[str, int]:
        owner = key_owner(self.conversation.store, request.headers.get("authorization"))
        if owner is None:
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key from `ouro api-key create`>",
                           code="invalid_api_key")
        return owner

    def _model_ids(self) -> list[str]:
        return [ALIAS, self.conversation.worker.engine.generation_id]

    def _model(self, model_id: str) -> dict:
        row = self.conversation.store.generation(self.conversation.worker.engine.generation_id) or {}
        return {"id": model_id, "object": "model", "created": _epoch(row.get("created_at")), "owned_by": OWNER}

    def _answered_by(self, turn_id: int) -> str:
        turn = self.conversation.turn(turn_id)
        return (turn.generation_id if turn else None) or self.conversation.worker.engine.generation_id


def build_api(settings: Settings, conversation: Conversation, *, flood: FloodLimit | None = None,
              learning: LearningLoop | None = None, auth: WebAuth | None = None) -> Starlette:
    """The ASGI application: the API under /v1 and the owner's web page (api/web.py) at /.
    `flood` lets a caller pass its own clock (tests do); `learning` is the process's learning loop,
    when it runs one, which the page's promote and rollback go through (and so hot-swap)."""
    api = Api(settings, conversation, flood=flood)
    page = WebPage(settings, conversation.store, serving_id=lambda: conversation.worker.engine.generation_id,
                   learning=learning, auth=auth, worker=conversation.worker)
    routes = [
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model_id}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/feedback", api.feedback, methods=["POST"]),
        *web_routes(page),
    ]
    app = Starlette(routes=routes, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.api = api
    app.state.page = page
    return app


def close_interrupted(conversation: Conversation) -> int:
    """At start-up without Telegram (`ouro web`): API turns a crash left pending are closed as failed
    (their clients saw the connection drop); Telegram's are left for the bot, which tells their authors."""
    closed = 0
    for turn in conversation.interrupted_turns():
        if is_api_user(turn["chat_id"]):
            conversation.mark_failed(turn["id"], "The server restarted before answering.")
            closed += 1
    return closed


async def _read_json(request: Request) -> object:
    """The body as JSON, refused past MAX_BODY_BYTES (413) before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):   # RecursionError: nested past Python's stack
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


def _outcome_error(outcome: Outcome) -> ApiError:
    """A turn that got no reply, as the error its client sees (what a Telegram user would be told)."""
    if outcome.kind == "gone":   # forgotten while it was written (`ouro api-key revoke --forget`): nothing kept
        return ApiError(410, GONE, code="conversation_forgotten")
    code = {"busy": "server_busy", "failed": "model_failed"}.get(outcome.kind, "invalid_request")
    if outcome.text == TOO_LONG:
        code = "context_length_exceeded"
    headers = {"busy": {"retry-after": str(RETRY_S)}, "failed": NO_RETRY}.get(outcome.kind)
    return ApiError(STATUS.get(outcome.kind, 500), outcome.text, code=code, headers=headers)


def _no_model(model_id: str) -> ApiError:
    return ApiError(404, f"the model {model_id[:100]!r} does not exist here; GET /v1/models lists the served ones",
                    param="model", code="model_not_found")


def _usage(outcome: Outcome) -> dict:
    c = outcome.completion
    assert c is not None
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _completion_id(turn_id: int) -> str:
    return f"chatcmpl-ouro-{turn_id}"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _epoch(iso: str | None) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp()) if iso else 0
    except ValueError:
        return 0


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own: unknown route (404), wrong method (405)."""
    assert isinstance(exc, HTTPException)
    message = {404: f"no route {request.method} {request.url.path[:200]}",
               405: f"{request.method} is not allowed on {request.url.path[:200]}"}.get(exc.status_code, exc.detail)
    return ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    """A bug: the admins get the traceback in the log, the client a plain 500."""
    log.error("API request %s %s failed", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "the server failed to handle this request; it has been logged", code="internal_error",
                    headers=NO_RETRY).response()
