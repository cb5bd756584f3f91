"""Every bot command and its description, in one table.

`/help`, Telegram's command menu (set_my_commands) and the README are all built from this
list; a test keeps the README in step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    description: str
    admin: bool = False


COMMANDS: tuple[Command, ...] = (
    Command("start", "Say hello and see what I can do"),
    Command("help", "List every command"),
    Command("reset", "Start a fresh conversation: I forget the current context"),
    Command("privacy", "What is stored about you, and why; whether your chats may be used for training"),
    Command("optout", "Keep your chats out of training (what you said before included)"),
    Command("optin", "Let your chats be used for training"),
    Command("forget", "Delete everything stored about you (asks to confirm)"),
    Command("status", "Active generation, uptime, traffic, model file and where it runs (CPU, or GPU layers), speed, disk (models folder, GGUFs pruned, free space); next training, cycle progress",
            admin=True),
    Command("generations", "The lineage: id, parent, date, data size, eval scores, gate, active mark", admin=True),
    Command("lineage", "A chart of recall, generalization, style drift and loss across generations", admin=True),
    Command("evals", "A generation's evals against its parent: /evals gen-0003", admin=True),
    Command("promote", "Serve a named generation (asks to confirm): /promote gen-0003 [why]", admin=True),
    Command("rollback", "Back to the parent, or a named generation (asks to confirm)", admin=True),
    Command("train", "Start a learning cycle now, in its own process", admin=True),
    Command("pause", "Pause scheduled training (kept across restarts)", admin=True),
    Command("resume", "Resume scheduled training", admin=True),
    Command("review", "Review self-refinement proposals, then answered turns, one by one", admin=True),
    Command("interview", "Interview the persona about who it is; its answers become its constitution", admin=True),
    Command("persona", "The constitution in force, or the diff between two generations': /persona gen-0001 gen-0003",
            admin=True),
)


def help_text(*, is_admin: bool) -> str:
    lines = ["Talk to me like to a friend. Under each reply: 👍 / 👎 rate it, 🔁 gives a second "
             "take (then pick the better one), ✏️ lets you write a better answer I can learn from.", ""]
    for cmd in COMMANDS:
        if cmd.admin and not is_admin:
            continue
        lines.append(f"/{cmd.name} — {cmd.description}" + (" (admins)" if cmd.admin else ""))
    return "\n".join(lines)
