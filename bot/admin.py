"""Admin commands for the lineage: see it, chart it, steer it — from the chat.

Registered only behind the admin filter (everyone else gets the refusal in bot/gate.py, and
the attempt is logged). /promote and /rollback never act on the first message: they answer
with a confirmation button whose callback data names the target *and* the generation active
when it was asked (`o1:adm:<action>:<target>:<active>`), so a stale button can't move the
pointer after something else did. Each confirmed action is recorded with who, when and why.
"""

from __future__ import annotations

import asyncio
import html
import io
import logging
import re
import tempfile
from pathlib import Path

from telegram import Update
from telegram.ext import ContextTypes

from bot import keyboards
from bot.edits import edit_pressed
from config.settings import Settings
from core.errors import OuroError
from evals.report import eval_lines, generation_rows, load_evals, table_lines
from memory.store import Store
from serving.loop import LearningLoop
from serving.notices import cycle_progress

log = logging.getLogger(__name__)
GEN_ARG = re.compile(r"gen-\d{4,8}|\d{1,8}")


def parse_gen_id(arg: str) -> str | None:
    """Turn "gen-0003" or "3" into "gen-0003"; anything else (a path, a traversal) into None."""
    if not GEN_ARG.fullmatch(arg or ""):
        return None
    return arg if arg.startswith("gen-") else f"gen-{int(arg):04d}"


def _who(update: Update) -> str:
    user = update.effective_user
    name = user.username and f"@{user.username}" or user.first_name or "admin"
    return f"{name} ({user.id})"


def _pre(lines: list[str]) -> str:
    return "<pre>" + html.escape("\n".join(lines))[:3900] + "</pre>"


async def loop_not_running(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """What a lineage command says in a process without the learning loop (`ouro serve` runs it)."""
    await update.effective_message.reply_text("The learning loop does not run in this process (ouro serve runs it).")


class AdminHandlers:
    def __init__(self, settings: Settings, store: Store, loop: LearningLoop) -> None:
        self.settings = settings
        self.store = store
        self.loop = loop
        self._reasons: dict[tuple[int, int], str] = {}

    # --- seeing ----------------------------------------------------------------------------------
    async def generations(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The lineage table: id, parent, date, data size, three scores, gate decision, * active."""
        rows = generation_rows(self.loop.lineage)
        text = _pre(table_lines(rows[-25:], compact=True)) + "\n* active · /evals GEN for details · /lineage chart"
        await update.effective_message.reply_text(text, parse_mode="HTML")

    async def lineage(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The chart of recall, generalization, style drift and loss; promotions and rollbacks marked."""
        from lineage.chart import lineage_chart

        def draw() -> bytes:
            with tempfile.TemporaryDirectory(dir=self.settings.data_dir) as tmp:   # inside the data folder
                path = lineage_chart(self.loop.lineage, Path(tmp) / "lineage.png")
                return path.read_bytes()

        png = await asyncio.to_thread(draw)
        await update.effective_message.reply_photo(io.BytesIO(png), filename="lineage.png",
                                                   caption=f"Lineage — active {self.loop.lineage.active_id()}")

    async def evals(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A generation's evals against its parent (default: the active one)."""
        args = context.args or []
        gen_id = parse_gen_id(args[0]) if args else self.loop.lineage.active_id()
        if gen_id is None:
            await update.effective_message.reply_text("Usage: /evals gen-0003 (or just /evals 3)")
            return
        try:
            gen = self.loop.lineage.generation(gen_id)
            lines = eval_lines(gen, load_evals(gen))
        except OuroError as exc:
            await update.effective_message.reply_text(str(exc).split("\n")[0])
            return
        await update.effective_message.reply_text(_pre(lines), parse_mode="HTML")

    # --- steering ---------------------------------------------------------------------------------
    async def promote(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Ask to confirm serving a named generation."""
        args = context.args or []
        gen_id = parse_gen_id(args[0]) if args else None
        if gen_id is None:
            await update.effective_message.reply_text("Usage: /promote gen-0003 [why]")
            return
        await self._ask(update, "promote", gen_id, " ".join(args[1:]))

    async def rollback(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Ask to confirm going back to the parent (or a named generation)."""
        args = context.args or []
        active = self.loop.lineage.active()
        named = parse_gen_id(args[0]) if args else None
        gen_id = named or active.parent_id
        reason = " ".join(args[1:] if named else args)
        if gen_id is None:
            await update.effective_message.reply_text(f"{active.id} has no parent to roll back to. "
                                                      "Usage: /rollback [gen-0002] [why]")
            return
        await self._ask(update, "rollback", gen_id, reason)

    async def _ask(self, update: Update, action: str, gen_id: str, reason: str) -> None:
        active = self.loop.lineage.active_id()
        try:
            gen = self.loop.lineage.generation(gen_id)
        except OuroError:
            await update.effective_message.reply_text(f"There is no {gen_id}. /generations lists them.")
            return
        if gen.id == active:
            await update.effective_message.reply_text(f"{gen.id} is already the active generation.")
            return
        note = "" if gen.meta.get("status") in ("promoted", "held", "base") else \
            f"\nNote: the gate marked it {gen.meta.get('status')}: " + "; ".join(gen.meta.get("reasons", []))[:300]
        keyboard = keyboards.confirm_keyboard(action, gen.id, active)
        sent = await update.effective_message.reply_text(
            f"{action.capitalize()} from {active} to {gen.id}?{note}", reply_markup=keyboard)
        if reason:
            self._reasons[(sent.chat_id, sent.message_id)] = reason[:200]

    async def confirm(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The confirmation button of /promote and /rollback."""
        query = update.callback_query
        if not self.settings.is_admin(query.from_user.id):
            self.store.log_event("admin_refused", user_id=query.from_user.id,
                                 chat_id=query.message.chat.id if query.message else None, detail=query.data[:64])
            await query.answer("Sorry, that button is for the bot's admins.", show_alert=True)
            return
        fields = keyboards.decode("admin", query.data)
        if fields is None or query.message is None:
            await query.answer("That button is not one of mine.")
            return
        action, gen_id, asked_active = fields
        reason = self._reasons.pop((query.message.chat.id, query.message.message_id), "")
        if action == "cancel":
            await query.answer("Cancelled.")
            await edit_pressed(query, "Cancelled — nothing changed.")
            return
        if self.loop.lineage.active_id() != asked_active:
            await query.answer("The lineage changed since — ask again.", show_alert=True)
            await edit_pressed(query, f"Not done: the active generation is now {self.loop.lineage.active_id()}.")
            return
        await query.answer("On it…")
        why = f"{action} by {_who(update)} from Telegram" + (f": {reason}" if reason else "")
        try:
            if action == "promote":
                swap = await self.loop.promote(gen_id, actor=_who(update), why=why, expect=asked_active)
                frm = asked_active
            else:
                frm, _, swap = await self.loop.rollback(gen_id, actor=_who(update), why=why)
        except OuroError as exc:
            await edit_pressed(query, f"Not done: {str(exc).splitlines()[0]}")
            return
        served = self.loop.swapper.serving()[0]
        tail = "" if swap is None or swap.ok else f"\n⚠️ hot-swap failed ({swap.reason}); {served} keeps serving."
        verb = "Promoted" if action == "promote" else "Rolled back"
        await edit_pressed(query, f"{verb}: {frm} → {gen_id}. Now serving {served}. Nothing was deleted.{tail}")

    async def train(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Start a learning cycle now, in its own process."""
        if not self.loop.start_cycle(_who(update)):
            await update.effective_message.reply_text(
                "A learning cycle is already running — " + cycle_progress(self.loop.cycle_status()))
            return
        await update.effective_message.reply_text(
            "🧬 Learning cycle started. I keep answering meanwhile; /status shows its progress and I'll "
            "message you the result.")

    async def pause(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Stop scheduled training (kept across restarts); /train still works."""
        if not self.loop.scheduler.pause():
            await update.effective_message.reply_text("There is no training schedule to pause (cycle_schedule is off).")
            return
        self.store.log_event("schedule_paused", user_id=update.effective_user.id)
        await update.effective_message.reply_text("⏸ Scheduled training paused. /resume restarts it.")

    async def resume(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Restart scheduled training."""
        if not self.loop.scheduler.resume():
            await update.effective_message.reply_text("There is no training schedule to resume (cycle_schedule is off).")
            return
        self.store.log_event("schedule_resumed", user_id=update.effective_user.id)
        await update.effective_message.reply_text("▶️ Scheduled training resumed: " + self.loop.scheduler.describe())

    def loop_info(self) -> dict:
        """The loop's part of /status and of the heartbeat file `ouro status` reads."""
        info = {"training": self.loop.scheduler.describe(), "cycle": cycle_progress(self.loop.cycle_status())}
        if self.loop.describe_trigger():
            info["data_trigger"] = self.loop.describe_trigger()
        watched = self.loop.watched()
        if watched:
            n = len(self.loop.watch_ratings(*watched)[0])
            info["live_watch"] = f"{watched[0]} vs {watched[1]}, {n}/{self.settings.watch_min_ratings} ratings"
        return info
