"""`/interview` and `/persona` in Telegram: the admin mentors the persona's constitution.

/interview (admins, private chat) puts serving/interview.py's questions to the served
generation one by one; each answer streams in with ✅ Keep · ✏️ Edit (the admin's next message
here is the answer instead) · 🔁 Ask again. After the last one the whole draft is shown with
💾 Save (it becomes the constitution the next cycle trains with) or 🗑 Discard. The interview in
progress lives in this process's memory: a restart forgets it, and nothing is written until Save.

Callback data `o1:iv:<keep|edit|again|save|drop>:<interview>:<question>` is untrusted: the presser
must be an admin whose interview in progress has that number and is at that question. /persona shows the constitution in force
and `/persona gen-0001 gen-0003` the diff between two generations' (lineage/constitution.py).
"""

from __future__ import annotations

import html
import itertools
import logging
from dataclasses import dataclass

from telegram import Message, Update
from telegram.constants import ChatType
from telegram.ext import ContextTypes, filters

from bot import keyboards
from bot.admin import parse_gen_id
from bot.retry import call_with_retry
from bot.splitting import split_text
from bot.streaming import StreamingReply
from config.settings import Settings
from core.errors import OuroError
from engine.worker import Busy
from lineage.constitution import constitution_diff, persona_report, persona_text
from memory.store import Store
from serving.interview import Interview, Interviewer

log = logging.getLogger(__name__)

PRIVATE_ONLY = "The interview is a conversation between you and me: /interview works only in a private chat."
ADMINS_ONLY = "Sorry, that button is for the bot's admins."
STALE = "That button belongs to an earlier question or interview."
EDIT_PROMPT = "✏️ Send the answer as it should read, as your next message here."
BUSY = "I'm answering a lot of people right now — press 🔁 Ask again in a minute."
PERSONA_USAGE = "Usage: /persona — the constitution in force; /persona gen-0001 gen-0003 — the diff between two " \
                "generations' (draft: the text the next cycle trains with)."


@dataclass
class _Session:
    interview: Interview
    chat_id: int
    number: int               # which interview: buttons of an earlier one are refused
    editing: bool = False


class AwaitingAnswer(filters.MessageFilter):
    """Messages from an admin who pressed ✏️ Edit in their interview and owes the answer."""

    def __init__(self, sessions: dict[int, _Session]) -> None:
        super().__init__(name="AwaitingAnswer")
        self.sessions = sessions

    def filter(self, message: Message) -> bool:
        user = message.from_user
        session = self.sessions.get(user.id) if user is not None else None
        return session is not None and session.editing and session.chat_id == message.chat.id


class InterviewHandlers:
    def __init__(self, settings: Settings, store: Store, interviewer: Interviewer) -> None:
        self.settings = settings
        self.store = store
        self.interviewer = interviewer
        self.sessions: dict[int, _Session] = {}   # admin → the interview in progress
        self._numbers = itertools.count(1)
        self.awaiting_answer = AwaitingAnswer(self.sessions)

    async def interview(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Admins: start (or start over) the interview that rewrites the persona's constitution."""
        if update.effective_chat.type != ChatType.PRIVATE:
            await update.effective_message.reply_text(PRIVATE_ONLY)
            return
        admin, chat_id = update.effective_user.id, update.effective_chat.id
        interview = self.interviewer.start(f"admin {admin} (telegram)")
        self.sessions[admin] = _Session(interview, chat_id, next(self._numbers))
        n = len(interview.questions)
        await update.effective_message.reply_text(
            f"🎙 Interview with {interview.generation_id}: {n} questions. Keep, edit or re-ask each answer; "
            "nothing is written until you save at the end. /interview again starts over.")
        await self._ask(context, admin)

    async def press(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """An interview button: checked (admin, data, the question in progress) before anything happens."""
        query = update.callback_query
        admin = query.from_user.id
        if not self.settings.is_admin(admin):
            self.store.log_event("admin_refused", user_id=admin,
                                 chat_id=query.message.chat.id if query.message else None, detail=(query.data or "")[:64])
            await query.answer(ADMINS_ONLY, show_alert=True)
            return
        fields = keyboards.decode("interview", query.data)
        session = self.sessions.get(admin)
        if fields is None or query.message is None or session is None or session.chat_id != query.message.chat.id \
                or (int(fields[1]), int(fields[2])) != (session.number, session.interview.index):
            await query.answer(STALE)
            return
        action, interview = fields[0], session.interview
        if action in ("keep", "edit", "again") and interview.done:
            await query.answer(STALE)
            return
        if action == "keep":
            interview.keep()
            session.editing = False
            await query.answer("✅ Kept.")
            await _drop_buttons(query, "→ ✅ kept")
            await self._ask(context, admin)
        elif action == "edit":
            session.editing = True
            await query.answer()
            await _drop_buttons(query, "→ ✏️ your own answer follows")
            await call_with_retry(lambda: context.bot.send_message(session.chat_id, EDIT_PROMPT))
        elif action == "again":
            session.editing = False
            await query.answer("🔁")
            await _drop_buttons(query, "→ 🔁 asked again")
            await self._ask(context, admin)
        elif action == "save":
            del self.sessions[admin]
            record = self.interviewer.save(interview, via="telegram", user_id=admin)
            await query.answer("💾 Saved.")
            await _drop_buttons(query, "→ 💾 saved")
            await call_with_retry(lambda: context.bot.send_message(
                session.chat_id, f"💾 Saved as the constitution draft ({record['path']}, sha {record['sha256'][:12]}). "
                                 "The next cycle trains with it, and the generation it makes speaks with it. "
                                 "/persona shows it; /train starts a cycle now."))
        else:   # drop
            del self.sessions[admin]
            await query.answer("🗑 Discarded.")
            await _drop_buttons(query, "→ 🗑 discarded; the constitution is unchanged")

    async def take_answer(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The admin's message after ✏️ Edit: the answer to the current question, as written."""
        admin = update.effective_user.id
        session = self.sessions.get(admin)
        text = (update.effective_message.text or "").strip()
        if session is None or not session.editing or session.interview.done:   # saved or restarted meanwhile
            await update.effective_message.reply_text("No question is waiting for your answer. /interview starts one.")
            return
        if not text:
            await update.effective_message.reply_text(EDIT_PROMPT)
            return
        session.editing = False
        session.interview.keep(text)
        await update.effective_message.reply_text("✍️ Kept as you wrote it.")
        await self._ask(context, admin)

    async def _ask(self, context: ContextTypes.DEFAULT_TYPE, admin: int) -> None:
        """The current question and its streamed answer with its buttons; after the last, the draft to save."""
        session = self.sessions[admin]
        interview, chat_id = session.interview, session.chat_id
        q = interview.question
        if q is None:
            draft = interview.draft()
            body = f"📜 The new constitution:\n\n{draft}" if draft else "No answers kept: nothing to save."
            pieces = split_text(body, 4000)
            for piece in pieces[:-1]:
                await call_with_retry(lambda p=piece: context.bot.send_message(chat_id, p))
            markup = keyboards.interview_done_keyboard(session.number, interview.index) if draft else None
            if not draft:
                del self.sessions[admin]
            await call_with_retry(lambda: context.bot.send_message(chat_id, pieces[-1], reply_markup=markup))
            return
        await call_with_retry(lambda: context.bot.send_message(
            chat_id, f"❓ {interview.index + 1}/{len(interview.questions)} · {q.heading}\n{q.text}"))
        stream = StreamingReply(context.bot, chat_id, interval=self.settings.stream_edit_interval_s)
        stream.start()
        try:
            text = await self.interviewer.ask(interview, on_text=stream.push)
        except Busy:
            await stream.finish(BUSY, markup=keyboards.interview_keyboard(session.number, interview.index))
            return
        await stream.finish(text or "…", markup=keyboards.interview_keyboard(session.number, interview.index))


class PersonaHandlers:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def persona(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Admins: the constitution in force, or the diff between two generations' (/persona gen-0001 gen-0003)."""
        args = context.args or []
        msg = update.effective_message
        if len(args) not in (0, 2):
            await msg.reply_text(PERSONA_USAGE)
            return
        try:
            if not args:
                body = persona_text(persona_report(self.settings))
            else:
                names = ["draft" if a.lower() == "draft" else parse_gen_id(a) for a in args]
                if None in names:
                    await msg.reply_text(PERSONA_USAGE)
                    return
                diff = constitution_diff(self.settings, names[0], names[1])
                body = diff or f"{names[0]} and {names[1]} have the same constitution."
        except OuroError as exc:
            await msg.reply_text(str(exc))
            return
        for piece in split_text(body, 3800):
            text = f"<pre>{html.escape(piece)}</pre>" if args else piece
            await msg.reply_text(text, parse_mode="HTML" if args else None)


async def _drop_buttons(query, mark: str) -> None:
    """Keep the answer's text for the record, drop its buttons, say what happened."""
    text = (query.message.text or "")[:3900]
    try:
        await query.edit_message_text(f"{text}\n\n{mark}")
    except Exception:  # only cosmetic: the choice is taken already
        log.debug("could not mark the interview message", exc_info=True)
