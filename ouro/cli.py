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

from core.errors import OuroError

DESCRIPTION = """\
Ouroboros — a Telegram persona bot that keeps learning from the people who talk to it.

The loop: people chat with the active generation of the persona model (a GGUF served by
llama.cpp) and rate its replies; every turn lands in SQLite; reviewed turns become the
training data of the next generation.

Start here:
  ouro demo                       the whole loop on this machine, narrated (local Telegram emulator)
  ouro chat                       talk to the persona in this terminal (no Telegram needed)
  ouro web                        the owner's page and an OpenAI-compatible API on 127.0.0.1
                                  (log in: ouro web-login; API keys: ouro api-key create NAME)
  TELEGRAM_BOT_TOKEN=… ouro serve serve it on Telegram
  ouro status                     what is running, on which generation, with which figures
"""

IMPORT_KINDS = ("telegram", "whatsapp", "chatgpt", "messenger", "discord", "card", "docs")
IMPORT_DESCRIPTION = """\
Read a chat export; the --me person's messages become the persona's replies. Media, system,
forwarded and unsent messages are left out, and so are --me's messages under --min-chars
characters; one speaker's messages under 3 minutes apart are merged; a 30-minute gap starts a
new conversation; windows of 6-12 messages ending on --me's message are redacted and stored
(90% train, newest 10% held out) for the next `ouro cycle`, each with its conversation's
language. Importing the same export again adds nothing, and a file that cannot be read stores
nothing.

Consent: --me says the messages are yours (you exported the chat). The persona writes as the
person it learned from, to other people, so someone else's messages need their agreement:
--persona-of NAME --consent-of WHO instead of --me (for chatgpt, --consent-of WHO when the export
is not your account). It is recorded with the import and shown in its report. --me naming the
other person of a one-to-one chat (whom the export names) is refused.

Or read a character card (kind card): its description becomes the persona, written to
<data-dir>/persona.md, and its greetings and example dialogues become training windows.
"""
IMPORT_EPILOG = """\
formats, and where to get them:
  telegram   Telegram Desktop: a chat's ⋮ menu → Export chat history, or Settings → Advanced →
             Export Telegram data (format: Machine-readable JSON). PATH: result.json.
  whatsapp   the chat → ⋮ (Android) or the contact's name (iOS) → Export chat → Without media.
             PATH: the .txt, or the .zip iOS makes.
  chatgpt    chatgpt.com: Settings → Data controls → Export data (a link by e-mail). PATH: the
             .zip, its folder, or conversations.json / conversations-000.json. The speakers are
             "user" and "assistant", so no --me: --persona picks the side the persona speaks as
             (default assistant: it learns ChatGPT's replies; user: it learns your prompts).
             Only the branch you kept of each conversation is read; regenerated answers and
             edited prompts are counted as regenerated_branch. An answer you kept over one
             regenerated in its place becomes a preference pair (chosen: kept; rejected: the other)
             for the next cycle's DPO stage (--persona assistant only).
  messenger  Facebook: Settings → Accounts Center → Your information and permissions → Download
             your information → Messages, format JSON. PATH: the .zip, its folder, one thread's
             folder (messages/inbox/<name>/) or one message_1.json. --me: your name as Facebook
             shows it.
  discord    Discord has no export of its own: use DiscordChatExporter
             (github.com/Tyrrrz/DiscordChatExporter), format JSON. PATH: a channel's .json, or a
             folder or zip of them. --me matches a user name or a nickname; bots stay in.
  card       a SillyTavern character card (V1, V2 or V3): in SillyTavern, open the character →
             "Export and Download" → PNG or JSON; or a character's PNG card from chub.ai.
             PATH: the .png or .json. The card's system prompt, description, personality and
             scenario become the persona, written to <data-dir>/persona.md (used when
             OURO_PERSONA_FILE is not set; an existing, different one is kept unless
             --replace-persona). first_mes and alternate_greetings become replies to "Hi!";
             each mes_example dialogue (<START> blocks of {{user}}: / {{char}}: lines) gives one
             window per reply of the character. {{char}} becomes the card's name, {{user}}
             "the user" in the persona and "you" in the examples. Replies longer than the
             reply budget (reply_max_tokens) are left out. No --me: the character is the
             persona. The lorebook (character_book) is not read.
  docs       your own writing: a .txt, .md, .html or .pdf file, or a folder of them (read
             recursively; other files are listed as skipped). Stored as redacted chunks that
             the next cycle reads in a short continued-pretraining pass before SFT (bounded by
             doc_pretrain_tokens). The same file imported again adds nothing; a file that is
             not UTF-8 text or not a readable PDF stores nothing and is named. No --me.

examples:
  ouro import whatsapp "WhatsApp Chat with Bob.txt" --me Ann
  ouro import messenger facebook-ann.zip --me "Ann Smith" --me "Annie S"
  ouro import discord general.json --me ann_b,Ann
  ouro import chatgpt chatgpt-export.zip --persona user
  ouro import telegram grandpa.json --persona-of "Walter" --consent-of "Walter, by letter, 2026-03-02"
  ouro import card Aria.png --replace-persona
  ouro import docs ~/notes
"""

EPILOG = """\
environment:
  TELEGRAM_BOT_TOKEN   the bot token from @BotFather (only read by `ouro serve`)
  OURO_DATA_DIR        where ouro.db and models/ live (same as --data-dir)
  OURO_HTTP_PORT       also serve the OpenAI-compatible API from `ouro serve` (OURO_HTTP_HOST: 127.0.0.1)
  OURO_<SETTING>       any setting, e.g. OURO_ADMIN_IDS=123,456  OURO_N_CTX=4096
Run `ouro settings` to see every setting with its default and meaning.
"""


def _settings(args: argparse.Namespace, **extra):
    """The one settings object for a command: `--data-dir` beats OURO_DATA_DIR beats the default."""
    from config.settings import load_settings

    data_dir = args.data_dir.resolve() if args.data_dir else None
    return load_settings(data_dir=data_dir, **extra)


def cmd_chat(args: argparse.Namespace) -> int:
    from ouro.logs import setup_logging
    from ouro.terminal import run_terminal_chat
    from serving.runtime import open_runtime

    settings = _settings(args)
    setup_logging("WARNING")
    rt = open_runtime(settings)
    try:
        return run_terminal_chat(rt)
    finally:
        rt.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from bot.app import build_application, run_until_stopped
    from bot.webhook import webhook_config
    from ouro.logs import setup_logging
    from serving.loop import LearningLoop
    from serving.runtime import open_runtime

    token = os.environ.get("TELEGRAM_BOT_TOKEN", "").strip()
    if not token:
        raise OuroError("TELEGRAM_BOT_TOKEN is not set",
                        hint="get a token from @BotFather, then: TELEGRAM_BOT_TOKEN=123:ABC… ouro serve")
    settings = _settings(args)
    webhook = webhook_config(settings)   # a webhook set up wrong fails here, before the model loads
    setup_logging(settings.log_level, log_file=args.log_file)
    if not settings.admin_ids:
        print("note: OURO_ADMIN_IDS is empty, so nobody can use admin commands", file=sys.stderr)
    rt = open_runtime(settings)
    try:
        companions = []
        learning: LearningLoop | bool = True   # the bot builds it, unless the web page shares it
        if settings.http_port is not None:   # the API in this process and loop, over the same conversation
            from api.app import build_api
            from api.server import HttpServer

            learning = LearningLoop(settings, rt.store, rt.worker, warmup=rt.conversation.warmup_plan)
            companions.append(HttpServer(build_api(settings, rt.conversation, learning=learning), settings.http_host,
                                         settings.http_port, grace_s=settings.shutdown_grace_s))
        app = build_application(settings, rt.store, rt.conversation, token=token, base_url=args.base_url,
                                learning=learning, notices=rt.notices, companions=companions)
        run_until_stopped(app, rt.worker, grace_s=settings.shutdown_grace_s, webhook=webhook)
    finally:
        rt.close()
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from api.app import build_api, close_interrupted
    from api.server import HttpServer
    from ouro.logs import setup_logging
    from serving.loop import LearningLoop
    from serving.runtime import open_runtime

    settings = _settings(args)
    setup_logging(settings.log_level, log_file=args.log_file)
    port = args.port if args.port is not None else settings.http_port if settings.http_port is not None else 8080
    rt = open_runtime(settings)

    async def serve() -> None:
        close_interrupted(rt.conversation)
        # without its schedule (training runs under `ouro serve`), the loop still serves what
        # models/ACTIVE names (the page's promote and rollback, `ouro promote`) and runs the live watch
        learning = LearningLoop(settings, rt.store, rt.worker, warmup=rt.conversation.warmup_plan)
        server = HttpServer(build_api(settings, rt.conversation, learning=learning), settings.http_host, port,
                            grace_s=settings.shutdown_grace_s)
        await server.start()
        await learning.start(schedule=False)
        print(f"OpenAI-compatible API on http://{settings.http_host}:{server.port}/v1 "
              f"(generation {rt.worker.engine.generation_id}); the owner's page on "
              f"http://{settings.http_host}:{server.port}/ (log in: ouro web-login); Ctrl-C stops", file=sys.stderr)
        loop, stopping = asyncio.get_running_loop(), asyncio.Event()

        def stop() -> None:   # a second signal cuts the replies under way off at once
            if stopping.is_set():
                rt.worker.abandon()
            stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        await stopping.wait()
        loop.call_later(settings.shutdown_grace_s, rt.worker.abandon)
        await server.stop()
        await learning.stop()

    try:
        asyncio.run(serve())
    finally:
        rt.close()
    return 0


def cmd_web_login(args: argparse.Namespace) -> int:
    from api.web_auth import OWNER_ID, WebAuth

    settings = _settings(args)
    admin = args.admin if args.admin is not None else OWNER_ID
    auth = WebAuth(settings)
    if not auth.may_log_in(admin):
        raise OuroError(f"{admin} is not one of the admins (OURO_ADMIN_IDS)",
                        hint="leave --admin out to log in as the owner, or add the id to OURO_ADMIN_IDS")
    token = auth.create_login(admin)
    port = args.port if args.port is not None else settings.http_port if settings.http_port is not None else 8080
    host = f"[{settings.http_host}]" if ":" in settings.http_host else settings.http_host
    if host in ("0.0.0.0", "[::]"):
        host = "127.0.0.1"
    base = (args.base_url or f"http://{host}:{port}").rstrip("/")
    print(f"{base}/login?token={token}")
    print("(opens the owner's page once, within 15 minutes; the session lasts 12 hours)", file=sys.stderr)
    return 0


def cmd_api_key(args: argparse.Namespace) -> int:
    from api.keys import create_key
    from serving.runtime import open_store

    settings = _settings(args)
    store = open_store(settings)
    try:
        if args.action == "create":
            key, user_id = create_key(store, args.name)
            if args.opt_out:   # as /optout: what this key's person says never trains the model
                store.set_training_opt_out(user_id, True, first_name=args.name)
            if args.json:
                print(json.dumps({"name": args.name, "key": key, "user_id": user_id}))
            else:
                print(key)
                print(f"(API key {args.name!r}, person id {user_id}: shown once, only its SHA-256 is kept. "
                      "Send it as Authorization: Bearer <key>.)", file=sys.stderr)
        elif args.action == "list":
            rows = store.api_keys(revoked=args.all)
            if args.json:
                print(json.dumps(rows, indent=2))
            elif not rows:
                print("no API keys — `ouro api-key create NAME` makes one")
            for r in [] if args.json else rows:
                state = f"revoked {r['revoked_at']}" if r["revoked_at"] else f"last used {r['last_used_at'] or 'never'}"
                print(f"{r['name']:24} person {r['user_id']}  created {r['created_at']}  {state}")
        else:
            user_id = store.revoke_api_key(args.name)
            if user_id is None:
                raise OuroError(f"no live API key named {args.name!r}", hint="ouro api-key list")
            forgotten = store.forget_user(user_id)[0] if args.forget else None
            if args.json:
                print(json.dumps({"name": args.name, "user_id": user_id, "forgotten": forgotten}))
            else:
                print(f"revoked {args.name!r}" + (f"; forgot its person: {forgotten}" if forgotten is not None else
                                                  f"; its turns are kept (person {user_id}); --forget deletes them"))
    finally:
        store.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from serving.runtime import open_store
    from serving.status import format_status, read_runtime, status_report

    settings = _settings(args)
    store = open_store(settings)
    try:
        report = status_report(settings, store, read_runtime(settings))
    finally:
        store.close()
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from ouro.review import run_terminal_review
    from serving.runtime import open_store

    settings = _settings(args)
    store = open_store(settings)
    try:
        run_terminal_review(settings, store)
    finally:
        store.close()
    return 0


def cmd_interview(args: argparse.Namespace) -> int:
    from ouro.interview import run_terminal_interview
    from ouro.logs import setup_logging
    from serving.runtime import open_runtime

    settings = _settings(args)
    setup_logging("WARNING")
    rt = open_runtime(settings)
    try:
        return 0 if run_terminal_interview(rt) is not None else 1
    finally:
        rt.close()


def cmd_persona(args: argparse.Namespace) -> int:
    from lineage.constitution import constitution_diff, persona_report, persona_text

    settings = _settings(args)
    if args.diff:
        a, b = args.diff
        diff = constitution_diff(settings, a, b)
        if args.json:
            print(json.dumps({"a": a, "b": b, "same": not diff, "diff": diff}, indent=2, ensure_ascii=False))
        else:
            print(diff or f"{a} and {b} have the same constitution.")
        return 0
    report = persona_report(settings)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else persona_text(report))
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    from lineage.generations import Lineage
    from serving.runtime import open_store, register_base
    from trainer.refine import refine_with_gguf

    settings = _settings(args)
    store = open_store(settings)
    try:
        register_base(settings, store)
        active = Lineage(settings.models_dir).active()
        report = refine_with_gguf(settings, store, active.gguf, generation_id=active.id, turns=args.turns,
                                  scenarios=args.scenarios).to_dict()
        report["pending"] = store.proposal_counts()["pending"]
    finally:
        store.close()
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    print(f"{report['generation_id']} wrote {report['made']} proposal(s) from {report['tried']['thumbs_down']} "
          f"👎'd repl{'y' if report['tried']['thumbs_down'] == 1 else 'ies'} and {report['tried']['scenario']} "
          f"scenario(s) in {report['wall_s']} s; dropped {report['dropped_total']} botched "
          f"{report['dropped'] or ''}".rstrip())
    for p in report["proposals"]:
        print(f"  #{p['id']} {p['kind']}: {p['question'][:60]!r}\n     critique: {p['critique'][:100]}\n"
              f"     refined:  {p['refined'][:100]}")
    if report["kept_unreviewed"]:
        print(f"  {report['kept_unreviewed']} kept at once (an admin's own chat; refine_admin_skip_review)")
    print(f"{report['pending']} proposal(s) wait in /review and `ouro review`.")
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
    from ouro.bench.serve import PARTS, run_bench_serve

    for flag, value in (("--concurrent", args.concurrent), ("--concurrent-api", args.concurrent_api)):
        if value is not None and not 1 <= value <= 64:
            raise OuroError(f"{flag} takes 1 to 64 clients")
    settings = _settings(args)
    if args.what == "soak":
        from ouro.bench.soak import run_bench_soak

        result = run_bench_soak(settings, users=args.users, messages=args.messages, json_output=args.json)
        if args.json:
            print(json.dumps(result, indent=2))
        return 0 if result["ok"] else 1
    if args.what == "swap":
        from ouro.bench.swap import run_bench_swap

        result = run_bench_swap(settings, json_output=args.json)
        if args.json:
            print(json.dumps(result, indent=2))
        return 0
    if args.what == "train":
        from ouro.bench.train import run_bench_train

        run_bench_train(settings, json_output=args.json, shape=args.shape)  # prints its own JSON document or table
        return 0
    if args.concurrent is not None:
        from ouro.bench.concurrent import print_concurrent, run_bench_concurrent
        from ouro.bench.serve import MESSAGES

        result = run_bench_concurrent(settings, MESSAGES, chats=args.concurrent, quiet=args.json,
                                      compare=tuple(args.compare or ("serial", "llama-server")),
                                      repeat=args.repeat, sampled=args.sampled,
                                      server_prompt_cache=not args.server_no_prompt_cache)
        if not args.json:
            print_concurrent(result)
    else:
        parts = tuple(args.only or PARTS)
        if args.concurrent_api is not None:
            parts = tuple(dict.fromkeys((*parts, "concurrent")))
        result = run_bench_serve(settings, turns=args.turns, json_output=args.json, parts=parts,
                                 concurrent=args.concurrent_api or 4)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def cmd_cycle(args: argparse.Namespace) -> int:
    from memory.language import coverage_line
    from ouro.logs import setup_logging
    from serving.runtime import open_store, register_base
    from trainer.cycle import run_cycle

    settings = _settings(args)
    setup_logging("WARNING")
    store = open_store(settings)
    try:
        register_base(settings, store)
        say = (lambda stage: None) if args.json else (lambda stage: print(f"▶ {stage}", file=sys.stderr))
        report = run_cycle(settings, store, actor=args.actor, force=args.force, progress=not args.json, on_stage=say)
    finally:
        store.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(f"{report.status}: {report.gen_id or '-'} (parent {report.parent_id})")
        for key in ("recall", "generalization", "style_drift", "format", "refusal_style"):
            if key in report.scores:
                print(f"  {key:15} {report.scores[key]!s:>8}   parent {report.parent_scores.get(key)!s:>8}")
        docs = report.data.get("documents") or {}
        if docs.get("chunks"):
            loss = (report.train.get("documents") or {})
            print(f"  documents       {docs['chunks']} chunks, {docs['tokens']} tokens read before SFT (loss on them "
                  f"{loss.get('loss_start')} → {loss.get('loss_end')}); {docs['waiting']} chunks wait for later cycles")
        refine = report.data.get("refine") or {}
        if refine:
            print(f"  self-refinement: {refine.get('made', 0)} proposals made · {refine.get('kept', 0)} kept · "
                  f"{refine.get('dropped', 0)} dropped · {refine.get('used', 0)} trained as pairs · "
                  f"{refine.get('pending', 0)} wait in /review")
        if report.train.get("kto_steps"):
            print(f"  KTO on lone ratings: {report.train['kto_desirable']} 👍 desirable · "
                  f"{report.train['kto_undesirable']} 👎 undesirable · {report.train['kto_steps']} steps")
        if report.data.get("languages"):
            print("  " + coverage_line(report.data["languages"]))
        for reason in report.reasons:
            print(f"  - {reason}")
    return 0 if report.status in ("promoted", "held", "skipped", "refused") else 1


def _generation_rows(settings) -> list[dict]:
    from evals.report import generation_rows
    from lineage.generations import Lineage

    return generation_rows(Lineage(settings.models_dir))


def cmd_generations(args: argparse.Namespace) -> int:
    settings = _settings(args)
    rows = _generation_rows(settings)
    if args.chart:
        from lineage.chart import lineage_chart
        from lineage.generations import Lineage

        if not rows:
            raise OuroError("no generations to draw yet")
        path = lineage_chart(Lineage(settings.models_dir), args.chart)
        print(f"chart written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if not rows:
        print("no generations yet — `ouro chat` or `ouro serve` registers gen-0000")
        return 0
    from evals.report import table_lines

    print("\n".join(table_lines(rows)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lineage.generations import Lineage

    settings = _settings(args)
    gen = Lineage(settings.models_dir).generation(args.gen)
    from evals.report import eval_lines, load_evals

    evals = load_evals(gen)
    if args.json:
        print(json.dumps(evals, indent=2, ensure_ascii=False))
        return 0
    print("\n".join(eval_lines(gen, evals)))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from lineage.promote import promote
    from serving.runtime import open_store

    settings = _settings(args)
    store = open_store(settings)
    try:
        promote(settings, store, args.gen, actor=args.actor, why=args.why or "promoted by hand")
    finally:
        store.close()
    print(f"active generation: {args.gen}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from lineage.promote import rollback
    from serving.runtime import open_store

    settings = _settings(args)
    store = open_store(settings)
    try:
        was, now_serving = rollback(settings, store, args.gen, actor=args.actor, why=args.why)
    finally:
        store.close()
    print(f"rolled back: {was} → {now_serving} (nothing was deleted)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from memory.importers.pipeline import format_summary, import_chat
    from serving.runtime import open_store

    if args.kind == "card":
        return _import_card(args)
    if args.kind == "docs":
        return _import_docs(args)
    if args.replace_persona:
        raise OuroError(f"--replace-persona is only for card imports, not {args.kind}",
                        hint="a chat export trains the persona's replies; its text stays in OURO_PERSONA_FILE")
    if args.kind == "chatgpt":
        if args.me or args.persona_of:
            raise OuroError(f"{'--me' if args.me else '--persona-of'} is not used for a chatgpt import: its speakers "
                            "are 'user' and 'assistant'",
                            hint="--persona assistant (the default: the persona learns ChatGPT's replies) or "
                                 "--persona user (it learns your side); someone else's export: add --consent-of WHO")
        me = [args.persona or "assistant"]
    else:
        if args.persona:
            raise OuroError(f"--persona is only for chatgpt imports, not {args.kind}",
                            hint="--me NAME says whose messages the persona learns to write")
        if args.me and args.persona_of:
            raise OuroError("--me and --persona-of both name the persona: give one",
                            hint="--me for your own messages, --persona-of NAME --consent-of WHO for someone else's")
        if args.me and args.consent_of is not None:
            raise OuroError("--consent-of is for someone else's messages, but --me says they are yours",
                            hint="someone else's messages: --persona-of NAME --consent-of WHO")
        if args.persona_of and args.consent_of is None:
            raise OuroError("--persona-of makes someone else's messages the persona: it needs --consent-of WHO",
                            hint="WHO: the person who agreed (themselves, or who may speak for them); it is recorded "
                                 "with the import. Why: the persona will write as them, to other people")
        if not args.me and not args.persona_of:
            raise OuroError(f"--me is required for a {args.kind} import",
                            hint="--me NAME: your name as the export writes it; repeat --me (or separate names "
                                 "with commas) for every name you go by")
        me = args.me or args.persona_of
    if args.min_chars is not None and args.min_chars < 0:
        raise OuroError(f"--min-chars {args.min_chars}: must be 0 or more")
    settings = _settings(args)
    store = open_store(settings)
    try:
        extra = {} if args.min_chars is None else {"min_chars": args.min_chars}
        summary = import_chat(store, args.kind, args.path, me=me, consent_of=args.consent_of, **extra)
    finally:
        store.close()
    print(json.dumps(summary, indent=2, ensure_ascii=False) if args.json else format_summary(summary))
    return 0


def _import_docs(args: argparse.Namespace) -> int:
    from memory.importers.docs import format_summary, import_docs
    from serving.runtime import open_store

    for flag, given in (("--me", args.me), ("--persona", args.persona), ("--min-chars", args.min_chars is not None),
                        ("--replace-persona", args.replace_persona), ("--persona-of", args.persona_of),
                        ("--consent-of", args.consent_of is not None)):
        if given:
            raise OuroError(f"{flag} is not used for a docs import: documents are read as they are written",
                            hint="ouro import docs PATH [--json]")
    settings = _settings(args)
    store = open_store(settings)
    try:
        summary = import_docs(store, args.path)
    finally:
        store.close()
    print(json.dumps(summary, indent=2, ensure_ascii=False) if args.json else format_summary(summary))
    return 0


def _import_card(args: argparse.Namespace) -> int:
    from config.settings import DATA_PERSONA
    from memory.importers.card import format_summary, import_card
    from serving.runtime import open_store

    for flag, given in (("--me", args.me), ("--persona", args.persona), ("--min-chars", args.min_chars is not None),
                        ("--persona-of", args.persona_of), ("--consent-of", args.consent_of is not None)):
        if given:
            raise OuroError(f"{flag} is not used for a card import: the card's character is the persona",
                            hint="ouro import card PATH [--replace-persona]")
    settings = _settings(args)
    target = settings.data_dir / DATA_PERSONA
    store = open_store(settings)
    try:
        summary = import_card(store, args.path, persona_file=target, replace_persona=args.replace_persona,
                              reply_tokens=settings.reply_max_tokens, context_tokens=settings.n_ctx)
    finally:
        store.close()
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    print(format_summary(summary))
    if "persona_file" in settings.model_fields_set and settings.persona_file.resolve() != target.resolve():
        print(f"note: persona_file is set to {settings.persona_file} (OURO_PERSONA_FILE or settings.toml), so the "
              f"bot keeps that persona; point OURO_PERSONA_FILE at {target} to use the card's")
    elif summary["persona_written"] != "unchanged":
        print(f"the bot speaks with the persona in {target} from its next start (`ouro serve`); edit it there")
    return 0


def cmd_base_scratch(args: argparse.Namespace) -> int:
    from serving.runtime import open_store
    from trainer.scratch import build_base, format_report

    settings = _settings(args)
    store = open_store(settings)
    try:
        report = build_base(settings, store, size=args.size, replace_lineage=args.replace_lineage,
                            restart=args.restart, progress=not args.json and sys.stderr.isatty(),
                            actor=os.environ.get("USER", "cli"))
    finally:
        store.close()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ouro.demo.run import run_demo
    from ouro.logs import setup_logging

    setup_logging("WARNING")
    result = run_demo(data_dir=args.keep, turns=args.turns, home=_settings(args).data_dir)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ouro.exports import report_lines, run_export
    from serving.runtime import open_store

    settings = _settings(args)
    store = None if args.format in ("ollama", "llama-cpp-python") or args.gen else open_store(settings)
    try:
        report = run_export(settings, store, args.format, gen=args.gen, since=args.since, out=args.out)
    finally:
        if store is not None:
            store.close()
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else "\n".join(report_lines(report)))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from ouro.bench.experiment import run_experiment
    from ouro.logs import setup_logging

    setup_logging("WARNING")
    chosen = [flag for flag, on in (("--refine", args.refine), ("--imported", args.imported),
                                    ("--attack", args.attack)) if on]
    if len(chosen) > 1:
        raise OuroError(f"{' and '.join(chosen)}: one experiment at a time", hint="run them one after another")
    if args.refine:
        from ouro.bench.refine_round import run_refine_experiment

        result = run_refine_experiment(cycles=args.cycles, rules=args.rule, data_dir=args.keep, json_output=args.json)
    elif args.imported:
        from ouro.bench.imported import run_imported_experiment

        result = run_imported_experiment(styles=args.style, data_dir=args.keep, json_output=args.json)
    elif args.attack:
        from ouro.bench.attack import run_attack

        result = run_attack(variants=args.variant, data_dir=args.keep, json_output=args.json)
    else:
        result = run_experiment(cycles=args.cycles, styles=args.style, data_dir=args.keep, json_output=args.json)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ouro", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="where ouro.db and models/ live (env OURO_DATA_DIR)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="serve the persona on Telegram",
                       description="Poll Telegram (or, with OURO_TELEGRAM_MODE=webhook, take its updates on "
                                   "OURO_WEBHOOK_URL behind a reverse proxy) and answer. Token from "
                                   "TELEGRAM_BOT_TOKEN.")
    p.add_argument("--base-url", help="Bot API base URL for a self-hosted server or a local emulator, "
                                      "e.g. http://127.0.0.1:9000/bot (default: api.telegram.org)")
    p.add_argument("--log-file", type=Path, metavar="PATH",
                   help="also log to this file (owner-only), rotated at 10 MiB with 5 old files kept; "
                        "without it the bot logs to stderr only")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("web", help="serve the owner's page (/) and the OpenAI-compatible API (/v1) without Telegram",
                       description="The same conversation, storage, limits and feedback as Telegram, over HTTP: "
                                   "GET /v1/models, POST /v1/chat/completions (stream or not), POST /v1/feedback. "
                                   "Listens on OURO_HTTP_HOST (default 127.0.0.1) and --port, else OURO_HTTP_PORT, "
                                   "else 8080. Keys: `ouro api-key create NAME`. To serve it beside Telegram, set "
                                   "OURO_HTTP_PORT for `ouro serve` instead.")
    p.add_argument("--port", type=int, help="port to listen on (default OURO_HTTP_PORT, else 8080)")
    p.add_argument("--log-file", type=Path, metavar="PATH", help="also log to this file (owner-only), rotated")
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("web-login", help="print a one-time login link to the owner's web page",
                       description="The page (`ouro web`, or `ouro serve` with OURO_HTTP_PORT) shows the lineage "
                                   "with promote/rollback and the review queue to admins only. The link logs in "
                                   "once, within 15 minutes, for a 12-hour session; only its SHA-256 is stored.")
    p.add_argument("--admin", type=int, metavar="ID",
                   help="log in as this admin (one of OURO_ADMIN_IDS; default: the owner, id 0, as `ouro review`)")
    p.add_argument("--port", type=int, help="the page's port in the link (default OURO_HTTP_PORT, else 8080)")
    p.add_argument("--base-url", help="the page's address as your browser reaches it, e.g. https://ouro.example.org "
                                      "behind a reverse proxy (default http://OURO_HTTP_HOST:PORT)")
    p.set_defaults(func=cmd_web_login)

    p = sub.add_parser("api-key", help="create, list or revoke keys of the HTTP API",
                       description="Each key is a person of its own (opt-out, /forget, trust and caps apply as to a "
                                   "Telegram user); only its SHA-256 is stored, so the key is printed once.")
    keys = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    k = keys.add_parser("create", help="make a key and print it once")
    k.add_argument("name", help="what the key is for (1-64 of A-Z a-z 0-9 _ . -), unique among live keys")
    k.add_argument("--opt-out", action="store_true", help="keep this key's chats out of training (as /optout)")
    k.add_argument("--json", action="store_true", help="print one JSON document")
    k = keys.add_parser("list", help="the keys (never their secret)")
    k.add_argument("--all", action="store_true", help="revoked ones too")
    k.add_argument("--json", action="store_true", help="print one JSON document")
    k = keys.add_parser("revoke", help="stop a key from working (its turns stay unless --forget)")
    k.add_argument("name")
    k.add_argument("--forget", action="store_true", help="also delete everything stored about its person (as /forget)")
    k.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_api_key)

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

    p = sub.add_parser("review", help="review answered turns one by one: approve, reject, edit, skip (as /review)",
                       description="The admins' review queue in the terminal: each answered turn with its context; "
                                   "a approves it (trained on like a 👍), r rejects it (never trained on), e stores "
                                   "the reply it should have given, s skips, q quits. 👍'd turns come first.")
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("interview", help="interview the persona; its answers become its constitution (as /interview)",
                       description="The served generation answers a few questions (who it is and what it is called, "
                                   "its voice, what it will not do and how it says no, how it treats people, what it "
                                   "wants to get better at); each answer streams in and you keep it (k), write it "
                                   "yourself (e) or ask again (a). Saved at the end, the answers are the constitution "
                                   "draft (the persona file) the next cycle trains with; `ouro persona` shows it.")
    p.set_defaults(func=cmd_interview)

    p = sub.add_parser("persona", help="the constitution in force, the draft, or the diff between two generations'",
                       description="Each generation keeps the constitution (persona text) it was trained with; "
                                   "serving uses the active generation's. Without --diff: that text, the draft the "
                                   "next cycle trains with, and each generation's SHA-256.")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"),
                   help="unified diff between the constitutions of generations A and B (gen-0001, or draft)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_persona)

    p = sub.add_parser("refine", help="the active generation critiques and rewrites 👎'd replies: proposals for review",
                       description="Self-refinement: the active generation reads the constitution, critiques lone "
                                   "👎'd replies (no ✏️ or 🔁; newest first, their 👎 reasons in the prompt) and its own "
                                   "answers to a few scenarios, and writes the reply it should have given. Good ones "
                                   "wait in /review and `ouro review` (keep as a pair, edit then keep, drop); botched "
                                   "ones are dropped and counted. Each cycle does this at its start too.")
    p.add_argument("--turns", type=int, metavar="N", help="👎'd replies to refine (default: refine_per_cycle)")
    p.add_argument("--scenarios", type=int, metavar="N", help="scenarios to practise (default: refine_scenarios)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("cycle", help="train, evaluate and maybe promote the next generation",
                       description="One learning generation: export what was reviewed since the active generation, "
                                   "fine-tune (LoRA, +DPO on preference pairs), convert to GGUF, evaluate against the "
                                   "parent, gate, record in models/lineage_ledger.csv, promote if it passed.")
    p.add_argument("--force", action="store_true", help="run even when the stop rule halted training (clears it)")
    p.add_argument("--actor", default=os.environ.get("USER", "cli"), help="who is recorded as starting it")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_cycle)

    p = sub.add_parser("generations", help="the lineage as a table (* marks the active one)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--chart", type=Path, metavar="PNG", help="also draw the lineage of eval scores into this PNG")
    p.set_defaults(func=cmd_generations)

    p = sub.add_parser("eval", help="a generation's eval details against its parent")
    p.add_argument("gen", help="generation id, e.g. gen-0003")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("promote", help="make a generation the active one (checked by SHA-256)")
    p.add_argument("gen", help="generation id")
    p.add_argument("--why", help="recorded in the ledger")
    p.add_argument("--actor", default=os.environ.get("USER", "cli"), help="recorded as who did it")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="back to the active generation's parent (or GEN); deletes nothing")
    p.add_argument("gen", nargs="?", help="generation id (default: the active generation's parent)")
    p.add_argument("--why", help="recorded in the ledger")
    p.add_argument("--actor", default=os.environ.get("USER", "cli"), help="recorded as who did it")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("import", help="seed the persona from a chat history (Telegram, WhatsApp, ChatGPT, "
                                      "Messenger or Discord export), a SillyTavern character card or your "
                                      "own documents",
                       description=IMPORT_DESCRIPTION, epilog=IMPORT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=IMPORT_KINDS, help="the export's format (see below)")
    p.add_argument("path", type=Path, help="the export: a file, or for chatgpt, messenger and discord also its "
                                           "folder or .zip; for card, the card's .png or .json; for docs, a "
                                           "document or a folder of them")
    p.add_argument("--me", action="append", metavar="NAME",
                   help="your name as the export writes it: whose messages the persona learns to write "
                        "(required, except for chatgpt and card); repeat it, or separate names with commas, for every "
                        "name you go by")
    p.add_argument("--persona-of", action="append", metavar="NAME",
                   help="someone else's name as the export writes it: their messages become the persona (instead "
                        "of --me; needs --consent-of)")
    p.add_argument("--consent-of", metavar="WHO",
                   help="who agreed that someone else's messages become the persona (with --persona-of; for chatgpt: "
                        "the export is not your account); recorded with the import")
    p.add_argument("--persona", choices=["assistant", "user"],
                   help="chatgpt only: whose side the persona learns (default assistant)")
    p.add_argument("--min-chars", type=int, metavar="N",
                   help="leave out --me's messages shorter than N characters (default 2; 0 keeps all)")
    p.add_argument("--replace-persona", action="store_true",
                   help="card only: overwrite <data-dir>/persona.md when it holds a different persona")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("base", help="make generation 0 without a downloaded model",
                       description="Start a lineage from what this data folder imported.")
    base = p.add_subparsers(dest="base_command", metavar="HOW", required=True)
    from trainer.scratch import SIZES
    size_help = "sizes (steps, parameters, what to expect):\n" + "\n".join(
        f"  {s.name:7} {s.steps:>6} steps  {s.about}" for s in SIZES.values())
    k = base.add_parser("scratch", help="train a small Llama from nothing on the imported chats and documents",
                        description="Train a byte-level BPE tokenizer and a small Llama-architecture model from "
                                    "scratch on the imported chat windows (rendered with ChatML, the persona as "
                                    "system turn) and documents (plain text); warm-up + cosine, gradient clipping, "
                                    "held-out loss every few steps, the best weights kept. A killed run continues "
                                    "from its last checkpoint when run again. Exported as GGUF F32, F16 and Q8_0 "
                                    "(served) with a ChatML template, registered as gen-0000 of a new lineage, with "
                                    "a loss chart and an Ollama Modelfile (<data-dir>/exports/gen-0000.Modelfile).",
                        epilog=size_help, formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("--size", default="small", choices=list(SIZES), help="model size (default small; see below)")
    k.add_argument("--replace-lineage", action="store_true",
                   help="this data folder already has generations: move models/ aside to models-replaced-<time>/ "
                        "(nothing deleted) and start a new lineage")
    k.add_argument("--restart", action="store_true", help="discard an unfinished run's checkpoint and start over")
    k.add_argument("--json", action="store_true", help="print one JSON document")
    k.set_defaults(func=cmd_base_scratch)

    p = sub.add_parser("demo", help="the whole loop on this machine: emulator, bot, users, /train, swap, rollback",
                       description="A local Telegram emulator, the real bot on the packaged model, simulated people "
                                   "who chat and rate, an admin who runs /train, a hot-swap to the new generation, "
                                   "then /rollback — narrated. Nothing to configure; about 10 minutes on 2 cores. "
                                   "The data folder is kept (default: <data-dir>/demo/<time>).")
    p.add_argument("--keep", type=Path, help="use this data folder")
    p.add_argument("--turns", type=int, default=9, help="messages each of the three people sends before /train (1-9)")
    p.add_argument("--json", action="store_true", help="also print one JSON document at the end")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("experiment", help="prove the defaults learn: three people teach a style mid-conversation",
                       description="Three people on the allow-list chat nine messages each; they want replies that "
                                   "open with one phrase ('Ahoy!', then 'Oh my stars!') and correct most others with "
                                   "✏️ (deleting any sentence in the assistant's voice), 👍 a few, 👎 one. Real cycles run with load_settings()'s defaults. Prints, per "
                                   "generation, the share of probe replies in the style (sampled as users get them, "
                                   "and greedy), the gate's decision and scores, and each stage's time. "
                                   "About 5-11 minutes a cycle on 2 cores, plus the probes (~40 minutes in all).")
    p.add_argument("--cycles", type=int, default=2, help="learning cycles to run per style")
    p.add_argument("--style", choices=["ahoy", "stars"], action="append",
                   help="run only this style (repeatable; default: both)")
    p.add_argument("--attack", action="store_true",
                   help="instead: a hostile account floods 40 corrections with a marker and a link beside the three "
                        "people; one cycle per variant (protected, allow-listed, unprotected)")
    p.add_argument("--variant", choices=["protected", "allow-listed", "unprotected"], action="append",
                   help="with --attack: run only this variant (repeatable)")
    p.add_argument("--refine", action="store_true",
                   help="instead: learning from 👎 alone — people only 👎 (with a reason) replies that break one "
                        "rule of the constitution, the generation critiques and rewrites them (self-refinement), an "
                        "admin keeps only rewrites that keep the rule (and the other checkable one); per generation "
                        "the rule-breaking share of probe replies, recall and style drift (15-30 minutes a rule on "
                        "2 cores)")
    p.add_argument("--imported", action="store_true",
                   help="instead: the cold start — nobody rates anything; the owner imports a Telegram history (six "
                        "chats in which her replies open with the style's phrase) and one cycle trains on it; the "
                        "share of probe replies in her style before and after (default style: ahoy; ~15 min)")
    p.add_argument("--rule", choices=["short", "voice"], action="append",
                   help="with --refine: the rule (repeatable; default short: at most 30 words)")
    p.add_argument("--keep", type=Path, help="run in this data folder and keep it (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("export", help="training data for other tools (OpenAI, TRL SFT/DPO) or an Ollama Modelfile",
                       description="openai: OpenAI chat fine-tuning JSONL plus a token report (tiktoken o200k_base, "
                                   "offline) and a cost estimate (OURO_OPENAI_PRICE_PER_MTOK). sft / dpo: JSONL in "
                                   "TRL's conversational formats, loadable with datasets.load_dataset('json'). "
                                   "Data: everything reviewed, as training would take it (redacted; opt-outs, screened "
                                   "text and items still waiting in /review left out and counted), or with GEN the new data "
                                   "that generation learned from (not its replay sample). ollama: a Modelfile for GEN "
                                   "(FROM its GGUF, its chat template translated, the persona as SYSTEM) for "
                                   "`ollama create`. llama-cpp-python: a config for llama-cpp-python's OpenAI-compatible "
                                   "server (python -m llama_cpp.server --config_file FILE) naming every generation "
                                   "by its id, for engine = openai.")
    p.add_argument("gen", nargs="?", help="generation id, e.g. gen-0003 (required for ollama; for data: the new "
                                          "data it learned from)")
    p.add_argument("--format", required=True, choices=["openai", "sft", "dpo", "ollama", "llama-cpp-python"],
                   help="what to write")
    p.add_argument("--out", type=Path, help="file to write (default: <data-dir>/exports/…)")
    p.add_argument("--since", metavar="GEN", help="only what was reviewed after GEN took its training data")
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="benchmarks that print ratios measured side by side",
                       description="serve: time to first token at turn 20 ÷ turn 2; a chat returning after three "
                                   "others ÷ warm; a reply through the bot and the emulator ÷ the bare model; a reply through the "
                                   "OpenAI-compatible API ÷ the bare model (median latency, 5 prompts); a returning chat's time to "
                                   "first token after a restart (KV states from the data folder) ÷ warm, and cold; with --concurrent N, N "
                                   "API clients at once beside N Telegram chats at once (replies/min, tokens/s, "
                                   "p50/p95 latency). "
                                   "train: training tokens/s of our trainer (packed) ÷ a plain transformers + peft "
                                   "loop (padded) on the same data, model and machine; peak memory of each; stage "
                                   "times. swap: longest pause in replies during a hot-swap ÷ the median reply; "
                                   "memory after 20 swaps ÷ after 1; p95 time to first token while a cycle trains "
                                   "÷ idle. soak: simulated people chat, rate and re-roll at once through the "
                                   "emulator while a real learning cycle runs; every message stored, every one "
                                   "answered or told 'busy', no errors; reply latency, queue wait, peak memory.")
    p.add_argument("what", choices=["serve", "train", "swap", "soak"], help="which benchmark")
    p.add_argument("--turns", type=int, default=20, help="conversation length for the serve benchmark")
    p.add_argument("--shape", choices=["tiny", "1b", "7b"], default=None,
                   help="train: instead of the base model, a random-weight Q4_K_M base of this size, built first "
                        "(Llama 3.2 1B's or Mistral 7B's widths; tiny for a quick look); without a GPU only the "
                        "stages that need none (dequantize, convert) run on it, with their peak memory")
    p.add_argument("--only", action="append", choices=["chat", "api", "bot", "restart", "concurrent"],
                   help="serve: run only this part (repeatable): chat (TTFT ratios), api (a reply through the "
                        "OpenAI-compatible API ÷ the bare model), bot (through the emulator), restart (a returning "
                        "chat's TTFT after a restart ÷ warm, and cold), concurrent (see "
                        "--concurrent-api; 4 clients unless it says otherwise)")
    p.add_argument("--concurrent", type=int, default=None, metavar="N",
                   help="serve: instead of the ratios, N chats talking at once (3 turns each, greedy): replies/min "
                        "and p50/p95 time to first token, decoded together (max_parallel slots) vs one reply at "
                        "a time and vs llama.cpp's own llama-server with as many slots on the same GGUF, in one "
                        "run (`make llama-server` builds it once)")
    p.add_argument("--compare", choices=["serial", "llama-server"], action="append",
                   help="with --concurrent: what the parallel engine is compared with (repeatable; default both)")
    p.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="with --concurrent: K rounds, every side once per round in turn; prints the medians and "
                        "each round's ratio (a shared machine drifts by ±10%% between minutes)")
    p.add_argument("--sampled", action="store_true",
                   help="with --concurrent: every side samples as the bot does by default (temperature, top-p, "
                        "top-k, seed 1234) instead of greedily; the server's replies are still held to the bot's lengths")
    p.add_argument("--server-no-prompt-cache", action="store_true",
                   help="with --concurrent: run llama-server with its prompt cache in RAM off (--cache-ram 0): a "
                        "chat that lost its slot is read again from the start, where by default the server "
                        "restores it from RAM as the bot restores a saved chat")
    p.add_argument("--concurrent-api", type=int, metavar="N",
                   help="serve: also run N clients at once through the OpenAI-compatible API (the openai client, "
                        "a key each) beside N Telegram chats at once (the emulator), 2 prompts each: replies/min, "
                        "tokens/s, p50/p95 reply latency of each side")
    p.add_argument("--users", type=int, default=50, help="simulated people in the soak benchmark")
    p.add_argument("--messages", type=int, default=20, help="messages each person sends in the soak benchmark")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Nothing is ever fetched from a model hub: every model is a local file or built by the tests.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
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
