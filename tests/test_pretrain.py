"""The documents' continued-pretraining pass (trainer/pretrain.py) on the tiny Llama: it lowers the loss
on the documents, keeps to its token budget, and leaves a base the SFT stage loads as it is."""

from __future__ import annotations

import pytest
import torch

from engine.template import ChatFormat
from trainer.dataset import IGNORE_INDEX, collate_packed, pack
from trainer.finetune import dataset_loss, load_base
from trainer.pretrain import PretrainConfig, continue_pretraining, encode_documents

DOCS = ["The blue tomatoes of plot 17 ripen late, never before the first week of September. "
        "Mulch them with straw and water at the roots.",
        "Nettle soup: pick the top four leaves of young nettles in April, simmer with one potato "
        "and a spoon of butter for twenty minutes.",
        "The soil here is heavy clay. Dig in leaf mould every autumn; it takes three winters to loosen."]
CHATS = [[{"role": "user", "content": "hi! how are you?"}, {"role": "assistant", "content": "sunny and muddy 🌱"}],
         [{"role": "user", "content": "what's for dinner"}, {"role": "assistant", "content": "soup, obviously"}]]


@pytest.fixture(scope="module")
def base(tiny_models):
    return tiny_models / "gen-0000" / "hf"


def doc_loss(model_dir, tokenizer_dir) -> float:
    model, tokenizer = load_base(model_dir)
    fmt = ChatFormat.from_tokenizer(tokenizer)
    encoded, _ = encode_documents(DOCS, tokenizer, fmt, 128, 10_000)
    return dataset_loss(model, pack(encoded, 128), tokenizer.eos_token_id)


def test_a_document_pass_lowers_the_loss_on_the_documents(base, tmp_path):
    cfg = PretrainConfig(epochs=30, lr=1e-2, batch=2, max_seq_len=128, rank=8)
    out = tmp_path / "hf-docs"
    result = continue_pretraining(base, DOCS, CHATS, out, cfg)
    assert result.chunks == 3 and result.tokens > 60 and result.replay_examples >= 1
    assert result.steps == len(result.losses) > 0
    assert result.loss_end < result.loss_start - 0.5, (result.loss_start, result.loss_end)   # 10.84 → 9.87 here
    # measured again from the saved model, independently of the pass's own figures
    before, after = doc_loss(base, base), doc_loss(out, out)
    assert after < before - 0.5 and abs(after - result.loss_end) < 0.05
    assert result.merge_max_abs_diff < 1e-3
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    with pytest.raises(Exception, match="already exists"):
        continue_pretraining(base, DOCS, CHATS, out, cfg)


def test_documents_are_plain_text_with_every_token_labelled_within_the_budget(base):
    _, tokenizer = load_base(base)
    fmt = ChatFormat.from_tokenizer(tokenizer)
    encoded, used = encode_documents(DOCS, tokenizer, fmt, 1024, 10_000)
    assert used == 3 and all(e.labels == e.input_ids for e in encoded)
    text = tokenizer.decode(encoded[0].input_ids)
    assert "<|im_start|>" not in text and text.startswith(DOCS[0][:20])           # no chat template
    first = len(encoded[0])
    few, used = encode_documents(DOCS, tokenizer, fmt, 1024, first + 5)          # room for one document only
    assert used == 1 and sum(len(e) for e in few) == first
    batch = collate_packed(pack(encoded, 1024), tokenizer.eos_token_id)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(len(e) for e in encoded)
    assert torch.equal(batch["labels"][0, : first], batch["input_ids"][0, : first])
