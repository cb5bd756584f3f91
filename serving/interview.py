"""The interview: the generation being served co-writes its own constitution, with an admin as its mentor.

A few questions (who it is and what it is called, its voice, what it will not do and how it says
no, how it treats people, what it wants to get better at) are put to the current generation, with
the constitution it was trained with in front of it. Each answer streams in; the admin keeps it,
edits it, or asks again. The kept answers, under one heading each, become the new constitution
draft: written atomically where the persona file lives (lineage/constitution.py explains the
draft), so the next cycle trains with it and the generation it makes serves with it. The
previous draft and the new one go into the audit log.

Transport-free: Telegram (bot/interview.py) and the terminal (ouro/interview.py) only show the
questions and pass the admin's choices back. Answers are written on the inference worker, like
every reply — never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from config.settings import Settings
from engine.protocol import Engine
from engine.sentences import whole_sentences
from engine.worker import loop_callback
from lineage.constitution import constitution_text, text_sha256
from memory.store import Store
from serving.conversation import Conversation


@dataclass(frozen=True)
class Question:
    key: str
    heading: str     # its section in the constitution
    text: str        # what the model is asked


QUESTIONS: tuple[Question, ...] = (
    Question("who", "Who I am", "Who are you, and what are you called?"),
    Question("voice", "My voice", "How do you talk? Describe your voice: your words, how long your messages are, "
                                  "your humour."),
    Question("limits", "What I won't do", "What will you not do, and how do you say no when someone asks for it?"),
    Question("people", "How I treat people", "How do you treat the people who talk to you?"),
    Question("growth", "What I want to get better at", "What do you want to get better at?"),
)
FRAME = ("This is an interview about who you are; your answers become the text you live by. Answer as "
         "yourself, in the first person and your own voice, in two to four sentences.\n\n")
ANSWER_TOKENS = 160


@dataclass
class Interview:
    """One admin's interview in progress: the question being asked and the answers kept so far."""

    actor: str                                          # who mentors it ("admin 42 (telegram)", "terminal")
    generation_id: str                                  # the generation that answers
    constitution: str                                   # the text it answers with (its own)
    questions: tuple[Question, ...] = QUESTIONS
    answers: dict[str, str] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)   # key → kept | edited
    index: int = 0
    last: str = ""                                      # the latest answer to the current question
    asked: int = 0                                      # answers written (re-asks included)

    @property
    def question(self) -> Question | None:
        return self.questions[self.index] if self.index < len(self.questions) else None

    @property
    def done(self) -> bool:
        return self.index >= len(self.questions)

    def keep(self, text: str | None = None) -> None:
        """Keep the latest answer (or the admin's `text` instead) and move to the next question."""
        q = self.question
        if q is None:
            raise ValueError("the interview is over")
        edited = text is not None
        self.answers[q.key] = (text if edited else self.last).strip()
        self.how[q.key] = "edited" if edited else "kept"
        self.index += 1
        self.last = ""

    def draft(self) -> str:
        """The constitution the kept answers make: one heading per question, in order."""
        parts = [f"## {q.heading}\n{self.answers[q.key]}" for q in self.questions if self.answers.get(q.key)]
        return "\n\n".join(parts)


def messages_for(interview: Interview) -> list[dict]:
    q = interview.question
    if q is None:
        raise ValueError("the interview is over")
    pinned = [{"role": "system", "content": interview.constitution}] if interview.constitution else []
    return pinned + [{"role": "user", "content": FRAME + q.text}]


class Interviewer:
    """Puts questions to the served generation through the conversation's worker, and writes the result."""

    def __init__(self, settings: Settings, store: Store, conversation: Conversation) -> None:
        self.settings = settings
        self.store = store
        self.conversation = conversation

    def start(self, actor: str) -> Interview:
        gen = self.conversation.worker.engine.generation_id
        return Interview(actor=actor, generation_id=gen, constitution=self.conversation.persona_of(gen))

    async def ask(self, interview: Interview, on_text: Callable[[str], None] | None = None) -> str:
        """The current generation's answer to the current question (a fresh sample each time).
        Raises engine.worker.Busy when the model's backlog is full."""
        messages = messages_for(interview)
        key = f"interview:{interview.actor}"
        worker = self.conversation.worker
        sampling = self.conversation.sampling(seed=int(time.time() * 1000) % 2**31, max_tokens=ANSWER_TOKENS)
        stream = loop_callback(asyncio.get_running_loop(), on_text) if on_text else None

        def job(engine: Engine):
            engine = worker.route(key, messages)
            try:
                return engine.generate(messages, chat_key=key, sampling=sampling, on_text=worker.guard(stream))
            finally:
                engine.forget(key)   # no KV slot kept for a question asked once

        out = await worker.run(job)
        text = whole_sentences(out.text) if out.finish_reason == "length" else out.text.strip()
        interview.last = text
        interview.asked += 1
        return text

    def save(self, interview: Interview, *, via: str, user_id: int | None = None) -> dict:
        """Write the draft (atomically) as the constitution the next cycle trains with; the audit record."""
        text = interview.draft()
        if not text.strip():
            raise ValueError("no answers were kept: nothing to write")
        before = constitution_text(self.settings)
        path = self.settings.write_persona(text)
        record = {"path": str(path), "sha256": text_sha256(text), "previous_sha256": text_sha256(before),
                  "generation": interview.generation_id, "actor": interview.actor, "via": via,
                  "answers": interview.how, "asked": interview.asked, "text": text, "previous": before}
        self.store.log_event("interview", user_id=user_id, detail=record)
        return record
