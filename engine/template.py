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


def render_chat(template_source: str, messages: Sequence[Message], add_generation_prompt: bool, *,
                bos_token: str = "", eos_token: str = "") -> str:
    """Render `messages` with a chat template the way llama_engine does (same sandbox, same flags)."""
    return _compiled(template_source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
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
