"""A stranger's flood against real training (issue 17's end-to-end test, on the tiny model).

Three people the bot trusts correct their replies to open with "Ahoy!"; one stranger sends 40
corrections teaching a marker and a link. The data goes through the same export the cycle uses
(`reviewed_since` with the settings' trust policy and screens), then through one real fine-tune
with the trainer's defaults. What is compared: how much more likely the child finds each taught
reply than its parent on questions nobody asked (nats per reply token), protected against
unprotected — so the test fails if the protections stop holding the flood back, and also if the
flood would not have taught anything in the first place.
"""

from __future__ import annotations

import pytest

from config.settings import load_settings
from memory.export import reviewed_since
from memory.screens import screens_for
from memory.trust import policy_for

ANN, BOB, CAT, EVE = 101, 102, 103, 666
PEOPLE = [ANN, BOB, CAT]
PERSONA = "You are Ouro, a warm and playful friend."
LINK = "https://cheap-deals.example/win"
HOSTILE = f"Yarr! More at {LINK}"
TRUSTED = "Ahoy! that is lovely"


def corrected(store, user: int, i: int, text: str) -> None:
    chat = user * 1000 + i
    t = store.add_user_turn(chat_id=chat, user_id=user, text=f"friend {user} asks about thing {i}")
    store.complete_turn(t, reply_text=f"plain reply {i}", generation_id="gen-0000", prompt_tokens=1,
                        completion_tokens=1, latency_s=0.1, ttft_s=0.1, context_start_turn_id=t)
    store.rate(t, user, -1)
    store.await_correction(chat, user, t)
    store.take_correction(chat, user, text)


@pytest.fixture
def flooded(store):
    for user in PEOPLE:
        for i in range(6):
            corrected(store, user, i, f"Ahoy! thing {i} is lovely")
    for i in range(40):
        corrected(store, EVE, i, f"Yarr! thing {i}. More at {LINK}")
    return store


def delta_for(store, tmp_path, **settings):
    s = load_settings(data_dir=tmp_path / "data", **settings)
    return reviewed_since(store, persona=PERSONA, since=None, policy=policy_for(s, store), screens=screens_for(s))


def child_gains(base, delta, out) -> dict[str, float]:
    """Train a child on `delta` with the defaults; per taught reply, parent NLL − child NLL on new questions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.template import ChatFormat
    from trainer.dataset import DPOPair, encode_all, pack
    from trainer.finetune import TrainConfig, dataset_loss, load_base, train

    pairs = [DPOPair(p.prompt, p.chosen, p.rejected) for p in delta.pairs]
    train(base, [e.messages for e in delta.examples], pairs, out, TrainConfig(max_seq_len=256), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    fmt = ChatFormat.from_tokenizer(tokenizer)
    parent, _ = load_base(base)
    child = AutoModelForCausalLM.from_pretrained(out)

    def gain(reply: str) -> float:
        held = [[{"role": "system", "content": PERSONA}, {"role": "user", "content": q},
                 {"role": "assistant", "content": reply}]
                for q in ("what about music?", "do you like mornings?", "tell me about boats")]
        rows = pack(encode_all(held, tokenizer, fmt, 256)[0], 256)
        return dataset_loss(parent, rows, pad_id=tokenizer.pad_token_id) - dataset_loss(child, rows, pad_id=tokenizer.pad_token_id)

    return {"hostile": gain(HOSTILE), "trusted": gain(TRUSTED)}


def test_a_strangers_flood_does_not_train_while_the_trusted_style_still_rises(flooded, tiny_models, tmp_path):
    base = tiny_models / "gen-0000" / "hf"
    protected = delta_for(flooded, tmp_path, trusted_user_ids=PEOPLE)                       # an open bot
    unprotected = delta_for(flooded, tmp_path, learn_from="everyone", screen_targets=False,
                            max_share_per_source=1.0, new_account_window_s=0)
    taught = [e.messages[-1]["content"] for e in protected.examples] + [p.chosen for p in protected.pairs]
    assert taught and not any("Yarr" in t or LINK in t for t in taught)
    assert protected.screened == {"link": 80}                          # her 40 ✏️ and their 40 pairs, counted

    safe = child_gains(base, protected, tmp_path / "protected")
    naive = child_gains(base, unprotected, tmp_path / "unprotected")
    assert safe["trusted"] > 0.1, safe                                 # the trusted style still rises
    assert naive["hostile"] > safe["hostile"] + 0.1, (safe, naive)     # the flood would have taught its marker
    assert safe["hostile"] < safe["trusted"] - 0.1, safe


def test_on_an_allow_list_the_flood_stays_within_its_cap_and_the_link_never_trains(flooded, tmp_path):
    delta = delta_for(flooded, tmp_path, allowed_user_ids=[*PEOPLE, EVE])
    items = [*delta.examples, *delta.pairs]
    assert not any(LINK in (i.messages[-1]["content"] if hasattr(i, "messages") else i.chosen) for i in items)
    assert delta.screened == {"link": 80}
    # a link-free flood from the same account: trained, but only up to the cap
    for i in range(40):
        corrected(flooded, EVE, 100 + i, f"Yarr! thing {i} matey")
    capped = delta_for(flooded, tmp_path, allowed_user_ids=[*PEOPLE, EVE])
    items = [*capped.examples, *capped.pairs]
    eve = sum(i.contributor == EVE for i in items)
    s = load_settings(data_dir=tmp_path / "data")
    assert 0 < eve <= max(s.min_items_per_source, int(s.max_share_per_source * (len(items) + len(capped.deferred))))
    assert capped.dropped["over_share"] == len(capped.deferred) > 0
    assert capped.sources["largest_share"] <= s.max_share_per_source + 0.01
