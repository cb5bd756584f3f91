"""Reading a chat-completion request: the conversation the client sent, the new message, and the
few fields the bot honours (`stream`, `max_completion_tokens`/`max_tokens`, `temperature`, `seed`,
`stop`). Everything else OpenAI defines is either ignored, where it changes nothing in the reply
(`user`, `metadata`, `store`, `top_p`…), or refused with a 400 that names it, where a client relies
on it and would get a wrong answer without being told: logit bias, tools and function calling,
several choices, log-probabilities, JSON or audio output."""

from __future__ import annotations

from dataclasses import dataclass

from api.errors import ApiError

REFUSED = {
    "tools": "tools and function calling are not supported by this model",
    "functions": "function calling is not supported by this model",
    "function_call": "function calling is not supported by this model",
    "tool_choice": "tools and function calling are not supported by this model",
    "parallel_tool_calls": "tools and function calling are not supported by this model",
    "logprobs": "log-probabilities are not available",
    "top_logprobs": "log-probabilities are not available",
    "audio": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "logit_bias": "logit bias is not supported",
}
ROLES = {"system", "developer", "user", "assistant"}
MAX_STOPS = 4
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class ChatRequest:
    model: str
    exchanges: list[tuple[str, str]]   # (user, reply) pairs before the new message, oldest first
    text: str                          # the new message: the turn
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None            # seeds the sampler, for reproducible replies
    stop: tuple[str, ...] = ()         # the reply ends where one of these begins (serving/stops.py)


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _text(content: object, param: str) -> str:
    """A message's content: a string, or a list of text parts (images and audio are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad("only text content parts are supported", f"{param}[{i}]")
            pieces.append(part["text"])
        return "\n".join(pieces)
    raise _bad("content must be a string or a list of text parts", param)


def parse_chat(body: object) -> ChatRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    for field, why in REFUSED.items():
        value = body.get(field)
        if value in (None, False, [], {}, "", "none") or (field == "parallel_tool_calls" and not body.get("tools")):
            continue
        raise _bad(f"{field}: {why}", field, "unsupported_parameter")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _bad("n: only one choice per request is supported", "n", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _bad("response_format: only text replies are supported", "response_format", "unsupported_parameter")
    if body.get("modalities") not in (None, ["text"]):
        raise _bad("modalities: only text is supported", "modalities", "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required (GET /v1/models lists them)", "model")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    turns: list[tuple[str, str]] = []   # (role, text), system and developer left out: the persona is the bot's
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad("each message needs a role: system, developer, user or assistant "
                       "(tool messages are not supported)", f"messages[{i}].role")
        text = _text(m.get("content"), f"messages[{i}].content")
        if m.get("tool_calls"):
            raise _bad("tool calls are not supported", f"messages[{i}].tool_calls", "unsupported_parameter")
        if m["role"] in ("system", "developer"):
            continue
        if turns and turns[-1][0] == m["role"]:   # two in a row from one side read as one message
            turns[-1] = (m["role"], turns[-1][1] + "\n" + text)
        else:
            turns.append((m["role"], text))
    if not turns or turns[-1][0] != "user":
        raise _bad("the last message must be the user's: it is the one answered", "messages")
    exchanges, user = [], ""
    for role, text in turns[:-1]:
        if role == "user":
            user = text
        else:
            exchanges.append((user, text))
            user = ""

    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))

    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(limit)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise _bad(f"{limit} must be a positive integer", limit)
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, int | float)
                                    or not 0 <= temperature <= 2):
        raise _bad("temperature must be a number from 0 to 2", "temperature")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed must be an integer", "seed")
    if seed is not None:   # OpenAI takes any 64-bit integer; some clients send -1 for "random"
        seed = None if seed < 0 else seed % (2**32 - 1)   # llama.cpp's seeds are 32-bit, 2**32 - 1 is "random"
    return ChatRequest(model=model, exchanges=exchanges, text=turns[-1][1], stream=stream, include_usage=include_usage,
                       max_tokens=max_tokens, temperature=None if temperature is None else float(temperature),
                       seed=seed, stop=_stops(body.get("stop")))


def _stops(value: object) -> tuple[str, ...]:
    """`stop`: a string or up to MAX_STOPS of them (OpenAI's limit), each at most MAX_STOP_CHARS."""
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise _bad(f"stop must be a string or a list of at most {MAX_STOPS} strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise _bad(f"each stop sequence may be at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(s for s in stops if s)
