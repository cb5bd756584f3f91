"""A byte-level BPE tokenizer trained on the owner's corpus, and the GGUF metadata llama.cpp reads it from.

Why byte-level BPE (HF `tokenizers`, the library transformers itself runs on): any text, emoji and
every script included, encodes without an unknown token, and llama.cpp implements exactly this
family as its "gpt2" tokenizer model — the vocabulary stored byte-mapped (`Ġhello`), the merges in
rank order, and GPT-2's pre-tokenizer regex (llama.cpp's pre-tokenizer name "gpt-2", the regex
`ByteLevel(use_regex=True)` applies). So a prompt splits into the same ids in training
(transformers) and in serving (llama.cpp).

The special tokens come first (ids 0, 1, 2): <|endoftext|> separates documents, <|im_start|> and
<|im_end|> are ChatML's, so the model is trained, served and exported (Ollama) with the ChatML
template the rest of the project already knows (`engine.template.CHATML`). <|im_end|> is the end of
a turn: llama.cpp stops generating on it (eos and eot).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from core.errors import OuroError
from engine.template import CHATML

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = (END_OF_TEXT, IM_START, IM_END)
GGUF_PRE = "gpt-2"   # llama.cpp's name for GPT-2's pre-tokenizer regex (LLAMA_VOCAB_PRE_TYPE_GPT2)
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3   # llama.cpp's llama_token_type values


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` of at most `vocab_size` ids (fewer if the corpus has
    fewer merges to give: its 256 byte symbols and 3 specials are always there)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 300:
        raise OuroError(f"a vocabulary of {vocab_size} is too small: byte-level BPE needs 256 byte symbols + "
                        f"{len(SPECIALS)} special tokens and some merges")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    for i, special in enumerate(SPECIALS):
        if tokenizer.token_to_id(special) != i:
            raise OuroError(f"the trained tokenizer put {special} at id {tokenizer.token_to_id(special)}, not {i}")
    return tokenizer


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def save_hf_tokenizer(tokenizer: Any, folder: Path, *, max_length: int) -> None:
    """The tokenizer as transformers files (tokenizer.json + config with the ChatML template), so the
    learning cycle loads generation 0's full-precision folder like any other."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=IM_START, eos_token=IM_END,
                                 pad_token=END_OF_TEXT, model_max_length=max_length)
    hf.chat_template = CHATML
    hf.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "TokenizersBackend"   # load tokenizer.json verbatim (see trainer/convert.py)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def gguf_metadata(tokenizer: Any, *, name: str) -> dict[str, tuple[Any, int, int | None]]:
    """tokenizer.* and general.name keys for the GGUF, as {key: (value, GGUFValueType, array sub-type)}:
    the form `trainer.convert.write_gguf_with_metadata` takes (and `engine.gguf.scan_gguf` reads)."""
    from gguf import GGUFValueType as T

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    if any(t == "" for t in tokens):
        raise OuroError("the tokenizer's ids are not contiguous; it cannot be written to a GGUF")
    model = json.loads(tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [TOKEN_CONTROL if t in SPECIALS else TOKEN_NORMAL for t in tokens]
    ids = {t: tokenizer.token_to_id(t) for t in SPECIALS}
    return {
        "general.name": (name, T.STRING, None),
        "tokenizer.ggml.model": ("gpt2", T.STRING, None),
        "tokenizer.ggml.pre": (GGUF_PRE, T.STRING, None),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
        "tokenizer.ggml.merges": (merges, T.ARRAY, T.STRING),
        "tokenizer.ggml.bos_token_id": (ids[IM_START], T.UINT32, None),
        "tokenizer.ggml.eos_token_id": (ids[IM_END], T.UINT32, None),
        "tokenizer.ggml.eot_token_id": (ids[IM_END], T.UINT32, None),
        "tokenizer.ggml.padding_token_id": (ids[END_OF_TEXT], T.UINT32, None),
        "tokenizer.ggml.add_bos_token": (False, T.BOOL, None),
        "tokenizer.chat_template": (CHATML, T.STRING, None),
    }
