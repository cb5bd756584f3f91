"""The chat template, rendered exactly as serving renders it.

Training and serving must agree token for token: the prompt a generation is trained on is the
prompt it will be served. Both render the Jinja template stored in the GGUF
(`tokenizer.chat_template`) in the same sandbox with the same settings as
`engine.llama.LlamaEngine.render`; `render_chat` is that one function, so the bot can adopt
it too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.errors import OuroError

Message = dict[str, str]

# Used only when a GGUF carries no template: plain ChatML, what SmolLM2 and most chat models use.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def _raise(message: str):
    raise OuroError(f"chat template error: {message}")


@functools.lru_cache(maxsize=8)
def _compiled(template_source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template_source)


def fold_system(messages: Sequence[Message]) -> list[Message] | None:
    """The persona moved into the first user turn ("persona\n\nuser text"), or None if there is none.

    Why: some families' templates refuse a system message (Gemma 2, Mistral-7B-Instruct v0.1/v0.2
    raise "System role not supported"), but the bot always sends its persona as one. Folding it
    into the first user turn is what Gemma 3's own template does with a system message, and what
    these models were tuned to read; `lineage/ollama.py` writes the same fold for Ollama.
    """
    if len(messages) < 2 or messages[0].get("role") != "system" or messages[1].get("role") != "user":
        return None
    first = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [first, *messages[2:]]


def render_chat(template_source: str, messages: Sequence[Message], add_generation_prompt: bool, *,
                bos_token: str = "", eos_token: str = "") -> str:
    """Render `messages` with a chat template the way llama_engine does (same sandbox, same flags).

    A template that refuses the leading system message is rendered again with it folded into the
    first user turn (`fold_system`); any other template error is raised as it was.
    """
    template = _compiled(template_source)
    try:
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token)
    except OuroError:
        folded = fold_system(messages)
        if folded is None:
            raise
        return template.render(messages=folded, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token)


@dataclass(frozen=True)
class ChatFormat:
    """A model's chat template plus the special-token facts needed to tokenize its renders."""

    template: str
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = False   # prepend BOS when tokenizing: the model wants one and the template does not write it

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        return render_chat(self.template, messages, add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token)

    @classmethod
    def from_gguf(cls, path: Path) -> ChatFormat:
        """Read the template and BOS/EOS from a GGUF's metadata, as llama_engine does at load.

        Uses the project's fast header scanner (gguf-py's reader takes ~5 s on SmolLM2's vocab).
        """
        from engine.gguf import scan_gguf

        scan = scan_gguf(Path(path))

        def value(key: str):
            item = scan.kv.get(key)
            return None if item is None else item[0]

        def token(key: str) -> str:
            token_id = value(key)
            tokens = value("tokenizer.ggml.tokens")
            if token_id is None or tokens is None:
                return ""
            return tokens[int(token_id)].decode("utf-8", errors="replace")

        template = scan.text("tokenizer.chat_template") or CHATML
        return cls(template=template, bos_token=token("tokenizer.ggml.bos_token_id"),
                   eos_token=token("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(value("tokenizer.ggml.add_bos_token")) and "bos_token" not in template)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatFormat:
        """The same facts from an HF tokenizer that was loaded from (or saved after) that GGUF."""
        template = tokenizer.chat_template or CHATML
        return cls(template=template, bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
                   add_bos=bool(getattr(tokenizer, "add_bos_token", False)) and "bos_token" not in template)
