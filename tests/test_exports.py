"""`ouro export`: each file read back by what consumes it.

- openai / sft / dpo: loaded with `datasets.load_dataset("json")`; the OpenAI token report is
  compared with tiktoken's own `get_encoding("o200k_base")`, fed the shipped vocabulary through
  TIKTOKEN_CACHE_DIR, with tiktoken's download function made to fail (so: offline).
- ollama: the Modelfile is parsed by a port of Ollama's own parser (parser/parser.go), and its
  TEMPLATE is executed by a small interpreter of the Go text/template subset it uses (range over
  .Messages, .Role, .Content, text; anything else fails the test). The output is compared with
  the GGUF's Jinja chat template, read independently with gguf-py and rendered by jinja2. What
  is not checked here: running the real `ollama create` (no Ollama on this machine).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re

import pytest

from config.settings import load_settings
from core.errors import OuroError
from core.files import atomic_write_text
from engine.template import ChatFormat, render_chat
from lineage.generations import Lineage
from lineage.ollama import probe_conversations, translate
from memory.dataset_export import VOCAB_FILE, default_epochs
from memory.export import Example, Pair
from ouro.cli import main
from ouro.exports import run_export

PERSONA = 'You are Ouro, a "tidal" bot.\nKeep it short — and kind 🌊'


@pytest.fixture
def cfg(tmp_path):
    persona = tmp_path / "persona.md"
    persona.write_text(PERSONA, encoding="utf-8")
    # the format tests: everyone teaches (the review modes' own test below uses an open bot)
    return load_settings(data_dir=tmp_path / "data", persona_file=persona, learn_from="everyone")


def answered(store, chat, text, reply, anchor=None):
    t = store.add_user_turn(chat_id=chat, user_id=chat, text=text)
    store.complete_turn(t, reply_text=reply, generation_id="gen-0000", prompt_tokens=1, completion_tokens=1,
                        latency_s=0.1, ttft_s=0.1, context_start_turn_id=anchor or t)
    return t


def add_reviewed(store, start: int, n: int) -> None:
    """n thumbs-up examples, one with served context, one correction (example + pair), one 🔁 pick."""
    t1 = answered(store, start, "hi", "hello!")
    t2 = answered(store, start, "my email is ann@example.com", "noted ✨", anchor=t1)
    store.rate(t2, start, 1)
    for i in range(1, n):
        store.rate(answered(store, start + i, f"topic {start + i}?", f"ooh, topic {start + i} 🌊"), start + i, 1)
    bad = answered(store, start + n, "q", "meh")
    store.await_correction(start + n, start + n, bad)
    store.take_correction(start + n, start + n, "a much better answer")
    t = answered(store, start + n + 1, "joke?", "first")
    store.pick(t, store.add_alternative(t, "second", "gen-0000"), start + n + 1, keep_alternative=True)
    store.rate(answered(store, start + n + 2, "and?", "nope"), start + n + 2, -1)   # never exported


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def load_json_dataset(path, tmp_path):
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))


@pytest.fixture
def tiktoken_reference(tmp_path, monkeypatch):
    """tiktoken's own o200k_base, from a cache holding our shipped file; any download attempt fails."""
    import tiktoken
    import tiktoken.load

    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(lzma.decompress(VOCAB_FILE.read_bytes()))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))

    def no_network(blobpath):
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    return tiktoken.get_encoding("o200k_base")   # hash-checked by tiktoken against its expected one


# --- datasets ---------------------------------------------------------------------------------

def test_openai_jsonl_schema_and_token_report_match_tiktoken(cfg, store, tmp_path, tiktoken_reference):
    add_reviewed(store, 100, 12)
    report = run_export(cfg, store, "openai", out=tmp_path / "ft.jsonl")
    rows = read_jsonl(tmp_path / "ft.jsonl")
    assert report["examples"] == len(rows) == 13           # 12 👍 + 1 correction; the 👎 and the pick are not
    for row in rows:
        assert set(row) == {"messages"}
        msgs = row["messages"]
        assert msgs[0] == {"role": "system", "content": PERSONA}
        assert {m["role"] for m in msgs} <= {"system", "user", "assistant"}
        assert msgs[-1]["role"] == "assistant" and "weight" not in msgs[-1]
        assert all(m.get("weight") == 0 for m in msgs[1:-1] if m["role"] == "assistant")
        assert all(isinstance(m["content"], str) and m["content"] for m in msgs)
    with_context = next(r["messages"] for r in rows if len(r["messages"]) == 5)
    assert with_context[2] == {"role": "assistant", "content": "hello!", "weight": 0}
    assert with_context[3]["content"] == "my email is [email]"  # redacted, as training data is

    enc = tiktoken_reference
    expected = [3 + sum(3 + len(enc.encode(m["role"])) + len(enc.encode(m["content"])) for m in r["messages"])
                for r in rows]
    assert report["encoding"] == "o200k_base"
    assert report["tokens_per_example"] == expected
    assert report["tokens_total"] == sum(expected) and report["tokens_max"] == max(expected)
    assert report["over_limit"] == 0 and report["warnings"] == []
    assert report["epochs"] == default_epochs(13) == 7        # OpenAI's default for 13 examples: 100 // 13
    assert report["estimated_cost_usd"] == round(sum(expected) * 7 * cfg.openai_price_per_mtok / 1e6, 4)
    ds = load_json_dataset(tmp_path / "ft.jsonl", tmp_path)
    assert ds.num_rows == 13 and ds.column_names == ["messages"]


def test_openai_report_counts_examples_over_the_limit(cfg, store, tmp_path):
    add_reviewed(store, 100, 3)
    limit = 40
    settings = cfg.model_copy(update={"openai_max_tokens_per_example": limit, "openai_price_per_mtok": 25.0})
    report = run_export(settings, store, "openai", out=tmp_path / "ft.jsonl")
    per = report["tokens_per_example"]
    assert any(n > limit for n in per)                      # the persona alone is ~25 tokens
    assert report["over_limit"] == sum(n > limit for n in per)
    assert report["over_limit_lines"] == [i + 1 for i, n in enumerate(per) if n > limit]
    assert report["billed_tokens_per_epoch"] == sum(min(n, limit) for n in per)
    assert report["estimated_cost_usd"] == round(report["billed_tokens_per_epoch"] * report["epochs"] * 25 / 1e6, 4)
    assert any("at least 10 examples" in w for w in report["warnings"])


def test_sft_and_dpo_load_with_datasets_as_trl_conversational_data(cfg, store, tmp_path):
    add_reviewed(store, 100, 4)
    run_export(cfg, store, "sft", out=tmp_path / "sft.jsonl")
    run_export(cfg, store, "dpo", out=tmp_path / "dpo.jsonl")
    sft = load_json_dataset(tmp_path / "sft.jsonl", tmp_path)
    # prompt-completion: TRL's SFTTrainer learns only the reviewed reply, never the context's replies
    assert sorted(sft.column_names) == ["completion", "prompt"] and sft.num_rows == 5
    assert sft[0]["prompt"] == read_jsonl(tmp_path / "sft.jsonl")[0]["prompt"]
    assert all(set(m) == {"role", "content"} for row in sft for m in row["prompt"] + row["completion"])
    served = next(row for row in sft if len(row["prompt"]) > 2)
    assert [m["role"] for m in served["prompt"]] == ["system", "user", "assistant", "user"]
    assert served["completion"] == [{"role": "assistant", "content": "noted ✨"}]

    dpo = load_json_dataset(tmp_path / "dpo.jsonl", tmp_path)
    assert sorted(dpo.column_names) == ["chosen", "prompt", "rejected"] and dpo.num_rows == 2
    pairs = {(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in dpo}
    assert pairs == {("a much better answer", "meh"), ("second", "first")}
    for row in dpo:
        assert row["prompt"][0]["role"] == "system" and row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"] + row["rejected"]] == ["assistant", "assistant"]
    assert (tmp_path / "dpo.jsonl").stat().st_mode & 0o077 == 0    # people's chats: owner only


def test_since_a_generation_and_what_a_generation_trained_on(cfg, store, tmp_path):
    add_reviewed(store, 100, 2)
    old, cutoff = "2000-01-01T00:00:00.000+00:00", "2000-01-02T00:00:00.000+00:00"
    for table, column in (("ratings", "updated_at"), ("corrections", "created_at"), ("preferences", "created_at")):
        store.database.conn.execute(f"UPDATE {table} SET {column} = ?", (old,))
    gen = cfg.models_dir / "gen-0001"
    (gen / "data").mkdir(parents=True)
    trained = Example(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                      source="thumbs_up", created_at=cutoff)
    pair = Pair(prompt=[{"role": "user", "content": "x"}], chosen="good", rejected="bad", source="correction",
                created_at=cutoff)
    (gen / "data" / "train.jsonl").write_text(json.dumps(trained.__dict__) + "\n", encoding="utf-8")
    (gen / "data" / "pairs.jsonl").write_text(json.dumps(pair.__dict__) + "\n", encoding="utf-8")
    atomic_write_text(gen / "meta.json", json.dumps({"id": "gen-0001", "data_cutoff": cutoff}))
    late = answered(store, 500, "later question", "later answer")
    store.rate(late, 500, 1)

    report = run_export(cfg, store, "sft", since="gen-0001", out=tmp_path / "since.jsonl")
    assert [r["completion"][-1]["content"] for r in read_jsonl(tmp_path / "since.jsonl")] == ["later answer"]
    assert report["source"] == {"reviewed_since": "gen-0001", "cutoff": cutoff,
                                "left_out": {"screened": {}, "waiting_for_review": 0, "not_trusted": 0}}

    run_export(cfg, None, "sft", gen="gen-0001", out=tmp_path / "gen.jsonl")
    run_export(cfg, None, "dpo", gen="gen-0001", out=tmp_path / "gen-dpo.jsonl")
    assert read_jsonl(tmp_path / "gen.jsonl") == [{"prompt": trained.messages[:-1], "completion": trained.messages[-1:]}]
    assert read_jsonl(tmp_path / "gen-dpo.jsonl")[0]["chosen"] == [{"role": "assistant", "content": "good"}]
    with pytest.raises(OuroError, match="not both"):
        run_export(cfg, store, "sft", gen="gen-0001", since="gen-0001")


def test_nothing_to_export_is_a_clear_error(cfg, store, tmp_path):
    with pytest.raises(OuroError, match="nothing to export"):
        run_export(cfg, store, "openai", out=tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_export_applies_the_review_mode_and_the_screens(cfg, store, tmp_path, capsys, monkeypatch):
    """An open bot: a stranger's ✏️ waits for /review and a link never leaves, as in training."""
    open_bot = load_settings(data_dir=cfg.data_dir, persona_file=cfg.persona_file, admin_ids=[7])
    mine = answered(store, 7, "hi", "hello")
    store.rate(mine, 7, 1)
    for i, text in enumerate(["Ahoy, a stranger's style", "visit spam.example.com now"]):
        t = answered(store, 900 + i, f"q{i}", "meh")
        store.await_correction(900 + i, 900 + i, t)
        store.take_correction(900 + i, 900 + i, text)
    with pytest.raises(OuroError, match="nothing to export yet: 2 items wait"):
        run_export(open_bot, store, "dpo", out=tmp_path / "x.jsonl")
    report = run_export(open_bot, store, "sft", out=tmp_path / "open.jsonl")
    assert [r["completion"][-1]["content"] for r in read_jsonl(tmp_path / "open.jsonl")] == ["hello"]
    assert report["source"]["left_out"] == {"screened": {"link": 2}, "waiting_for_review": 2, "not_trusted": 0}
    everyone = run_export(cfg, store, "sft", out=tmp_path / "all.jsonl")
    targets = [r["completion"][-1]["content"] for r in read_jsonl(tmp_path / "all.jsonl")]
    assert "Ahoy, a stranger's style" in targets and not any("example.com" in t for t in targets)
    assert everyone["source"]["left_out"]["waiting_for_review"] == 0
    from ouro.exports import report_lines
    assert "  left out, waiting for an admin in /review: 2" in report_lines(report)


def test_cli_export_json_report_and_default_location(cfg, store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OURO_PERSONA_FILE", str(cfg.persona_file))
    monkeypatch.setenv("OURO_LEARN_FROM", "everyone")
    add_reviewed(store, 100, 3)
    assert main(["export", "--format", "openai", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    folder = (cfg.data_dir / "exports").resolve()
    out = folder / report["path"].rsplit("/", 1)[1]
    assert report["path"] == str(out) and out.name.endswith(".openai.jsonl") and report["tokens_total"] > 0
    assert folder.stat().st_mode & 0o777 == 0o700
    assert len(read_jsonl(out)) == report["rows"] == 4
    assert main(["export", "--format", "ollama"]) == 1
    assert "for one generation" in capsys.readouterr().err


# --- Ollama ---------------------------------------------------------------------------------------

def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """A line-by-line port of Ollama's parser.ParseFile (parser/parser.go): (command, args) pairs."""
    nil, name, value, parameter, comment = range(5)
    valid = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
             "message", "requires"}

    def unquote(s):
        if s[:3] == '"""':
            return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
        if s[:1] == '"':
            return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
        return s, True

    def step(r, cs):
        space, newline = r in " \t", r in "\r\n"
        if cs == nil:
            return (comment, "") if r == "#" else (nil, "") if space or newline else (name, r)
        if cs == name:
            assert (r.isascii() and r.isalpha()) or space, "invalid command"
            return (name, r) if not space else (value, "")
        if cs == value:
            return (nil, r) if space or newline else (value, r)
        if cs == parameter:
            assert (r.isascii() and (r.isalnum() or r == "_")) or space, "bad parameter"
            return (parameter, r) if not space else (value, "")
        return (nil, "") if newline else (comment, "")

    commands, buf, curr, cmd = [], "", nil, ""
    for ch in text:
        nxt, r = step(ch, curr)
        if nxt != curr:
            if curr == name:
                word = buf.lower()
                assert word in valid, word
                if word == "parameter":
                    nxt = parameter
                else:
                    cmd = "model" if word == "from" else word
            elif curr == parameter:
                cmd = buf
            elif curr == value:
                s, ok = unquote(buf.strip())
                if not ok or r in " \t":
                    buf += r
                    continue
                commands.append((cmd, s))
            buf, curr = "", nxt
        if r and r.isprintable():
            buf += r
    assert curr in (nil, comment), "unterminated value"
    return commands


def go_template_render(template: str, messages: list[dict]) -> str:
    """Execute the Go text/template subset the exported TEMPLATEs use; anything else fails the test."""
    parts = re.split(r"(\{\{.*?\}\})", template, flags=re.S)
    for i, part in enumerate(parts):           # {{- / -}} trim the whitespace next to them, as in Go
        if part.startswith("{{- "):
            parts[i - 1] = parts[i - 1].rstrip()
        if part.endswith(" -}}") and i + 1 < len(parts):
            parts[i + 1] = parts[i + 1].lstrip()

    def run(pos: int, dot: dict | None, out: list[str]) -> int:
        while pos < len(parts):
            part = parts[pos]
            if not part.startswith("{{"):
                out.append(part)
                pos += 1
                continue
            action = part.strip("{}").strip("- \t\n")
            if action == "end":
                return pos + 1
            if action == "range .Messages":
                end = pos + 1
                for m in messages:
                    end = run(pos + 1, m, out)
                if not messages:
                    end = run(pos + 1, None, [])
                pos = end
                continue
            assert action in (".Role", ".Content") and dot is not None, f"unsupported action {part!r}"
            out.append(dot[action[1:].lower()])
            pos += 1
        return pos

    out: list[str] = []
    assert run(0, None, out) == len(parts)
    return "".join(out)


@pytest.fixture(scope="module")
def packaged_metadata():
    """The packaged GGUF's chat template and vocabulary, read with gguf-py (not our own scanner)."""
    from gguf import GGUFReader

    from lineage.generations import packaged_base_gguf

    reader = GGUFReader(packaged_base_gguf())

    def field(key):
        f = reader.fields[key]
        return f.parts[f.data[0]]

    template = bytes(field("tokenizer.chat_template")).decode("utf-8")
    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(tokens_field.parts[i]).decode("utf-8", errors="replace") for i in tokens_field.data]
    eos = tokens[int(field("tokenizer.ggml.eos_token_id")[0])]
    return template, tokens, eos


def test_modelfile_for_a_generation_matches_its_gguf(cfg, store, tmp_path, packaged_metadata):
    from serving.runtime import register_base

    register_base(cfg, store)
    gen = Lineage(cfg.models_dir).generation("gen-0000")
    report = run_export(cfg, None, "ollama", gen="gen-0000")
    path = cfg.data_dir / "exports" / "gen-0000.Modelfile"
    assert report["path"] == str(path.resolve()) and "ollama create ouroboros-gen-0000 -f" in report["create"]
    commands = parse_modelfile(path.read_text(encoding="utf-8"))
    one = {k: v for k, v in commands if k in ("model", "template", "system")}
    params: dict[str, list[str]] = {}
    for k, v in commands:
        if k not in one:
            params.setdefault(k, []).append(v)

    assert one["model"] == str(gen.gguf.resolve()) and gen.gguf.is_file()
    assert one["system"] == PERSONA
    jinja_template, tokens, eos = packaged_metadata
    assert params["stop"] == ["<|im_start|>", "<|im_end|>"] and eos in params["stop"]
    assert all(s in tokens for s in params["stop"])
    assert params["num_ctx"] == [str(cfg.n_ctx)] and params["temperature"] == [str(cfg.temperature)]
    conversations = probe_conversations(PERSONA) + [
        [{"role": "system", "content": PERSONA}, {"role": "user", "content": "  spaced  "},
         {"role": "assistant", "content": "a\n\nb"}, {"role": "user", "content": "<b>html</b> & {{ braces }}"}]]
    for messages in conversations:      # Ollama sends SYSTEM as the first message
        expected = render_chat(jinja_template, messages, True)
        assert go_template_render(one["template"], messages) == expected
    assert expected.endswith("<|im_start|>assistant\n") and expected.startswith(f"<|im_start|>system\n{PERSONA}")


LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_VOCAB = {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"}


def test_llama3_templates_translate_and_render_the_same():
    chat = ChatFormat(template=LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", add_bos=False)
    tr = translate(chat, LLAMA3_VOCAB, persona=PERSONA)
    assert tr.family.name == "llama3"
    assert tr.stops == ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>")
    for messages in probe_conversations(PERSONA):
        with_bos = chat.render(messages, add_generation_prompt=True)
        assert with_bos.startswith("<|begin_of_text|>")      # Ollama adds BOS when tokenizing; the template doesn't
        assert go_template_render(tr.template, messages) == with_bos.removeprefix("<|begin_of_text|>")


def test_unknown_or_lookalike_templates_are_refused():
    gemma = ("{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + "
             "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
             "{{'<start_of_turn>model\n'}}{% endif %}")
    with pytest.raises(OuroError, match="renders differently"):   # Gemma's turns, but role "assistant", not "model"
        translate(ChatFormat(template=gemma), {"<start_of_turn>", "<end_of_turn>"})
    alpaca = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
              "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    with pytest.raises(OuroError, match="not one Ouroboros can translate"):
        translate(ChatFormat(template=alpaca), {"###"})
    dated = LLAMA3.replace("message['content'] | trim", "('Cutting Knowledge Date: December 2023\n\n' "
                                                        "if message['role'] == 'system' else '') + message['content']")
    with pytest.raises(OuroError, match="renders differently"):
        translate(ChatFormat(template=dated), LLAMA3_VOCAB)
    chatml_extra_newline = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(OuroError, match="renders differently"):
        translate(ChatFormat(template=chatml_extra_newline), {"<|im_start|>", "<|im_end|>"})
    with pytest.raises(OuroError, match="vocabulary lacks"):
        translate(ChatFormat(template=LLAMA3), {"<|start_header_id|>"})


def test_a_persona_ollama_cannot_quote_is_refused(cfg, store, tmp_path):
    from serving.runtime import register_base

    register_base(cfg, store)
    cfg.persona_file.write_text('say """hi"""', encoding="utf-8")
    with pytest.raises(OuroError, match='contains """'):
        run_export(cfg, None, "ollama", gen="gen-0000", out=tmp_path / "M")
