"""`ouro interview`: the /interview of Telegram in a terminal (serving/interview.py holds its logic).

Each question is put to the served generation and its answer streams in; then a key: k keeps
it, e replaces it with the next line typed, a asks again, q quits without writing anything.
After the last question the draft is shown and written only on y. The answers are generated on
the same inference worker as every reply (one asyncio.run per answer, as `ouro chat` does).
"""

from __future__ import annotations

import asyncio
import sys

from engine.worker import Busy
from serving.interview import Interviewer
from serving.runtime import Runtime

KEYS = "[k]eep  [e]dit  [a]sk again  [q]uit"


def run_terminal_interview(rt: Runtime, *, stdin=None, stdout=None) -> dict | None:
    """The interview, until saved (its audit record), or quit / end of input / not saved (None)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interviewer = Interviewer(rt.settings, rt.store, rt.conversation)
    interview = interviewer.start("terminal")

    def ask(prompt: str) -> str | None:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        return None if not line else line.rstrip("\n")

    def show(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    n = len(interview.questions)
    print(f"Interview with {interview.generation_id}: {n} questions. Its answers become the constitution the "
          "next cycle trains with; nothing is written until you say so at the end.", file=stdout)
    while (q := interview.question) is not None:
        print(f"\n❓ {interview.index + 1}/{n} · {q.heading}\n{q.text}\n", file=stdout)
        try:
            asyncio.run(interviewer.ask(interview, on_text=show))
        except Busy:
            print("(the model is busy; asking again)", file=stdout)
            continue
        stdout.write("\n")
        key = ""
        while key not in ("k", "e", "a", "q"):
            line = ask(f"{KEYS}> ")
            if line is None:
                key = "q"
                break
            key = line.strip().lower()[:1]
        if key == "q":
            print("Nothing written; the constitution is unchanged.", file=stdout)
            return None
        if key == "k":
            interview.keep()
        elif key == "e":
            text = ask("the answer as it should read (one line; empty: ask again)> ")
            if text and text.strip():
                interview.keep(text)
    draft = interview.draft()
    print(f"\n📜 The new constitution:\n\n{draft}\n", file=stdout)
    answer = ask("Save it as the constitution the next cycle trains with? [y/N]> ")
    if (answer or "").strip().lower()[:1] != "y":
        print("Nothing written; the constitution is unchanged.", file=stdout)
        return None
    record = interviewer.save(interview, via="terminal")
    print(f"💾 Written to {record['path']} (sha {record['sha256'][:12]}). The next cycle (`ouro cycle`) trains with "
          "it; `ouro persona` shows it.", file=stdout)
    return record
