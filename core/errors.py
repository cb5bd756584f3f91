"""The one error type users see.

Anything raised as `OuroError` carries a message written for a person (what went wrong and
what to do). The CLI prints it without a traceback; the bot shows a kind version to chat
users and the full traceback only to admins. Every other exception is a bug.
"""


class OuroError(Exception):
    """A failure with a message meant for the person running Ouroboros."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base
