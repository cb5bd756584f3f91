"""`ouro review`: the admins' review queue in a terminal — what /review does in Telegram.

One turn at a time with its context (the same text as in Telegram), then a key: a approve,
r reject, e edit (the next line is the reply it should have given), s skip, q quit. Verdicts
are stored at once, signed with reviewer id 0 (the terminal), so quitting loses nothing.
Self-refinement proposals come first, as in /review: k keep as a pair, e edit then keep, d drop,
s skip, q quit.
"""

from __future__ import annotations

import sys
from collections import Counter

from bot.review import EMPTY, proposal_text, review_text
from config.settings import Settings
from memory.store import Store
from memory.trust import TERMINAL_USER_ID

KEYS = "[a]pprove  [r]eject  [e]dit  [s]kip  [q]uit"
PROPOSAL_KEYS = "[k]eep as a pair  [e]dit then keep  [d]rop  [s]kip  [q]uit"


def run_terminal_review(settings: Settings, store: Store, *, stdin=None, stdout=None,
                        reviewer_id: int = TERMINAL_USER_ID) -> Counter:
    """Review until the queue is empty, everything left was skipped, or q / end of input; returns the tally."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    skipped: set[int] = set()
    tally: Counter = Counter()

    def ask(prompt: str) -> str | None:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        return None if not line else line.rstrip("\n")

    if not _review_proposals(store, settings, ask, stdout, reviewer_id, tally):
        print(_summary(tally), file=stdout)
        return tally
    while True:
        item = store.next_review(opt_out_by_default=settings.training_opt_out_default, skip=skipped)
        if item is None:
            print(f"Only the {len(skipped)} turn(s) you skipped are left; run `ouro review` again for them."
                  if skipped else EMPTY, file=stdout)
            break
        print("\n" + review_text(item), file=stdout)
        key = ""
        while key not in ("a", "r", "e", "s", "q"):
            line = ask(f"{KEYS}> ")
            if line is None:
                key = "q"
                break
            key = line.strip().lower()[:1]
        if key == "q":
            break
        if key == "s":
            skipped.add(item.turn_id)
            tally["skipped"] += 1
            continue
        if key == "e":
            text = ask("the reply it should have given (one line; empty: back to the turn)> ")
            if not text or not text.strip():
                continue
            verdict = "edited"
        else:
            verdict, text = ("approved" if key == "a" else "rejected"), None
        if store.record_review(item.turn_id, reviewer_id, verdict, text):
            store.log_event("review", user_id=reviewer_id, detail={"turn_id": item.turn_id, "verdict": verdict,
                                                                   "via": "terminal"})
            tally[verdict] += 1
            print(f"→ {verdict}", file=stdout)
        else:
            print(f"→ already {store.review_verdict(item.turn_id) or 'gone'}", file=stdout)
    print(_summary(tally), file=stdout)
    return tally


def _summary(tally: Counter) -> str:
    """The turns' verdicts, then the proposals' (those only when there were any)."""
    keys = ["approved", "rejected", "edited", "skipped"] + [k for k in ("proposals kept", "proposals edited",
                                                                        "proposals dropped", "proposals skipped")
                                                            if tally[k]]
    return " · ".join(f"{k} {tally[k]}" for k in keys)


def _review_proposals(store: Store, settings: Settings, ask, stdout, reviewer_id: int, tally: Counter) -> bool:
    """The pending proposals one by one; False when the admin quit (q or end of input)."""
    skipped: set[int] = set()
    while True:
        proposal = store.next_proposal(opt_out_by_default=settings.training_opt_out_default, skip=skipped)
        if proposal is None:
            return True
        print("\n" + proposal_text(proposal), file=stdout)
        key = ""
        while key not in ("k", "e", "d", "s", "q"):
            line = ask(f"{PROPOSAL_KEYS}> ")
            if line is None:
                return False
            key = line.strip().lower()[:1]
        if key == "q":
            return False
        if key == "s":
            skipped.add(proposal.id)
            tally["proposals skipped"] += 1
            continue
        text = None
        if key == "e":
            text = ask("the reply it should have given (one line; empty: back to the proposal)> ")
            if not text or not text.strip():
                continue
        verdict = {"k": "kept", "e": "edited", "d": "dropped"}[key]
        if store.decide_proposal(proposal.id, reviewer_id, verdict, text):
            store.log_event("proposal", user_id=reviewer_id, detail={"proposal_id": proposal.id, "verdict": verdict,
                                                                     "via": "terminal"})
            tally[f"proposals {verdict}"] += 1
            print(f"→ {verdict}", file=stdout)
        else:
            print(f"→ already {(store.proposal(proposal.id) or proposal).status}", file=stdout)
