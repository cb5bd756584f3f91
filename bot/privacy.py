"""What people control about their data: /privacy, /optout, /optin, /forget.

/optout and /optin set whether a person's chats may be trained on (the default comes from
`training_opt_out_default`); the export and the replay of older generations' data both read
it at training time, so it also covers what was said before. /forget deletes everything
stored about the person after a confirmation button only they can press
(`o1:fg:<yes|no>:<their id>`), leaves a tombstone without content, and drops the model's
cached state of their chats; their next message starts from nothing.
"""

from __future__ import annotations

import asyncio
import logging

from telegram import Update
from telegram.ext import ContextTypes

from bot import keyboards
from bot.edits import answer_pressed, edit_pressed
from config.settings import Settings
from engine.worker import InferenceWorker
from memory.store import Store

log = logging.getLogger(__name__)


PRIVACY = ("What I store: your Telegram id, name and username; the messages you send me and my replies; "
           "your ratings, picks and corrections; when each happened and which model version answered.\n"
           "Why: to keep our conversation's context across restarts, and to train the next version of me "
           "on replies people rated well. Personal data (emails, phone numbers, card numbers…) is redacted "
           "before anything is used for training. Only the bot's owner can read the database.")
NOT_YOURS = "Only the person who asked to be forgotten can confirm it."


def training_line(opt_out: bool | None, default_out: bool) -> str:
    """The person's training setting in words, and how to change it."""
    out = default_out if opt_out is None else opt_out
    why = "the default here" if opt_out is None else ("you chose /optout" if out else "you chose /optin")
    if out:
        return f"Training: your chats are kept out of training ({why}). /optin lets them in."
    return f"Training: your chats may be used to train the next versions of me ({why}). /optout keeps them out."


def _amounts(counts: dict) -> str:
    parts = [f"{counts.get('messages', 0)} messages", f"{counts.get('ratings', 0)} ratings",
             f"{counts.get('corrections', 0)} corrections", f"{counts.get('picks', 0)} picks"]
    return ", ".join(parts)


class PrivacyHandlers:
    def __init__(self, settings: Settings, store: Store, worker: InferenceWorker) -> None:
        self.settings = settings
        self.store = store
        self.worker = worker

    async def privacy(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Say what is stored and why, how much of it is this person's, and their training setting."""
        uid = update.effective_user.id
        text = "\n\n".join([
            PRIVACY,
            f"About you right now: {_amounts(self.store.user_data_counts(uid))}.",
            training_line(self.store.training_opt_out(uid), self.settings.training_opt_out_default),
            "/forget deletes everything I keep about you.",
        ])
        await update.effective_message.reply_text(text)

    async def optout(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Keep this person's chats out of training, including what they said before."""
        await self._set(update, True, "Done — your chats are kept out of training from now on, including what "
                                      "you said before. I still remember our conversation for its context; "
                                      "/forget deletes it. /optin undoes this.")

    async def optin(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Let this person's chats be used for training."""
        await self._set(update, False, "Thanks — your chats may be used to train the next versions of me "
                                       "(personal data is redacted first). /optout undoes this.")

    async def _set(self, update: Update, opt_out: bool, text: str) -> None:
        user = update.effective_user
        self.store.set_training_opt_out(user.id, opt_out, username=user.username, first_name=user.first_name)
        self.store.log_event("training_opt_out" if opt_out else "training_opt_in", user_id=user.id)
        await update.effective_message.reply_text(text)

    async def forget(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Ask to confirm deleting everything stored about this person."""
        uid = update.effective_user.id
        keyboard = keyboards.forget_keyboard(uid)
        await update.effective_message.reply_text(
            f"This deletes everything I keep about you ({_amounts(self.store.user_data_counts(uid))}, your "
            "settings) and keeps it out of every future training set. It can't be undone. Versions of me "
            "already trained keep what they learned; no new one learns from it.", reply_markup=keyboard)

    async def confirm(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The /forget confirmation button: only the person it asked may press it."""
        query = update.callback_query
        fields = keyboards.decode("forget", query.data)
        if fields is None or query.message is None:
            await query.answer("That button is not one of mine.")
            return
        answer, uid = fields[0], int(fields[1])
        if query.from_user.id != uid:
            await query.answer(NOT_YOURS, show_alert=True)
            return
        if answer == "no":
            await query.answer("Cancelled.")
            await edit_pressed(query, "Cancelled — nothing was deleted.")
            return
        await answer_pressed(query, "Forgetting…")   # a late press still forgets
        counts, chats = await asyncio.to_thread(self.store.forget_user, uid)
        try:  # the model's cached state of those chats holds their words too
            await self.worker.run(lambda engine: self.worker.forget(chats), bounded=False)
        except Exception:
            log.warning("could not drop the cached model state of %d chat(s)", len(chats), exc_info=True)
        log.info("forgot a person: %s", counts)
        await edit_pressed(query,
            f"Done — I deleted everything I kept about you ({counts.get('turns', 0)} messages with my replies, "
            f"{counts.get('ratings', 0)} ratings, {counts.get('corrections', 0)} corrections). If you write "
            "again, I start from scratch.")
