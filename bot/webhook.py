"""Webhook mode: Telegram POSTs each update to a public HTTPS URL instead of being polled.

Polling works anywhere but keeps a request open all the time; behind a reverse proxy that holds
the TLS certificate, a webhook answers as soon as Telegram has an update and scales to busy bots.
The listener is python-telegram-bot's own (`Updater.start_webhook`, tornado: the package's
`webhooks` extra): it binds `webhook_listen:webhook_port` (loopback by default, so only the
proxy reaches it), serves the path of `webhook_url`, registers that URL with Telegram at start,
and answers 403 to any request without the secret Telegram was given (header
X-Telegram-Bot-Api-Secret-Token) — nothing of such a request reaches a handler or the store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from telegram import Update
from telegram.ext import Application

from config.settings import Settings
from core.errors import OuroError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Webhook:
    url: str          # what Telegram posts to (public, https)
    listen: str       # what the bot binds, behind the reverse proxy
    port: int
    path: str         # the URL's path: the proxy forwards it as is
    secret: str

    def __repr__(self) -> str:   # never print the secret (logs, tracebacks)
        return f"Webhook(url={self.url!r}, listen={self.listen!r}, port={self.port}, path={self.path!r})"


def webhook_config(settings: Settings) -> Webhook | None:
    """The webhook to serve, None in polling mode; an OuroError naming the setting when one is missing.
    Called at start-up, before the model loads, so a bad configuration fails at once."""
    if settings.telegram_mode != "webhook":
        return None
    missing = [name for name, value in (("webhook_url", settings.webhook_url),
                                        ("webhook_secret", settings.webhook_secret)) if not value]
    if missing:
        raise OuroError(
            f"telegram_mode is webhook but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set",
            hint="set OURO_WEBHOOK_URL=https://your.domain/path (your reverse proxy forwards it to "
                 f"{settings.webhook_listen}:{settings.webhook_port}) and OURO_WEBHOOK_SECRET=<1-256 of A-Z a-z 0-9 _ ->, "
                 "or OURO_TELEGRAM_MODE=polling")
    url = settings.webhook_url
    assert url is not None and settings.webhook_secret is not None
    return Webhook(url=url, listen=settings.webhook_listen, port=settings.webhook_port,
                   path=urlsplit(url).path.strip("/"), secret=settings.webhook_secret.get_secret_value())


def _options(hook: Webhook) -> dict:
    return dict(listen=hook.listen, port=hook.port, url_path=hook.path, webhook_url=hook.url,
                secret_token=hook.secret, allowed_updates=Update.ALL_TYPES)


def _cannot_listen(hook: Webhook, exc: OSError) -> OuroError:
    return OuroError(f"cannot listen on {hook.listen}:{hook.port} for the webhook: {exc.strerror or exc}",
                     hint="choose another OURO_WEBHOOK_PORT, or stop what holds that one")


async def start_webhook(app: Application, hook: Webhook) -> None:
    """Bind the listener and register the URL and secret with Telegram (an initialized app), inside a
    running event loop: bot.app.running (tests, the demo)."""
    try:
        await app.updater.start_webhook(**_options(hook))
    except OSError as exc:
        raise _cannot_listen(hook, exc) from exc


def run_webhook(app: Application, hook: Webhook) -> None:
    """`Application.run_webhook` for `ouro serve` (bot.app.run_until_stopped owns the signals)."""
    log.info("webhook mode: Telegram posts to %s; listening on %s:%s/%s", hook.url, hook.listen, hook.port, hook.path)
    try:
        app.run_webhook(**_options(hook), close_loop=False, stop_signals=None)
    except OSError as exc:
        raise _cannot_listen(hook, exc) from exc
