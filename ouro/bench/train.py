"""`ouro bench train`: our fine-tuning loop against a plain padded loop, side by side in one run.

Same model (the default GGUF, dequantized to float32), same ~60 synthetic chat examples, same
LoRA config, same number of epochs, same machine, same run:

1. ours — `trainer.finetune.train`: packed rows (no padding), LM head only on reply tokens,
   then a short DPO pass, merge (checked) and save; then the GGUF conversion; every stage timed and
   its own peak memory measured (trainer/peak.py), printed with its share of the time.
2. plain — transformers + peft as usually written: one example per row, right-padded to the
   batch's longest, `model(**batch).loss`; as many optimizer steps per epoch as ours.
3. packed-full-logits (with `ablation`) — ours' packed rows through `model(**batch).loss`: separates the gain of
   packing from the gain of skipping the LM head on context tokens.

Each trainer runs in a fresh process, so its peak RSS is its own. Tokens are real tokens
(prompt + reply, padding excluded), identical for every trainer: tokens/s compare directly.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

from config.settings import Settings

N_EXAMPLES = 60
N_PAIRS = 8

PERSONA = "You are Mia: warm, playful, brief. You text like a friend, never like a help desk."
OPENERS = ["hey! 👋", "good morning ☀️", "yo, you around?", "ugh what a day 😩", "guess what happened 😂",
           "hiii", "quick question 🤔", "are you awake?", "I'm bored lol", "ok I need advice"]
TOPICS = ["my cat Pixel knocked over a plant 🪴", "I burned the soup again 🍲", "rain all day here 🌧️",
          "I finally finished that book 📚", "my code works and I don't know why 💻", "coffee or tea? ☕",
          "I want to learn guitar 🎸", "the bus was 40 minutes late 🚌", "pizza tonight? 🍕",
          "I can't sleep 😴", "saw a double rainbow 🌈", "my plants are thriving 🌱"]
REPLIES = ["haha classic {x} 😂 what did you do?", "oh no, not again! 🙈 are you ok?", "love that for you ✨",
           "honestly same. tell me more?", "ok that's iconic 😄", "noooo 😭 how??", "wait really? since when?",
           "I'd go with tea, always 🍵", "big mood. want a distraction?", "yesss, proud of you 🥳"]
CORPORATE = ["As an AI language model, I'd be happy to help you with that.",
             "I'm sorry to hear that. Is there anything else I can assist you with today?",
             "Thank you for sharing! Here are some helpful tips: 1. Stay positive. 2. Seek support."]


def synthetic_examples(n: int = N_EXAMPLES, seed: int = 7) -> list[list[dict]]:
    """Short chats in the persona's voice: 0–2 earlier exchanges, then the reply to learn."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": PERSONA}]
        for _ in range(rng.randint(0, 2)):
            messages.append({"role": "user", "content": f"{rng.choice(OPENERS)} {rng.choice(TOPICS)}"})
            messages.append({"role": "assistant", "content": rng.choice(REPLIES).format(x="move")})
        topic = rng.choice(TOPICS)
        messages.append({"role": "user", "content": f"{rng.choice(OPENERS)} {topic}"})
        messages.append({"role": "assistant", "content": rng.choice(REPLIES).format(x=topic.split()[-1])})
        out.append(messages)
    return out


def synthetic_pairs(n: int = N_PAIRS, seed: int = 11) -> list[tuple]:
    rng = random.Random(seed)
    return [([{"role": "system", "content": PERSONA},
              {"role": "user", "content": f"{rng.choice(OPENERS)} {rng.choice(TOPICS)}"}],
             rng.choice(REPLIES).format(x="that"), rng.choice(CORPORATE)) for _ in range(n)]


# --- children (each in a fresh process) -----------------------------------------------------
def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _child_convert(gguf: str, base_dir: str, precision: str = "float32") -> dict:
    from trainer.convert import dequantize_gguf_to_hf
    from trainer.peak import peak_rss_mb
    from trainer.precision import base_dtype

    t0 = time.perf_counter()
    dequantize_gguf_to_hf(Path(gguf), Path(base_dir), dtype=base_dtype(precision))   # as the cycle does
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def _child_gguf(out_dir: str, parent_gguf: str, target: str, quantization: str) -> dict:
    """The cycle's convert stage on the trained checkpoint: F16 GGUF written tensor by tensor, then quantized."""
    from trainer.convert import quantize_gguf, write_gguf
    from trainer.peak import peak_rss_mb, reset_peak_rss

    reset_peak_rss()
    t0 = time.perf_counter()
    f16 = Path(target).with_suffix(".f16.gguf")
    write_gguf(Path(out_dir), Path(parent_gguf), f16, dtype="f16", name="bench")
    quantize_gguf(f16, Path(target), quantization)
    f16.unlink()
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def _child_build(shape: str, folder: str, progress: bool) -> tuple[str, dict]:
    from ouro.bench.shapes import build_base

    base, steps = build_base(shape, Path(folder), progress=progress)
    return str(base), steps


def _child_ours(base_dir: str, out_dir: str, cfg: dict, examples: list, pairs: list, progress: bool,
                threads: int | None) -> dict:
    from trainer.finetune import TrainConfig, train

    _set_threads(threads)
    result = train(Path(base_dir), examples, pairs, Path(out_dir), TrainConfig(**cfg), progress=progress)
    return asdict(result)


def _child_plain(base_dir: str, cfg: dict, examples: list, batch_examples: int, packed: bool,
                 progress: bool, threads: int | None) -> dict:
    """The comparison loops: the model's own forward + loss (full logits at every position)."""
    import torch
    from tqdm import tqdm

    from engine.template import ChatFormat
    from trainer.dataset import collate_packed, collate_padded, encode_all, pack
    from trainer.finetune import DTYPES, TrainConfig, add_lora, load_base
    from trainer.peak import peak_rss_mb, reset_peak_rss

    _set_threads(threads)
    config = TrainConfig(**cfg)
    t0 = time.perf_counter()
    model, tokenizer = load_base(Path(base_dir), quantize_4bit=config.precision == "nf4",
                                 dtype=DTYPES.get(config.precision, torch.float32))
    model = add_lora(model, config)
    load_s = time.perf_counter() - t0
    encoded, _ = encode_all(examples, tokenizer, ChatFormat.from_tokenizer(tokenizer), config.max_seq_len)
    pad_id = tokenizer.pad_token_id
    if packed:
        items, per_step, collate = pack(encoded, config.max_seq_len), config.batch, collate_packed
    else:
        items, per_step, collate = encoded, batch_examples, collate_padded
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    losses, tokens, computed = [], 0, 0
    model.train()
    reset_peak_rss()
    t0 = time.perf_counter()
    total = math.ceil(len(items) / per_step) * config.epochs
    name = "packed, full logits" if packed else "plain padded"
    with tqdm(total=total, desc=name, unit="step", disable=not progress) as bar:
        for _ in range(config.epochs):
            order = torch.randperm(len(items), generator=generator).tolist()
            for i in range(0, len(order), per_step):
                chunk = [items[j] for j in order[i:i + per_step]]
                batch = collate(chunk, pad_id)
                loss = model(**batch, use_cache=False).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                tokens += sum(len(x) for x in chunk)
                computed += batch["input_ids"].numel()
                bar.update(1)
    seconds = time.perf_counter() - t0
    return {"load_s": round(load_s, 2), "train_s": round(seconds, 2), "steps": len(losses), "tokens": tokens,
            "computed_tokens": computed, "tokens_per_s": round(tokens / seconds, 1),
            "loss_start": losses[0], "loss_end": losses[-1], "train_peak_rss_mb": round(peak_rss_mb(), 1)}


def _in_fresh_process(fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# --- the bench --------------------------------------------------------------------------------
def run_bench_train(settings: Settings | None = None, json_output: bool = False, *, epochs: int = 1,
                    max_seq_len: int = 512, batch: int = 2, ablation: bool = False,
                    threads: int | None = None, shape: str | None = None) -> dict:
    """Run the three trainers (the third only with `ablation`) and return/print their figures.

    `threads`: torch threads in each trainer (default: torch's, i.e. all cores). On a busy
    machine 1 thread is steadier: oversubscribed OpenMP threads slow every op several-fold.
    `shape` (ouro/bench/shapes.py: 1b, 7b): instead of the base model, a random-weight Q4_K_M base of
    that size built first. Without a GPU the trainers do not run on it (a 1B or 7B on CPU cores
    is hours): the stages that need none are measured — dequantize, and convert with the
    dequantized base standing in for the trained child (float32: more than a bf16 child takes).
    """
    from lineage.generations import packaged_base_gguf
    from trainer.precision import gguf_parameters, resolve

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = (settings.base_model if settings and settings.base_model else None) or packaged_base_gguf()
    examples, pairs = synthetic_examples(), synthetic_pairs()
    progress = not json_output
    quantization = settings.quantization if settings else "Q8_0"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ouro-bench-train-") as tmp:
        built = None
        if shape is not None:
            gguf, built = _in_fresh_process(_child_build, shape, str(Path(tmp) / "shape"), progress)
        cfg = {"rank": 16, "alpha": 32.0, "lr": 2e-4, "epochs": epochs, "batch": batch, "max_seq_len": max_seq_len,
               "dpo_steps": 4, "dpo_lr": 5e-5, "seed": 1234,
               "precision": resolve(settings.train_precision if settings else "auto", Path(gguf)).name}
        base_dir, out_dir = Path(tmp) / "base", Path(tmp) / "out"
        model = (Path(gguf).name if shape is None else
                 f"random {shape} ({gguf_parameters(Path(gguf)) / 1e9:.2f}B parameters, {Path(gguf).name})")
        convert = _in_fresh_process(_child_convert, str(gguf), str(base_dir), cfg["precision"])
        if shape is not None and not _has_cuda():          # no GPU: the stages without training
            gguf_out = _in_fresh_process(_child_gguf, str(base_dir), str(gguf), str(Path(tmp) / "child.gguf"),
                                         quantization)
            result = {"model": model, "precision": cfg["precision"], "shape": shape, "trained": False,
                      "build": built, "convert_gguf": convert, "stages": stage_table(convert, None, gguf_out),
                      "wall_s": 0.0}
            return _report(result, started, json_output)
        ours = _in_fresh_process(_child_ours, str(base_dir), str(out_dir), cfg, examples, pairs, progress, threads)
        # the plain loop takes as many optimizer steps per epoch as ours: same examples, same epochs
        batch_examples = math.ceil(len(examples) / math.ceil(ours["rows"] / batch))
        plain = _in_fresh_process(_child_plain, str(base_dir), cfg, examples, batch_examples, False, progress,
                                  threads)
        packed_full = (_in_fresh_process(_child_plain, str(base_dir), cfg, examples, batch_examples, True, progress,
                                         threads) if ablation else None)
        # the base is no longer needed: its disk goes before the child's GGUFs are written (a 7B's
        # base, bf16 child, F16 and Q8_0 GGUFs together would be ~52 GB)
        shutil.rmtree(base_dir)
        gguf_out = _in_fresh_process(_child_gguf, str(out_dir), str(gguf), str(Path(tmp) / "child.gguf"),
                                     quantization)
    result = {
        "model": model,
        "shape": shape, "trained": True, "build": built,
        "examples": len(examples), "epochs": epochs, "max_seq_len": max_seq_len,
        "lora_rank": cfg["rank"], "precision": cfg["precision"], "threads": threads or _threads(),
        "ours": {"tokens_per_s": ours["tokens_per_s"], "steps": ours["steps"], "rows": ours["rows"],
                 "row_fill": ours["row_fill"], "tokens": ours["tokens"], "target_tokens": ours["target_tokens"],
                 "sft_s": ours["stage_s"]["sft"], "sft_peak_rss_mb": ours["stage_peak_rss_mb"]["sft"],
                 "peak_rss_mb": ours["peak_rss_mb"], "loss_start": round(ours["loss_start"], 3),
                 "loss_end": round(ours["loss_end"], 3), "stage_s": ours["stage_s"],
                 "stage_peak_rss_mb": ours["stage_peak_rss_mb"], "dpo_margin_start": ours["dpo_margin_start"],
                 "dpo_margin_end": ours["dpo_margin_end"], "merge_max_abs_diff": ours["merge_max_abs_diff"]},
        "plain": {**plain, "batch_examples": batch_examples},
        "speedup": round(ours["tokens_per_s"] / plain["tokens_per_s"], 2),
        "sft_peak_rss_ratio": round(ours["stage_peak_rss_mb"]["sft"] / plain["train_peak_rss_mb"], 2),
        "convert_gguf": convert,
        "stages": stage_table(convert, ours, gguf_out),
        "wall_s": 0.0,
    }
    if packed_full:
        result["packed_full_logits"] = packed_full
        result["speedup_from_packing"] = round(packed_full["tokens_per_s"] / plain["tokens_per_s"], 2)
        result["speedup_from_reply_only_head"] = round(ours["tokens_per_s"] / packed_full["tokens_per_s"], 2)
    return _report(result, started, json_output)


def _report(result: dict, started: float, json_output: bool) -> dict:
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if json_output:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return result


def stage_table(dequantize: dict, ours: dict | None, convert: dict) -> list[dict]:
    """One row per stage of a cycle's training path, in order: wall time, its share of their sum,
    peak RSS (and GPU memory where CUDA is). Each stage's peak is its own (trainer/peak.py).
    Without `ours` (nothing trained) only dequantize and convert."""
    rows = [{"stage": "dequantize", "seconds": dequantize["seconds"], "peak_rss_mb": dequantize["peak_rss_mb"]}]
    ours = ours or {"stage_s": {}}
    gpu = ours.get("stage_peak_gpu_mb") or {}
    for name, seconds in ours["stage_s"].items():
        rows.append({"stage": name, "seconds": seconds, "peak_rss_mb": ours["stage_peak_rss_mb"][name],
                     **({"peak_gpu_mb": gpu[name]} if name in gpu else {})})
    rows.append({"stage": "convert", "seconds": convert["seconds"], "peak_rss_mb": convert["peak_rss_mb"]})
    total = sum(r["seconds"] for r in rows) or 1.0
    for r in rows:
        r["share"] = round(r["seconds"] / total, 3)
    return rows


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _print(r: dict) -> None:
    if r.get("build"):
        print(f"\nbuilt {r['model']}: " + ", ".join(f"{k} {v['seconds']:.0f} s / {v['peak_rss_mb']:.0f} MB peak RSS"
                                                 for k, v in r["build"].items()))
    if not r["trained"]:
        print(f"no GPU: the trainers do not run on {r['model']}; the stages that need none "
              "(convert: the dequantized float32 base standing in for the child):")
        _print_stages(r["stages"])
        print(f"wall {r['wall_s']} s")
        return
    ours, plain = r["ours"], r["plain"]
    print(f"\nLoRA r={r['lora_rank']} on {r['model']} ({r['precision']}, {r['threads']} threads), "
          f"{r['examples']} examples × {r['epochs']} epoch(s), max_seq_len {r['max_seq_len']}")
    print(f"{'trainer':<26}{'tokens/s':>10}{'steps':>7}{'train s':>9}{'peak RSS MB':>13}{'loss':>16}")
    print(f"{'ours (packed, reply head)':<26}{ours['tokens_per_s']:>10}{ours['steps']:>7}{ours['sft_s']:>9}"
          f"{ours['sft_peak_rss_mb']:>13}{ours['loss_start']:>8.3f}→{ours['loss_end']:.3f}")
    rows = [("plain (padded)", plain)]
    if "packed_full_logits" in r:
        rows.append(("packed, full logits", r["packed_full_logits"]))
    for name, x in rows:
        print(f"{name:<26}{x['tokens_per_s']:>10}{x['steps']:>7}{x['train_s']:>9}{x['train_peak_rss_mb']:>13}"
              f"{x['loss_start']:>8.3f}→{x['loss_end']:.3f}")
    print(f"speed-up ours ÷ plain: {r['speedup']}×", end="")
    if "speedup_from_packing" in r:
        print(f"  (packing {r['speedup_from_packing']}×, reply-only LM head {r['speedup_from_reply_only_head']}×)",
              end="")
    print()
    _print_stages(r["stages"])
    print(f"DPO margin {ours['dpo_margin_start']:.2f} → {ours['dpo_margin_end']:.2f}; "
          f"merge max |Δlogit| {ours['merge_max_abs_diff']:.2e}; wall {r['wall_s']} s")


def _print_stages(stages: list[dict]) -> None:
    print(f"{'stage':<12}{'seconds':>9}{'share':>8}{'peak RSS MB':>13}{'peak GPU MB':>13}")
    for row in stages:
        print(f"{row['stage']:<12}{row['seconds']:>9.1f}{row['share']:>8.0%}{row['peak_rss_mb']:>13.0f}"
              f"{row.get('peak_gpu_mb', '—'):>13}")
