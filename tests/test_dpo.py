"""The project's DPO pass (trainer/dpo.py) against trl's DPOTrainer, the reference it replaced, on a tiny
Llama with SmolLM2's tokenizer: one step's loss and the adapter's gradients agree, and the pass widens
the chosen-over-rejected margin. Also the chunked LM head (trainer/head.py) it and the SFT loss use."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.template import ChatFormat
from trainer.dataset import DPOPair, encode_pairs
from trainer.dpo import accumulate, dpo_loss, dpo_train, parent_hiddens, reference_logps
from trainer.finetune import TrainConfig, add_lora, load_base, preference_margin
from trainer.head import token_logps, token_logps_and_kl

PERSONA = "You are Mia 🌸: warm, playful, brief."
CHOSEN = ["haha classic 😂 what did you do?", "ooh tea, always 🍵", "noooo 😭 how??", "love that for you ✨"]
REJECTED = ["As an AI language model, I'd be happy to help you with that.",
            "I'm sorry to hear that. Is there anything else I can assist you with today?",
            "Thank you for sharing! Here are some helpful tips: 1. Stay positive.",
            "Certainly! Here is a list of options you might consider."]


def pairs(n: int = 4, start: int = 0) -> list[DPOPair]:
    return [DPOPair([{"role": "system", "content": PERSONA}, {"role": "user", "content": f"guess what #{i} 🙈"}],
                    CHOSEN[i % 4], REJECTED[i % 4]) for i in range(start, start + n)]


@pytest.fixture
def sft_model(tiny_models):
    """The tiny generation 0 with an adapter that is not zero, as after SFT: the reference is that state."""
    model, tokenizer = load_base(tiny_models / "gen-0000" / "hf")
    model = add_lora(model, TrainConfig(rank=8, alpha=16, seed=5))
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model, tokenizer


def trl_trainer(model, tokenizer, encoded, cfg: TrainConfig, tmp_path):
    """trl's DPOTrainer set up as trainer/finetune.py used it before trainer/dpo.py replaced it; with
    cfg.dpo_nll_weight > 0, trl's RPO: the sigmoid and the SFT losses, weighted 1 and the weight."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rpo = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, cfg.dpo_nll_weight]} if cfg.dpo_nll_weight else {}
    args = DPOConfig(**rpo, output_dir=str(tmp_path), per_device_train_batch_size=len(encoded), max_steps=1,
                     learning_rate=cfg.dpo_lr, lr_scheduler_type="constant", beta=cfg.dpo_beta,
                     max_length=cfg.dpo_max_len, save_strategy="no", precompute_ref_log_probs=True,
                     report_to="none", disable_tqdm=True, seed=cfg.seed, data_seed=cfg.seed, bf16=False,
                     use_cpu=True, dataloader_num_workers=0, max_grad_norm=1.0, activation_checkpointing=False)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list([p.record() for p in encoded]),
                      processing_class=tokenizer)


def adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default.", "."): p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None and ".default." in n}


@pytest.mark.parametrize("nll_weight", [0.0, 0.7], ids=["dpo", "rpo"])
def test_one_step_matches_trls_dpo_trainer_in_loss_and_adapter_gradients(sft_model, tmp_path, nll_weight):
    model, tokenizer = sft_model
    fmt = ChatFormat.from_tokenizer(tokenizer)
    encoded, dropped = encode_pairs(pairs(), tokenizer, fmt, 256)
    assert dropped == 0
    cfg = TrainConfig(dpo_beta=0.5, dpo_max_len=256, dpo_lr=1e-3, seed=1, dpo_nll_weight=nll_weight)
    theirs = copy.deepcopy(model)
    pad = tokenizer.pad_token_id

    reference = reference_logps(model, encoded, pad)
    trainer = trl_trainer(theirs, tokenizer, encoded, cfg, tmp_path)   # reads its reference now
    # the policy moves away from the reference the same way in both, so the loss is not just log 2
    for m in (model, theirs):
        torch.manual_seed(9)
        for name, p in m.named_parameters():
            if ".default." in name and "lora_A" in name:
                p.data += 0.05 * torch.randn_like(p)
    model.train()
    ours_loss = accumulate(model, encoded, reference, cfg.dpo_beta, pad, nll_weight=nll_weight)
    ours = adapter_grads(model)

    rows = trainer.train_dataset
    assert [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows] == \
        [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in encoded]       # the same token ids
    assert torch.allclose(torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in rows]),
                          reference, atol=1e-3)                                # the same reference
    theirs.train()
    batch = next(iter(trainer.get_train_dataloader()))                          # all four pairs, any order
    their_loss = trainer.compute_loss(trainer.model, batch)
    their_loss.backward()
    grads = adapter_grads(theirs)

    assert ours_loss == pytest.approx(their_loss.item(), abs=1e-4)
    at_reference = dpo_loss(reference, reference, cfg.dpo_beta).mean().item()      # log 2
    assert abs(ours_loss - at_reference) > 1e-3
    if nll_weight:   # the SFT term is really in both: far above the sigmoid loss alone
        assert ours_loss > at_reference + 0.5
    assert set(ours) == set(grads) and len(ours) > 0
    for name, g in grads.items():
        assert torch.allclose(ours[name], g, rtol=1e-3, atol=1e-6), name
    assert max(g.abs().max().item() for g in grads.values()) > 1e-4             # a real gradient, not zeros


def test_the_pass_raises_the_preference_margin_and_keeps_one_adapter(sft_model):
    model, tokenizer = sft_model
    fmt = ChatFormat.from_tokenizer(tokenizer)
    encoded, _ = encode_pairs(pairs(4), tokenizer, fmt, 256)
    fresh, _ = encode_pairs(pairs(2, start=10), tokenizer, fmt, 256)   # prompts the pass never sees
    cfg = TrainConfig(batch=2, dpo_steps=12, dpo_epochs=6, dpo_beta=0.5, dpo_lr=5e-3, seed=2)
    before, before_fresh = preference_margin(model, encoded), preference_margin(model, fresh)
    result = dpo_train(model, encoded, cfg, tokenizer.pad_token_id)
    assert result["steps"] == 12 and result["loss_end"] < result["loss_start"]
    assert preference_margin(model, encoded) > before + 2.0
    assert preference_margin(model, fresh) > before_fresh + 1.0
    assert list(model.peft_config) == ["default"]


def test_dpo_steps_follow_the_pairs_and_zero_means_off(sft_model):
    model, tokenizer = sft_model
    encoded, _ = encode_pairs(pairs(3), tokenizer, ChatFormat.from_tokenizer(tokenizer), 256)
    off = dpo_train(model, encoded, TrainConfig(dpo_steps=0), tokenizer.pad_token_id)
    assert off["steps"] == 0 and off["loss_start"] is None
    two = dpo_train(model, encoded, TrainConfig(batch=2, dpo_steps=20, dpo_epochs=1), tokenizer.pad_token_id)
    assert two["steps"] == 2     # ceil(1 × 3 pairs / 2 a step)


def chosen_kl(model, encoded, pad) -> float:
    """KL(parent ‖ model) summed over every pair's chosen reply tokens, from the full logits of both."""
    total = 0.0
    model.eval()
    with torch.no_grad():
        for pair in encoded:
            ids = torch.tensor([pair.prompt_ids + pair.chosen_ids])
            span = slice(len(pair.prompt_ids) - 1, ids.shape[1] - 1)   # the positions that predict the reply
            with model.disable_adapter():
                parent = model(input_ids=ids).logits[0, span].float().log_softmax(-1)
            policy = model(input_ids=ids).logits[0, span].float().log_softmax(-1)
            total += (parent.exp() * (parent - policy)).sum().item()
    return total


def test_the_kl_anchor_adds_the_parents_kl_over_the_batchs_chosen_tokens(sft_model):
    model, tokenizer = sft_model
    encoded, _ = encode_pairs(pairs(3), tokenizer, ChatFormat.from_tokenizer(tokenizer), 256)
    pad = tokenizer.pad_token_id
    reference, parents = reference_logps(model, encoded, pad), parent_hiddens(model, encoded, pad)
    expected = chosen_kl(model, encoded, pad) / sum(len(p.chosen_ids) for p in encoded)
    assert expected > 1e-3                         # the adapter has moved the model off the parent
    model.train()
    plain = accumulate(model, encoded, reference, 0.5, pad)
    held = accumulate(model, encoded, reference, 0.5, pad, kl_beta=2.0, parents=parents)
    assert held - plain == pytest.approx(2.0 * expected, rel=1e-3)
    none = accumulate(model, encoded, reference, 0.5, pad, kl_beta=2.0, parents=parents, free_below=0.999)
    # only the few chosen tokens the parent is that sure of (an end of turn) are held, and there it barely moved
    assert abs(none - plain) < 0.01 * (held - plain)


def test_the_kl_anchor_keeps_the_pass_nearer_the_parent(sft_model):
    """The same DPO pass with and without dpo_kl_beta: both learn the preference, the anchored one ends
    nearer the parent at the chosen replies' tokens."""
    model, tokenizer = sft_model
    encoded, _ = encode_pairs(pairs(4), tokenizer, ChatFormat.from_tokenizer(tokenizer), 256)
    pad = tokenizer.pad_token_id
    after, start = {}, chosen_kl(model, encoded, pad)
    for kl_beta in (0.0, 5.0):
        trained = copy.deepcopy(model)
        cfg = TrainConfig(batch=2, dpo_steps=8, dpo_epochs=4, dpo_beta=0.5, dpo_lr=5e-3, seed=2, dpo_kl_beta=kl_beta)
        before = preference_margin(trained, encoded)
        dpo_train(trained, encoded, cfg, pad)
        assert preference_margin(trained, encoded) > before + 1.0
        after[kl_beta] = chosen_kl(trained, encoded, pad)
    assert after[5.0] - start < 0.8 * (after[0.0] - start)   # measured: 0.20 vs 0.32 nats over 31 tokens


# --- the chunked head ---------------------------------------------------------------------------
def test_chunked_head_equals_full_log_softmax_in_value_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    ref_hidden = torch.randn(37, 16)
    targets = torch.randint(0, 1000, (37,))

    full = head(hidden).log_softmax(-1)
    want_logps = full.gather(-1, targets[:, None]).squeeze(-1)
    ref = head(ref_hidden).log_softmax(-1)
    want_kl = (ref.exp() * (ref - full)).sum()
    (want_logps.sum() + want_kl).backward()
    want_grad = hidden.grad.clone()
    hidden.grad = None

    logps, kl = token_logps_and_kl(head, hidden, targets, ref_hidden, chunk=8)   # 5 chunks, the last short
    assert torch.allclose(logps, want_logps, atol=1e-5) and torch.allclose(kl, want_kl, atol=1e-4)
    (logps.sum() + kl).backward()
    assert torch.allclose(hidden.grad, want_grad, atol=1e-5)
    assert torch.allclose(token_logps(head, hidden, targets, chunk=8), want_logps, atol=1e-5)
