"""The training stage on a tiny Llama with the real SmolLM2 tokenizer (from the packaged GGUF).

Covers: reply-only labels rendered exactly as serving renders, packing (whole examples, rows
filled, attention isolated per example), LoRA training that changes the adapter and lowers
the loss, a merge that leaves logits unchanged, a DPO pass that widens the chosen-over-
rejected margin, and config validation.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from core.errors import OuroError
from engine.template import ChatFormat
from lineage.generations import packaged_base_gguf
from trainer.dataset import (
    IGNORE_INDEX,
    DPOPair,
    Encoded,
    collate_packed,
    encode_all,
    encode_pairs,
    encode_sft,
    merge_conversations,
    pack,
    tokenize,
)
from trainer.finetune import (
    TrainConfig,
    TrainConfigError,
    accumulate_step,
    add_lora,
    dataset_loss,
    groups,
    load_base,
    lr_factor,
    max_logit_diff,
    merge_checked,
    plan_run,
    preference_margin,
    reply_loss,
    rows_for,
    sft_train,
    train,
)

PERSONA = "You are Mia 🌸: warm, playful, brief."
CHATS = [
    [{"role": "system", "content": PERSONA},
     {"role": "user", "content": "hey!! 😂 how's it going? 👍🏽"},
     {"role": "assistant", "content": "good! just made tea 🍵 you?"},
     {"role": "user", "content": "café naïve — 日本語 test 🧪"},
     {"role": "assistant", "content": "ooh fancy 😄 what are you testing?"}],
    [{"role": "user", "content": "no persona here, just hi 👋"},
     {"role": "assistant", "content": "hi hi! 🙌"}],
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The SmolLM2 tokenizer, read once from the packaged GGUF and saved (reloads in ~0.3 s)."""
    from transformers import AutoTokenizer

    gguf = packaged_base_gguf()
    folder = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def fmt(tokenizer):
    return ChatFormat.from_tokenizer(tokenizer)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer):
    """A 2-layer Llama (hidden 64, 4 heads / 2 KV heads) with SmolLM2's vocabulary, saved as a checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-base")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def persona_chats(n: int, seed: int = 3) -> list[list[dict]]:
    rng = random.Random(seed)
    topics = ["tea 🍵", "rain 🌧️", "cats 🐈", "pizza 🍕", "guitar 🎸", "books 📚"]
    out = []
    for i in range(n):
        topic = rng.choice(topics)
        out.append([{"role": "system", "content": PERSONA},
                    {"role": "user", "content": f"what do you think about {topic}? #{i}"},
                    {"role": "assistant", "content": f"{topic} is the best, obviously 😄"}])
    return out


# --- (1) labels and the serving template ---------------------------------------------------
def test_labels_cover_only_the_reply_and_its_end_token(tokenizer, fmt):
    for chat in CHATS:
        enc = encode_sft(chat, tokenizer, fmt, max_seq_len=512)
        n_prompt = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
        assert all(label == IGNORE_INDEX for label in enc.labels[:n_prompt])
        assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
        assert tokenizer.decode(enc.input_ids[n_prompt:]) == chat[-1]["content"] + "<|im_end|>"
        # the prompt is the serving render (generation prompt included), and ids match a one-piece tokenization
        prompt = fmt.render(chat[:-1], add_generation_prompt=True)
        assert tokenizer.decode(enc.input_ids[:n_prompt]) == prompt
        assert enc.input_ids[:n_prompt] == tokenize(tokenizer, fmt, prompt)
        assert enc.input_ids == tokenize(tokenizer, fmt, prompt + chat[-1]["content"] + "<|im_end|>")
    with pytest.raises(OuroError, match="end with the assistant"):
        encode_sft(CHATS[0][:-1], tokenizer, fmt, max_seq_len=512)


@pytest.mark.model
def test_template_and_ids_match_llama_cpp_serving(tokenizer, fmt):
    from engine.llama import LlamaEngine

    gguf = packaged_base_gguf()
    assert ChatFormat.from_gguf(gguf) == fmt
    engine = LlamaEngine(gguf, generation_id="x")
    try:
        for chat in CHATS:
            prompt = chat[:-1]
            assert fmt.render(prompt, add_generation_prompt=True) == engine.render(prompt)
            enc = encode_sft(chat, tokenizer, fmt, max_seq_len=512)
            served = engine.tokenize(prompt)
            assert enc.input_ids[:len(served)] == served
            assert enc.labels[len(served) - 1] == IGNORE_INDEX and enc.labels[len(served)] != IGNORE_INDEX
    finally:
        engine.close()


def test_too_long_example_drops_its_oldest_exchanges(tokenizer, fmt):
    chat = [CHATS[0][0]]
    for i in range(6):
        chat += [{"role": "user", "content": f"message {i} " + "blah " * 10},
                 {"role": "assistant", "content": f"reply {i} " + "ok " * 10}]
    full = encode_sft(chat, tokenizer, fmt, max_seq_len=4096)
    short = encode_sft(chat, tokenizer, fmt, max_seq_len=len(full) - 10)
    assert not full.trimmed and short.trimmed and len(short) <= len(full) - 10
    assert tokenizer.decode(short.input_ids).startswith("<|im_start|>system\n" + PERSONA)
    assert short.labels[-short.n_target:] == full.labels[-full.n_target:]
    assert encode_sft(chat, tokenizer, fmt, max_seq_len=full.n_target) is None


def corrected_chat(turns: int = 4) -> list[dict]:
    chat = [{"role": "system", "content": PERSONA}]
    for i in range(turns):
        chat += [{"role": "user", "content": f"question {i} about tea 🍵?"},
                 {"role": "assistant", "content": f"Ahoy! answer {i}, with tea 🍵"}]
    return chat


def test_a_chats_reviewed_turns_are_read_once_each_in_its_own_context(tokenizer, fmt, tiny_base):
    chat = corrected_chat(4)
    examples = [chat[: 2 * k + 1] for k in (1, 2, 3, 4)] + [chat[:5]]           # every turn reviewed, one twice
    chats = merge_conversations(examples)
    assert len(chats) == 1 and chats[0].targets == [2, 4, 6, 8]
    merged, dropped = encode_all(examples, tokenizer, fmt, max_seq_len=1024)
    assert dropped == 0 and len(merged) == 1
    whole = fmt.render(chat, add_generation_prompt=False)
    whole = whole[: whole.rindex("<|im_end|>") + len("<|im_end|>")]
    assert merged[0].input_ids == tokenize(tokenizer, fmt, whole)            # as serving tokenizes the whole chat
    separate = [encode_sft(chat[: 2 * k + 1], tokenizer, fmt, 1024) for k in (1, 2, 3, 4)]
    targets = [t for e in separate for t in e.labels if t != IGNORE_INDEX]
    assert [t for t in merged[0].labels if t != IGNORE_INDEX] == targets
    assert sum(len(e) for e in separate) > 2 * len(merged[0])                 # read once, not once per turn
    # causal attention: the merged row computes the same loss as the separate examples
    model, _ = load_base(tiny_base)
    model.eval()
    with torch.no_grad():
        one, n_one = reply_loss(model, collate_packed(pack(merged, 1024), 0))
        parts = [reply_loss(model, collate_packed(pack([e], 1024), 0)) for e in separate]
    assert n_one == sum(n for _, n in parts)
    assert one.item() == pytest.approx(sum(loss.item() * n for loss, n in parts) / n_one, rel=1e-4)


def test_a_chat_too_long_for_a_row_keeps_every_target(tokenizer, fmt):
    chat = corrected_chat(6)
    examples = [chat[: 2 * k + 1] for k in range(1, 7)]
    full, _ = encode_all(examples, tokenizer, fmt, max_seq_len=4096)
    short, dropped = encode_all(examples, tokenizer, fmt, max_seq_len=len(full[0]) // 2)
    assert dropped == 0 and len(short) > 1 and all(len(e) <= len(full[0]) // 2 for e in short)
    assert sum(e.n_target for e in short) == full[0].n_target                  # no target lost, none twice
    assert any(e.trimmed for e in short)


def test_run_sizing_gives_a_small_delta_more_steps_than_two_epochs_of_batch_4(tokenizer, fmt):
    cfg = TrainConfig()                                                        # the defaults
    examples = []                                                              # 21 reviewed turns in 3 chats
    for person in range(3):
        chat = [{**m, "content": f"{m['content']} ({person})"} for m in corrected_chat(7)]
        examples += [chat[: 2 * k + 1] for k in range(1, 8)]
    encoded = encode_all(examples, tokenizer, fmt, cfg.max_seq_len)[0]
    assert len(pack(encoded, cfg.max_seq_len)) == 1                             # all three fit one packed row
    rows = rows_for(encoded, cfg)
    assert len(rows) == 3                                                      # so each chat gets a row of its own
    plan = plan_run(len(rows), cfg)
    assert plan.steps > 2 * math.ceil(len(rows) / 4) and plan.steps >= cfg.min_steps
    assert plan.epochs <= cfg.max_epochs
    big = plan_run(400, cfg)                                                   # a large delta: the epochs as set
    assert (big.epochs, big.batch, big.steps) == (cfg.epochs, cfg.batch, 200)
    assert plan_run(1, cfg) == type(plan)(batch=1, epochs=cfg.max_epochs, steps=cfg.max_epochs)
    assert plan_run(400, TrainConfig(max_steps=50)).steps == 50


def test_cosine_schedule_warms_up_then_decays():
    factors = [lr_factor(s, 40, "cosine") for s in range(40)]
    assert factors[0] < factors[3] == 1.0 and factors[-1] < 0.01
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    assert {lr_factor(s, 40, "constant") for s in range(40)} == {1.0}


def test_the_defaults_make_a_corrected_style_more_likely_on_new_prompts(tiny_base, tokenizer, fmt, tmp_path):
    """A small version of the experiment: three chats whose replies were corrected to open with one
    phrase; with TrainConfig's defaults the child prefers the corrected reply to the parent's on
    questions it never saw — more than the parent did."""
    chats = []
    for person in range(3):
        chat = [{"role": "system", "content": PERSONA}]
        for i in range(6):
            chat += [{"role": "user", "content": f"friend {person} asks thing {i} about {['tea', 'rain', 'cats'][person]}"},
                     {"role": "assistant", "content": f"Ahoy! thing {i} is lovely"}]
        chats += [chat[: 2 * k + 1] for k in range(1, 7)]
    out = tmp_path / "child"
    result = train(tiny_base, chats, [], out, TrainConfig(max_seq_len=256), progress=False)
    assert result.chats == 3 and result.steps >= TrainConfig().min_steps
    from transformers import AutoModelForCausalLM

    parent, _ = load_base(tiny_base)
    child = AutoModelForCausalLM.from_pretrained(out)

    def gain(reply: str) -> float:   # how much less surprised the child is than the parent, nats per token
        held = [[{"role": "system", "content": PERSONA}, {"role": "user", "content": q},
                 {"role": "assistant", "content": reply}]
                for q in ("what about music?", "do you like mornings?", "tell me about boats")]
        rows = pack(encode_all(held, tokenizer, fmt, 256)[0], 256)
        return dataset_loss(parent, rows, pad_id=0) - dataset_loss(child, rows, pad_id=0)

    taught, other = gain("Ahoy! that is lovely"), gain("Certainly. Here is some information on that topic.")
    assert taught > 0.1 and taught > other + 0.05, (taught, other)


# --- (2) packing -----------------------------------------------------------------------------
def test_packing_fills_rows_and_never_splits_an_example():
    rng = random.Random(0)
    examples = [Encoded(input_ids=[i] * n, labels=[i] * n) for i, n in enumerate(rng.randint(5, 120) for _ in range(80))]
    rows = pack(examples, max_seq_len=256)
    total = sum(len(e) for e in examples)
    assert len(rows) <= math.ceil(total / 256) + 1          # first-fit-decreasing: nearly no waste
    seen = []
    for row in rows:
        assert len(row) <= 256 and sum(row.lengths) == len(row)
        start = 0
        for n in row.lengths:                               # each example whole and contiguous
            piece = row.input_ids[start:start + n]
            assert len(set(piece)) == 1 and len(piece) == len(examples[piece[0]])
            assert row.position_ids[start:start + n] == list(range(n))
            seen.append(piece[0])
            start += n
    assert sorted(seen) == list(range(len(examples)))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        pack([Encoded([1] * 300, [1] * 300)], max_seq_len=256)


def test_packed_examples_do_not_attend_to_each_other(tiny_base, tokenizer, fmt):
    model, _ = load_base(tiny_base)
    model.eval()
    encoded, _ = encode_all(persona_chats(4) + CHATS, tokenizer, fmt, max_seq_len=512)
    row = pack(encoded, max_seq_len=512)[0]
    assert len(row.lengths) > 2
    batch = collate_packed([row], pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        start = 0
        for n in row.lengths:
            alone = model(input_ids=torch.tensor([row.input_ids[start:start + n]])).logits[0]
            assert torch.allclose(alone, packed[start:start + n], atol=1e-5)
            start += n


# --- (3) training, (4) merge -------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_base, tokenizer, fmt):
    cfg = TrainConfig(rank=8, alpha=16, lr=5e-3, epochs=4, min_steps=1, batch=2, max_seq_len=256, seed=1,
                      lr_schedule="constant")
    model, _ = load_base(tiny_base)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = add_lora(model, cfg)
    encoded, _ = encode_all(persona_chats(16), tokenizer, fmt, cfg.max_seq_len)
    rows = pack(encoded, cfg.max_seq_len)
    before_params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_before = dataset_loss(model, rows, pad_id=0)
    stats = sft_train(model, rows, cfg, pad_id=0, progress=False)
    return {"model": model, "rows": rows, "stats": stats, "loss_before": loss_before,
            "loss_after": dataset_loss(model, rows, pad_id=0), "before_params": before_params,
            "base_weights": base_weights}


def test_training_changes_the_lora_parameters_and_lowers_the_loss(trained):
    model = trained["model"]
    params = dict(model.named_parameters())
    assert trained["before_params"] and all("lora_" in n for n in trained["before_params"])
    changed = [n for n, v in trained["before_params"].items() if not torch.equal(params[n], v)]
    assert len(changed) == len(trained["before_params"])
    for name, weight in trained["base_weights"].items():     # the base itself stays frozen
        peft_name = next(n for n in params if n.endswith(name.replace(".weight", ".base_layer.weight"))
                         or n.endswith(name))
        assert torch.equal(params[peft_name], weight)
    assert trained["loss_after"] < trained["loss_before"] - 0.5
    assert trained["stats"].steps == 4 * math.ceil(len(trained["rows"]) / 2) and trained["stats"].tokens > 0


def test_merge_leaves_logits_unchanged(trained):
    peft_model = copy.deepcopy(trained["model"])
    reference = copy.deepcopy(trained["model"]).eval()
    batch = collate_packed(trained["rows"][:2], pad_id=0)
    merged, diff = merge_checked(peft_model, batch, atol=1e-4)
    assert diff < 1e-4
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert max_logit_diff(reference, merged, batch) < 1e-4
    # the adapter did something: the merged model is not the base model
    base = copy.deepcopy(reference)
    with base.disable_adapter():
        assert max_logit_diff(base, merged, batch) > 1e-3


# --- (5) DPO, end to end through train() ---------------------------------------------------------
def test_train_runs_sft_then_dpo_and_saves_the_merged_model(tiny_base, tokenizer, fmt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pairs = [DPOPair([{"role": "system", "content": PERSONA}, {"role": "user", "content": f"tea or coffee? #{i}"}],
                     "tea, always 🍵", "As an AI, I'd be happy to help you choose a beverage.") for i in range(4)]
    cfg = TrainConfig(rank=8, alpha=16, lr=5e-3, epochs=2, batch=2, max_seq_len=256, dpo_steps=6, dpo_epochs=3, dpo_lr=5e-3,
                      dpo_beta=0.1, seed=2)
    out = tmp_path / "child"
    result = train(tiny_base, persona_chats(8), pairs, out, cfg, progress=False)
    assert result.dpo_steps == 6 and result.dpo_pairs == 4
    assert result.dpo_margin_end > result.dpo_margin_start + 0.5
    assert result.merge_max_abs_diff < 1e-4 and result.trained_tensors_changed == 1.0
    assert result.steps > 0 and result.tokens_per_s > 0 and result.peak_rss_mb > 0
    assert set(result.stage_s) == {"load", "encode", "sft", "dpo", "merge", "save"}
    # out_dir is a complete checkpoint: the saved model has the DPO'd preferences, the tokenizer its template
    assert json.loads((out / "training.json").read_text())["config"]["dpo_steps"] == 6
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    child = AutoModelForCausalLM.from_pretrained(out)
    child_tok = AutoTokenizer.from_pretrained(out)
    assert ChatFormat.from_tokenizer(child_tok) == fmt
    encoded, _ = encode_pairs(pairs, child_tok, fmt, cfg.max_seq_len)
    assert preference_margin(child, encoded[:32]) == pytest.approx(result.dpo_margin_end, abs=1e-2)
    with pytest.raises(OuroError, match="already exists"):
        train(tiny_base, persona_chats(2), [], out, cfg, progress=False)


# --- (6) config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("rank", 0), ("alpha", 0), ("dropout", 1.0), ("lr", 0.0), ("epochs", 0), ("max_steps", 0),
    ("batch", 0), ("max_seq_len", 8), ("dpo_beta", -0.1), ("dpo_steps", -1), ("dpo_lr", 0), ("seed", -1),
])
def test_bad_config_values_name_their_field(field, value):
    with pytest.raises(TrainConfigError, match=rf"TrainConfig\.{field} must be"):
        TrainConfig(**{field: value})
    assert issubclass(TrainConfigError, OuroError) and issubclass(TrainConfigError, ValueError)
    assert field in TrainConfig.help()


# --- tier weights (memory/trust.py → train(weights=…)) -----------------------------------------
def test_weighted_reply_loss_scales_each_token_by_its_examples_weight(tiny_base, tokenizer, fmt):
    import torch.nn.functional as F

    model, _ = load_base(tiny_base)
    encoded, _ = encode_all(CHATS, tokenizer, fmt, 256, weights=[3.0, 1.0])
    assert encoded[0].weights is not None and {w for w, label in zip(encoded[0].weights, encoded[0].labels,
                                                                        strict=True) if label != IGNORE_INDEX} == {3.0}
    batch = collate_packed(pack(encoded, 512), 0)
    assert "label_weights" in batch and "label_weights" not in collate_packed(pack(encode_all(CHATS, tokenizer, fmt, 256)[0], 512), 0)
    with torch.no_grad():
        weighted, n = reply_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    targets, weights = batch["labels"][:, 1:], batch["label_weights"][:, 1:]
    keep = targets != IGNORE_INDEX
    per_token = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="none")
    assert n == int(keep.sum())
    assert torch.allclose(weighted, (per_token * weights[keep]).sum() / n, rtol=1e-4)
    assert not torch.allclose(weighted, per_token.mean(), rtol=1e-3)


def test_a_step_a_row_at_a_time_equals_the_whole_step_in_loss_and_gradients(tiny_base, tokenizer, fmt):
    """SFT's micro-batches (one row a forward on the CPU) accumulate exactly the whole step's gradient:
    weighted tokens, unequal rows and the KL term included."""
    model = add_lora(load_base(tiny_base)[0], TrainConfig(rank=8, alpha=16, seed=4))
    torch.manual_seed(4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)     # an adapter that moved, so the KL term is not zero
    encoded, _ = encode_all(CHATS + persona_chats(3), tokenizer, fmt, 256, weights=[3.0, 1.0, 1.0, 2.0, 1.0])
    rows = pack(encoded, 96)
    assert len(rows) >= 3 and len({sum(label != IGNORE_INDEX for label in r.labels) for r in rows}) > 1

    def step(micro_tokens: int):
        model.zero_grad(set_to_none=True)
        loss = accumulate_step(model, rows, 0, 0.5, micro_tokens)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    assert [len(g) for g in groups(rows, 1)] == [1] * len(rows)               # every row alone
    assert len(groups(rows, 96 * len(rows))) == 1                              # all in one forward
    whole, whole_grads = step(96 * len(rows))
    parts, part_grads = step(1)
    assert parts == pytest.approx(whole, rel=1e-5)
    for name, grad in whole_grads.items():
        assert torch.allclose(part_grads[name], grad, rtol=1e-4, atol=1e-7), name
    assert max(g.abs().max().item() for g in whole_grads.values()) > 0


def test_merged_chats_keep_each_targets_weight_and_equal_weights_change_nothing(tokenizer, fmt):
    chat = CHATS[0]
    examples = [chat[:3], chat]                                   # turn 1 folds into the whole chat as a target
    (merged,), _ = encode_all(examples, tokenizer, fmt, 256, weights=[2.0, 1.0])
    per_target = [w for w, label in zip(merged.weights, merged.labels, strict=True) if label != IGNORE_INDEX]
    first = next(i for i, w in enumerate(per_target) if w == 1.0)
    assert set(per_target[:first]) == {2.0} and set(per_target[first:]) == {1.0}
    from trainer.finetune import mean_one, normalized

    assert normalized([2.0, 2.0]) is None and normalized(None) is None
    scaled = mean_one([merged])[0]
    labelled = [w for w, label in zip(scaled.weights, scaled.labels, strict=True) if label != IGNORE_INDEX]
    assert abs(sum(labelled) / len(labelled) - 1.0) < 1e-9
    with pytest.raises(OuroError, match="positive"):
        normalized([1.0, -1.0])


def test_an_admins_weight_wins_a_tie_with_a_strangers_opposite_teaching(tiny_base, tokenizer, fmt, tmp_path):
    """Same questions, half taught "Ahoy!" by an admin (weight 3), half "Yarr!" by a stranger (1):
    weighted, the child leans to the admin's opener more than unweighted training on the same data."""
    chats, weights = [], []
    for i in range(8):
        for opener, w in (("Ahoy!", 3.0), ("Yarr!", 1.0)):
            chats.append([{"role": "system", "content": PERSONA}, {"role": "user", "content": f"question {i} about {opener[0]}"},
                          {"role": "assistant", "content": f"{opener} thing {i} is lovely"}])
            weights.append(w)
    from transformers import AutoModelForCausalLM

    parent, _ = load_base(tiny_base)

    def lean(out) -> float:
        child = AutoModelForCausalLM.from_pretrained(out)

        def gain(reply: str) -> float:
            held = [[{"role": "system", "content": PERSONA}, {"role": "user", "content": q},
                     {"role": "assistant", "content": reply}] for q in ("what about music?", "tell me about boats")]
            rows = pack(encode_all(held, tokenizer, fmt, 256)[0], 256)
            return dataset_loss(parent, rows, pad_id=0) - dataset_loss(child, rows, pad_id=0)

        return gain("Ahoy! thing") - gain("Yarr! thing")     # the openers, not diluted by a shared tail

    cfg = TrainConfig(max_seq_len=256)
    train(tiny_base, chats, [], tmp_path / "weighted", cfg, progress=False, weights=weights)
    train(tiny_base, chats, [], tmp_path / "plain", cfg, progress=False)
    weighted, plain = lean(tmp_path / "weighted"), lean(tmp_path / "plain")
    assert weighted > plain + 0.05, (weighted, plain)


def test_the_kl_term_is_zero_at_the_parent_and_grows_as_the_adapter_moves(tiny_base, tokenizer, fmt):
    model, _ = load_base(tiny_base)
    model = add_lora(model, TrainConfig())
    batch = collate_packed(pack(encode_all(CHATS, tokenizer, fmt, 256)[0], 512), 0)
    with torch.no_grad():
        plain, _ = reply_loss(model, batch)
        held, _ = reply_loss(model, batch, kl_beta=1.0)
        assert torch.allclose(plain, held, atol=1e-5)              # LoRA starts as the identity: no KL yet
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
        moved, _ = reply_loss(model, batch)
        moved_kl, _ = reply_loss(model, batch, kl_beta=1.0)
    assert moved_kl > moved + 1e-4
    with pytest.raises(TrainConfigError, match="kl_beta"):
        TrainConfig(kl_beta=-1.0)


def test_kl_free_below_leaves_out_the_positions_the_parent_thinks_unlikely(tiny_base, tokenizer, fmt):
    """The KL term counted only where the parent gives the target ≥ kl_free_below: at 0 every position,
    at a threshold above every target's probability none (the plain loss), in between some."""
    from trainer.head import token_logps_and_kl

    model, _ = load_base(tiny_base)
    model = add_lora(model, TrainConfig())
    batch = collate_packed(pack(encode_all(CHATS, tokenizer, fmt, 256)[0], 512), 0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
        plain, _ = reply_loss(model, batch)
        every, _ = reply_loss(model, batch, kl_beta=1.0)
        none, _ = reply_loss(model, batch, kl_beta=1.0, kl_free_below=0.999)
        lm = model.get_base_model()
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        hidden = lm.get_decoder()(input_ids=batch["input_ids"], use_cache=False).last_hidden_state[:, :-1][keep]
        with model.disable_adapter():
            ref_hidden = lm.get_decoder()(input_ids=batch["input_ids"], use_cache=False).last_hidden_state[:, :-1][keep]
            ref_p = lm.get_output_embeddings()(ref_hidden).float().softmax(-1).gather(-1, targets[keep][:, None])
        middle = float(ref_p.median())
        head = lm.get_output_embeddings()
        _, kl_all = token_logps_and_kl(head, hidden, targets[keep], ref_hidden)
        _, kl_some = token_logps_and_kl(head, hidden, targets[keep], ref_hidden, free_below=middle)
    assert every > plain + 1e-4 and torch.allclose(none, plain, atol=1e-6)
    assert 0 < kl_some < kl_all
    with pytest.raises(TrainConfigError, match="kl_free_below"):
        TrainConfig(kl_free_below=1.0)
