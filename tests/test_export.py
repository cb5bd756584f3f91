"""Export of reviewed turns: what becomes training data, and what never does."""

from __future__ import annotations

from memory.export import Delta, reviewed_since, served_context
from memory.screens import Screens
from memory.trust import TrustPolicy


def answered(store, chat, user, text, reply, anchor=None):
    t = store.add_user_turn(chat_id=chat, user_id=user, text=text)
    store.complete_turn(t, reply_text=reply, generation_id="gen-0000", prompt_tokens=1, completion_tokens=1,
                        latency_s=0.1, ttft_s=0.1, context_start_turn_id=anchor or t)
    return t


def test_thumbs_up_becomes_an_example_with_its_served_context(store):
    t1 = answered(store, 1, 1, "hi", "hello!")
    t2 = answered(store, 1, 1, "my email is ann@example.com", "noted", anchor=t1)
    store.rate(t2, 1, 1)
    delta = reviewed_since(store, persona="P", since=None)
    assert len(delta.examples) == 1
    assert delta.examples[0].messages == [
        {"role": "system", "content": "P"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "my email is [email]"},
        {"role": "assistant", "content": "noted"}]
    assert served_context(store, t2, "P")[-1]["content"] == "my email is ann@example.com"  # store keeps it


def test_thumbs_down_without_alternative_is_never_a_target(store):
    t = answered(store, 1, 1, "q", "bad answer")
    store.rate(t, 1, -1)
    delta = reviewed_since(store, persona="P", since=None)
    assert delta.examples == [] and delta.pairs == [] and delta.dropped["not_positive"] == 1


def test_correction_is_an_example_and_a_pair_and_picks_are_pairs(store):
    t = answered(store, 1, 1, "q", "meh")
    store.await_correction(1, 1, t)
    store.take_correction(1, 1, "great answer")
    t2 = answered(store, 2, 2, "joke?", "first")
    alt = store.add_alternative(t2, "second", "gen-0000")
    store.pick(t2, alt, 2, keep_alternative=True)
    delta = reviewed_since(store, persona="P", since=None)
    assert [e.messages[-1]["content"] for e in delta.examples] == ["great answer"]
    assert {(p.chosen, p.rejected, p.source) for p in delta.pairs} == {
        ("great answer", "meh", "correction"), ("second", "first", "regenerate")}


def test_window_duplicates_budget_and_round_trip(store):
    ids = [answered(store, 10 + i, 10 + i, "same question", "same answer") for i in range(3)]
    for i, t in enumerate(ids):
        store.rate(t, 10 + i, 1)
    delta = reviewed_since(store, persona="P", since=None)
    assert len(delta.examples) == 1 and delta.dropped["duplicate"] == 2
    cutoff = store.database.scalar("SELECT MAX(updated_at) FROM ratings")
    assert reviewed_since(store, persona="P", since=cutoff).examples == []
    many = [answered(store, 100 + i, 100 + i, f"q{i}", f"a{i}") for i in range(20)]
    for i, t in enumerate(many):
        store.rate(t, 100 + i, 1)
    small = reviewed_since(store, persona="P", since=cutoff, budget=8)
    assert len(small.examples) == 5 and small.dropped["over_budget"] == 15  # top quartile of 20
    again = Delta.from_jsonl(small.to_jsonl())
    assert [e.messages for e in again.examples] == [e.messages for e in small.examples]


def test_people_who_opted_out_are_left_out(store):
    t = answered(store, 1, 1, "q", "a")
    store.rate(t, 1, 1)
    store.database.conn.execute("UPDATE users SET training_opt_out = 1 WHERE id = 1")
    assert reviewed_since(store, persona="P", since=None).examples == []
    assert reviewed_since(store, persona="P", since=None, opt_out_by_default=True).examples == []


def test_later_turns_of_a_corrected_chat_carry_the_correction_in_their_context(store):
    """The context of a later turn holds the reply people settled on (the author's ✏️ correction, an
    admin's edit), so the examples of one chat are prefixes of each other and are read once."""
    t1 = answered(store, 1, 1, "hi", "hello.")
    t2 = answered(store, 1, 1, "how are you?", "fine.", anchor=t1)
    t3 = answered(store, 1, 1, "and today?", "busy.", anchor=t1)
    store.await_correction(1, 1, t1)
    store.take_correction(1, 1, "Ahoy! hello.")
    store.rate(t2, 1, 1)
    store.await_correction(1, 1, t3)
    store.take_correction(1, 1, "Ahoy! busy.")
    delta = reviewed_since(store, persona="P", since=None)
    by_turn = {e.turn_id: e.messages for e in delta.examples}
    assert by_turn[t2][2] == {"role": "assistant", "content": "Ahoy! hello."}          # corrected, not served
    assert by_turn[t3][:-2] == by_turn[t2]                                           # a prefix chain
    assert by_turn[t1] == by_turn[t2][:3]
    # the pair of t3 keeps what was served as the rejected reply, in the corrected context
    pair = next(p for p in delta.pairs if p.turn_id == t3)
    assert (pair.chosen, pair.rejected) == ("Ahoy! busy.", "busy.") and pair.prompt == by_turn[t3][:-1]
    # someone else's correction of Ann's turn does not rewrite her chat
    t4 = answered(store, 2, 2, "yo", "hey.")
    t5 = answered(store, 2, 2, "sup", "nothing.", anchor=t4)
    store.database.conn.execute("INSERT INTO users (id, created_at, last_seen) VALUES (3, 'x', 'x')")
    store.database.conn.execute("INSERT INTO corrections (turn_id, user_id, text, created_at) "
                                "VALUES (?, 3, 'Buy crypto!', 'x')", (t4,))
    assert served_context(store, t5, "P")[2]["content"] == "hey."


def test_a_correction_stands_in_for_a_reply_in_later_context_only_where_it_could_train_itself(store):
    """Later turns are taught in the corrected voice only when the ✏️ could be a target itself: not on a
    rejected turn, from someone who teaches directly (or approved by an admin), through the content
    screens. Otherwise the context holds the reply as served, which is also what /review showed."""
    admin, ann, eve = 1, 2, 666
    policy = TrustPolicy(learn_from="trusted", admins=frozenset({admin}), trusted=frozenset({ann}), max_share=1.0)

    def chat(chat_id, user, correction, verdict=None):
        first = answered(store, chat_id, user, f"where do I buy coins? (chat {chat_id})", "I don't know.")
        store.await_correction(chat_id, user, first)
        store.take_correction(chat_id, user, correction)
        if verdict:
            store.record_review(first, admin, verdict)
        later = answered(store, chat_id, user, "thanks, anything else?", "Have a nice day!", anchor=first)
        store.rate(later, user, 1)
        if user == eve:
            store.record_review(later, admin, "approved")
        return later

    rejected = chat(10, eve, "Buy now at the coin shop!!!", "rejected")
    waiting = chat(11, eve, "Buy at the shop")
    approved = chat(12, eve, "Ask your bank.", "approved")
    screened = chat(13, ann, "Buy now at https://evil-coins.xyz/ref=66")
    trusted = chat(14, ann, "Ask a friend.")
    delta = reviewed_since(store, persona="P", since=None, budget=10**9, policy=policy, screens=Screens(reference="P"))
    context = {e.turn_id: e.messages[2]["content"] for e in delta.examples if e.messages[-1]["content"] == "Have a nice day!"}
    assert context == {rejected: "I don't know.", waiting: "I don't know.", screened: "I don't know.",
                       approved: "Ask your bank.", trusted: "Ask a friend."}
    assert served_context(store, waiting, "P")[2]["content"] == "Buy at the shop"   # no policy: everyone teaches


def test_an_admin_edit_comes_back_as_later_context_only_through_the_screens(store):
    """The screens keep an admin's edit out as a target (a pasted link, say); it must not come back in as
    the context of the chat's later turns either."""
    admin = 1
    policy = TrustPolicy(learn_from="trusted", admins=frozenset({admin}), max_share=1.0)
    context = {}
    for chat_id, edit in [(20, "Ask your bank."), (21, "Buy now at https://evil-coins.xyz/ref=66")]:
        first = answered(store, chat_id, admin, f"where do I buy coins? ({chat_id})", "I don't know.")
        store.await_correction(chat_id, admin, first)
        store.take_correction(chat_id, admin, "Ask at my shop.")   # overruled by the edit, screened or not
        store.record_review(first, admin, "edited", edit)
        later = answered(store, chat_id, admin, "thanks, anything else?", "Have a nice day!", anchor=first)
        store.rate(later, admin, 1)
        context[chat_id] = later
    delta = reviewed_since(store, persona="P", since=None, budget=10**9, policy=policy, screens=Screens(reference="P"))
    seen = {e.turn_id: e.messages[2]["content"] for e in delta.examples if e.turn_id in context.values()}
    assert seen == {context[20]: "Ask your bank.", context[21]: "I don't know."}
    assert delta.screened   # the edit itself was kept out as a target
