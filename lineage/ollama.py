"""An Ollama Modelfile for a generation, so `ollama create` serves what Ouroboros serves.

A Modelfile names the weights (`FROM` the generation's GGUF), the prompt format (`TEMPLATE`, in
Go's text/template syntax), the persona (`SYSTEM`) and the sampling (`PARAMETER`). Our models
carry their chat template as Jinja (`tokenizer.chat_template` in the GGUF), which Ollama does not
run, so the template is translated.

Translation is by family, not by a general Jinja→Go compiler (no such thing is needed here): the
family is recognised from the Jinja source, or from the GGUF's special tokens when the source
does not say, and each family has one Go template. ChatML (`<|im_start|>role\\n…<|im_end|>\\n`,
SmolLM2, Qwen2/2.5/3), Llama 3 (`<|start_header_id|>role<|end_header_id|>\\n\\n…<|eot_id|>`), Phi-3
(`<|user|>\\n…<|end|>\\n`), Gemma (`<start_of_turn>user|model\\n…<end_of_turn>\\n`, the persona
folded into the first user turn as Gemma 3's template does) and Mistral (`[INST] … [/INST]…</s>`,
the persona folded likewise) are known. The translation is then checked, not trusted: sample
conversations are rendered with the GGUF's Jinja template (exactly as serving renders it, `engine.template`) and with the family's
turn format, which is what its Go template prints, and they must agree character for character.
A template that looks like a known family but renders differently (Llama 3.1's date header, a
ChatML variant with other whitespace) or that is unknown is refused with an `OuroError`, rather
than exported as a model that silently prompts differently.

What Ollama does that the check relies on: it prepends the Modelfile's `SYSTEM` as a system
message when a chat does not start with one, passes all messages as `.Messages`, and adds BOS
itself when the GGUF asks for it (so the template never writes BOS). Templates whose Jinja adds
a default system prompt when there is none (SmolLM2's does) agree with ours whenever a system
message is present, which `SYSTEM` guarantees; with an empty persona the check covers that case
too and refuses such a template.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from config.settings import Settings
from core.errors import OuroError
from core.files import atomic_write_text
from engine.template import ChatFormat, Message, render_chat
from lineage.generations import Generation


@dataclass(frozen=True)
class Family:
    """A chat format: how one turn and the reply prompt look, and which tokens end a turn.

    Most families are one string per message (`turn`) and a reply prompt; those whose roles or
    persona need more (Gemma calls the assistant "model" and has no system turn) give their own
    Go template in `go` and the Python function `printer` that prints what it prints.
    """

    name: str
    markers: tuple[str, ...]      # all present in the Jinja source (or the vocabulary) identify it
    turn: str                     # one message, with {role} and {content}
    reply: str                    # what opens the assistant's reply
    stops: tuple[str, ...]
    go: str | None = None
    printer: Callable[[Sequence[Message]], str] | None = None

    @property
    def go_template(self) -> str:
        """The Ollama TEMPLATE: every message as a turn, then the reply prompt."""
        if self.go is not None:
            return self.go
        turn = self.turn.replace("{role}", "{{ .Role }}").replace("{content}", "{{ .Content }}")
        return "{{ range .Messages }}" + turn + "{{ end }}" + self.reply

    def render(self, messages: Sequence[Message]) -> str:
        """What `go_template` prints for these messages (used to check the translation)."""
        if self.printer is not None:
            return self.printer(messages)
        return "".join(self.turn.replace("{role}", m["role"]).replace("{content}", m["content"])
                       for m in messages) + self.reply


def _persona_prefix(messages: Sequence[Message], index: int) -> str:
    """The persona folded into the first user turn (engine.template.fold_system), as Go prints it."""
    if index == 1 and messages[0]["role"] == "system":
        return messages[0]["content"] + "\n\n"
    return ""


# Go: the persona goes into the first user turn, exactly where `_persona_prefix` puts it
_GO_PERSONA = ('{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}'
               "{{ (index $.Messages 0).Content }}\n\n{{ end }}")


def _gemma_print(messages: Sequence[Message]) -> str:
    out = [f"<start_of_turn>{'model' if m['role'] == 'assistant' else m['role']}\n"
           f"{_persona_prefix(messages, i)}{m['content']}<end_of_turn>\n"
           for i, m in enumerate(messages) if m["role"] != "system"]
    return "".join(out) + "<start_of_turn>model\n"


def _mistral_print(messages: Sequence[Message]) -> str:
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "user":
            out.append(f"[INST] {_persona_prefix(messages, i)}{m['content']} [/INST]")
        elif m["role"] == "assistant":
            out.append(f"{m['content']}</s>")
    return "".join(out)


CHATML = Family("chatml", ("<|im_start|>", "<|im_end|>"), turn="<|im_start|>{role}\n{content}<|im_end|>\n",
                reply="<|im_start|>assistant\n", stops=("<|im_start|>", "<|im_end|>"))
LLAMA3 = Family("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                turn="<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
                reply="<|start_header_id|>assistant<|end_header_id|>\n\n",
                stops=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
PHI3 = Family("phi3", ("<|user|>", "<|assistant|>", "<|end|>"), turn="<|{role}|>\n{content}<|end|>\n",
              reply="<|assistant|>\n", stops=("<|end|>", "<|user|>", "<|assistant|>"))
GEMMA = Family("gemma", ("<start_of_turn>", "<end_of_turn>"), turn="", reply="",
               stops=("<start_of_turn>", "<end_of_turn>"),
               go=('{{ range $i, $m := .Messages }}{{ if ne $m.Role "system" }}<start_of_turn>'
                   '{{ if eq $m.Role "assistant" }}model{{ else }}{{ $m.Role }}{{ end }}\n' + _GO_PERSONA
                   + "{{ $m.Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n"),
               printer=_gemma_print)
MISTRAL = Family("mistral", ("[INST]", "[/INST]"), turn="", reply="", stops=("[INST]", "</s>"),
                 go=('{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}[INST] ' + _GO_PERSONA
                     + '{{ $m.Content }} [/INST]{{ else if eq $m.Role "assistant" }}{{ $m.Content }}</s>{{ end }}'
                     "{{ end }}"),
                 printer=_mistral_print)
FAMILIES = (CHATML, LLAMA3, PHI3, GEMMA, MISTRAL)


@dataclass(frozen=True)
class Translation:
    family: Family
    template: str
    stops: tuple[str, ...]


def probe_conversations(persona: str) -> list[list[Message]]:
    """Conversations as Ollama would pass them: the persona first (when there is one), then turns."""
    head = [{"role": "system", "content": persona}] if persona else []
    return [
        head + [{"role": "user", "content": "hi!"}],
        head + [{"role": "user", "content": "what's up?\nline two"},
                {"role": "assistant", "content": "not much 🌊 — you?"},
                {"role": "user", "content": "tell me a {story} with \"quotes\""}],
    ]


def translate(chat: ChatFormat, vocab: Collection[str], *, persona: str = "probe persona") -> Translation:
    """The Ollama template and stop tokens for a model's Jinja chat template, checked by rendering."""
    by_source = [f for f in FAMILIES if all(m in chat.template for m in f.markers)]
    by_tokens = [f for f in FAMILIES if all(m in vocab for m in f.markers)]
    candidates = by_source or by_tokens
    if not candidates:
        raise OuroError("the model's chat template is not one Ouroboros can translate for Ollama "
                        f"(known: {', '.join(f.name for f in FAMILIES)})",
                        hint="write the Modelfile's TEMPLATE by hand from the GGUF's tokenizer.chat_template")
    family = candidates[0]
    missing = [s for s in family.stops if s not in vocab]
    if missing:
        raise OuroError(f"the chat template looks like {family.name}, but the model's vocabulary lacks "
                        f"{', '.join(missing)}", hint="is tokenizer.chat_template the one this model was trained with?")
    for messages in probe_conversations(persona):
        # BOS is left out: Ollama (llama.cpp) adds it when tokenizing, as serving does
        jinja = render_chat(chat.template, messages, True, bos_token="", eos_token=chat.eos_token)
        if jinja != family.render(messages):
            raise OuroError(f"the chat template looks like {family.name} but renders differently, so the "
                            "Ollama template would prompt the model in a way it was not trained on",
                            hint="write the Modelfile's TEMPLATE by hand from the GGUF's tokenizer.chat_template")
    stops = family.stops + tuple(t for t in (chat.eos_token,) if t and t not in family.stops)
    return Translation(family, family.go_template, stops)


def _quoted(text: str, what: str) -> str:
    """A Modelfile value in triple quotes; Ollama's parser has no escapes, so `\"\"\"` cannot appear."""
    if '"""' in text:
        raise OuroError(f'the {what} contains """, which an Ollama Modelfile cannot hold',
                        hint='replace """ in it and export again')
    return f'"""{text}"""'


def modelfile_text(settings: Settings, gen: Generation) -> tuple[str, Translation]:
    """The Modelfile for `gen`: its GGUF, the translated template, the persona, stops and sampling."""
    from engine.gguf import scan_gguf

    gguf = gen.gguf.resolve()
    chat = ChatFormat.from_gguf(gguf)
    tokens = scan_gguf(gguf).kv.get("tokenizer.ggml.tokens", ([],))[0]
    vocab = {t.decode("utf-8", errors="replace") for t in tokens}
    persona = settings.persona()
    tr = translate(chat, vocab, persona=persona)
    source = f'"{gguf}"' if any(c.isspace() for c in str(gguf)) else str(gguf)
    lines = [f"# Ouroboros {gen.id} (parent {gen.parent_id or 'none'}), written by `ouro export --format ollama`.",
             f"# TEMPLATE: the GGUF's {tr.family.name} chat template, translated and checked by rendering.",
             f"FROM {source}",
             f"TEMPLATE {_quoted(tr.template, 'chat template')}"]
    if persona:
        lines.append(f"SYSTEM {_quoted(persona, 'persona')}")
    lines += [f'PARAMETER stop "{s}"' for s in tr.stops]
    params = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
              "repeat_penalty": settings.repeat_penalty, "num_ctx": settings.n_ctx,
              "num_predict": settings.reply_max_tokens, "seed": settings.seed}
    lines += [f"PARAMETER {k} {v}" for k, v in params.items() if v is not None]
    return "\n".join(lines) + "\n", tr


def write_modelfile(settings: Settings, gen: Generation, out: Path) -> dict:
    """Write the Modelfile (atomically) and return what was written and how to use it."""
    text, tr = modelfile_text(settings, gen)
    out = Path(out)
    if not out.parent.is_dir():
        raise OuroError(f"cannot write {out}: folder {out.parent} does not exist")
    atomic_write_text(out, text)
    name = f"ouroboros-{gen.id}"
    return {"format": "ollama", "path": str(out.resolve()), "generation": gen.id, "gguf": str(gen.gguf.resolve()),
            "template_family": tr.family.name, "stop": list(tr.stops), "system": bool(settings.persona()),
            "create": f"ollama create {name} -f {out.resolve()}"}
