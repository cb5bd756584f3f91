"""`ouro chat`: the same engine, context, logging and ratings as Telegram, in a terminal."""

from __future__ import annotations

import asyncio
import sys

from memory.trust import TERMINAL_USER_ID
from serving.conversation import TERMINAL_CHAT_ID, Speaker
from serving.runtime import Runtime

HELP = """Commands: /good  /bad  rate my last reply · /better <text>  store a better answer for it
          /reset  start over · /help  this text · /quit  leave (Ctrl-D works too)"""


def run_terminal_chat(rt: Runtime, *, stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    who = Speaker(chat_id=TERMINAL_CHAT_ID, user_id=TERMINAL_USER_ID, chat_type="terminal", first_name="you")
    gen = rt.worker.engine.generation_id
    print(f"Ouroboros — chatting with {gen}. {HELP}", file=stdout)
    last_turn: int | None = None

    def show(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    while True:
        stdout.write("\nyou> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            print("", file=stdout)
            return 0
        line = line.rstrip("\n")
        cmd, _, arg = line.strip().partition(" ")
        if cmd in ("/quit", "/exit"):
            return 0
        if cmd == "/help":
            print(HELP, file=stdout)
            continue
        if cmd == "/reset":
            rt.conversation.reset(who)
            last_turn = None
            print("(new conversation)", file=stdout)
            continue
        if cmd in ("/good", "/bad"):
            if last_turn is None:
                print("(nothing to rate yet)", file=stdout)
                continue
            result = rt.store.rate(last_turn, TERMINAL_USER_ID, 1 if cmd == "/good" else -1)
            print(f"(rating {result})", file=stdout)
            continue
        if cmd == "/better":
            if last_turn is None or not arg.strip():
                print("(usage: /better <the answer you would have liked>, after a reply)", file=stdout)
                continue
            rt.store.await_correction(TERMINAL_CHAT_ID, TERMINAL_USER_ID, last_turn)
            rt.store.take_correction(TERMINAL_CHAT_ID, TERMINAL_USER_ID, arg.strip())
            print("(correction stored — thanks)", file=stdout)
            continue
        stdout.write("ouro> ")
        stdout.flush()
        outcome = asyncio.run(rt.conversation.handle_text(who, line, on_text=show))
        if outcome.kind != "answered":
            stdout.write(outcome.text)
        else:
            last_turn = outcome.turn_id
        stdout.write("\n")
