"""Webhook mode: a configuration that cannot work fails at start-up; the real bot takes updates posted
to its listener only with the secret, and answers through the (emulated) Bot API."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from bot.webhook import webhook_config
from config.settings import load_settings
from core.errors import OuroError
from tests.helpers.fakes import FakeEngine

ANN = 1001
SECRET = "s3cret-Token_for-the-webhook"
HEADER = "X-Telegram-Bot-Api-Secret-Token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_polling_needs_no_webhook(tmp_path):
    assert webhook_config(load_settings(data_dir=tmp_path)) is None


@pytest.mark.parametrize("given, missing", [
    ({}, "webhook_url and webhook_secret are not set"),
    ({"webhook_url": "https://bot.example.org/tg"}, "webhook_secret is not set"),
    ({"webhook_secret": SECRET}, "webhook_url is not set"),
])
def test_webhook_mode_without_its_url_or_secret_is_refused_at_start_up(tmp_path, given, missing):
    settings = load_settings(data_dir=tmp_path, telegram_mode="webhook", **given)
    with pytest.raises(OuroError, match=missing) as err:
        webhook_config(settings)
    assert "OURO_WEBHOOK_URL" in err.value.hint and "OURO_WEBHOOK_SECRET" in err.value.hint


@pytest.mark.parametrize("given, named", [
    ({"webhook_url": "http://bot.example.org/tg"}, "webhook_url"),        # Telegram posts only to HTTPS
    ({"webhook_url": "bot.example.org/tg"}, "webhook_url"),
    ({"webhook_secret": "has spaces and ünïcode"}, "webhook_secret"),
    ({"webhook_secret": "x" * 257}, "webhook_secret"),
    ({"telegram_mode": "push"}, "telegram_mode"),
])
def test_a_malformed_webhook_setting_is_named(tmp_path, given, named):
    with pytest.raises(OuroError, match=named):
        load_settings(data_dir=tmp_path, **given)


def test_the_secret_never_shows_in_the_settings_or_the_webhook(tmp_path, monkeypatch):
    monkeypatch.setenv("OURO_WEBHOOK_SECRET", SECRET)
    settings = load_settings(data_dir=tmp_path, telegram_mode="webhook", webhook_url="https://bot.example.org/ouro/tg")
    hook = webhook_config(settings)
    assert hook.secret == SECRET and hook.path == "ouro/tg" and (hook.listen, hook.port) == ("127.0.0.1", 8443)
    assert SECRET not in repr(settings) and SECRET not in repr(hook) and SECRET not in str(settings.model_dump())
    assert str(settings.webhook_secret) == "**********"                    # what `ouro settings` prints


def _update(update_id: int, text: str) -> dict:
    user = {"id": ANN, "is_bot": False, "first_name": "Ann"}
    return {"update_id": update_id, "message": {"message_id": 900_000 + update_id, "date": int(time.time()),
                                                "chat": {"id": ANN, "type": "private", "first_name": "Ann"},
                                                "from": user, "text": text}}


@pytest.mark.e2e
async def test_the_bot_takes_updates_on_its_webhook_only_with_the_secret(emu, make_bot):
    port = free_port()
    url = "https://bot.example.test/ouro/tg"
    async with make_bot(FakeEngine(["hello over the webhook"]), telegram_mode="webhook", webhook_url=url,
                        webhook_port=port, webhook_secret=SECRET) as bot:
        (registered,) = emu.calls("setWebhook")
        assert registered["params"]["url"] == url and registered["params"]["secret_token"] == SECRET
        assert emu.calls("getUpdates") == []                                    # nobody polls
        listener = f"http://127.0.0.1:{port}/ouro/tg"
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            for headers in ({}, {HEADER: "not-the-secret"}):
                refused = await http.post(listener, json=_update(1, "let me in"), headers=headers)
                assert refused.status_code == 403
            assert (await http.post(f"http://127.0.0.1:{port}/elsewhere", json=_update(2, "x"),
                                    headers={HEADER: SECRET})).status_code == 404
            assert bot.store.stats()["turns"] == 0 and bot.engine.prompts == []
            taken = await http.post(listener, json=_update(3, "hi via webhook"), headers={HEADER: SECRET})
            assert taken.status_code == 200
        ann = emu.client(ANN, "Ann")
        msg = await ann.await_for(lambda m: bool(m.callback_data), timeout=15)
        assert msg.text == "hello over the webhook" and msg.button_texts == ["👍", "👎", "🔁", "✏️"]
        turn = bot.store.turn(bot.store.latest_answered_turn(ANN))
        assert turn.user_text == "hi via webhook" and turn.reply_message_ids == [msg.message_id]
        assert bot.store.stats()["turns"] == 1 and [p[-1]["content"] for p in bot.engine.prompts] == ["hi via webhook"]
