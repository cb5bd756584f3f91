"""`ouro base scratch`: a small Llama trained from nothing on the owner's imported corpus, as generation 0.

Why: a lineage should be able to start without a downloaded base — from what the owner imported
(chat histories, character cards, documents) alone. Honestly small: on two CPU cores a few million
parameters for a quarter of an hour, a model that picks up the corpus's words and the chat format,
not one that reasons. Bigger sizes are for bigger machines (`SIZES`).

    corpus     imported chat windows rendered with ChatML (the persona as system turn, as serving
               sends it) and document chunks as plain text, each text ended by <|endoftext|>.
               Held out: the windows the importer held out, and the newest tenth of the chunks.
    tokenizer  byte-level BPE on the training texts (trainer/bpe.py), ChatML's special tokens.
    train      LlamaForCausalLM from a config; AdamW, linear warm-up then cosine to a tenth,
               gradient clipping; each step a batch of random seq_len windows of the training
               stream; held-out loss every eval_every steps; the best weights kept.
    checkpoint every checkpoint_every steps: weights, optimizer, schedule, step, RNG states, curve,
               in <data_dir>/scratch/<size>/; a rerun after a kill continues from it (same result
               as an uninterrupted run), unless the corpus or the size changed.
    export     the best weights as GGUF F32 and F16 (trainer/convert.py) and Q8_0 (llama.cpp's own
               quantizer; the served file), checked: architecture and template, and transformers vs
               llama.cpp logits on a rendered chat.
    register   generation 0 of a new lineage, a loss chart beside it, an Ollama Modelfile in exports/.
               A data folder that already has a lineage is refused unless `replace_lineage`: then the
               old models folder is renamed aside (nothing deleted) and its rows retired in one event.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from config.settings import Settings
from core.errors import OuroError
from core.files import atomic_write_text, ensure_private_dir
from engine.template import CHATML, render_chat
from lineage.generations import GEN_ZERO, GGUF_NAME, Lineage
from memory.store import Store
from trainer.bpe import END_OF_TEXT, gguf_metadata, load_tokenizer, save_hf_tokenizer, train_tokenizer
from trainer.lock import CycleLock

CHECKPOINT = "checkpoint.pt"
HELDOUT_DOC_SHARE = 0.1
MIN_LR_RATIO = 0.1
CHART = "scratch-loss.png"


@dataclass(frozen=True)
class ScratchSize:
    """One model size and its training budget. Widths are multiples of 32 (Q8_0's block)."""

    name: str
    vocab: int            # BPE vocabulary, at most (a small corpus may give fewer merges)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int              # SwiGLU width
    seq_len: int          # tokens per training window, and the model's context length
    batch: int            # windows per step
    steps: int
    lr: float
    warmup: int           # steps of linear warm-up
    eval_every: int
    checkpoint_every: int
    eval_rows: int = 16   # held-out windows each evaluation reads, at most
    seed: int = 1234
    about: str = ""


SIZES: dict[str, ScratchSize] = {s.name: s for s in (
    ScratchSize("tiny", vocab=384, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, seq_len=64, batch=8,
                steps=60, lr=3e-3, warmup=6, eval_every=10, checkpoint_every=20, eval_rows=8,
                about="~0.1M parameters; seconds: for tests"),
    ScratchSize("small", vocab=4096, hidden=192, layers=6, heads=6, kv_heads=2, ffn=512, seq_len=256, batch=8,
                steps=400, lr=2e-3, warmup=20, eval_every=25, checkpoint_every=50,
                about="~3M parameters; about 15 minutes on 2 shared CPU cores"),
    ScratchSize("medium", vocab=8192, hidden=512, layers=8, heads=8, kv_heads=4, ffn=1408, seq_len=512, batch=32,
                steps=3000, lr=8e-4, warmup=150, eval_every=200, checkpoint_every=200,
                about="~28M parameters; for a GPU or many cores (not measured here)"),
    ScratchSize("large", vocab=16384, hidden=768, layers=12, heads=12, kv_heads=4, ffn=2048, seq_len=1024,
                batch=32, steps=10000, lr=5e-4, warmup=500, eval_every=500, checkpoint_every=500,
                about="~90M parameters; for a GPU (not measured here)"),
)}


# --- corpus -----------------------------------------------------------------------------------

@dataclass
class Corpus:
    train: list[str]
    heldout: list[str]
    windows: int
    chunks: int

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for part, texts in (("train", self.train), ("heldout", self.heldout)):
            h.update(part.encode())
            for t in texts:
                h.update(hashlib.sha256(t.encode("utf-8")).digest())
        return h.hexdigest()


def load_corpus(store: Store, persona: str) -> Corpus:
    """What the store holds from imports, as training and held-out texts (see the module docstring)."""
    train, heldout = [], []
    windows = store.imported_examples(since=None, until=None)
    for ex in windows:
        messages = ([{"role": "system", "content": persona}] if persona else []) + ex["messages"]
        (heldout if ex["split"] == "heldout" else train).append(render_chat(CHATML, messages, False))
    chunks = [c["text"] for c in store.document_chunks()]
    n_held = math.ceil(len(chunks) * HELDOUT_DOC_SHARE) if len(chunks) >= 2 else 0
    train += chunks[:len(chunks) - n_held]
    heldout += chunks[len(chunks) - n_held:]
    if not windows and not chunks:
        raise OuroError("there is nothing to train on: no imported chats or documents in this data folder",
                        hint="import something first: `ouro import docs PATH` (your writing), `ouro import "
                             "telegram|whatsapp|chatgpt|messenger|discord PATH`, or `ouro import card PATH`")
    if not train or not heldout:
        raise OuroError(f"too little to train on: {len(windows)} chat windows and {len(chunks)} document chunks "
                        "leave nothing to hold out for evaluation",
                        hint="import more: at least two document chunks, or a chat long enough to hold out a window")
    return Corpus(train, heldout, len(windows), len(chunks))


def _stream(tokenizer: Any, texts: list[str]):
    import torch

    eot = tokenizer.token_to_id(END_OF_TEXT)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids += enc.ids
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


# --- the model and its training ---------------------------------------------------------------

def model_config(size: ScratchSize, vocab_size: int):
    from transformers import LlamaConfig

    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}   # trainer.bpe.SPECIALS order
    return LlamaConfig(vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.ffn,
                       num_hidden_layers=size.layers, num_attention_heads=size.heads,
                       num_key_value_heads=size.kv_heads, max_position_embeddings=size.seq_len,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, **ids)


def lr_factor(step: int, size: ScratchSize) -> float:
    """Linear warm-up to the peak, then cosine down to MIN_LR_RATIO of it at the last step."""
    if step < size.warmup:
        return (step + 1) / size.warmup
    progress = (step - size.warmup) / max(1, size.steps - size.warmup)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _heldout_rows(stream, seq_len: int, rows: int) -> list:
    n = min(rows, max(1, (len(stream) - 1) // seq_len))
    return [stream[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)]


def heldout_loss(model, rows: list) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        losses = [float(model(input_ids=r[None], labels=r[None]).loss) for r in rows]
    model.train()
    return sum(losses) / len(losses)


@dataclass
class TrainResult:
    steps: int
    resumed_from: int | None
    seconds: float               # training time across every run that made this model
    tokens_per_s: float          # of this run
    curve: list[dict]            # {step, heldout_loss, train_loss}
    best_step: int
    best_loss: float
    params: int


def train(size: ScratchSize, work: Path, corpus: Corpus, *, progress: bool = True,
          on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train (or continue training) the model in `work`; the best weights end in work/best."""
    import torch
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    tokenizer_path = work / "tokenizer.json"
    if tokenizer_path.exists():
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        tokenizer = train_tokenizer(corpus.train, size.vocab)
        tokenizer.save(str(tokenizer_path))
    train_ids, held_ids = _stream(tokenizer, corpus.train), _stream(tokenizer, corpus.heldout)
    seq_len = min(size.seq_len, len(train_ids) - 1)
    if seq_len < 8:
        raise OuroError(f"the training text is only {len(train_ids)} tokens long", hint="import more text")
    rows = _heldout_rows(held_ids, seq_len, size.eval_rows)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # the CPU path is the one measured
    rows = [r.to(device) for r in rows]
    torch.manual_seed(size.seed)
    model = LlamaForCausalLM(model_config(size, tokenizer.get_vocab_size())).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=size.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, size))
    sampler = torch.Generator().manual_seed(size.seed)
    state = {"step": 0, "curve": [], "best_step": -1, "best_loss": math.inf, "seconds": 0.0}

    checkpoint, best_dir = work / CHECKPOINT, work / "best"
    resumed_from = None
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True, map_location="cpu")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        sampler.set_state(saved["sampler"])
        torch.set_rng_state(saved["torch_rng"])
        state = json.loads(saved["state"])
        resumed_from = state["step"]
    if (best_dir / "best.json").exists():   # newer than the checkpoint if a kill fell between the two saves
        best = json.loads((best_dir / "best.json").read_text(encoding="utf-8"))
        state["best_step"], state["best_loss"] = best["step"], best["loss"]

    def evaluate(step: int, train_loss: float | None) -> None:
        loss = heldout_loss(model, rows)
        state["curve"].append({"step": step, "heldout_loss": round(loss, 4),
                               "train_loss": None if train_loss is None else round(train_loss, 4)})
        if loss < state["best_loss"]:
            state["best_step"], state["best_loss"] = step, loss
            tmp = work / "best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            atomic_write_text(tmp / "best.json", json.dumps({"step": step, "loss": loss}))
            shutil.rmtree(best_dir, ignore_errors=True)
            os.replace(tmp, best_dir)

    def save_checkpoint() -> None:
        tmp = work / f".{CHECKPOINT}.tmp"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "sampler": sampler.get_state(),
                    "torch_rng": torch.get_rng_state(), "state": json.dumps(state)}, tmp)
        os.replace(tmp, checkpoint)

    if state["step"] == 0 and not state["curve"]:
        evaluate(0, None)
    model.train()
    started, start_step, earlier_seconds, recent = time.monotonic(), state["step"], state["seconds"], []
    bar = tqdm(total=size.steps, initial=state["step"], desc=f"scratch {size.name}", unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        while state["step"] < size.steps:
            offsets = torch.randint(0, len(train_ids) - seq_len, (size.batch,), generator=sampler)
            batch = torch.stack([train_ids[o:o + seq_len + 1] for o in offsets.tolist()]).to(device)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            state["step"] += 1
            step = state["step"]
            recent = (recent + [loss.item()])[-size.eval_every:]
            state["seconds"] = earlier_seconds + time.monotonic() - started
            if step % size.eval_every == 0 or step == size.steps:
                evaluate(step, sum(recent) / len(recent))
                bar.set_postfix(heldout=f"{state['curve'][-1]['heldout_loss']:.3f}")
            if step % size.checkpoint_every == 0 or step == size.steps:
                save_checkpoint()
            bar.update(1)
            if on_step is not None:
                on_step(step, size.steps)
    finally:
        bar.close()
    ran = time.monotonic() - started
    done = state["step"] - start_step
    return TrainResult(steps=state["step"], resumed_from=resumed_from, seconds=round(state["seconds"], 1),
                       tokens_per_s=round(done * size.batch * seq_len / ran, 1) if ran > 0 and done else 0.0,
                       curve=state["curve"], best_step=state["best_step"], best_loss=round(state["best_loss"], 4),
                       params=sum(p.numel() for p in model.parameters()))


# --- export and registration ------------------------------------------------------------------

def export(work: Path, staging: Path, *, name: str, seq_len: int) -> dict:
    """work/best → staging/hf (weights + tokenizer), model-f32.gguf, model-f16.gguf and model.gguf (Q8_0),
    then the checks: what generation 0 needs (engine.gguf.check_base_model) and logit agreement."""
    from engine.gguf import check_base_model
    from trainer.convert import logit_agreement, quantize_gguf, write_gguf_with_metadata

    tokenizer = load_tokenizer(work / "tokenizer.json")
    shutil.copytree(work / "best", staging / "hf", ignore=shutil.ignore_patterns("best.json"))
    save_hf_tokenizer(tokenizer, staging / "hf", max_length=seq_len)
    metadata = gguf_metadata(tokenizer, name=name)
    write_gguf_with_metadata(staging / "hf", staging / "model-f32.gguf", metadata, dtype="f32")
    write_gguf_with_metadata(staging / "hf", staging / "model-f16.gguf", metadata, dtype="f16")
    quantize_gguf(staging / "model-f16.gguf", staging / GGUF_NAME, "Q8_0")
    check_base_model(staging / GGUF_NAME)
    probe = render_chat(CHATML, [{"role": "user", "content": "Hello! How was your day?"}], True)
    agreement = logit_agreement(staging / "hf", staging / "model-f32.gguf", tokenizer.encode(probe).ids)
    if agreement.correlation < 0.999:
        raise OuroError(f"the F32 GGUF computes something else than the trained weights (logit correlation "
                        f"{agreement.correlation:.5f}); nothing was registered")
    return {"files": {f: (staging / f).stat().st_size for f in ("model-f32.gguf", "model-f16.gguf", GGUF_NAME)},
            "logit_correlation": round(agreement.correlation, 6), "same_argmax": agreement.same_argmax}


def loss_chart(curve: list[dict], out: Path, *, title: str) -> Path:
    """The held-out (and training) loss against steps, as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot([c["step"] for c in curve], [c["heldout_loss"] for c in curve], "o-", ms=3, label="held-out")
    trained = [c for c in curve if c["train_loss"] is not None]
    ax.plot([c["step"] for c in trained], [c["train_loss"] for c in trained], "--", color="gray",
            label="training (mean since last eval)")
    best = min(curve, key=lambda c: c["heldout_loss"])
    ax.annotate(f"best {best['heldout_loss']:.2f} @ {best['step']}", (best["step"], best["heldout_loss"]),
                textcoords="offset points", xytext=(-60, 18), fontsize=8, arrowprops={"arrowstyle": "->"})
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _existing_lineage(lineage: Lineage, store: Store) -> str | None:
    if lineage.exists() or store.generation(GEN_ZERO) is not None:
        gens = [g.id for g in lineage.generations()]
        return (f"{len(gens)} generation(s), active {lineage.active_id() or 'none'}" if gens
                else "generation records in its database")
    return None


def build_base(settings: Settings, store: Store, *, size: str | ScratchSize = "small", replace_lineage: bool = False,
               restart: bool = False, progress: bool = True, actor: str = "cli",
               on_step: Callable[[int, int], None] | None = None) -> dict:
    """Train a model from scratch on the store's imports and register it as generation 0; the report.

    Refused before anything is written: an unknown size, an empty corpus, a data folder that already
    has a lineage (unless `replace_lineage`). `restart` discards an unfinished run's checkpoint;
    otherwise a run of the same size on the same corpus continues from it. `on_step(step, total)` is
    called after every optimizer step (a progress hook; raising in it stops training, checkpoint kept).
    """
    if isinstance(size, str):
        if size not in SIZES:
            raise OuroError(f"unknown size {size!r}", hint=f"one of {', '.join(SIZES)}")
        size = SIZES[size]
    lineage = Lineage(settings.models_dir)
    existing = _existing_lineage(lineage, store)
    if existing and not replace_lineage:
        raise OuroError(f"{settings.data_dir} already has a lineage ({existing}); a base trained from scratch "
                        "would start a new one", hint="pass --replace-lineage to set the old one aside in "
                        f"{settings.models_dir.name}-replaced-<time>/ (nothing is deleted), or use another --data-dir")
    corpus = load_corpus(store, settings.persona())

    work = settings.data_dir / "scratch" / size.name
    fingerprint = hashlib.sha256(json.dumps([asdict(replace(size, about="")), corpus.fingerprint()]).encode()).hexdigest()
    stamp = work / "corpus.sha256"
    if restart:
        shutil.rmtree(work, ignore_errors=True)
    if stamp.exists() and stamp.read_text(encoding="utf-8").strip() != fingerprint:
        raise OuroError(f"an unfinished {size.name} run in {work} was trained on another corpus (or size); "
                        "it cannot continue on this one", hint="pass --restart to discard it and start over")
    ensure_private_dir(work)
    atomic_write_text(stamp, fingerprint + "\n")

    result = train(size, work, corpus, progress=progress, on_step=on_step)
    staging = work / "gen-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    name = f"ouroboros scratch-{size.name} {GEN_ZERO}"
    exported = export(work, staging, name=name, seq_len=size.seq_len)
    curve_title = f"ouro base scratch --size {size.name}: {result.params / 1e6:.2f}M parameters"
    loss_chart(result.curve, staging / CHART, title=curve_title)
    report = {"size": size.name, "about": size.about, "params": result.params,
              "vocab": load_tokenizer(work / "tokenizer.json").get_vocab_size(),
              "corpus": {"chat_windows": corpus.windows, "document_chunks": corpus.chunks,
                         "train_texts": len(corpus.train), "heldout_texts": len(corpus.heldout)},
              "steps": result.steps, "resumed_from": result.resumed_from, "train_seconds": result.seconds,
              "tokens_per_s": result.tokens_per_s, "loss_start": result.curve[0]["heldout_loss"],
              "best_step": result.best_step, "best_loss": result.best_loss, "curve": result.curve, **exported}
    atomic_write_text(staging / "scratch.json", json.dumps(report, indent=2))

    moved = None
    if existing and settings.models_dir.exists():
        with CycleLock(settings.models_dir / ".cycle.lock"):   # never move a lineage a cycle is writing to
            moved = lineage.set_aside()
    if existing:
        store.retire_generations(moved_to=str(moved or ""))
    gen = lineage.add_base(staging, {"source": f"ouro base scratch --size {size.name}", "scratch": {
        k: report[k] for k in ("size", "params", "vocab", "steps", "best_step", "best_loss", "train_seconds")}},
        {"steps": result.steps, "lr": size.lr, "walltime_min": round(result.seconds / 60, 2),
         "loss_start": report["loss_start"], "loss_end": result.best_loss, "actor": actor,
         "reason": f"trained from scratch ({size.name}, {result.params / 1e6:.2f}M parameters)"})
    store.upsert_generation(gen_id=gen.id, parent_id=None, gguf_path=str(gen.gguf), gguf_sha256=gen.sha256,
                            status="base", meta=gen.meta)
    from lineage.ollama import write_modelfile

    exports = settings.data_dir / "exports"
    ensure_private_dir(exports)
    modelfile = write_modelfile(settings, gen, exports / f"{gen.id}.Modelfile")
    shutil.rmtree(work, ignore_errors=True)   # finished: the generation holds everything worth keeping
    with contextlib.suppress(OSError):
        work.parent.rmdir()                   # scratch/, unless another size's run is unfinished there
    return {**report, "generation": gen.id, "folder": str(gen.folder), "chart": str(gen.folder / CHART),
            "modelfile": modelfile["path"], "ollama_create": modelfile["create"],
            "old_lineage": None if moved is None else str(moved)}


def format_report(report: dict) -> str:
    lines = [f"{report['generation']}: a {report['size']} model trained from scratch "
             f"({report['params'] / 1e6:.2f}M parameters, vocabulary {report['vocab']})",
             f"  corpus: {report['corpus']['chat_windows']} chat windows, {report['corpus']['document_chunks']} "
             f"document chunks ({report['corpus']['heldout_texts']} texts held out)",
             f"  {report['steps']} steps in {report['train_seconds'] / 60:.1f} min"
             + (f" (continued from step {report['resumed_from']})" if report["resumed_from"] is not None else "")
             + f"; held-out loss {report['loss_start']:.3f} -> best {report['best_loss']:.3f} at step "
             f"{report['best_step']}",
             "  files: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in report["files"].items())
             + f" (model.gguf is Q8_0, served); logit correlation HF vs llama.cpp {report['logit_correlation']}",
             f"  loss chart: {report['chart']}",
             f"  Ollama: {report['ollama_create']}"]
    if report["old_lineage"]:
        lines.append(f"  the previous lineage was moved to {report['old_lineage']}")
    return "\n".join(lines)
