"""Reviewed turns as files other tools train on: OpenAI chat fine-tuning JSONL, TRL SFT and DPO JSONL.

The rows come from `memory.export` (redacted, deduplicated, opt-outs left out), so an export
never holds more than the project itself would train on. Three shapes:

- `openai`: one `{"messages": [...]}` per line, roles system / user / assistant, the format of
  OpenAI's chat fine-tuning. The earlier assistant messages of an example are the context the
  reply was served with, not reviewed replies, so they carry `"weight": 0` (OpenAI's switch for
  "do not train on this message"); only the last one is learned, as in our own trainer.
- `sft`: TRL's conversational prompt-completion format, `{"prompt": [...], "completion": [assistant]}`.
  SFTTrainer learns only the completion of such rows (its default), so only the reviewed reply is
  a target, as in our own trainer; a `{"messages": [...]}` row would teach every earlier reply too
  (the served context, replies an admin rejected included).
- `dpo`: TRL's conversational preference format, `{"prompt": [...], "chosen": [assistant],
  "rejected": [assistant]}`.
All three load with `datasets.load_dataset("json", data_files=...)` as they are.

The OpenAI report counts tokens with tiktoken's `o200k_base`, the encoding of the models OpenAI
fine-tunes today (gpt-4o, gpt-4o-mini, gpt-4.1 family). tiktoken normally downloads that file on
first use; we ship it instead (`memory/vocab/o200k_base.tiktoken.xz`, 1.1 MB, byte-identical to
OpenAI's file: its SHA-256 is checked against the hash tiktoken itself expects), so exports work
offline. Counting follows OpenAI's cookbook ("Chat fine-tuning data prep"): 3 tokens per message
plus its role and content, plus 3; the cost estimate uses the cookbook's default epochs rule.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import lzma
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from core.errors import OuroError
from memory.export import Delta

DATASET_FORMATS = ("openai", "sft", "dpo")

VOCAB_FILE = Path(__file__).resolve().parent / "vocab" / "o200k_base.tiktoken.xz"
# what tiktoken_ext.openai_public.o200k_base() passes as expected_hash for the same file
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# tiktoken_ext.openai_public.o200k_base(): the pre-tokenizer pattern and special tokens
_O200K_PAT = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
_O200K_SPECIAL = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}

# OpenAI cookbook, "Chat fine-tuning data prep": per-message overhead and the default epochs rule
TOKENS_PER_MESSAGE, REPLY_PRIMING = 3, 3
TARGET_EPOCHS, MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES, MIN_EPOCHS, MAX_EPOCHS = 3, 100, 25_000, 1, 25
OPENAI_MIN_EXAMPLES = 10   # OpenAI refuses a fine-tuning job with fewer


@functools.lru_cache(maxsize=1)
def openai_encoding():
    """tiktoken's o200k_base, built from the shipped vocabulary: no network, ever (~1 s, once)."""
    import tiktoken

    try:
        raw = lzma.decompress(VOCAB_FILE.read_bytes())
    except (OSError, lzma.LZMAError) as exc:
        raise OuroError(f"cannot read the token vocabulary {VOCAB_FILE}: {exc}",
                        hint="reinstall Ouroboros; the file ships with it") from exc
    if hashlib.sha256(raw).hexdigest() != O200K_SHA256:
        raise OuroError(f"{VOCAB_FILE} is not OpenAI's o200k_base vocabulary (checksum mismatch)",
                        hint="reinstall Ouroboros; the file ships with it")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in raw.splitlines() if line)}
    return tiktoken.Encoding(name="o200k_base", pat_str=_O200K_PAT, mergeable_ranks=ranks,
                             special_tokens=_O200K_SPECIAL)


def count_tokens(messages: list[dict], encoding=None) -> int:
    """Tokens of one chat example as OpenAI's cookbook counts them (special-token text counts as text)."""
    enc = encoding or openai_encoding()
    return REPLY_PRIMING + sum(TOKENS_PER_MESSAGE + len(enc.encode_ordinary(m["role"]))
                               + len(enc.encode_ordinary(m["content"])) for m in messages)


def default_epochs(n_examples: int) -> int:
    """The epochs OpenAI picks by default for a data set of this size (the cookbook's rule)."""
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


# --- rows ------------------------------------------------------------------------------------

def _plain(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def openai_rows(delta: Delta) -> list[dict]:
    rows = []
    for ex in delta.examples:
        messages = _plain(ex.messages)
        for m in messages[:-1]:
            if m["role"] == "assistant":
                m["weight"] = 0   # served context, not a reviewed reply: do not train on it
        rows.append({"messages": messages})
    return rows


def sft_rows(delta: Delta) -> list[dict]:
    return [{"prompt": _plain(ex.messages[:-1]), "completion": _plain(ex.messages[-1:])} for ex in delta.examples]


def dpo_rows(delta: Delta) -> list[dict]:
    return [{"prompt": _plain(p.prompt), "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in delta.pairs]


def write_jsonl_private(path: Path, rows: Iterable[dict]) -> None:
    """Write rows atomically, readable by the owner only (they are people's chats, even redacted)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OuroError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- the OpenAI report -------------------------------------------------------------------------

def openai_report(rows: list[dict], *, price_per_mtok: float, max_tokens_per_example: int) -> dict:
    """Examples, tokens per example and in total, the ones over OpenAI's limit, and the training cost."""
    enc = openai_encoding()
    per_example = [count_tokens(r["messages"], enc) for r in rows]
    over = [i + 1 for i, n in enumerate(per_example) if n > max_tokens_per_example]
    billed = sum(min(n, max_tokens_per_example) for n in per_example)   # OpenAI truncates longer ones
    epochs = default_epochs(len(rows))
    warnings = []
    if len(rows) < OPENAI_MIN_EXAMPLES:
        warnings.append(f"OpenAI needs at least {OPENAI_MIN_EXAMPLES} examples to start a fine-tuning job")
    if over:
        warnings.append(f"{len(over)} example(s) exceed {max_tokens_per_example} tokens; OpenAI truncates them, "
                        "which may cut off the reply being taught")
    return {
        "encoding": enc.name,
        "tokens_total": sum(per_example),
        "tokens_per_example": per_example,
        "tokens_min": min(per_example),
        "tokens_max": max(per_example),
        "tokens_mean": round(sum(per_example) / len(per_example), 1),
        "max_tokens_per_example": max_tokens_per_example,
        "over_limit": len(over),
        "over_limit_lines": over,
        "billed_tokens_per_epoch": billed,
        "epochs": epochs,
        "price_per_mtok_usd": price_per_mtok,
        "estimated_cost_usd": round(billed * epochs * price_per_mtok / 1_000_000, 4),
        "warnings": warnings,
    }


def write_dataset(delta: Delta, fmt: str, out: Path, *, price_per_mtok: float = 0.0,
                  max_tokens_per_example: int = 65536) -> dict:
    """Write `delta` as `fmt` to `out`; return the report (for `openai`, with the token figures)."""
    if fmt not in DATASET_FORMATS:
        raise OuroError(f"unknown dataset format {fmt!r}", hint=f"one of {', '.join(DATASET_FORMATS)}")
    rows = {"openai": openai_rows, "sft": sft_rows, "dpo": dpo_rows}[fmt](delta)
    if not rows:
        what = "preference pairs (a ✏️ correction or a 🔁 pick makes one)" if fmt == "dpo" else "reviewed examples"
        raise OuroError(f"nothing to export: no {what} in the chosen range",
                        hint="people rate replies with 👍 / ✏️ / 🔁 in the chat; then export again")
    report: dict = {"format": fmt, "path": str(Path(out).resolve()), "rows": len(rows),
                    "examples": len(delta.examples), "pairs": len(delta.pairs)}
    if fmt == "openai":
        report.update(openai_report(rows, price_per_mtok=price_per_mtok,
                                    max_tokens_per_example=max_tokens_per_example))
    write_jsonl_private(Path(out), rows)
    return report
