"""The OpenAI-compatible API (api/), driven by the real `openai` client against a real uvicorn server
over the fake engine: turns stored like Telegram's, feedback that reaches the training export,
/forget, keys, limits, and every error in OpenAI's shape."""

from __future__ import annotations

import ast
import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from api.app import GONE, MAX_BODY_BYTES
from api.keys import create_key, key_sha256
from config.settings import load_settings
from memory.api_keys import API_USER_BASE
from memory.export import reviewed_since
from memory.screens import screens_for
from memory.store import Store
from memory.trust import policy_for
from ouro.cli import main
from serving.conversation import FAILED, LEFT
from tests.helpers.api_server import start_api_server
from tests.helpers.fakes import FakeEngine, GatedEngine

ROOT = Path(__file__).resolve().parents[1]


class RecordingEngine(FakeEngine):
    """The fake, also recording each reply's sampling and whether its turn was stored before it ran."""

    def __init__(self, *args, store_probe=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.samplings = []
        self.stored_first = []
        self.store_probe = store_probe

    def generate(self, messages, *, chat_key, sampling, on_text=None):
        self.samplings.append(sampling)
        if self.store_probe is not None:
            self.stored_first.append(self.store_probe(messages[-1]["content"]))
        return super().generate(messages, chat_key=chat_key, sampling=sampling, on_text=on_text)


@pytest.fixture
def make_api(tmp_path):
    started = []

    def factory(engine: FakeEngine | None = None, **overrides):
        settings = load_settings(data_dir=tmp_path / "data", **overrides)
        api, thread = start_api_server(settings, engine or RecordingEngine())
        started.append((api, thread))
        return api

    yield factory
    for api, thread in started:
        thread.stop()
        api.worker.close()
        api.store.close()


def make_api_other_key(api) -> str:
    """A second key (another person) on the same server."""
    return create_key(api.store, "someone-else")[0]


def turn_of(completion_id: str) -> int:
    return int(completion_id.rsplit("-", 1)[1])


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_a_completion_is_a_stored_turn_answered_with_the_persona(make_api):
    engine = RecordingEngine(["ahoy there friend"])
    api = make_api(engine)
    engine.store_probe = lambda text: api.store.database.scalar(
        "SELECT status FROM turns WHERE user_text = ? AND user_id = ?", (text, api.user_id))
    reply = api.client().chat.completions.create(
        model="ouro", messages=[{"role": "system", "content": "You are a calculator."},
                                {"role": "user", "content": "hi there"}])
    assert reply.choices[0].message.content == "ahoy there friend"
    assert reply.choices[0].finish_reason == "stop" and reply.model == "gen-0000"
    assert reply.usage.completion_tokens == 3 and reply.usage.total_tokens > 3
    turn = api.store.turn(turn_of(reply.id))
    assert reply.id == f"chatcmpl-ouro-{turn.id}"
    assert (turn.user_id, turn.chat_id, turn.status) == (api.user_id, api.user_id, "answered")
    assert (turn.user_text, turn.reply_text) == ("hi there", "ahoy there friend")
    assert engine.stored_first == ["pending"]                  # stored before the model saw it
    prompt = engine.prompts[-1]
    assert prompt[0] == {"role": "system", "content": api.settings.persona()}   # the bot's persona, not the client's
    assert prompt[-1] == {"role": "user", "content": "hi there"} and len(prompt) == 2
    assert api.user_id < API_USER_BASE <= -(2**53)             # never a Telegram user or chat id


def test_the_context_is_the_history_the_client_sends(make_api):
    engine = RecordingEngine(["first reply", "second reply", "third reply"])
    api = make_api(engine)
    client = api.client()
    one = client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "hello"}])
    two = client.chat.completions.create(model="gen-0000", messages=[
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "first reply"},
        {"role": "user", "content": "and then?"}])
    assert engine.prompts[-1][1:] == [{"role": "user", "content": "hello"},
                                      {"role": "assistant", "content": "first reply"},
                                      {"role": "user", "content": "and then?"}]
    first, second = api.store.turn(turn_of(one.id)), api.store.turn(turn_of(two.id))
    assert second.session_id == first.session_id            # it went on with what was served
    assert second.context_start_turn_id == first.id         # so training reads the context that was served
    three = client.chat.completions.create(model="ouro", messages=[
        {"role": "user", "content": "pretend"}, {"role": "assistant", "content": "words never served"},
        {"role": "user", "content": "go on"}])
    assert engine.prompts[-1][1:] == [{"role": "user", "content": "pretend"},
                                      {"role": "assistant", "content": "words never served"},
                                      {"role": "user", "content": "go on"}]
    third = api.store.turn(turn_of(three.id))
    assert third.session_id != second.session_id and third.context_start_turn_id == third.id


def test_max_tokens_and_temperature_within_the_bots_bounds(make_api):
    engine = RecordingEngine()
    api = make_api(engine)
    client = api.client()
    client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "a"}], max_tokens=5,
                                   temperature=0.0)
    client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "b"}],
                                   max_completion_tokens=100_000)
    assert (engine.samplings[0].max_tokens, engine.samplings[0].temperature) == (5, 0.0)
    assert engine.samplings[1].max_tokens == api.settings.reply_max_tokens
    assert engine.samplings[1].temperature == api.settings.temperature
    with pytest.raises(openai.BadRequestError) as hot:
        client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "c"}], temperature=2.5)
    assert hot.value.body["param"] == "temperature"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "d"}], tools=[tool])
    assert tools.value.body["param"] == "tools" and "not supported" in tools.value.message
    assert len(engine.samplings) == 2                        # refused requests never reached the model


def test_streaming_sends_openai_chunks_then_done(make_api):
    api = make_api(RecordingEngine(["one two three four"]))
    chunks = list(api.client().chat.completions.create(
        model="ouro", messages=[{"role": "user", "content": "count"}], stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert len({c.id for c in chunks}) == 1 and api.store.turn(turn_of(chunks[0].id)).reply_text == text
    raw = httpx.post(f"{api.base_url}/chat/completions", headers={"authorization": f"Bearer {api.key}"},
                     json={"model": "ouro", "stream": True, "messages": [{"role": "user", "content": "again"}]})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n") and raw.text.count("chat.completion.chunk") >= 3


def test_models_and_unknown_models(make_api):
    api = make_api()
    client = api.client()
    assert [m.id for m in client.models.list()] == ["ouro", "gen-0000"]
    assert client.models.retrieve("gen-0000").owned_by == "ouroboros"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gen-9999")
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"


def test_keys_are_checked_and_stored_only_as_hashes(make_api):
    api = make_api()
    with pytest.raises(openai.AuthenticationError):
        api.client("ouro-not-a-real-key").models.list()
    missing = httpx.get(f"{api.base_url}/models")
    assert missing.status_code == 401 and error_of(missing)["code"] == "invalid_api_key"
    stored = api.store.database.query("SELECT * FROM api_keys")
    assert stored[0]["key_sha256"] == key_sha256(api.key) and api.key not in json.dumps(stored)


def test_bad_requests_get_the_right_4xx_in_openai_shape(make_api):
    api = make_api()
    auth = {"authorization": f"Bearer {api.key}"}
    url = api.base_url
    bad_json = httpx.post(f"{url}/chat/completions", headers={**auth, "content-type": "application/json"},
                          content=b'{"model": "ouro", "messages": [')
    assert bad_json.status_code == 400 and error_of(bad_json)["code"] == "invalid_json"
    huge = httpx.post(f"{url}/chat/completions", headers={**auth, "content-type": "application/json"},
                      content=b" " * (MAX_BODY_BYTES + 1))
    assert huge.status_code == 413 and error_of(huge)["code"] == "request_too_large"

    def chunked():   # no Content-Length: the limit holds while reading
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    streamed = httpx.post(f"{url}/chat/completions", headers=auth, content=chunked())
    assert streamed.status_code == 413
    unknown = httpx.get(f"{url}/engines/../../etc/passwd", headers=auth)
    assert unknown.status_code == 404 and error_of(unknown)["type"] == "invalid_request_error"
    for bad_id in ("../../etc/passwd", "chatcmpl-ouro-1/../2", "chatcmpl-ouro-%2e%2e", 7):
        r = httpx.post(f"{url}/feedback", headers=auth, json={"completion_id": bad_id, "rating": 1})
        assert r.status_code == 400 and error_of(r)["param"] == "completion_id"
    no_turn = httpx.post(f"{url}/feedback", headers=auth, json={"completion_id": "chatcmpl-ouro-999999", "rating": 1})
    assert no_turn.status_code == 404
    last_user = httpx.post(f"{url}/chat/completions", headers=auth, json={
        "model": "ouro", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    assert last_user.status_code == 400 and error_of(last_user)["param"] == "messages"
    assert "Traceback" not in bad_json.text + huge.text + unknown.text
    nested = httpx.post(f"{url}/chat/completions", headers={**auth, "content-type": "application/json"},
                        content=b'{"model": "ouro", "messages": ' + b"[" * 100_000)
    assert nested.status_code == 400 and error_of(nested)["code"] == "invalid_json"


def test_fields_that_change_the_reply_are_honoured_or_refused_never_dropped(make_api):
    """`stop` and `logit_bias` would change the text: a client relying on them is told, not answered
    wrongly. `seed` and either spelling of the token limit reach the sampler; empty values are no ask."""
    engine = RecordingEngine(["a reply"] * 8)
    api = make_api(engine)
    auth = {"authorization": f"Bearer {api.key}"}

    def ask(**fields):
        return httpx.post(f"{api.base_url}/chat/completions", headers=auth,
                          json={"model": "ouro", "messages": [{"role": "user", "content": "hi"}], **fields})

    for field, value in (("stop", ["a"] * 5), ("stop", 7), ("stop", "x" * 300), ("logit_bias", {"50256": -100}),
                         ("n", True), ("n", 2)):
        refused = ask(**{field: value})
        assert refused.status_code == 400 and error_of(refused)["param"] == field, (field, value)
    assert len(engine.samplings) == 0
    assert ask(stop=None, logit_bias={}, n=1, seed=42, max_completion_tokens=None, max_tokens=3).status_code == 200
    assert (engine.samplings[-1].seed, engine.samplings[-1].max_tokens) == (42, 3)
    assert ask(max_completion_tokens=5, max_tokens=3).status_code == 200 and engine.samplings[-1].max_tokens == 5
    bad = ask(max_completion_tokens=0)
    assert bad.status_code == 400 and error_of(bad)["param"] == "max_completion_tokens"
    assert error_of(ask(seed="7"))["param"] == "seed" and error_of(ask(seed=1.5))["param"] == "seed"
    assert ask(seed=-1).status_code == 200 and engine.samplings[-1].seed is None        # "random", as some send
    assert ask(seed=2**40 + 3).status_code == 200 and engine.samplings[-1].seed == (2**40 + 3) % (2**32 - 1)


def test_feedback_reaches_the_training_export_under_the_trust_rules(make_api, tmp_path):
    api = make_api(RecordingEngine(["a dull reply"]))
    reply = api.client().chat.completions.create(model="ouro", messages=[{"role": "user", "content": "tell a joke"}])
    auth = {"authorization": f"Bearer {api.key}"}
    r = httpx.post(f"{api.base_url}/feedback", headers=auth, json={
        "completion_id": reply.id, "rating": -1, "correction": "Why did the snake cross the road? To eat its tail."})
    assert r.status_code == 200 and r.json() == {"id": reply.id, "object": "feedback", "rating": "new",
                                                 "correction": "stored"}
    turn_id = turn_of(reply.id)
    assert api.store.rating(turn_id, api.user_id) == -1

    def targets(**overrides) -> list[str]:
        s = load_settings(data_dir=tmp_path / "data", **overrides)
        delta = reviewed_since(api.store, persona=s.persona(), since=None, policy=policy_for(s, api.store),
                               screens=screens_for(s))
        return [e.messages[-1]["content"] for e in delta.examples] + [p.chosen for p in delta.pairs]

    # an open bot learns from trusted people only: a stranger's key waits for review, a trusted one teaches
    assert targets() == []
    taught = targets(trusted_user_ids=[api.user_id])
    assert "Why did the snake cross the road? To eat its tail." in taught

    other = make_api_other_key(api)
    theirs = httpx.post(f"{api.base_url}/feedback", headers={"authorization": f"Bearer {other}"},
                        json={"completion_id": reply.id, "rating": 1})
    assert theirs.status_code == 404 and api.store.rating(turn_id, api.user_id) == -1



def test_forget_removes_the_keys_turns_and_revoke_locks_it_out(make_api, monkeypatch, capsys):
    api = make_api(RecordingEngine(["kept for now"]))
    reply = api.client().chat.completions.create(model="ouro", messages=[{"role": "user", "content": "remember me"}])
    httpx.post(f"{api.base_url}/feedback", headers={"authorization": f"Bearer {api.key}"},
               json={"completion_id": reply.id, "rating": 1})
    assert api.store.user_data_counts(api.user_id)["messages"] == 1

    counts, chats = api.store.forget_user(api.user_id)      # what /forget does for a Telegram user
    assert counts["turns"] == 1 and counts["ratings"] == 1 and chats == [api.user_id]
    assert api.store.user_data_counts(api.user_id) == {"messages": 0, "ratings": 0, "corrections": 0, "picks": 0}
    assert api.store.database.scalar("SELECT COUNT(*) FROM turns WHERE user_text = 'remember me'") == 0

    again = api.client().chat.completions.create(model="ouro", messages=[{"role": "user", "content": "hello again"}])
    assert api.store.turn(turn_of(again.id)).user_id == api.user_id   # the key still works, from scratch
    monkeypatch.setenv("OURO_DATA_DIR", str(api.settings.data_dir))
    assert main(["api-key", "revoke", "tester", "--forget", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["forgotten"]["turns"] == 1
    assert api.store.user_data_counts(api.user_id)["messages"] == 0
    with pytest.raises(openai.AuthenticationError):
        api.client().models.list()


def test_rate_limit_is_per_key_and_stores_the_turn(make_api):
    api = make_api(flood_messages=2, flood_window_s=600)
    client = api.client()
    for i in range(2):
        client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": f"m{i}"}])
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "one too many"}])
    assert 590 <= int(limited.value.response.headers["retry-after"]) <= 600   # when the first leaves the window
    assert api.store.database.scalar("SELECT status FROM turns WHERE user_text = 'one too many'") == "limited"
    other = make_api_other_key(api)
    assert api.client(other).chat.completions.create(model="ouro", messages=[{"role": "user", "content": "hi"}])


def test_corrections_through_the_api_count_against_the_keys_rate_limit(make_api):
    api = make_api(RecordingEngine(["a reply"] * 4), flood_messages=3, flood_window_s=600)
    reply = api.client().chat.completions.create(model="ouro", messages=[{"role": "user", "content": "hi"}])
    auth = {"authorization": f"Bearer {api.key}"}

    def correct(text):
        return httpx.post(f"{api.base_url}/feedback", headers=auth, json={"completion_id": reply.id, "correction": text})

    assert [correct(f"better {i}").status_code for i in range(2)] == [200, 200]   # 1 chat + 2 corrections
    limited = correct("and another, forever")
    assert limited.status_code == 429 and 590 <= int(limited.headers["retry-after"]) <= 600
    assert api.store.database.scalar("SELECT COUNT(*) FROM corrections") == 2
    rated = httpx.post(f"{api.base_url}/feedback", headers=auth, json={"completion_id": reply.id, "rating": 1})
    assert rated.status_code == 200                                                # a rating needs no allowance


def test_a_completion_forgotten_while_it_is_written_is_a_410_without_its_text(make_api):
    engine = GatedEngine(["a reply nobody may keep"])
    api = make_api(engine)
    engine.hold()
    answer: dict = {}
    asking = threading.Thread(target=lambda: answer.setdefault("r", httpx.post(
        f"{api.base_url}/chat/completions", headers={"authorization": f"Bearer {api.key}"}, timeout=30,
        json={"model": "ouro", "messages": [{"role": "user", "content": "remember this"}]})))
    asking.start()
    assert engine.started.wait(10)
    api.store.forget_user(api.user_id)                 # `ouro api-key revoke --forget` meanwhile
    engine.release()
    asking.join(30)
    r = answer["r"]
    assert r.status_code == 410 and r.json()["error"]["message"] == GONE
    assert "nobody may keep" not in r.text and api.store.user_data_counts(api.user_id)["messages"] == 0


def test_a_failing_model_is_a_500_with_the_turn_stored_and_the_server_alive(make_api, caplog):
    api = make_api(FakeEngine(fail_with=RuntimeError("secret internals exploded")))
    client = api.client()
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "please answer"}])
    assert FAILED in failed.value.message and failed.value.status_code == 500
    assert failed.value.response.headers["x-should-retry"] == "false"   # a retry would be another stored turn
    assert "secret internals" not in json.dumps(failed.value.body) and "Traceback" not in failed.value.response.text
    assert api.store.database.scalar("SELECT status FROM turns WHERE user_text = 'please answer'") == "failed"
    with pytest.raises(openai.APIError) as streamed:
        list(client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "stream it"}],
                                            stream=True))
    assert FAILED in str(streamed.value) and "secret internals" not in str(streamed.value)
    assert [m.id for m in client.models.list()] == ["ouro", "gen-0000"]   # still serving


def test_stop_sequences_end_the_reply_where_they_begin_streamed_or_not(make_api):
    api = make_api(RecordingEngine(["Thought: look it up\nObservation: the sea is wet"] * 2 + ["no stop here"]))
    client = api.client()
    whole = client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "q"}],
                                           stop=["\nObservation:", "never"])
    assert whole.choices[0].message.content == "Thought: look it up" and whole.choices[0].finish_reason == "stop"
    assert api.store.turn(turn_of(whole.id)).reply_text == "Thought: look it up"
    chunks = list(client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "q2"}],
                                                 stop="\nObservation:", stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == "Thought: look it up" and [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    plain = client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "q3"}], stop=["zzz"])
    assert plain.choices[0].message.content == "no stop here"                       # held back, then passed on


def test_a_streamed_reply_sent_back_as_written_goes_on_with_its_stored_session(make_api):
    """A stop leaves the streamed text with its trailing newline; the store keeps it stripped. The
    client sends back what it was shown: that is the same conversation, not a new session."""
    api = make_api(RecordingEngine(["Hello there.\nUser: more", "fine"]))
    client = api.client()
    chunks = list(client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "hi"}],
                                                 stop="User:", stream=True))
    shown = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert shown == "Hello there.\n"
    later = client.chat.completions.create(model="ouro", messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": shown},
        {"role": "user", "content": "and then?"}])
    first, second = api.store.turn(turn_of(chunks[0].id)), api.store.turn(turn_of(later.id))
    assert second.session_id == first.session_id and second.context_start_turn_id == first.id


def test_a_client_that_hangs_up_mid_stream_stops_the_reply_and_frees_its_key(make_api):
    """A Stop button: the reply is not written on for nobody, the turn is closed as such (no admin told),
    and the key's next request is answered at once instead of waiting behind it."""
    class SlowToWrite(FakeEngine):   # the long reply at 50 ms a word, the next at once
        def generate(self, messages, **kwargs):
            self.delay_s = 20.0 if messages[-1]["content"] == "long" else 0.0
            return super().generate(messages, **kwargs)

    api = make_api(SlowToWrite([" ".join(f"w{i}" for i in range(400)), "next"]))
    auth = {"authorization": f"Bearer {api.key}"}
    with httpx.stream("POST", f"{api.base_url}/chat/completions", headers=auth, timeout=30,
                      json={"model": "ouro", "stream": True, "messages": [{"role": "user", "content": "long"}]}) as r:
        lines = r.iter_lines()
        first = [next(lines) for _ in range(6)]   # the role chunk and a couple of words, with blank separators
    assert any('"w0' in line for line in first)
    started = time.monotonic()
    again = api.client().chat.completions.create(model="ouro", messages=[{"role": "user", "content": "hi"}])
    assert again.choices[0].message.content == "next"
    assert time.monotonic() - started < 10   # the 400-word reply (20 s) was not finished first
    turn = api.store.database.one("SELECT status, reply_text FROM turns WHERE user_text = 'long'")
    assert turn == {"status": "failed", "reply_text": LEFT}


def test_a_store_failure_under_a_stream_ends_it_with_an_error_not_a_hang(make_api, monkeypatch):
    api = make_api(RecordingEngine(["one two three"]))

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(api.store, "complete_turn", locked)
    raw = httpx.post(f"{api.base_url}/chat/completions", headers={"authorization": f"Bearer {api.key}"}, timeout=20,
                     json={"model": "ouro", "stream": True, "messages": [{"role": "user", "content": "save me"}]})
    events = [json.loads(line[6:]) for line in raw.text.split("\n\n") if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "model_failed" and raw.text.endswith("data: [DONE]\n\n")
    assert "database is locked" not in raw.text
    assert api.store.database.scalar("SELECT status FROM turns WHERE user_text = 'save me'") == "failed"


def test_api_key_cli_prints_once_and_lists_without_secrets(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OURO_DATA_DIR", str(tmp_path / "cli"))
    assert main(["api-key", "create", "laptop"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("ouro-") and len(key) > 40
    assert main(["api-key", "create", "laptop"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["api-key", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["laptop"] and key not in json.dumps(rows) and rows[0]["user_id"] < -(2**53)
    assert main(["api-key", "create", "../etc"]) == 1
    assert main(["api-key", "create", "private", "--opt-out", "--json"]) == 0
    private = json.loads(capsys.readouterr().out)
    store = Store.open(tmp_path / "cli" / "ouro.db")
    try:
        assert store.training_opt_out(private["user_id"]) is True
        assert store.training_opt_out(rows[0]["user_id"]) is None   # the default applies to the others
    finally:
        store.close()
    assert main(["api-key", "revoke", "laptop"]) == 0 and main(["api-key", "revoke", "laptop"]) == 1


def test_api_speaks_http_only_over_serving():
    """api/ is a transport beside bot/: it never imports Telegram or the bot."""
    for path in (ROOT / "api").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in {"bot", "telegram", "ouro"}, f"{path.name} imports {name}"


@pytest.mark.e2e
async def test_served_beside_telegram_in_one_loop_over_one_conversation(emu, tmp_path):
    """`ouro serve` with OURO_HTTP_PORT: the bot starts the API in its own loop, over its conversation."""
    from api.app import build_api
    from api.server import HttpServer
    from bot.app import build_application, running
    from engine.worker import InferenceWorker
    from serving.conversation import Conversation

    emu.reset()
    settings = load_settings(data_dir=tmp_path / "data", stream_edit_interval_s=0.2)
    store = Store.open(settings.db_path)
    engine = RecordingEngine(["from telegram", "from the api"])
    worker = InferenceWorker(engine)
    conversation = Conversation(settings, store, worker)
    key, user_id = create_key(store, "beside")
    http = HttpServer(build_api(settings, conversation), "127.0.0.1", 0)
    app = build_application(settings, store, conversation, token=emu.token, base_url=emu.api_url, companions=[http])
    try:
        async with running(app, poll_timeout=1):
            ann = emu.client(1001, "Ann")
            mid = await ann.asend_text("hi bot")
            await ann.await_for(lambda m: bool(m.callback_data), after=mid, timeout=15)
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key=key, max_retries=0)
            reply = await client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "hi api"}])
            assert reply.choices[0].message.content == "from the api"
            assert engine.chat_keys == [1001, user_id]          # one worker, one engine answered both
            await client.close()
        with pytest.raises(httpx.ConnectError):                 # stopped with the bot
            httpx.get(f"http://127.0.0.1:{http.port}/v1/models")
    finally:
        worker.close()
        store.close()


@pytest.mark.model
def test_ouro_web_serves_the_packaged_model(tmp_path, monkeypatch, capsys):
    """`ouro web` as its own process on the real GGUF: a key, a completion, a clean stop on SIGTERM."""
    import os
    import re
    import signal
    import subprocess
    import sys

    data = tmp_path / "web"
    monkeypatch.setenv("OURO_DATA_DIR", str(data))
    assert main(["api-key", "create", "real"]) == 0
    key = capsys.readouterr().out.strip()
    env = {**os.environ, "OURO_REPLY_MAX_TOKENS": "16", "OURO_SEED": "7"}
    proc = subprocess.Popen([sys.executable, "-m", "ouro.cli", "web", "--port", "0"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:   # model loaded and listening
            if found := re.search(r"http://127\.0\.0\.1:(\d+)/v1", line):
                port = int(found.group(1))
                break
        assert port, "ouro web never said where it listens"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="ouro", messages=[{"role": "user", "content": "Say hi!"}],
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].message.content.strip() and reply.usage.completion_tokens <= 8
        assert reply.model == "gen-0000"
        capsys.readouterr()
        assert main(["web-login", "--port", str(port)]) == 0          # the owner's page, same server
        with httpx.Client(follow_redirects=True, timeout=30) as web:
            page = web.get(capsys.readouterr().out.strip())
            assert page.status_code == 200 and '<td id="active">gen-0000</td>' in page.text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


async def test_a_port_in_use_is_one_clear_error(settings, conversation):
    import socket

    from api.app import build_api
    from api.server import HttpServer
    from core.errors import OuroError

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(OuroError, match="cannot listen for HTTP on 127.0.0.1"):
            await HttpServer(build_api(settings, conversation), "127.0.0.1", taken.getsockname()[1]).start()
    finally:
        taken.close()


def test_bench_serve_api_part_times_the_api_against_the_bare_model(tmp_path, capsys):
    """`ouro bench serve`'s API part over the fake engine: the real openai client against a real server,
    non-streaming, greedy, the same max tokens as the bare side, and its line in the printed report."""
    import asyncio
    from types import SimpleNamespace

    from engine.worker import InferenceWorker
    from ouro.bench.serve import measure_api, print_report
    from serving.conversation import Conversation

    settings = load_settings(data_dir=tmp_path / "data", temperature=0.0, reply_max_tokens=16)
    store = Store.open(settings.db_path)
    engine = RecordingEngine(delay_s=0.02)
    worker = InferenceWorker(engine)
    try:
        rt = SimpleNamespace(settings=settings, store=store, worker=worker,
                             conversation=Conversation(settings, store, worker))
        result = asyncio.run(measure_api(rt, quiet=True, prompts=3))
    finally:
        worker.close()
        store.close()
    assert result["api_prompts"] == 3 and result["api_same_replies"] and result["api_vs_bare_goal"] == 1.10
    assert result["api_reply_s"] > 0 and result["api_bare_reply_s"] > 0
    assert result["api_vs_bare_ratio"] == pytest.approx(result["api_reply_s"] / result["api_bare_reply_s"], rel=0.01)
    measured = [(s.temperature, s.max_tokens) for k, s in zip(engine.chat_keys, engine.samplings, strict=True)
                if k != "z"]                                           # both sides of each prompt, not the other chat
    assert len(measured) == 6 and set(measured) == {(0.0, 16)}
    assert sum(1 for k in engine.chat_keys if str(k).startswith("bare-api")) == 3
    print_report(result)
    assert "reply through the API ÷ bare model" in capsys.readouterr().out


def test_bench_serve_concurrent_part_runs_n_api_clients_beside_n_telegram_chats(tmp_path, capsys):
    """`ouro bench serve --concurrent N` over the fake engine: N real openai clients (a key each) at
    once and N emulated Telegram users at once, every reply counted on both sides, and its lines in
    the printed report."""
    import asyncio
    from types import SimpleNamespace

    from engine.worker import InferenceWorker
    from ouro.bench import concurrent_api as bench
    from ouro.bench.serve import MESSAGES, print_report
    from serving.conversation import Conversation

    settings = load_settings(data_dir=tmp_path / "data", temperature=0.0, reply_max_tokens=16,
                             stream_edit_interval_s=0.2)
    store = Store.open(settings.db_path)

    engine = RecordingEngine(delay_s=0.05)
    worker = InferenceWorker(engine)
    try:
        rt = SimpleNamespace(settings=settings, store=store, worker=worker,
                             conversation=Conversation(settings, store, worker))
        result = asyncio.run(bench.measure_concurrent(rt, 3, messages=MESSAGES, quiet=True, rounds=2))
        answered = store.database.query("SELECT user_id, completion_tokens FROM turns WHERE status = 'answered'")
    finally:
        worker.close()
        store.close()
    assert result["concurrent_clients"] == 3 and result["concurrent_rounds"] == 2
    for side in ("api", "telegram"):
        assert result[f"{side}_replies"] == 6 and result[f"{side}_failed"] == 0, side
        assert 0 < result[f"{side}_p50_s"] <= result[f"{side}_p95_s"] <= result[f"{side}_wall_s"], side
        assert result[f"{side}_replies_per_min"] == pytest.approx(60 * 6 / result[f"{side}_wall_s"], rel=0.01)
        assert result[f"{side}_tokens_per_s"] > 0
    api_people = {r["user_id"] for r in answered if is_api_person(r["user_id"])}
    telegram_people = {r["user_id"] for r in answered if not is_api_person(r["user_id"])}
    assert len(api_people) == 3 and telegram_people == {70_000, 70_001, 70_002}   # a person per client
    telegram_tokens = sum(r["completion_tokens"] for r in answered if r["user_id"] in telegram_people)
    assert result["telegram_tokens_per_s"] == pytest.approx(telegram_tokens / result["telegram_wall_s"], rel=0.01)
    for i in range(3):   # each second prompt was answered with its first exchange in context, on both sides
        first, second = MESSAGES[2 * i], MESSAGES[2 * i + 1]
        seen = [[m["content"] for m in p] for p in engine.prompts if p[-1]["content"] == second]
        assert len(seen) == 2 and all(any(first in c for c in contents[:-1]) for contents in seen), i
        assert len(seen[0]) == len(seen[1])
    print_report(result)
    out = capsys.readouterr().out
    assert "3 clients at once, 2 prompts each" in out and "OpenAI-compatible API" in out and "Telegram" in out


def is_api_person(user_id: int) -> bool:
    return user_id <= API_USER_BASE


def test_percentile_stays_within_the_measured_values():
    from ouro.bench.concurrent_api import percentile

    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 50) == 3.0 and 4.0 < percentile(values, 95) <= 10.0
    assert percentile([2.5], 95) == 2.5


def test_bench_concurrent_flag_is_checked_and_documented(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--concurrent-api N" in capsys.readouterr().out
    assert main(["bench", "serve", "--concurrent-api", "0"]) == 1
    assert "--concurrent-api takes 1 to 64 clients" in capsys.readouterr().err
