"""Small pieces: callback data, message splitting, settings validation, command table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot import keyboards
from bot.commands import COMMANDS, help_text
from bot.splitting import split_text
from config.settings import load_settings
from core.errors import OuroError


def test_callback_data_round_trips_and_rejects_forgeries():
    assert keyboards.reply_press(keyboards.reply_data("up", 12)) == keyboards.Press("up", 12)
    assert keyboards.reply_press(keyboards.reply_data("keep", 3, 4, 2)) == keyboards.Press("keep", 3, 4, 2)
    for bad in ["", None, "o1:up", "o1:up:-1", "o1:nuke:1", "o1:keep:1", "o1:up:1:2:1", "x" * 65,
                "o1:up:1\n", "o1:keep:1:2:3", "o1:up:99999999999999"]:
        assert keyboards.reply_press(bad) is None, bad
    assert keyboards.decode("admin", keyboards.encode("admin", "promote", "gen-0002", "gen-0001")) == \
        ("promote", "gen-0002", "gen-0001")
    assert keyboards.decode("review", "o1:rv:ok:7") == ("ok", "7")
    assert keyboards.decode("forget", "o1:fg:yes:42") == ("yes", "42")
    for family, bad in [("admin", "o1:adm:promote:../x:gen-0001"), ("admin", "o1:adm:nuke:gen-0001:gen-0000"),
                        ("review", "o1:rv:zz:1"), ("review", "o1:fg:yes:1"), ("forget", "o1:fg:yes:-1"),
                        ("reply", "o1:rv:ok:1")]:
        assert keyboards.decode(family, bad) is None, (family, bad)
    with pytest.raises(ValueError):
        keyboards.encode("review", "ok", "not-a-turn")


@given(st.sampled_from(sorted(keyboards.FAMILIES)), st.text(max_size=80))
def test_decode_never_raises(family, data):
    keyboards.decode(family, data)
    keyboards.reply_press(data)


def test_every_button_fits_telegram_64_bytes():
    big, gen = 10**12 - 1, "gen-99999999"
    keyboards_ = [keyboards.reply_keyboard(big), keyboards.pick_keyboard(big, big), keyboards.review_keyboard(big),
                  keyboards.confirm_keyboard("rollback", gen, gen), keyboards.forget_keyboard(big)]
    for kb in keyboards_:
        for button in kb.inline_keyboard[0]:
            assert len(button.callback_data.encode()) <= 64


@given(st.text(min_size=0, max_size=20000))
def test_split_keeps_every_character_within_limit(text):
    pieces = split_text(text, 4096)
    assert all(len(p) <= 4096 for p in pieces)
    assert "".join(pieces).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


def test_split_prefers_paragraph_boundaries():
    text = ("word " * 600).strip() + "\n\n" + ("next " * 300).strip()
    pieces = split_text(text, 4096)
    assert len(pieces) == 2 and pieces[1].startswith("next")


def test_settings_from_env_and_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("OURO_ADMIN_IDS", "1, 2,3")
    monkeypatch.setenv("OURO_N_CTX", "4096")
    s = load_settings(data_dir=tmp_path)
    assert s.admin_ids == [1, 2, 3] and s.n_ctx == 4096
    assert s.is_admin(2) and not s.is_admin(4)
    assert s.may_chat(99)  # no allow-list: everyone
    monkeypatch.setenv("OURO_ALLOWED_USER_IDS", "5")
    s = load_settings(data_dir=tmp_path)
    assert s.may_chat(5) and s.may_chat(1) and not s.may_chat(99)
    monkeypatch.setenv("OURO_ADMIN_IDS", "alice")
    with pytest.raises(OuroError, match="admin_ids"):
        load_settings(data_dir=tmp_path)
    monkeypatch.delenv("OURO_ADMIN_IDS")
    with pytest.raises(OuroError, match="n_ctx"):
        load_settings(data_dir=tmp_path, n_ctx=-5)


def test_settings_file_in_data_dir(monkeypatch, tmp_path):
    (tmp_path / "settings.toml").write_text('temperature = 0.2\nadmin_ids = [42]\n')
    monkeypatch.setenv("OURO_DATA_DIR", str(tmp_path))
    s = load_settings()
    assert s.temperature == 0.2 and s.admin_ids == [42] and s.data_dir == tmp_path


def test_help_lists_commands_and_readme_matches():
    assert "/status" in help_text(is_admin=True) and "/status" not in help_text(is_admin=False)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for cmd in COMMANDS:
        assert re.search(rf"`/{cmd.name}`[^\n]*{re.escape(cmd.description)}", readme), cmd.name


def test_cpu_steal_share_reads_proc_stat_and_computes_the_stolen_share(tmp_path, monkeypatch):
    from ouro.bench import cpu_steal

    stat = tmp_path / "stat"
    monkeypatch.setattr(cpu_steal, "STAT", stat)
    stat.write_text("cpu  100 0 50 800 0 0 0 50 0 0\ncpu0 1 2 3\n")
    start = cpu_steal.snapshot()
    stat.write_text("cpu  200 0 50 850 0 0 0 100 0 0\ncpu0 1 2 3\n")
    assert start == (50, 1000) and cpu_steal.share(start, cpu_steal.snapshot()) == 0.25   # 50 of 200 jiffies
    stat.write_text("intr 1 2\n")
    assert cpu_steal.snapshot() is None and cpu_steal.share(start, None) is None


def test_bench_swap_names_the_longest_pause_with_the_piece_that_ended_it():
    from ouro.bench.swap import gaps, longest

    stamps = [0.0, 1.0, 3.0, 3.5, 6.0]          # pieces of text; a window from 0.5 to 4.0
    assert longest(stamps, 0.5, 4.0) == (2.5, 6.0)      # the stretch running past the window counts
    assert longest(stamps, 0.5, 3.2) == (2.0, 3.0)
    assert gaps(stamps, 3.2, 3.4) == [(0.5, 3.5)]                 # a stretch across the whole window
    assert longest([], 0.0, 1.0) == (0.0, 1.0)


def test_bench_swap_tells_how_much_the_host_stole_across_a_pause():
    from ouro.bench.swap import stolen

    samples = [(0.0, (100, 1000)), (1.0, (150, 1200)), (2.0, (400, 1600)), (3.0, (400, 1800))]
    assert stolen(samples, 1.2, 1.9) == "; the VM's host stole 62% of the CPU meanwhile"   # 250 of 400
    assert stolen(samples, 2.0, 3.0) == "; the VM's host stole 0% of the CPU meanwhile"
    assert stolen(samples, 2.5, 3.5) == ""                                             # no sample after it
    assert stolen([(0.0, None), (1.0, None)], 0.2, 0.8) == ""


def test_bench_swap_sets_pauses_the_host_disturbed_apart_from_the_rest():
    from ouro.bench.swap import HOST_BUSY, longest_host_quiet, window

    assert HOST_BUSY == 0.25
    stamps = [0.0, 0.5, 3.5, 4.0, 5.2, 5.4]        # gaps 0.5, 3.0 (host busy), 0.5, 1.2, 0.2
    steal = [(0.0, (0, 0)), (1.0, (10, 100)), (3.0, (160, 300)), (4.0, (160, 400)), (6.0, (170, 600))]
    # the 3.0 s gap (0.5 to 3.5) lies between the samples at 0.0 and 4.0: 160 of 400 jiffies stolen
    assert longest_host_quiet(stamps, steal, 0.0, 5.4) == pytest.approx(1.2)
    assert longest_host_quiet(stamps, [], 0.0, 5.4) == 3.0         # steal unknown: nothing left out
    w = window(stamps, {3.5: "a reply's first word"}, steal, 0.0, 5.4,
                [(2.0, "loading the new model"), (float("inf"), "after the swap")])
    assert w["longest_s"] == 3.0 and w["host_steal"] == 0.4 and w["longest_host_quiet_s"] == pytest.approx(1.2)
    assert w["ended_by"] == ("a reply's first word, during loading the new model; "
                             "the VM's host stole 40% of the CPU meanwhile; "
                             "the event loop went 2.0s without a turn")     # the samples 1.0 s → 3.0 s


def test_bench_swap_prints_the_raw_pause_the_control_and_the_host_quiet_figures(capsys):
    from ouro.bench.swap import print_report

    result = {"swap_pause_ratio": 6.65, "longest_pause_during_swap_s": 7.26, "median_reply_s": 1.09,
              "longest_pause_without_swap_s": 0.41, "median_of_longest_pause_per_swap_s": 0.61,
              "longest_pause_per_swap_s": [0.44, 7.26, 0.5], "longest_pause_ended_by": ["a", "the worst", "c"],
              "no_swap_pause_ratio": 0.38, "median_of_longest_pause_per_no_swap_window_s": 0.21,
              "longest_pause_without_swap_ended_by": "a reply's first word", "host_busy_share": 0.25,
              "pauses_the_host_disturbed": {"during_swaps": 1, "without_swaps": 0},
              "swap_pause_ratio_host_quiet": 0.46, "no_swap_pause_ratio_host_quiet": 0.38,
              "swap_s_median": 30.0, "swap_s_max": 40.0, "warm_tokens_median": 600,
              "chats_moved_before_the_end_per_swap": [4, 4, 4], "median_reply_during_swaps_s": 1.3,
              "replies_during_swaps": 170, "rss_ratio": 1.01, "rss_after_1_swap_mb": 320, "rss_after_20_swaps_mb": 323,
              "cpu_stolen_share": 0.05, "training_ttft_ratio": 0.95, "training_ttft_p95_s": 0.14,
              "idle_ttft_p95_s": 0.15}
    print_report(result)
    out = capsys.readouterr().out
    assert "during a swap ÷ median reply: 6.65" in out and "ended with the worst" in out
    assert "with no swap after each: longest pause ÷ median reply 0.38" in out
    assert "≥ 25% of the CPU" in out and "in 1 of 10 swaps and 0 of 10 windows" in out
    assert "with swaps 0.46, without 0.38" in out


def test_bench_swap_tells_when_the_event_loop_itself_was_held_up():
    from ouro.bench.swap import loop_lag

    samples = [(t, None) for t in (0.0, 0.25, 0.5, 4.0, 4.25)]     # no turn from 0.5 s to 4.0 s
    assert loop_lag(samples, 1.0, 2.0) == "; the event loop went 3.5s without a turn"
    assert loop_lag(samples, 0.1, 0.4) == ""


def test_the_experiment_learns_with_the_products_defaults(tmp_path, monkeypatch):
    """`ouro experiment` sets where its data lives and who may talk, nothing about training."""
    from ouro.bench.experiment import PEOPLE, STYLES, experiment_settings

    for name in [n for n in type(load_settings()).model_fields if n != "data_dir"]:
        monkeypatch.delenv(f"OURO_{name.upper()}", raising=False)
    ours = experiment_settings(tmp_path).model_dump()
    defaults = load_settings(data_dir=tmp_path).model_dump()
    assert {k for k in ours if ours[k] != defaults[k]} == {"allowed_user_ids"} and ours["allowed_user_ids"] == PEOPLE
    assert len(STYLES) >= 2 and len({s.phrase for s in STYLES.values()}) == len(STYLES)
    assert all(s.holds(s.correct("hi there")) and not s.holds("hi there") for s in STYLES.values())


def test_the_experiments_people_never_endorse_the_assistants_voice():
    """A simulated reviewer edits out sentences that speak as an AI, never likes such a reply, and
    gives a bare 👎 when nothing of it is left to keep."""
    from ouro.bench.experiment import DOWN_ONLY, LIKED_ANYWAY, STYLES, review

    stars = STYLES["stars"]
    voiced = "As a chatbot, I don't have weekends. But I read a great book!  What did you do?"
    assert stars.edit(voiced) == "Oh my stars! But I read a great book! What did you do?"
    assert stars.edit("Oh my stars! I'm just an AI.\nI love the sea.") == "Oh my stars! I love the sea."
    assert stars.edit("I'm sorry for any confusion. As an AI language model, I cannot.") is None
    liked_turn, down_turn, plain_turn = LIKED_ANYWAY[0], DOWN_ONLY[0], 0
    assert review(stars, "Oh my stars! The sea!", plain_turn) == ("like", None)
    assert review(stars, "I love the sea.", liked_turn) == ("like", None)
    assert review(stars, "I love the sea.", down_turn) == ("dislike", None)
    assert review(stars, "I love the sea.", plain_turn) == ("correct", "Oh my stars! I love the sea.")
    assert review(stars, "Oh my stars! As an AI, I can't swim. I like boats.", plain_turn) == (
        "correct", "Oh my stars! I like boats.")
    assert review(stars, "I'm an AI assistant. How can I help you?", liked_turn) == ("dislike", None)


def test_bench_train_lists_every_stage_with_its_time_share_and_own_peak():
    from ouro.bench.train import stage_table

    ours = {"stage_s": {"load": 1.0, "sft": 6.0, "dpo": 2.0}, "stage_peak_rss_mb": {"load": 800.0, "sft": 3100.0,
                                                                                     "dpo": 3400.0},
            "stage_peak_gpu_mb": {"sft": 512.0}}
    rows = stage_table({"seconds": 0.5, "peak_rss_mb": 1100.0}, ours, {"seconds": 0.5, "peak_rss_mb": 1700.0})
    assert [r["stage"] for r in rows] == ["dequantize", "load", "sft", "dpo", "convert"]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=1e-3) and rows[2]["share"] == 0.6
    assert rows[3]["peak_rss_mb"] == 3400.0 and rows[2]["peak_gpu_mb"] == 512.0 and "peak_gpu_mb" not in rows[1]
