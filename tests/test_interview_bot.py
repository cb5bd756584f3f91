"""/interview and /persona in Telegram, through the real application and an offline Bot API."""

from __future__ import annotations

import json

from lineage.constitution import constitution_text, text_sha256
from lineage.generations import Lineage
from tests.helpers.fakes import FakeEngine
from tests.helpers.lineages import give_constitution, make_generation
from tests.helpers.offline_bot import ADMIN, ANN, GROUP, offline_bot

OWN = "## Who I am\nI'm Ouro, a fox."


def _buttons(bot, prefix: str = "o1:iv:") -> list[tuple[int, int, str]]:
    return [b for b in bot.tg.visible_buttons(ADMIN) if b[2].startswith(prefix)]


async def _press(bot, action: str) -> str:
    chat, mid, data = [b for b in _buttons(bot) if b[2].split(":")[2] == action][-1]   # the newest
    return await bot.press(ADMIN, chat, mid, data)


async def test_an_admin_interviews_the_persona_and_saves_its_constitution(tmp_path):
    data = tmp_path / "data"
    make_generation(data / "models", "gen-0000", None, status="base")
    give_constitution(data / "models", "gen-0000", OWN)   # the served one answers with its own text
    Lineage(data / "models").set_active("gen-0000")
    engine = FakeEngine(["I'm Ouro.", "Short.", "Short and silly.", "(replaced)", "Kindly.", "At listening."])
    async with offline_bot(data, engine=engine) as bot:
        await bot.command(ADMIN, "interview", chat=GROUP)            # quotes nobody, but it is a private talk
        assert "only in a private chat" in bot.tg.texts_to(GROUP)[-1] and not _buttons(bot)
        await bot.command(ADMIN, "interview")
        assert any("1/5 · Who I am" in t for t in bot.tg.texts_to(ADMIN))
        assert engine.prompts[-1][0] == {"role": "system", "content": OWN}
        assert [b[2] for b in _buttons(bot)] == ["o1:iv:keep:1:0", "o1:iv:edit:1:0", "o1:iv:again:1:0"]
        # someone else cannot press them; a stale one does nothing
        chat, mid, keep = _buttons(bot)[0]
        qid = await bot.press(ANN, chat, mid, keep)
        assert "admins" in bot.answer_to(qid)[0]["text"]
        await _press(bot, "keep")                                    # 1: kept
        qid = await bot.press(ADMIN, chat, mid, keep)                # the first answer's button, again
        assert "earlier question" in bot.answer_to(qid)[0]["text"]
        await _press(bot, "again")                                   # 2: re-asked, then kept
        await _press(bot, "keep")
        await _press(bot, "edit")                                    # 3: the admin writes it
        await bot.say(ADMIN, "I won't be cruel. I choose not to, and say so kindly.")
        await _press(bot, "keep")                                    # 4, 5
        await _press(bot, "keep")
        assert "📜 The new constitution" in bot.tg.texts_to(ADMIN)[-1]
        assert [b[2] for b in _buttons(bot)] == ["o1:iv:save:1:5", "o1:iv:drop:1:5"]
        assert not (data / "persona.md").exists()                    # nothing written before Save
        await _press(bot, "save")
        assert "💾 Saved" in bot.tg.texts_to(ADMIN)[-1]
        text = constitution_text(bot.settings)
        assert text == (data / "persona.md").read_text(encoding="utf-8").strip()
        assert text.startswith("## Who I am\nI'm Ouro.\n\n## My voice\nShort and silly.\n\n## What I won't do\n"
                               "I won't be cruel. I choose not to, and say so kindly.")
        detail = json.loads(bot.store.events("interview")[0]["detail"])
        assert detail["sha256"] == text_sha256(text) and detail["via"] == "telegram"
        assert detail["answers"]["limits"] == "edited" and bot.store.events("interview")[0]["user_id"] == ADMIN
        # /persona: the served text is still gen-0000's own, and the draft is the interview's
        await bot.command(ADMIN, "persona")
        shown = bot.tg.texts_to(ADMIN)[-1]
        assert "gen-0000 (its own" in shown and "I'm Ouro, a fox." in shown and "differs" in shown
        await bot.command(ADMIN, "persona", "gen-0000 draft")
        diff = bot.tg.texts_to(ADMIN)[-1]
        assert "-I&#x27;m Ouro, a fox." in diff and "+## My voice" in diff
        await bot.command(ADMIN, "persona", "gen-0000 ../../etc")
        assert "Usage: /persona" in bot.tg.texts_to(ADMIN)[-1]
        assert bot.errors == []


async def test_discarding_writes_nothing_and_an_earlier_interviews_buttons_are_refused(tmp_path):
    async with offline_bot(tmp_path / "data") as bot:
        await bot.command(ADMIN, "interview")
        [(chat, mid, first), *_] = _buttons(bot)
        await bot.command(ADMIN, "interview")                     # starts over: interview 2, question 0 again
        qid = await bot.press(ADMIN, chat, mid, first)
        assert "earlier question or interview" in bot.answer_to(qid)[0]["text"]
        assert [b[2] for b in _buttons(bot) if b[1] != mid][0] == "o1:iv:keep:2:0"
        for _ in range(5):
            await _press(bot, "keep")
        await _press(bot, "drop")
        assert "discarded" in bot.tg.texts_to(ADMIN)[-1]
        assert not (tmp_path / "data" / "persona.md").exists() and bot.store.events("interview") == []
        assert [b[2] for b in _buttons(bot)][:1] == ["o1:iv:keep:1:0"] and len(_buttons(bot)) == 3   # interview 1's
        assert bot.errors == []
