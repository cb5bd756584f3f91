"""Gate and stop rule on scripted eval results."""

from evals.gate import Thresholds, decide, stop_rule

TH = Thresholds()
GOOD = {"recall": 0.95, "generalization": 0.9, "style_drift": 1.0, "format": 1.0}


def test_a_good_child_passes():
    r = decide(GOOD, {"style_drift": 1.0, "format": 1.0}, TH)
    assert r.passed and r.reasons == []


def test_each_threshold_refuses_with_a_reason_naming_it():
    cases = {"recall": 0.5, "generalization": 0.2, "style_drift": 5.0, "format": 0.4}
    for key, bad in cases.items():
        r = decide({**GOOD, key: bad}, None, TH)
        assert not r.passed and any(key.replace("_", " ") in reason for reason in r.reasons), (key, r.reasons)


def test_unmeasured_generalization_is_refused():
    r = decide({**GOOD, "generalization": None}, None, TH)
    assert not r.passed and "not measured" in r.reasons[0]


def test_regression_against_the_parent_beyond_the_margin_is_refused():
    assert not decide({**GOOD, "style_drift": 2.0}, {"style_drift": 0.0, "format": 1.0}, TH).passed
    assert decide({**GOOD, "style_drift": 1.0}, {"style_drift": 0.0, "format": 1.0}, TH).passed
    assert not decide({**GOOD, "format": 0.85}, {"style_drift": 1.0, "format": 1.0}, Thresholds(format_margin=0.1)).passed
    assert decide({**GOOD, "format": 0.85}, {"style_drift": 1.0, "format": 1.0}, TH).passed


def test_invariant_failures_refuse_even_with_perfect_scores():
    r = decide(GOOD, None, TH, invariant_failures=["merge changed logits by 0.3"])
    assert not r.passed and r.reasons == ["merge changed logits by 0.3"]


def test_stop_rule_needs_two_consecutive_stalled_and_drifting_steps():
    g = lambda gen, drift: {"generalization": gen, "style_drift": drift}  # noqa: E731
    assert stop_rule([g(0.9, 1.0), g(0.91, 1.5), g(0.92, 2.0)]) is not None
    assert stop_rule([g(0.9, 1.0), g(0.91, 1.5)]) is None                       # only one step
    assert stop_rule([g(0.8, 1.0), g(0.9, 1.5), g(0.91, 2.0)]) is None          # first step learned enough
    assert stop_rule([g(0.9, 1.0), g(0.91, 1.0), g(0.92, 2.0)]) is None         # first step did not drift
    assert stop_rule([g(0.9, 1.0), g(0.91, 1.5), g(0.99, 2.0)]) is None         # last step learned
    assert stop_rule([g(None, 1.0), g(0.91, 1.5), g(0.92, 2.0)]) is None


def test_a_parent_below_target_lets_a_child_improve_step_by_step():
    weak_parent = {"style_drift": 5.0, "format": 0.4}
    better = decide({**GOOD, "style_drift": 4.0, "format": 0.6}, weak_parent, TH)
    assert better.passed and any("no worse than the parent" in n for n in better.notes)
    noise = decide({**GOOD, "style_drift": 5.8, "format": 0.4}, weak_parent, TH)     # one probe's flip: noise
    assert noise.passed and any("beyond the margin" in n for n in noise.notes)
    worse = decide({**GOOD, "style_drift": 6.5, "format": 0.6}, weak_parent, TH)
    assert not worse.passed and "regressed" in worse.reasons[0]
    worse_format = decide({**GOOD, "style_drift": 4.0, "format": 0.1}, weak_parent, TH)
    assert not worse_format.passed and "format" in worse_format.reasons[0]
    # single-probe steps cannot add up: the base bounds how far a lineage may drift
    base = {"style_drift": 3.0, "format": 0.6}
    drifting = decide({**GOOD, "style_drift": 4.5, "format": 0.6}, {"style_drift": 3.8, "format": 0.6}, TH, base=base)
    assert not drifting.passed and "base's 3.0" in drifting.reasons[0]
    assert decide({**GOOD, "style_drift": 3.8, "format": 0.6}, {"style_drift": 3.0, "format": 0.6}, TH, base=base).passed
    sliding = decide({**GOOD, "format": 0.3}, {"style_drift": 1.0, "format": 0.4}, TH, base=base)
    assert not sliding.passed and "base's 0.6" in sliding.reasons[0]
    # a parent that met the target holds the child to it
    assert not decide({**GOOD, "style_drift": 2.5}, {"style_drift": 2.0, "format": 1.0}, TH).passed
