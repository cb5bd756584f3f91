"""Tiny generation-0 models of every architecture the loop supports, built offline.

Each family is a 2-layer random model of its real transformers class, with SmolLM2's byte-level
BPE (from the packaged GGUF) cut to its first 1,024 tokens, whose control tokens at the front are
renamed to that family's special tokens, and that family's published chat template. It is written as a GGUF the
way a user's download would look: `<arch>` tensors and keys, tokenizer and template in metadata.
No downloads; each model takes ~1 s to build.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Published templates, verbatim except where noted. Qwen2.5's tool-call branches are left out
# (the bot never passes tools); everything it renders for plain chats is the original's.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Gemma 2's template refuses a system message (Gemma 3's folds it into the first user turn)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n")
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

# Mistral-7B-Instruct v0.1/v0.2: no system role (serving folds the persona into the first turn)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 2048, "initializer_range": 0.1}


@dataclass(frozen=True)
class TinyFamily:
    name: str
    arch: str                       # GGUF general.architecture
    template: str
    specials: dict[int, str]        # token id -> special token text (SmolLM2's control ids 0..16)
    bos: int
    eos: int
    end_of_turn: str                # what ends an assistant turn (a stop when serving)
    config: Callable[[], Any]
    add_bos: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _config(cls_name: str, **kw):
    def build():
        import transformers

        return getattr(transformers, cls_name)(**{**SIZES, **kw})
    return build


FAMILIES: dict[str, TinyFamily] = {f.name: f for f in (
    TinyFamily("llama3", "llama", LLAMA3_TEMPLATE,
               {0: "<|end_of_text|>", 1: "<|begin_of_text|>", 2: "<|eot_id|>", 3: "<|start_header_id|>",
                4: "<|end_header_id|>"}, bos=1, eos=2, end_of_turn="<|eot_id|>",
               config=_config("LlamaConfig", tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
                              bos_token_id=1, eos_token_id=2)),
    TinyFamily("llama32", "llama", LLAMA3_TEMPLATE,
               {0: "<|end_of_text|>", 1: "<|begin_of_text|>", 2: "<|eot_id|>", 3: "<|start_header_id|>",
                4: "<|end_header_id|>"}, bos=1, eos=2, end_of_turn="<|eot_id|>",
               config=_config("LlamaConfig", tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1,
                              eos_token_id=2, rope_parameters={
                                  "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192})),
    TinyFamily("qwen2", "qwen2", QWEN25_TEMPLATE, {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"},
               bos=0, eos=2, end_of_turn="<|im_end|>",
               config=_config("Qwen2Config", tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                              bos_token_id=0, eos_token_id=2)),
    TinyFamily("qwen3", "qwen3", QWEN25_TEMPLATE, {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"},
               bos=0, eos=2, end_of_turn="<|im_end|>",
               config=_config("Qwen3Config", head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0,
                              rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=2)),
    TinyFamily("gemma2", "gemma2", GEMMA2_TEMPLATE,
               {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<start_of_turn>", 4: "<end_of_turn>"},
               bos=2, eos=1, end_of_turn="<end_of_turn>",
               config=_config("Gemma2Config", head_dim=16, query_pre_attn_scalar=16, sliding_window=512,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
                              pad_token_id=0, bos_token_id=2, eos_token_id=1)),
    TinyFamily("gemma3", "gemma3", GEMMA3_TEMPLATE,
               {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<start_of_turn>", 4: "<end_of_turn>"},
               bos=2, eos=1, end_of_turn="<end_of_turn>",
               # Gemma 3 4B+'s shape: six layers (five sliding, one global) and linear RoPE scaling
               # (factor 8) on the global layer only
               config=_config("Gemma3TextConfig", head_dim=16, query_pre_attn_scalar=16, sliding_window=512,
                              num_hidden_layers=6, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2,
                              eos_token_id=1, rope_parameters={
                                  "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    TinyFamily("phi3", "phi3", PHI3_TEMPLATE,
               {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<|endoftext|>", 4: "<|end|>", 5: "<|user|>", 6: "<|assistant|>",
                7: "<|system|>"},
               bos=1, eos=3, end_of_turn="<|end|>",
               config=_config("Phi3Config", tie_word_embeddings=False, rms_norm_eps=1e-5, pad_token_id=3,
                              bos_token_id=1, eos_token_id=3)),
    TinyFamily("mistral", "llama", MISTRAL_TEMPLATE, {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]"},
               bos=1, eos=2, end_of_turn="</s>",
               config=_config("MistralConfig", tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-5,
                              sliding_window=None, bos_token_id=1, eos_token_id=2)),
)}


VOCAB = SIZES["vocab_size"]


def _merges_within(base, n_tokens: int) -> list[bytes]:
    """SmolLM2's BPE cut to its first `n_tokens` tokens: the merges whose parts and result all
    survive. Its byte-level symbols come first and every later token is one merge's result, so
    the cut is a complete, smaller BPE (1,024 tokens: tokenizer and embeddings ~50x cheaper)."""
    kept = set(base.kv["tokenizer.ggml.tokens"][0][:n_tokens])
    out = []
    for merge in base.kv["tokenizer.ggml.merges"][0]:
        left, right = merge.split(b" ", 1)
        if left in kept and right in kept and left + right in kept:
            out.append(merge)
    return out


def write_tokenizer_gguf(path: Path, family: TinyFamily) -> Path:
    """A tensor-less GGUF of `family.arch` holding only the family's tokenizer and chat template
    (the metadata parent `write_gguf` copies them from)."""
    import gguf

    from engine.gguf import scan_gguf
    from lineage.generations import packaged_base_gguf

    base = scan_gguf(packaged_base_gguf())
    writer = gguf.GGUFWriter(str(path), family.arch)
    for key, (value, vtype, sub) in base.kv.items():
        if not key.startswith("tokenizer."):
            continue
        if key == "tokenizer.ggml.tokens":
            value = list(value[:VOCAB])
            for token_id, text in family.specials.items():
                value[token_id] = text.encode()
        elif key == "tokenizer.ggml.token_type":
            value = list(value[:VOCAB])
        elif key == "tokenizer.ggml.merges":
            value = _merges_within(base, VOCAB)
        elif key == "tokenizer.chat_template":
            value = family.template.encode()
        elif key == "tokenizer.ggml.bos_token_id":
            value = family.bos
        elif key == "tokenizer.ggml.eos_token_id":
            value = family.eos
        elif key == "tokenizer.ggml.padding_token_id":
            value = family.eos
        elif key == "tokenizer.ggml.add_bos_token":
            value = family.add_bos
        writer.add_key_value(key, value, gguf.GGUFValueType(vtype),
                             sub_type=None if sub is None else gguf.GGUFValueType(sub))
    # llama.cpp keys Phi-3's special-token stripping on general.name, as real Phi-3 files are named
    writer.add_name(f"tiny {family.name}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def build_family_model(family: TinyFamily, folder: Path, *, seed: int = 1234) -> tuple[Path, Path]:
    """(HF folder, F32 GGUF) of a tiny random `family` model; norms are randomised so that a norm
    written to the wrong slot, or Gemma's `1 + w` left out, changes the logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.convert import write_gguf

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = family.config()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gemma = family.arch.startswith("gemma")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 and p.numel() > 0:
                p.copy_((0 if gemma else 1) + 0.1 * torch.randn_like(p))
    model.save_pretrained(folder / "hf")
    (folder / "hf" / "family.json").write_text(json.dumps({"family": family.name}))
    donor = write_tokenizer_gguf(folder / "tokenizer.gguf", family)
    gguf_path = folder / "model.gguf"
    write_gguf(folder / "hf", donor, gguf_path, dtype="f32", name=f"tiny {family.name} gen-0000")
    return folder / "hf", gguf_path
