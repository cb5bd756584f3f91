"""Lone 👍/👎 as KTO items: what the export makes of them under the trust rules, a real tiny KTO pass,
the 👎 reason's storage, and the migration that adds it."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from bot.review import review_text
from config.settings import load_settings
from engine.template import ChatFormat
from memory.export import Delta, Rated, reviewed_since, still_unwanted
from memory.migrations import migrate, pending
from memory.screens import Screens
from memory.store import Store
from memory.trust import policy_for
from trainer.finetune import TrainConfig, add_lora, load_base, train
from trainer.kto import KTOItem, encode_items, kto_train, sequence_logps

ADMIN, ANN, EVE = 1, 101, 666
PERSONA = "You are Ouro, a warm and playful friend."


def answered(store, user: int, i: int, reply: str) -> int:
    chat = user * 1000 + i
    t = store.add_user_turn(chat_id=chat, user_id=user, text=f"question {i} from {user}")
    store.complete_turn(t, reply_text=reply, generation_id="gen-0000", prompt_tokens=1, completion_tokens=1,
                        latency_s=0.1, ttft_s=0.1, context_start_turn_id=t)
    return t


def export(store, tmp_path, **settings):
    s = load_settings(data_dir=tmp_path, admin_ids=[ADMIN], **settings)
    return reviewed_since(store, persona=PERSONA, since=None, policy=policy_for(s, store),
                          screens=Screens(blocklist=tuple(s.blocklist), reference=PERSONA))


def kto(delta) -> set[tuple[int, bool]]:
    return {(r.turn_id, r.desirable) for r in delta.rated}


# --- the export -----------------------------------------------------------------------------------
def test_lone_ratings_become_kto_items_and_a_rating_beside_an_alternative_does_not(store):
    liked = answered(store, ANN, 1, "Ahoy! tea it is 🍵")
    store.rate(liked, ANN, 1)
    disliked = answered(store, ANN, 2, "As an AI, I'd be happy to help.")
    store.rate(disliked, ANN, -1)
    assert store.give_reason(disliked, ANN, "voice")
    corrected = answered(store, ANN, 3, "meh")
    store.rate(corrected, ANN, -1)
    store.await_correction(ANN * 1000 + 3, ANN, corrected)
    store.take_correction(ANN * 1000 + 3, ANN, "Yarr, much better 🌊")
    picked = answered(store, ANN, 4, "first take")
    store.rate(picked, ANN, 1)
    store.pick(picked, store.add_alternative(picked, "second take", "gen-0000"), ANN, keep_alternative=True)

    delta = reviewed_since(store, persona=PERSONA, since=None)
    assert kto(delta) == {(liked, True), (disliked, False)}
    down = next(r for r in delta.rated if not r.desirable)
    assert down.completion == "As an AI, I'd be happy to help." and down.reason == "voice"
    assert down.prompt[-1] == {"role": "user", "content": "question 2 from 101"} and down.contributor == ANN
    up = next(r for r in delta.rated if r.desirable)
    example = next(e for e in delta.examples if e.turn_id == liked)
    assert up.prompt + [{"role": "assistant", "content": up.completion}] == example.messages
    assert "As an AI, I'd be happy to help." not in [e.messages[-1]["content"] for e in delta.examples]
    # they travel with the generation's data, and come back the same
    assert kto(Delta.from_jsonl(delta.to_jsonl())) == kto(delta)


def test_a_strangers_thumbs_down_on_an_open_bot_waits_for_review_and_approving_it_agrees(store, tmp_path):
    stranger = answered(store, EVE, 1, "a dull reply")
    store.rate(stranger, EVE, -1)
    own = answered(store, ADMIN, 1, "a reply the admin disliked")
    store.rate(own, ADMIN, -1)
    delta = export(store, tmp_path)                                  # open bot: learn_from auto = trusted
    assert kto(delta) == {(own, False)} and delta.waiting == {EVE: 1}
    assert delta.rated[0].weight == 3.0                              # the admin's tier weight
    item = store.review_item(stranger)
    assert item.lone_down and "agrees with the 👎" in review_text(item)
    store.record_review(stranger, ADMIN, "approved")
    delta = export(store, tmp_path)
    agreed = next(r for r in delta.rated if r.turn_id == stranger)
    assert not agreed.desirable and agreed.approved and agreed.contributor == ADMIN and agreed.source == "review"
    assert delta.waiting == {} and stranger not in {e.turn_id for e in delta.examples}   # never an SFT target
    # a rejected turn is nothing at all
    rejected = answered(store, ADMIN, 2, "whatever")
    store.rate(rejected, ADMIN, -1)
    store.record_review(rejected, ADMIN, "rejected")
    assert rejected not in {r.turn_id for r in export(store, tmp_path).rated}
    # the admins mode ignores strangers' 👎 outright
    later = answered(store, EVE, 2, "another dull reply")
    store.rate(later, EVE, -1)
    admins = export(store, tmp_path, learn_from="admins")
    assert later not in {r.turn_id for r in admins.rated} and admins.dropped["not_trusted"] == 1


def test_a_screened_thumbs_down_never_trains_even_approved(store, tmp_path):
    spam = answered(store, EVE, 1, "join my channel t.me/cheapstuff for a promo code")
    store.rate(spam, EVE, -1)
    delta = export(store, tmp_path, learn_from="everyone")
    assert delta.rated == [] and delta.screened.get("link") == 1 and delta.screened_items[0]["turn_id"] == spam
    store.record_review(spam, ADMIN, "approved")
    assert export(store, tmp_path, learn_from="everyone").rated == []


def test_one_strangers_thumbs_down_flood_is_capped_like_any_other_source(store, tmp_path):
    for i in range(20):
        store.rate(answered(store, EVE, i, f"reply {i}"), EVE, -1)
    for i in range(2):
        store.rate(answered(store, ANN, i, f"Ann's reply {i}"), ANN, -1)
    delta = export(store, tmp_path, learn_from="everyone", max_share_per_source=0.5, min_items_per_source=2)
    mine = [r for r in delta.rated if r.contributor == EVE]
    assert len(mine) == 2 and len(delta.deferred) == 18                  # her share: half of what trains
    assert sum(r.contributor == ANN for r in delta.rated) == 2
    # the deferred ones compete again next generation, if they still are lone 👎s someone may teach
    waiting = [r for r in delta.deferred if isinstance(r, Rated)]
    assert len(still_unwanted(store, waiting, opt_out_by_default=False)) == 18
    store.rate(waiting[0].turn_id, EVE, 1)                                     # she changed her mind
    store.record_review(waiting[1].turn_id, ADMIN, "rejected")
    assert len(still_unwanted(store, waiting, opt_out_by_default=False)) == 16
    store.forget_user(EVE)
    assert still_unwanted(store, waiting, opt_out_by_default=False) == []


# --- the 👎 reason ---------------------------------------------------------------------------------
def test_a_reason_needs_a_thumbs_down_and_a_changed_rating_clears_it(store):
    t = answered(store, ANN, 1, "too much text")
    assert not store.give_reason(t, ANN, "long")                           # not rated yet
    store.rate(t, ANN, -1)
    assert store.give_reason(t, ANN, "long") and store.rating_reasons(t) == ["too long"]
    with pytest.raises(ValueError, match="reason must be one of"):
        store.give_reason(t, ANN, "boring")
    assert "👎 1 (too long)" in review_text(store.review_item(t))
    store.rate(t, ANN, 1)
    assert store.rating_reasons(t) == [] and not store.give_reason(t, ANN, "long")


def test_the_reason_migration_applies_to_an_existing_database(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, stop_before="m010_rating_reasons")
    conn.execute("INSERT INTO users (id, username, first_name, created_at, last_seen) "
                 "VALUES (7, 'ann', 'Ann', 'then', 'then')")
    conn.execute("INSERT INTO chats (id, type, title, created_at) VALUES (5, 'private', NULL, 'then')")
    conn.execute("INSERT INTO sessions (chat_id, started_at) VALUES (5, 'then')")
    conn.execute("INSERT INTO turns (session_id, chat_id, user_id, user_text, created_at, status, reply_text) "
                 "VALUES (1, 5, 7, 'old question', 'then', 'answered', 'old answer')")
    conn.execute("INSERT INTO ratings (turn_id, user_id, value, created_at, updated_at) VALUES (1, 7, -1, 'then', 'then')")
    conn.close()
    store = Store.open(path)
    assert pending(store.database.conn) == [] and store.rating(1, 7) == -1 and store.rating_reasons(1) == []
    assert store.give_reason(1, 7, "wrong") and store.rating_reasons(1) == ["wrong"]
    assert kto(reviewed_since(store, persona="", since=None)) == {(1, False)}
    store.close()


# --- a real KTO pass on a tiny Llama ---------------------------------------------------------------
WANTED, UNWANTED = "Ahoy! tea, always 🍵", "As an AI, I'd be happy to help you choose a beverage."


def items(n: int, start: int = 0) -> list[KTOItem]:
    out = []
    for i in range(start, start + n):
        prompt = [{"role": "system", "content": PERSONA}, {"role": "user", "content": f"tea or coffee? #{i}"}]
        out.append(KTOItem(prompt, WANTED if i % 2 == 0 else UNWANTED, i % 2 == 0))
    return out


def test_a_tiny_kto_pass_lowers_the_unwanted_reply_against_the_wanted_one(tiny_models):
    model, tokenizer = load_base(tiny_models / "gen-0000" / "hf")
    fmt = ChatFormat.from_tokenizer(tokenizer)
    cfg = TrainConfig(rank=8, alpha=16, kto_steps=24, kto_epochs=8, kto_batch=2, kto_lr=5e-3, kto_beta=0.5, seed=3)
    model = add_lora(model, cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trained, dropped = encode_items(items(6), tokenizer, fmt, 256)
    assert dropped == 0 and [e.completion_ids[-1] for e in trained] == [tokenizer.convert_tokens_to_ids("<|im_end|>")] * 6
    # both replies on prompts the pass never sees: the gap must move there too
    fresh, _ = encode_items([KTOItem(i.prompt, WANTED, True) for i in items(2, 50)]
                            + [KTOItem(i.prompt, UNWANTED, False) for i in items(2, 50)], tokenizer, fmt, 256)

    def gap(encoded) -> float:
        with torch.no_grad():
            logps = sequence_logps(model, [(e.prompt_ids, e.completion_ids) for e in encoded], pad).tolist()
        wanted = [lp for lp, e in zip(logps, encoded, strict=True) if e.desirable]
        unwanted = [lp for lp, e in zip(logps, encoded, strict=True) if not e.desirable]
        return sum(wanted) / len(wanted) - sum(unwanted) / len(unwanted)

    before, before_fresh = gap(trained), gap(fresh)
    model.eval()
    unwanted_before = sequence_logps(model, [(e.prompt_ids, e.completion_ids) for e in trained if not e.desirable],
                                     pad).detach()
    result = kto_train(model, trained, cfg, pad)
    model.eval()
    unwanted_after = sequence_logps(model, [(e.prompt_ids, e.completion_ids) for e in trained if not e.desirable],
                                    pad).detach()
    assert result["steps"] == 24 and result["desirable"] == 3 and result["undesirable"] == 3
    assert result["loss_end"] < result["loss_start"]
    assert (unwanted_after < unwanted_before).all()                       # the 👎'd reply got less likely
    assert gap(trained) > before + 2.0 and result["margin_end"] > 2.0      # nats, against the wanted one
    assert gap(fresh) > before_fresh + 1.0


def test_train_runs_kto_after_sft_and_reports_what_it_used(tiny_models, tmp_path):
    chats = [[{"role": "system", "content": PERSONA}, {"role": "user", "content": f"hi #{i}"},
              {"role": "assistant", "content": "Ahoy! 🌊"}] for i in range(4)]
    cfg = TrainConfig(rank=8, alpha=16, lr=5e-3, epochs=1, min_steps=2, batch=2, max_seq_len=128, dpo_steps=0,
                      kto_steps=3, kto_batch=2, kto_lr=5e-3, seed=2)
    result = train(tiny_models / "gen-0000" / "hf", chats, [], tmp_path / "child", cfg, progress=False,
                   kto_items=items(5))
    assert (result.kto_desirable, result.kto_undesirable, result.kto_steps) == (3, 2, 3)
    assert result.kto_loss_start is not None and result.stage_peak_rss_mb["kto"] > 0
    assert list(result.stage_s) == ["load", "encode", "sft", "kto", "merge", "save"]
    skipped = train(tiny_models / "gen-0000" / "hf", chats, [], tmp_path / "child2",
                    TrainConfig(**{**cfg.__dict__, "kto_steps": 0}), progress=False, kto_items=items(5))
    assert skipped.kto_steps == 0 and "kto" not in skipped.stage_s


@pytest.mark.parametrize("field, value", [("kto_steps", -1), ("kto_batch", 0), ("kto_beta", 0), ("kto_lr", 0),
                                          ("kto_epochs", 0)])
def test_bad_kto_settings_name_their_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_the_web_review_page_shows_the_reason_and_what_approving_means(tmp_path, monkeypatch, capsys):
    import httpx

    from ouro.cli import main
    from tests.helpers.web import ADMIN as WEB_ADMIN
    from tests.helpers.web import start_web

    monkeypatch.setenv("OURO_ADMIN_IDS", str(WEB_ADMIN))
    web = start_web(tmp_path)
    try:
        turn, user = web.turns[0], 1001
        web.store.rate(turn, user, -1)
        web.store.give_reason(turn, user, "long")
        capsys.readouterr()
        assert main(["--data-dir", str(web.settings.data_dir), "web-login", "--port", web.base_url.rsplit(":", 1)[1],
                     "--admin", str(WEB_ADMIN)]) == 0
        link = capsys.readouterr().out.strip()
        with httpx.Client(base_url=web.base_url, follow_redirects=False, timeout=20) as client:
            assert client.get(link.removeprefix(web.base_url)).status_code == 303
            page = client.get("/review").text
        card = page[page.index(f'id="turn-{turn}"'):]
        assert "👎 1 <span class=\"reasons\">(too long)</span>" in card and "agrees with the 👎" in card
    finally:
        web.close()
