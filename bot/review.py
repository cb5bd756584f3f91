"""Admins review answered turns one at a time in Telegram: `/review`.

Each turn comes with a little of the context it was served with and four buttons: ✅ approve
(it counts as reviewed for the next cycle, like a 👍; on a lone 👎 it agrees with the 👎), 🚫 reject (never trained on, whatever
its ratings), ✏️ edit (the admin's next message in that chat becomes the reply it should have
given: an example and a preference pair against the served one) and ⏭ skip (nothing recorded;
it comes back once the rest is done, or after a restart). After each verdict the next turn
follows. `ouro review` (ouro/review.py) does the same in a terminal.

Self-refinement proposals (memory/proposals.py) come first: the generation's critique of a 👎'd reply
(or of its answer to a scenario) and the reply it would give instead, with ✅ keep as a pair, ✏️ edit
then keep, 🚫 drop and ⏭ skip (`o1:rf:<keep|edit|drop|skip>:<proposal id>`, checked the same way).

Callback data `o1:rv:<ok|no|ed|sk>:<turn id>` is untrusted: it must fullmatch, the presser
must be an admin, and the turn must still be an answered one in the store. Unlike the lineage
commands in bot/admin.py, this works whether or not the learning loop runs in this process.
"""

from __future__ import annotations

import logging

from telegram import Message, Update
from telegram.constants import ChatType
from telegram.ext import ContextTypes, filters

from bot import keyboards
from bot.retry import call_with_retry
from config.settings import Settings
from memory.proposals import Proposal
from memory.store import ReviewItem, Store

log = logging.getLogger(__name__)

VERDICTS = {"ok": "approved", "no": "rejected"}
MARKS = {"approved": "✅ approved", "rejected": "🚫 rejected", "edited": "✏️ edited", "skipped": "⏭ skipped"}
EDIT_PROMPT = "✏️ Send the reply it should have given, as your next message here. (/review again: skip the edit.)"
EMPTY = "Nothing to review: every answered turn has a verdict. 🎉"
ONLY_SKIPPED = "Only the {} turn(s) you skipped are left — /review goes through them again."
GONE = "That turn is gone (forgotten at its author's request, or never answered)."
ADMINS_ONLY = "Sorry, that button is for the bot's admins."
PRIVATE_ONLY = "Reviews show what people wrote to me, so /review works only in a private chat with me."

_SNIPPET, _TEXT = 300, 1500   # characters of each context message, of the reviewed exchange


def _cut(text: str, n: int) -> str:
    text = " ".join(text.split()) if len(text) > n else text
    return text if len(text) <= n else text[: n - 1] + "…"


def review_text(item: ReviewItem) -> str:
    """The turn as admins see it (Telegram and terminal): where, who rated it, context, the exchange."""
    why = f" ({', '.join(item.reasons)})" if item.reasons else ""
    feedback = [f"👍 {item.ups}" if item.ups else "", f"👎 {item.downs}{why}" if item.downs else "",
                "✏️ corrected by its author" if item.corrected else ""]
    head = f"Review · turn {item.turn_id} · {item.chat_type} chat · {item.generation_id or '—'} · {item.created_at[:16]}"
    lines = [head, " ".join(f for f in feedback if f) or "not rated", ""]
    if item.context:
        lines.append("…context:")
        for ex in item.context:
            lines += [f"👤 {_cut(ex.user_text, _SNIPPET)}", f"🤖 {_cut(ex.reply_text, _SNIPPET)}"]
        lines.append("")
    lines += [f"👤 {item.author}: {_cut(item.user_text, _TEXT)}", f"🤖 {_cut(item.reply_text, _TEXT)}"]
    if item.correction is not None:
        lines.append(f"✏️ {item.author} wants: {_cut(item.correction, _TEXT)}  (✅ trains this correction)")
    elif item.lone_down:
        lines.append("(✅ agrees with the 👎: the next cycle trains away from this reply)")
    lines += ["", f"{item.remaining} waiting for review, this one included."]
    if item.waiting_by:
        lines.append("👍/👎/✏️ waiting by person: " + " · ".join(f"{who} {n}" for who, n in item.waiting_by))
    return "\n".join(lines)


PROPOSAL_VERDICTS = {"keep": "kept", "drop": "dropped"}
PROPOSAL_MARKS = {"kept": "✅ kept as a pair", "dropped": "🚫 dropped", "edited": "✏️ edited and kept",
                  "skipped": "⏭ skipped"}
PROPOSAL_EDIT_PROMPT = ("✏️ Send the reply it should have given, as your next message here; it is kept as the "
                        "better reply. (/review again: skip the edit.)")
PROPOSAL_GONE = "That proposal is gone (its turn was forgotten at its author's request)."


def proposal_text(p: Proposal) -> str:
    """A self-refinement proposal as admins see it (Telegram and terminal)."""
    if p.kind == "scenario":
        head = f"Proposal {p.id} · a scenario from the constitution · written by {p.generation_id or '—'}"
        said = [f"👤 (scenario) {_cut(p.question, _TEXT)}", f"🤖 answered: {_cut(p.served, _TEXT)}"]
    else:
        why = f" ({', '.join(p.reasons)})" if p.reasons else ""
        head = f"Proposal {p.id} · turn {p.turn_id} got 👎{why} · written by {p.generation_id or '—'}"
        said = [f"👤 {_cut(p.question, _TEXT)}", f"🤖 served: {_cut(p.served, _TEXT)}"]
    lines = [head, "", *said, "", f"🪞 critique: {_cut(p.critique, _SNIPPET)}", f"✨ refined: {_cut(p.refined, _TEXT)}",
             "", "(✅ trains the refined reply over the served one; 🚫 never trains either)",
             f"{p.remaining} proposal(s) waiting, this one included."]
    return "\n".join(lines)


class AwaitingEdit(filters.MessageFilter):
    """Messages from someone who pressed ✏️ Edit in this chat and owes the edited reply."""

    def __init__(self, store: Store) -> None:
        super().__init__(name="AwaitingEdit")
        self.store = store

    def filter(self, message: Message) -> bool:
        user = message.from_user
        return user is not None and self.store.awaiting_review_edit(message.chat.id, user.id) is not None


class AwaitingProposalEdit(filters.MessageFilter):
    """Messages from someone who pressed ✏️ on a proposal in this chat and owes the reply."""

    def __init__(self, store: Store) -> None:
        super().__init__(name="AwaitingProposalEdit")
        self.store = store

    def filter(self, message: Message) -> bool:
        user = message.from_user
        return user is not None and self.store.awaiting_proposal_edit(message.chat.id, user.id) is not None


class ReviewHandlers:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._skipped: dict[int, set[int]] = {}   # per admin; in memory: a restart brings skipped turns back
        self._skipped_proposals: dict[int, set[int]] = {}
        self.awaiting_edit = AwaitingEdit(store)
        self.awaiting_proposal_edit = AwaitingProposalEdit(store)

    async def review(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Admins: the next turn to review, with its context and approve / reject / edit / skip."""
        admin, chat_id = update.effective_user.id, update.effective_chat.id
        if update.effective_chat.type != ChatType.PRIVATE:   # reviews quote people's chats: never in a group
            await update.effective_message.reply_text(PRIVATE_ONLY)
            return
        self.store.cancel_review_edit(chat_id, admin)
        self.store.cancel_proposal_edit(chat_id, admin)
        await self._show_next(context, chat_id, admin)

    async def press_proposal(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A proposal's button: checked (admin, data, proposal) before anything is recorded."""
        query = update.callback_query
        admin = query.from_user.id
        if not self.settings.is_admin(admin):
            self.store.log_event("admin_refused", user_id=admin,
                                 chat_id=query.message.chat.id if query.message else None, detail=(query.data or "")[:64])
            await query.answer(ADMINS_ONLY, show_alert=True)
            return
        fields = keyboards.decode("proposal", query.data)
        if fields is None or query.message is None:
            await query.answer("That button is not one of mine.")
            return
        action, proposal_id, chat_id = fields[0], int(fields[1]), query.message.chat.id
        proposal = self.store.proposal(proposal_id)
        if proposal is None:
            await query.answer(PROPOSAL_GONE)
            await self._mark(query, "gone")
            await self._show_next(context, chat_id, admin)
            return
        if action == "edit" and proposal.status == "pending":
            self.store.await_proposal_edit(chat_id, admin, proposal_id)
            await query.answer()
            await call_with_retry(lambda: context.bot.send_message(chat_id, PROPOSAL_EDIT_PROMPT))
            return
        if action == "skip":
            self._skipped_proposals.setdefault(admin, set()).add(proposal_id)
            await query.answer("Skipped.")
            await self._mark(query, PROPOSAL_MARKS["skipped"])
        elif action in PROPOSAL_VERDICTS and self.store.decide_proposal(proposal_id, admin, PROPOSAL_VERDICTS[action]):
            verdict = PROPOSAL_VERDICTS[action]
            self.store.log_event("proposal", user_id=admin, detail={"proposal_id": proposal_id, "verdict": verdict})
            await query.answer(f"{PROPOSAL_MARKS[verdict]}.")
            await self._mark(query, PROPOSAL_MARKS[verdict])
        else:  # decided already (another admin, or a second press): the first decision stands
            status = (self.store.proposal(proposal_id) or proposal).status
            await query.answer(f"Already {status}.")
            await self._mark(query, f"already {status}")
        self.store.cancel_proposal_edit(chat_id, admin)
        await self._show_next(context, chat_id, admin)

    async def take_proposal_edit(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The admin's message after ✏️ on a proposal: kept as the better reply."""
        msg = update.effective_message
        admin, chat_id = update.effective_user.id, update.effective_chat.id
        proposal_id = self.store.take_proposal_edit(chat_id, admin, msg.text or "")
        if proposal_id is None:
            await msg.reply_text("That proposal was decided meanwhile (or is gone) — nothing saved. /review goes on.")
            return
        self.store.log_event("proposal", user_id=admin, detail={"proposal_id": proposal_id, "verdict": "edited"})
        await msg.reply_text(f"✍️ Kept your reply for proposal {proposal_id}.")
        await self._show_next(context, chat_id, admin)

    async def press(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A review button: checked (admin, data, turn) before anything is recorded."""
        query = update.callback_query
        admin = query.from_user.id
        if not self.settings.is_admin(admin):
            self.store.log_event("admin_refused", user_id=admin,
                                 chat_id=query.message.chat.id if query.message else None, detail=(query.data or "")[:64])
            await query.answer(ADMINS_ONLY, show_alert=True)
            return
        fields = keyboards.decode("review", query.data)
        if fields is None or query.message is None:
            await query.answer("That button is not one of mine.")
            return
        action, turn_id = fields[0], int(fields[1])
        chat_id = query.message.chat.id
        if self.store.review_item(turn_id, context_turns=0) is None:
            await query.answer(GONE)
            await self._mark(query, "gone")
            await self._show_next(context, chat_id, admin)
            return
        existing = self.store.review_verdict(turn_id)
        if action == "ed" and existing is None:
            self.store.await_review_edit(chat_id, admin, turn_id)
            await query.answer()
            await call_with_retry(lambda: context.bot.send_message(chat_id, EDIT_PROMPT))
            return
        if action == "sk":
            self._skipped.setdefault(admin, set()).add(turn_id)
            await query.answer("Skipped.")
            await self._mark(query, MARKS["skipped"])
        elif existing is None and self.store.record_review(turn_id, admin, VERDICTS[action]):
            verdict = VERDICTS[action]
            self.store.log_event("review", user_id=admin, detail={"turn_id": turn_id, "verdict": verdict})
            await query.answer(f"{MARKS[verdict]}.")
            await self._mark(query, MARKS[verdict])
        else:  # another admin (or this one, twice) was quicker: the first verdict stands
            existing = self.store.review_verdict(turn_id) or "reviewed"
            await query.answer(f"Already {existing}.")
            await self._mark(query, f"already {existing}")
        self.store.cancel_review_edit(chat_id, admin)
        await self._show_next(context, chat_id, admin)

    async def take_edit(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The admin's message after ✏️ Edit: stored as the reply the turn should have had."""
        msg = update.effective_message
        admin, chat_id = update.effective_user.id, update.effective_chat.id
        turn_id = self.store.take_review_edit(chat_id, admin, msg.text or "")
        if turn_id is None:
            await msg.reply_text("That turn got a verdict meanwhile (or is gone) — nothing saved. /review goes on.")
            return
        self.store.log_event("review", user_id=admin, detail={"turn_id": turn_id, "verdict": "edited"})
        await msg.reply_text(f"✍️ Saved as the reply for turn {turn_id}.")
        await self._show_next(context, chat_id, admin)

    async def _show_next(self, context: ContextTypes.DEFAULT_TYPE, chat_id: int, admin: int) -> None:
        proposal = self.store.next_proposal(opt_out_by_default=self.settings.training_opt_out_default,
                                            skip=self._skipped_proposals.get(admin, set()))
        if proposal is not None:   # self-refinement proposals first: few, and each a pair in waiting
            await call_with_retry(lambda: context.bot.send_message(
                chat_id, proposal_text(proposal), reply_markup=keyboards.proposal_keyboard(proposal.id)))
            return
        skipped = self._skipped.get(admin, set())
        item = self.store.next_review(opt_out_by_default=self.settings.training_opt_out_default, skip=skipped)
        if item is None:
            text = ONLY_SKIPPED.format(len(skipped)) if skipped else EMPTY
            self._skipped.pop(admin, None)
            self._skipped_proposals.pop(admin, None)
            await call_with_retry(lambda: context.bot.send_message(chat_id, text))
            return
        await call_with_retry(lambda: context.bot.send_message(chat_id, review_text(item),
                                                               reply_markup=keyboards.review_keyboard(item.turn_id)))

    @staticmethod
    async def _mark(query, mark: str) -> None:
        """Keep the reviewed turn's text for the record, drop its buttons, say what happened."""
        text = (query.message.text or "")[:3900]
        try:
            await query.edit_message_text(f"{text}\n\n→ {mark}")
        except Exception:  # only cosmetic: the verdict is stored already
            log.debug("could not mark the review message", exc_info=True)
