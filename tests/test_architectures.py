"""The learning loop for every supported architecture, on tiny random models built here.

Per family (Llama 3, Mistral, Qwen2.5, Qwen3, Gemma 2, Gemma 3, Phi-3; tests/helpers/families.py):
a generation-0 GGUF of that architecture with the family's chat template is registered, serves a
reply, is dequantized to HF as the cycle does, LoRA-trained a few steps by `trainer.finetune`,
merged, written back as the cycle's F16 child GGUF, checked for logit parity (llama.cpp on the
child vs transformers on the merged weights) and exported as an Ollama Modelfile. Unsupported
files are refused at registration with nothing written.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from core.errors import OuroError
from engine.gguf import LOOP_ARCHITECTURES, check_gguf, scan_gguf
from engine.template import ChatFormat, render_chat
from tests.helpers.families import FAMILIES, GEMMA2_TEMPLATE, MISTRAL_TEMPLATE, build_family_model
from trainer.convert import ARCHITECTURES

# the Ollama template family each model family's Jinja template translates to
OLLAMA_FAMILY = {"llama3": "llama3", "llama32": "llama3", "mistral": "mistral", "qwen2": "chatml", "qwen3": "chatml",
                 "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3"}
PERSONA = "You are Ouro, a calm sea serpent."
CHATS = [
    [{"role": "system", "content": PERSONA}, {"role": "user", "content": "hi! who are you?"},
     {"role": "assistant", "content": "I am Ouro, I swim in circles."}],
    [{"role": "system", "content": PERSONA}, {"role": "user", "content": "what do you eat?"},
     {"role": "assistant", "content": "My own tail, mostly."},
     {"role": "user", "content": "really?"}, {"role": "assistant", "content": "Really. It grows back."}],
    [{"role": "system", "content": PERSONA}, {"role": "user", "content": "tell me a story"},
     {"role": "assistant", "content": "Once there was a loop, and it never ended."}],
]


def test_registration_and_conversion_support_the_same_architectures():
    assert set(LOOP_ARCHITECTURES) == set(ARCHITECTURES) == {"llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"}
    assert {f.arch for f in FAMILIES.values()} == set(ARCHITECTURES)    # every one is exercised below


@pytest.mark.model
@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_family_goes_round_the_loop(name, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from config.settings import load_settings
    from engine.protocol import Sampling
    from lineage.generations import Generation
    from lineage.ollama import modelfile_text
    from serving.runtime import load_engine, open_store, register_base
    from trainer.convert import hf_last_logits, logit_agreement, write_gguf
    from trainer.cycle import ensure_full_precision
    from trainer.dataset import end_of_turn_token
    from trainer.dataset import tokenize as train_tokenize
    from trainer.finetune import TrainConfig, train

    family = FAMILIES[name]
    built_hf, gguf0 = build_family_model(family, tmp_path / "build")

    # registration accepts it
    persona = tmp_path / "persona.md"
    persona.write_text(PERSONA, encoding="utf-8")
    settings = load_settings(data_dir=tmp_path / "data", base_model=gguf0, n_ctx=512, persona_file=persona)
    store = open_store(settings)
    try:
        gen0 = register_base(settings, store).generation("gen-0000")
    finally:
        store.close()
    assert check_gguf(gen0.gguf).architecture == family.arch

    # a reply through the engine; the family's end of turn is a stop
    chat = CHATS[1][:-1]
    engine = load_engine(settings, gen0)
    try:
        prompt = engine.render(chat)
        serving_ids = engine.tokenize(chat)
        reply = engine.generate(chat, chat_key=1, sampling=Sampling(temperature=0.0, max_tokens=6, seed=1))
        end_id = engine.llm.tokenize(family.end_of_turn.encode(), add_bos=False, special=True)
        stop_ids = set(engine.stop_ids)
    finally:
        engine.close()
    assert reply.completion_tokens >= 1
    assert len(end_id) == 1 and end_id[0] in stop_ids, (family.end_of_turn, end_id)
    assert PERSONA in prompt and "what do you eat?" in prompt

    # the cycle's first leg: generation 0's GGUF dequantized to HF; it renders and tokenizes as serving does
    base_hf = ensure_full_precision(gen0)
    # ... computing what the model it was written from computes (config facts the GGUF loader
    # leaves at defaults included: Gemma's query scale and soft-caps, Llama 3.2's RoPE scaling)
    built, dequantized = hf_last_logits(built_hf, serving_ids), hf_last_logits(base_hf, serving_ids)
    assert np.abs(built - dequantized).max() <= 1e-5 * np.abs(built).max()
    fmt = ChatFormat.from_gguf(gen0.gguf)
    assert fmt.render(chat, add_generation_prompt=True) == prompt
    tokenizer = AutoTokenizer.from_pretrained(str(base_hf))
    assert train_tokenize(tokenizer, fmt, prompt) == serving_ids
    assert end_of_turn_token(tokenizer, fmt.template) == family.end_of_turn

    # LoRA training, merged child, child GGUF written as the cycle writes it
    cfg = TrainConfig(rank=4, alpha=8, lr=1e-2, max_steps=3, min_steps=3, batch=2, max_seq_len=128, dpo_steps=0)
    result = train(base_hf, CHATS, [], tmp_path / "child-hf", cfg, progress=False, chat_format=fmt)
    assert result.steps == 3 and result.trained_tensors_changed > 0
    child_dir = tmp_path / "data" / "models" / "gen-0001"
    child_dir.mkdir()
    write_gguf(tmp_path / "child-hf", gen0.gguf, child_dir / "model.gguf", dtype="f16", name="ouroboros gen-0001")
    assert sorted(p.name for p in child_dir.iterdir()) == ["model.gguf"]          # no temp left behind
    assert ("rope_freqs.weight" in scan_gguf(child_dir / "model.gguf").tensors) == (name == "llama32")

    # parity: llama.cpp on the child GGUF vs transformers on the merged weights
    agreement = logit_agreement(tmp_path / "child-hf", child_dir / "model.gguf", serving_ids)
    print(f"\n{name}: child F16 GGUF vs merged HF: {json.dumps(agreement.__dict__)}")
    # F16 weights: measured ~1e-4..1e-3 relative (see test_convert); the cycle's gate wants correlation >= 0.98
    assert agreement.max_rel_diff < 5e-3 and agreement.correlation > 0.9999 and agreement.same_argmax, agreement
    child_fmt = ChatFormat.from_gguf(child_dir / "model.gguf")
    assert child_fmt == fmt                                                         # same template, BOS, EOS
    child_vocab = Llama(model_path=str(child_dir / "model.gguf"), vocab_only=True, verbose=False)
    try:   # the child splits the same prompt into the same ids (Phi-3's name-keyed stripping included)
        assert child_vocab.tokenize(prompt.encode(), add_bos=fmt.add_bos, special=True) == serving_ids
    finally:
        child_vocab.close()

    # Ollama Modelfile
    gen1 = Generation("gen-0001", child_dir, meta={"gguf": "model.gguf", "parent_id": "gen-0000", "gguf_sha256": ""})
    text, translation = modelfile_text(settings, gen1)
    assert translation.family.name == OLLAMA_FAMILY[name]
    assert family.end_of_turn in translation.stops or family.end_of_turn == fmt.eos_token
    assert f'PARAMETER stop "{family.end_of_turn}"' in text and "TEMPLATE" in text and f"SYSTEM \"\"\"{PERSONA}" in text


def test_child_of_a_phi3_keeps_the_name_llama_cpp_reads_its_tokenizer_from(tmp_path):
    from trainer.convert import child_name

    assert child_name("ouroboros gen-0001", "Phi 3 Mini") == "ouroboros gen-0001"
    assert child_name("ouroboros gen-0001", "tiny phi3") == "ouroboros gen-0001 (tiny phi3)"
    assert child_name("ouroboros gen-0001", "Phi-3-mini-4k-instruct") == "ouroboros gen-0001 (Phi-3-mini-4k-instruct)"


def test_gemma_norms_are_written_with_their_one_offset(tmp_path):
    """HF Gemma stores w and computes with (1 + w); llama.cpp reads the stored value as the factor."""
    import torch
    from safetensors.torch import load_file

    hf, path = build_family_model(FAMILIES["gemma3"], tmp_path)
    weights = load_file(str(hf / "model.safetensors"))
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    expected = weights["model.layers.0.input_layernorm.weight"].to(torch.float32).numpy() + 1
    np.testing.assert_array_equal(tensors["blk.0.attn_norm.weight"], expected)
    np.testing.assert_array_equal(tensors["blk.1.attn_k_norm.weight"],
                                  weights["model.layers.1.self_attn.k_norm.weight"].numpy() + 1)
    assert "output.weight" not in tensors                                  # Gemma ties its output to token_embd


def test_a_template_that_refuses_the_system_role_gets_the_persona_in_the_first_turn():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    assert render_chat(GEMMA2_TEMPLATE, messages, True, bos_token="<bos>") == (
        "<bos><start_of_turn>user\nbe brief\n\nhi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n"
        "<start_of_turn>user\nbye<end_of_turn>\n<start_of_turn>model\n")
    assert render_chat(MISTRAL_TEMPLATE, messages, True, bos_token="<s>", eos_token="</s>") == (
        "<s>[INST] be brief\n\nhi [/INST]hello</s>[INST] bye [/INST]")
    with pytest.raises(OuroError, match="alternate"):           # other template errors are not papered over
        render_chat(GEMMA2_TEMPLATE, messages[1:2] * 2, True)


# --- refused at registration, nothing written ---------------------------------------------------

def _gguf(path, arch, *, template="{{ messages }}", kv=None, tensors=("token_embd.weight",)):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    if template is not None:
        writer.add_chat_template(template)
    for key, value in (kv or {}).items():
        writer.add_key_value(key, value, gguf.GGUFValueType.STRING if isinstance(value, str)
                             else gguf.GGUFValueType.UINT32)
    for name in tensors:
        writer.add_tensor(name, np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch,extra,message", [
    ("falcon", {}, "'falcon' model; the learning loop supports: Llama"),
    ("deepseek2", {}, "Qwen2 and Qwen2.5"),
    ("llama", {"kv": {"llama.expert_count": 8}}, "mixture-of-experts"),
    ("llama", {"tensors": ("token_embd.weight", "rope_freqs.weight")}, "not Llama 3.1/3.2's"),
    ("qwen2", {"kv": {"qwen2.rope.scaling.type": "yarn"}}, "'yarn' RoPE scaling"),
    ("phi3", {"tensors": ("token_embd.weight", "rope_factors_long.weight")}, "per-dimension RoPE"),
    ("gemma3", {"template": None}, "carries no chat template"),
])
def test_what_the_loop_cannot_train_is_refused_before_anything_is_written(tmp_path, arch, extra, message):
    from config.settings import load_settings
    from serving.runtime import open_store, register_base

    base = _gguf(tmp_path / f"{arch}.gguf", arch, **extra)
    settings = load_settings(data_dir=tmp_path / "data", base_model=base)
    store = open_store(settings)
    try:
        with pytest.raises(OuroError, match=message) as err:
            register_base(settings, store)
        assert not (settings.models_dir / "gen-0000").exists() and list(settings.models_dir.glob(".gen-*")) == []
        assert store.generation("gen-0000") is None
    finally:
        store.close()
    if "supports" in message or "Qwen2" in message:
        assert all(d in str(err.value) for d in LOOP_ARCHITECTURES.values())


def test_write_gguf_refuses_an_architecture_it_cannot_write(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.convert import write_gguf

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OuroError, match="cannot write a 'gpt2' checkpoint; supported model types: llama, mistral"):
        write_gguf(tmp_path / "hf", tmp_path / "none.gguf", out / "x.gguf")
    assert list(out.iterdir()) == []
