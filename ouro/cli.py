"""`ouro`: the command line. Each command is a small function; `--help` on any of them teaches.

Errors meant for people (`OuroError`) print as one clean message and exit 1; anything else
is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ouro.errors import OuroError

DESCRIPTION = """\
Ouroboros — a Telegram persona bot that keeps learning from the people who talk to it.

The loop: people chat with the active generation of the persona model (a GGUF served by
llama.cpp) and rate its replies; every turn lands in SQLite; reviewed turns become the
training data of the next generation.

Start here:
  ouro chat                       talk to the persona in this terminal (no Telegram needed)
  TELEGRAM_BOT_TOKEN=… ouro serve serve it on Telegram
  ouro status                     what is running, on which generation, with which figures
"""

EPILOG = """\
environment:
  TELEGRAM_BOT_TOKEN   the bot token from @BotFather (only read by `ouro serve`)
  OURO_DATA_DIR        where ouro.db and models/ live (same as --data-dir)
  OURO_<SETTING>       any setting, e.g. OURO_ADMIN_IDS=123,456  OURO_N_CTX=4096
Run `ouro settings` to see every setting with its default and meaning.
"""


def _settings(args: argparse.Namespace, **extra):
    from config.settings import load_settings

    return load_settings(**extra)


def cmd_chat(args: argparse.Namespace) -> int:
    from ouro.logs import setup_logging
    from ouro.runtime import open_runtime
    from ouro.terminal import run_terminal_chat

    settings = _settings(args)
    setup_logging("WARNING")
    rt = open_runtime(settings)
    try:
        return run_terminal_chat(rt)
    finally:
        rt.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from telegram import Update

    from bot.app import build_application
    from ouro.logs import setup_logging
    from ouro.runtime import open_runtime

    token = os.environ.get("TELEGRAM_BOT_TOKEN", "").strip()
    if not token:
        raise OuroError("TELEGRAM_BOT_TOKEN is not set",
                        hint="get a token from @BotFather, then: TELEGRAM_BOT_TOKEN=123:ABC… ouro serve")
    settings = _settings(args)
    setup_logging(settings.log_level)
    if not settings.admin_ids:
        print("note: OURO_ADMIN_IDS is empty, so nobody can use admin commands", file=sys.stderr)
    rt = open_runtime(settings)
    try:
        app = build_application(settings, rt.store, rt.conversation, token=token, base_url=args.base_url)
        app.run_polling(allowed_updates=Update.ALL_TYPES, close_loop=False)
    finally:
        rt.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from bot.status import format_status, read_runtime, status_report
    from ouro.runtime import open_store

    settings = _settings(args)
    store = open_store(settings)
    try:
        report = status_report(settings, store, read_runtime(settings))
    finally:
        store.close()
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    from config.settings import describe

    settings = _settings(args)
    rows = [{"name": n, "env": f"OURO_{n.upper()}", "value": str(getattr(settings, n)), "default": d, "help": h}
            for n, d, h in describe()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']} = {r['value']}\n    {r['env']}  {r['help']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ouro.bench_serve import run_bench_serve

    settings = _settings(args)
    if args.what != "serve":
        raise OuroError(f"unknown benchmark {args.what!r}", hint="available: serve")
    result = run_bench_serve(settings, turns=args.turns, json_output=args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ouro", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="where ouro.db and models/ live (env OURO_DATA_DIR)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="serve the persona on Telegram",
                       description="Poll Telegram and answer. Token from TELEGRAM_BOT_TOKEN.")
    p.add_argument("--base-url", help="Bot API base URL for a self-hosted server or a local emulator, "
                                      "e.g. http://127.0.0.1:9000/bot (default: api.telegram.org)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat with the persona in this terminal",
                       description="The same engine, context, logging and ratings as Telegram. In the chat: "
                                   "/good, /bad, /better <text>, /reset, /quit.")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("status", help="active generation, uptime, traffic, model file and speed")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("settings", help="every setting with its current value and meaning")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("bench", help="benchmarks that print ratios measured side by side",
                       description="serve: time to first token at turn 20 ÷ turn 2; a chat returning after three "
                                   "others ÷ warm; a reply through the bot and the emulator ÷ the bare model.")
    p.add_argument("what", choices=["serve"], help="which benchmark")
    p.add_argument("--turns", type=int, default=20, help="conversation length for the serve benchmark")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_dir:
        os.environ["OURO_DATA_DIR"] = str(args.data_dir.resolve())
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except OuroError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
