"""The two measurements every eval is built from, both through llama.cpp.

- `reply_logprobs`: the log-probability of each token of a reference reply (and its
  end-of-turn token), teacher forced after its prompt. Deterministic: one forward pass.
- `reply_nll`: their negative mean (nats per token). Lower means the model finds that reply
  more natural.
- `greedy_reply`: the reply the model would give with greedy decoding (temperature 0) and
  the serving repeat penalty (1.1 by default): deterministic, and closer to what people see
  than raw greedy decoding, which loops ("I'm sorry. I'm sorry. …") on small models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.llama import LlamaEngine
from engine.protocol import Sampling

GREEDY = Sampling(temperature=0.0, top_k=1, top_p=1.0, repeat_penalty=1.1, seed=0, max_tokens=96)


def cycle_gpu_layers(settings, gguf: Path) -> int:
    """n_gpu_layers for a model the learning cycle loads for itself (evals here, self-refinement and
    contrast pairs in trainer/): the whole model on the GPU where it fits now and `cycle_gpu_offload`
    allows (engine/placement.py), else the CPU."""
    from engine.placement import side_job_gpu_layers

    return side_job_gpu_layers(gguf) if settings.cycle_gpu_offload else 0


class EvalModel:
    """A GGUF loaded for scoring (logits at every position) and greedy generation."""

    def __init__(self, gguf: Path, *, generation_id: str, n_ctx: int = 1024, n_threads: int | None = None,
                 repeat_penalty: float = 1.1, n_gpu_layers: int = 0) -> None:
        self.repeat_penalty = repeat_penalty
        self.engine = LlamaEngine(gguf, generation_id=generation_id, n_ctx=n_ctx, n_threads=n_threads,
                                  n_gpu_layers=n_gpu_layers, kv_cache_chats=0, logits_all=True)
        self._cache: dict[str, np.ndarray] = {}

    def close(self) -> None:
        self.engine.close()

    def reply_nll(self, messages: list[dict]) -> float:
        """`messages` ends with the assistant reply being scored."""
        return float(-np.mean(self.reply_logprobs(messages)))

    def reply_logprobs(self, messages: list[dict]) -> np.ndarray:
        """Per-token log-probabilities of the final assistant reply (`messages[-1]`)."""
        key = repr(messages)
        if key in self._cache:
            return self._cache[key]
        llm = self.engine.llm
        prompt = self.engine.tokenize(messages[:-1])
        full_text = self.engine.render(messages, add_generation_prompt=False)
        full = llm.tokenize(full_text.encode("utf-8"), add_bos=False, special=True)
        if full[: len(prompt)] != prompt:
            raise ValueError("the template does not render the prompt as a prefix of the full conversation")
        end = len(full)
        # score through the end-of-turn token, not the newline the template writes after it
        while end > len(prompt) and full[end - 1] not in self.engine.stop_ids:
            end -= 1
        if end <= len(prompt):
            end = len(full)
        tokens = full[:end]
        n_ctx = self.engine.n_ctx
        if len(tokens) > n_ctx:
            cut = len(tokens) - n_ctx
            tokens, prompt_len = tokens[cut:], max(1, len(prompt) - cut)
        else:
            prompt_len = len(prompt)
        llm.reset()
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
        pred = logits[prompt_len - 1: len(tokens) - 1]
        targets = np.asarray(tokens[prompt_len:])
        peak = pred.max(axis=1, keepdims=True)
        logz = np.log(np.exp(pred - peak).sum(axis=1)) + peak[:, 0]
        logprobs = pred[np.arange(len(targets)), targets] - logz
        self._cache[key] = logprobs
        return logprobs

    def greedy_reply(self, messages: list[dict], max_tokens: int = 96):
        sampling = Sampling(**{**GREEDY.__dict__, "max_tokens": max_tokens, "repeat_penalty": self.repeat_penalty})
        self.engine.llm.reset()
        return self.engine.generate(messages, chat_key="eval", sampling=sampling)
