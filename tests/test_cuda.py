"""The GPU paths: QLoRA (nf4) and bf16 training on a tiny Llama, the merge in bf16 on the GPU against
the same merge on the CPU, the GGUF written from the bf16 checkpoint, and serving with every layer
offloaded by llama.cpp's CUDA build. Marked
`cuda`: deselected (with the reason printed, tests/conftest.py) where torch sees no CUDA device."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.convert import logit_agreement, write_gguf
from trainer.finetune import TrainConfig, load_base, train
from trainer.precision import has_bitsandbytes

pytestmark = pytest.mark.cuda

PERSONA = "You are Mia 🌸: warm, playful, brief."


def chats(n: int) -> list[list[dict]]:
    return [[{"role": "system", "content": PERSONA}, {"role": "user", "content": f"tea or coffee? #{i}"},
             {"role": "assistant", "content": "tea, always 🍵"}] for i in range(n)]


def pairs(n: int) -> list[tuple]:
    return [([{"role": "system", "content": PERSONA}, {"role": "user", "content": f"hi #{i}"}],
             "hiii 👋", "Hello. How may I assist you today?") for i in range(n)]


def cfg(precision: str) -> TrainConfig:
    return TrainConfig(rank=8, alpha=16, lr=2e-3, epochs=1, min_steps=4, batch=2, max_seq_len=128, dpo_steps=2,
                       dpo_epochs=2, dpo_lr=1e-3, seed=3, precision=precision)


@pytest.mark.parametrize("precision", ["nf4", "bf16"])
def test_gpu_training_changes_the_adapter_merges_in_bf16_and_keeps_a_bf16_checkpoint(tiny_models, tmp_path,
                                                                                    precision):
    if precision == "nf4":
        assert has_bitsandbytes(), "the GPU machine lacks bitsandbytes: pip install '.[cuda]'"
    out = tmp_path / "child"
    result = train(tiny_models / "gen-0000" / "hf", chats(6), pairs(2), out, cfg(precision), progress=False)
    assert result.trained_tensors_changed > 0.9 and result.dpo_steps == 2
    assert result.precision == precision and result.stage_peak_gpu_mb["sft"] > 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    gguf = tmp_path / "child.gguf"
    write_gguf(out, tiny_models / "gen-0000" / "model.gguf", gguf, dtype="f32")
    agreement = logit_agreement(out, gguf, [1, 2, 3, 4, 5, 6, 7, 8])
    assert agreement.correlation > 0.999


def test_the_bf16_merge_on_the_gpu_equals_the_same_merge_on_the_cpu(tiny_models):
    from peft import PeftModel

    from trainer.finetune import add_lora

    base, _ = load_base(tiny_models / "gen-0000" / "hf", dtype=torch.bfloat16)
    model = add_lora(base, cfg("bf16"))
    torch.manual_seed(4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "lora_" in k}
    gpu = model.merge_and_unload().state_dict()

    cpu_base, _ = load_base(tiny_models / "gen-0000" / "hf", dtype=torch.bfloat16)
    cpu_base = cpu_base.to("cpu")
    cpu_model = add_lora(cpu_base, cfg("bf16"))
    cpu_model.load_state_dict(state, strict=False)
    assert isinstance(cpu_model, PeftModel)
    cpu = cpu_model.merge_and_unload().state_dict()
    for name, tensor in cpu.items():
        assert torch.allclose(gpu[name].float().cpu(), tensor.float(), atol=1e-2, rtol=1e-2), name


def test_llama_cpp_offloads_the_served_model_to_the_gpu():
    """The set-up builds llama.cpp with CUDA where it finds nvcc (Makefile); then n_gpu_layers = -1
    puts every layer on the card and the engine says so (/status: "Runs on")."""
    from engine.llama import LlamaEngine
    from engine.protocol import Sampling
    from lineage.generations import packaged_base_gguf

    engine = LlamaEngine(packaged_base_gguf(), generation_id="gen-0000", n_gpu_layers=-1)
    try:
        assert engine.placement.startswith("GPU ("), engine.placement
        assert engine.placement.endswith(": 31 of 31 layers")      # SmolLM2-135M: 30 blocks and the output
        reply = engine.generate([{"role": "user", "content": "hi!"}], chat_key=1,
                                sampling=Sampling(temperature=0.0, max_tokens=8, seed=1))
        assert reply.completion_tokens > 0 and reply.text.strip()
    finally:
        engine.close()


def test_the_cycles_eval_models_go_on_the_card_when_it_has_room(tmp_path):
    """A 7B's eval suite on CPU cores takes hours: the cycle's own llama.cpp models go on the GPU
    whole where they fit (`cycle_gpu_offload`, engine/placement.py)."""
    from config.settings import load_settings
    from evals.scoring import EvalModel, cycle_gpu_layers
    from lineage.generations import packaged_base_gguf

    layers = cycle_gpu_layers(load_settings(data_dir=tmp_path), packaged_base_gguf())
    assert layers == -1, "llama.cpp cannot offload here: the set-up builds it with CUDA where nvcc is found"
    model = EvalModel(packaged_base_gguf(), generation_id="gen-0000", n_gpu_layers=layers)
    try:
        assert model.engine.placement.endswith(": 31 of 31 layers")
        assert model.reply_nll([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey!"}]) > 0
    finally:
        model.close()
