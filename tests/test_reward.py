"""reward.py: extraction, format, an equivalence table, hostile inputs, fuzzing, the pool, the CLI."""

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reward
from reward import accuracy_reward, compute_rewards, extract_answer, format_reward, is_equivalent

# (pred, gold, choices, expected)
EQUIVALENCE = [
    # multiple-choice letters
    ("C", "C", None, True),
    ("(C)", "C", None, True),
    ("C.", "C", None, True),
    ("C: 40°", "C", None, True),
    ("C) 40", "C", None, True),
    ("\\text{C}", "C", None, True),
    ("c", "C", None, True),
    ("D", "C", None, False),
    ("(B)", "C", None, False),
    ("C", "(C)", None, True),
    ("A", "A", ["3", "4", "5"], True),
    ("B", "A", ["3", "4", "5"], False),
    ("4", "B", ["3", "4", "5"], True),
    ("five", "C", ["three", "four", "five"], True),
    ("Five", "C", ["three", "four", "five"], True),
    ("four", "C", ["three", "four", "five"], False),
    ("C", "five", ["three", "four", "five"], True),
    ("B", "five", ["three", "four", "five"], False),
    ("(C) five", "C", ["three", "four", "five"], True),
    ("E", "A", ["1", "2"], False),
    ("yellow", "A", ["yellow", "blue", "green", "red"], True),
    ("red", "A", ["yellow", "blue", "green", "red"], False),
    ("D", "D", ["yellow", "blue", "green", "red"], True),
    # integers, decimals, separators, signs
    ("5", "5", None, True),
    ("05", "5", None, True),
    ("5.0", "5", None, True),
    ("-3", "-3", None, True),
    ("+3", "3", None, True),
    ("-3", "3", None, False),
    ("1,000", "1000", None, True),
    ("1000", "1,000", None, True),
    ("12,345.5", "12345.5", None, True),
    ("1.25", "1.2", None, False),
    ("1.2", "1.25", None, False),
    ("0.3333333", "0.3333333", None, True),
    ("3.14159", "3.14", None, False),
    ("6", "7", None, False),
    (".5", "0.5", None, True),
    ("1e3", "1000", None, True),
    # fractions
    ("0.5", "\\frac{1}{2}", None, True),
    ("\\frac{1}{2}", "0.5", None, True),
    ("1/2", "0.5", None, True),
    ("\\dfrac{3}{4}", "0.75", None, True),
    ("-\\frac{1}{4}", "-0.25", None, True),
    ("\\frac{1}{3}", "0.5", None, False),
    ("2/4", "\\frac{1}{2}", None, True),
    # percentages
    ("12.5%", "0.125", None, True),
    ("12.5%", "12.5", None, True),
    ("12.5\\%", "12.5", None, True),
    ("0.125", "12.5%", None, True),
    ("13%", "0.125", None, False),
    ("50%", "50%", None, True),
    # units and degrees
    ("145°", "145", None, True),
    ("145^\\circ", "145", None, True),
    ("145^{\\circ}", "145", None, True),
    ("145 degrees", "145", None, True),
    ("146°", "145", None, False),
    ("5 cm", "5", None, True),
    ("\\text{5 cm}", "5", None, True),
    ("12 m", "12", None, True),
    ("$5$", "5", None, True),
    ("5.", "5", None, True),
    # LaTeX expressions via Math-Verify
    ("2\\sqrt{3}", "2\\sqrt{3}", None, True),
    ("\\sqrt{12}", "2\\sqrt{3}", None, True),
    ("2\\sqrt{3}", "2", None, False),
    ("\\sqrt{3}", "2\\sqrt{3}", None, False),
    ("\\frac{\\pi}{2}", "\\pi/2", None, True),
    ("x^2+1", "1+x^2", None, True),
    ("x^2+2", "1+x^2", None, False),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", None, True),
    ("3\\pi", "3\\pi", None, True),
    ("2\\pi", "3\\pi", None, False),
    # intervals, sets, lists
    ("[0, 2, 0]", "[0, 2, 0]", None, True),
    ("[0,2,0]", "[0, 2, 0]", None, True),
    ("[0, 2, 1]", "[0, 2, 0]", None, False),
    ("(1, 2]", "(1,2]", None, True),
    ("[1, 2]", "(1,2]", None, False),
    ("\\{1,2\\}", "\\{2,1\\}", None, True),
    ("1, 2, 3", "1,2,3", None, True),
    ("1, 2, 4", "1,2,3", None, False),
    ("(3, 4)", "(3,4)", None, True),
    # plain strings
    ("Yes", "yes", None, True),
    ("yes", "No", None, False),
    ("Blue", "blue", None, True),
    ("  dark   blue ", "Dark Blue", None, True),
    ("square", "circle", None, False),
    # empty / None
    ("", "5", None, False),
    (None, "5", None, False),
    ("5", None, None, False),
    ("5", "", None, False),
]


@pytest.mark.parametrize("pred, gold, choices, expected", EQUIVALENCE)
def test_equivalence_table(pred, gold, choices, expected):
    assert is_equivalent(pred, gold, choices) is expected


def test_table_is_large():
    assert len(EQUIVALENCE) >= 80


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>x</think><answer>\\boxed{5}</answer>", "5"),
        ("<think>\\boxed{1}</think><answer>so \\boxed{2} then \\boxed{3}</answer>", "3"),
        ("<think>\\boxed{1}</think><answer>no box</answer> \\boxed{7}", "7"),
        ("<answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
        ("<answer>\\boxed{\\{1,\\{2\\}\\}}</answer>", "\\{1,\\{2\\}\\}"),
        ("the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} and \\boxed{2", "1"),
        ("<answer> 17 </answer>", "17"),
        ("<answer>  </answer>", None),
        ("\\boxed{", None),
        ("no answer here", None),
        ("", None),
        (None, None),
        (12, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>r</think><answer>\\boxed{5}</answer>", 1.0),
        ("  <think>r</think>\n\n<answer>it is \\boxed{5}.</answer>\n", 1.0),
        ("<think>r</think><answer>5</answer>", 0.0),
        ("<answer>\\boxed{5}</answer>", 0.0),
        ("<think>r</think>", 0.0),
        ("hello <think>r</think><answer>\\boxed{5}</answer>", 0.0),
        ("<think>r</think> extra <answer>\\boxed{5}</answer>", 0.0),
        ("<think>r</think><answer>\\boxed{5}</answer> trailing", 0.0),
        ("<think>r</think><answer>\\boxed{5}</answer><answer>\\boxed{5}</answer>", 0.0),
        ("<think>a<think>b</think><answer>\\boxed{5}</answer>", 0.0),
        ("<think>r</think><answer>\\boxed{5</answer>", 0.0),
        ("<answer>\\boxed{5}</answer><think>r</think>", 0.0),
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward(text, expected):
    assert format_reward(text) == expected


def test_accuracy_reward_and_weights():
    good = "<think>3 + 4</think><answer>\\boxed{7}</answer>"
    assert reward.accuracy_reward(good, "7") == 1.0
    assert reward.accuracy_reward("<think>x</think><answer>\\boxed{8}</answer>", "7") == 0.0
    assert reward.accuracy_reward("The answer is (B).", "B", None) == 0.0  # no box, no answer tag
    scores = compute_rewards([good, "7", "<think>x</think><answer>\\boxed{8}</answer>"], ["7"] * 3, workers=0)
    assert [(s["format"], s["accuracy"], s["overall"]) for s in scores] == [(1, 1, 2), (0, 0, 0), (1, 0, 1)]
    weighted = compute_rewards([good], ["7"], workers=0, scoring=reward.Scoring(format_weight=0.5, accuracy_weight=2.0))
    assert weighted[0]["overall"] == 2.5
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        compute_rewards(["a", "b"], ["a"], workers=0)


HOSTILE = [
    "x" * 1_000_000,
    "{" * 10_000 + "}" * 10_000,
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "\\boxed{" * 50_000,
    "<answer>\\boxed{",
    "<think>" + "\\boxed{10^{10^{10^{10}}}}" + "</think><answer>\\boxed{10^{10^{10^{10}}}}</answer>",
    "<answer>\\boxed{" + "(" * 5000 + "</answer>",
    bytes(range(256)).decode("latin-1") * 100,
    "\x00\xff\ud7ff",
    "",
    None,
]


def test_hostile_inputs_never_raise_and_respect_the_timeout():
    timeout = 3.0
    golds = ["10^{10^{10^{10}}}" if i == 5 else "1" for i in range(len(HOSTILE))]
    start = time.monotonic()
    scores = compute_rewards(HOSTILE, golds, workers=2, timeout_s=timeout)
    elapsed = time.monotonic() - start
    assert len(scores) == len(HOSTILE)
    for s in scores:
        assert set(s) == {"overall", "format", "accuracy", "timed_out"}
        assert s["format"] in (0.0, 1.0) and s["accuracy"] in (0.0, 1.0)
    # every response is scored or cut within its own time limit: at most N / 2 rounds of 2 workers of
    # `timeout` s each, plus a worker restart (a fresh Python, seconds on a loaded machine) per cut
    # and the pool's start-up. A hang would be hours; the margins only absorb a busy machine.
    assert elapsed < len(HOSTILE) * (timeout + 10) / 2 + 30
    assert scores[2]["accuracy"] == 0.0 and extract_answer(HOSTILE[2]) is not None
    for text in HOSTILE:  # the extraction and format functions alone are linear and total: tens of
        t0 = time.monotonic()  # ms on a 1 MB string; catastrophic backtracking would take minutes
        extract_answer(text)
        format_reward(text)
        assert time.monotonic() - t0 < 20.0


def sleepy_score(response, gold, choices=None, scoring=reward.Scoring()):
    """score_one, except that a response 'HANG' never returns (a stand-in for a pathological parse)."""
    if response == "HANG":
        time.sleep(3600)
    return reward.score_one(response, gold, choices, scoring)


def test_pool_cuts_a_hanging_worker_keeps_order_and_survives():
    responses = ["<think>t</think><answer>\\boxed{1}</answer>", "HANG", "<answer>\\boxed{3}</answer>", "x"] * 2
    golds = ["1", "2", "3", "4"] * 2
    start = time.monotonic()
    with reward.RewardPool(workers=2, timeout_s=1.0, score_fn=sleepy_score) as pool:
        scores = compute_rewards(responses, golds, pool=pool)
        again = compute_rewards(responses[:1], golds[:1], pool=pool)
    assert time.monotonic() - start < 15
    assert [s["accuracy"] for s in scores] == [1.0, 0.0, 1.0, 0.0] * 2
    assert [s["timed_out"] for s in scores] == [False, True, False, False] * 2
    assert [s["format"] for s in scores] == [1.0, 0.0, 0.0, 0.0] * 2
    assert again[0]["accuracy"] == 1.0


class SlowToStart:
    """sleepy_score as a callable whose unpickling in a fresh worker takes 1.5 s: a stand-in for the
    spawn and imports of a worker on a loaded machine, three times the 0.5 s limit below."""

    def __getstate__(self):
        return {"start_up_s": 1.5}

    def __setstate__(self, state):
        time.sleep(state["start_up_s"])

    def __call__(self, **job):
        return sleepy_score(**job)


def test_pool_does_not_charge_a_workers_start_up_to_a_response():
    """The limit counts from dispatch to a started worker: responses that score in milliseconds are
    not timed out while their worker starts (1.5 s > 0.5 s limit), at the first call nor right after a
    hanging response's worker was killed and replaced (before, both came back as timed out: wrong
    answers credited 0 for the machine's load)."""
    responses = ["<answer>\\boxed{1}</answer>", "HANG", "<answer>\\boxed{3}</answer>"]
    with reward.RewardPool(workers=1, timeout_s=0.5, score_fn=SlowToStart()) as pool:
        scores = compute_rewards(responses, ["1", "2", "3"], pool=pool)
    assert [s["timed_out"] for s in scores] == [False, True, False]
    assert [s["accuracy"] for s in scores] == [1.0, 0.0, 1.0]


def test_pool_on_a_pathological_expression_keeps_order():
    # 10^{10^{10^{10}}} vs a huge integer makes sympy work for a long time: the pool must cut it
    responses = [f"<think>t</think><answer>\\boxed{{{i}}}</answer>" for i in range(6)]
    responses[3] = "<think>t</think><answer>\\boxed{9^{9^{9^{9}}}}</answer>"
    golds = [str(i) for i in range(6)]
    golds[3] = "9^{9^{9^{9}}} + 1"
    with reward.RewardPool(workers=2, timeout_s=1.0) as pool:
        scores = compute_rewards(responses, golds, pool=pool)
        again = compute_rewards(responses[:2], golds[:2], pool=pool)  # the pool survives
    assert [s["accuracy"] for i, s in enumerate(scores) if i != 3] == [1.0] * 5
    assert scores[3]["accuracy"] == 0.0 and scores[3]["format"] == 1.0
    assert [s["accuracy"] for s in again] == [1.0, 1.0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=300), min_size=1, max_size=6), st.text(max_size=20))
def test_fuzz_compute_rewards_returns_valid_scores(responses, gold):
    scores = compute_rewards(responses, [gold] * len(responses), workers=0)
    assert len(scores) == len(responses)
    for s in scores:
        assert s["format"] in (0.0, 1.0) and s["accuracy"] in (0.0, 1.0)
        assert s["overall"] == s["format"] + s["accuracy"]


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="\\boxed{}<>/answerthink 0123", max_size=200))
def test_fuzz_extraction_on_tag_soup(text):
    answer = extract_answer(text)
    assert answer is None or isinstance(answer, str)
    assert format_reward(text) in (0.0, 1.0)


def test_no_eval_or_exec_in_reward_code():
    source = open(reward.__file__).read()
    assert "eval(" not in source.replace("_eval(", "") and "exec(" not in source


def test_cli_scores_a_predictions_file(tmp_path, capsys):
    rows = [
        {"id": "a", "response": "<think>t</think><answer>\\boxed{4}</answer>", "answer": "4"},
        {"id": "b", "response": "<think>t</think><answer>\\boxed{B}</answer>", "answer": "A", "choices": ["x", "y"]},
        {"id": "c", "response": "just 5", "answer": "5"},
    ]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward.main([str(preds), "--workers", "0"])
    out = capsys.readouterr().out
    assert "accuracy   0.3333" in out and "format     0.6667" in out and "timeouts   0" in out
    scores = [json.loads(x) for x in (tmp_path / "preds.scores.jsonl").read_text().splitlines()]
    assert [s["accuracy"] for s in scores] == [1.0, 0.0, 0.0] and scores[0]["extracted"] == "4"


# (pred, gold): the same answer written with other Unicode code points; before unicode_clean each scored 0
UNICODE_PAIRS = [
    ("1\u200b2", "12"),  # zero-width space inside a number
    ("12", "1\u200b2"),
    ("1\u200c2", "12"),  # zero-width non-joiner
    ("1\u2060000", "1000"),  # word joiner
    ("\ufeff42", "42"),  # BOM
    ("3\u00ad5", "35"),  # soft hyphen
    ("1,000\u00a0cm", "1000"),  # NBSP before the unit
    ("5\u202fkg", "5"),  # narrow NBSP
    ("\u200e42\u200f", "42"),  # bidi marks (LRM, RLM)
    ("\u202a3.5\u202c", "3.5"),  # bidi embedding
    ("\u2066x+1\u2069", "x+1"),  # bidi isolates
    ("\uff21", "A"),  # full-width letter
    ("\uff08A\uff09", "A"),  # full-width brackets
    ("\uff08\uff22\uff09", "(B)"),
    ("\uff11\uff12", "12"),  # full-width digits
    ("\uff0d\uff13", "-3"),  # full-width minus sign
    ("\u22123", "-3"),  # Unicode minus
    ("caf\u0065\u0301", "caf\u00e9"),  # decomposed é against the composed one
    ("\u00bd", "1/2"),  # vulgar fraction
    ("\u00bd", "0.5"),
    ("0.5", "\u00bd"),
    ("\u00be", "\\frac{3}{4}"),
    ("1\u20442", "0.5"),  # fraction slash
    ("x\u00b2", "x^2"),  # superscript digit
    ("\u2460", "1"),  # circled digit
    ("\uff4e\uff4f", "No"),  # full-width lower-case
]


@pytest.mark.parametrize("pred, gold", UNICODE_PAIRS)
def test_unicode_variants_score_right(pred, gold):
    assert is_equivalent(pred, gold), (pred, gold)
    assert reward.accuracy_reward(f"<think>t</think><answer>\\boxed{{{pred}}}</answer>", gold) == 1.0


@pytest.mark.parametrize(
    "pred, gold",
    [("2\u00b2", "22"), ("1\u200b2", "1 2 3"), ("\u00bd", "2"), ("\uff21", "B"), ("\u200b", "\u200b")],
)
def test_unicode_cleanup_does_not_merge_different_answers(pred, gold):
    assert not is_equivalent(pred, gold)


def test_unicode_clean_values():
    assert reward.unicode_clean("\uff08\uff21\uff09\u00a0\u00bd\u200b") == "(A) 1/2"
    assert reward.unicode_clean("x\u00b2\u2212y") == "x^2-y"
    assert reward.clean_answer("\u200e$12$\u200f") == "12"


# Issue 28: integers and exact decimals compared exactly, fractions against a decimal gold by its written
# places, space-kind thousands separators between groups of three digits
EXACT_NUMBERS = [
    ("1000001", "1000000", False),
    ("3628803", "3628800", False),  # 10! + 3
    ("123456788", "123456789", False),
    ("123456789", "123456789", True),
    ("3628800", "3628800.0", True),
    ("1000000.000001", "1000000", False),
    ("0.1000001", "0.1", False),
    ("12345678901234567891", "12345678901234567890", False),  # beyond float precision
    ("12345678901234567890", "12,345,678,901,234,567,890", True),
    ("1 000", "1000", True),
    ("1\u00a0000", "1000", True),  # no-break space
    ("1\u202f000", "1000", True),  # narrow no-break space
    ("1\u2009000", "1000", True),  # thin space
    ("1000", "1\u202f000", True),
    ("1 000 000", "1000000", True),
    ("12 345.5", "12345.5", True),
    ("1 000 m", "1000", True),
    ("1 00", "100", False),  # groups of three only
    ("10 00", "1000", False),
    ("1 0000", "10000", False),
    ("1 000", "1001", False),
    ("1 000,000", "1000000", False),  # one separator kind throughout
    ("1/3", "0.33", True),  # the gold's written precision: 1/3 at two places
    ("1/3", "0.333", True),
    ("1/3", "0.34", False),
    ("2/3", "0.67", True),  # rounded half up
    ("2/3", "0.66", False),
    ("0.333333", "\\frac{1}{3}", True),  # a decimal against a fraction: within REL_TOL
    ("0.33", "\\frac{1}{3}", False),
    ("1/8", "12.5%", True),
]


@pytest.mark.parametrize("pred, gold, expected", EXACT_NUMBERS)
def test_numbers_are_compared_exactly(pred, gold, expected):
    assert is_equivalent(pred, gold) is expected
    assert accuracy_reward(f"<answer>\\boxed{{{pred}}}</answer>", gold) == float(expected)  # the training reward


def test_answer_cleaning_is_linear_in_whitespace():
    """40,000 spaces inside \\boxed{} (and around a unit): the unit-stripping pattern was `\\s*unit$`, tried at
    every position (quadratic: minutes). Run in a worker with a hard limit far above the linear time
    (milliseconds) so a regression shows as a timeout, not a flaky clock comparison."""
    hostile = [
        "<answer>\\boxed{" + " " * 40_000 + "}</answer>",
        "<answer>\\boxed{5" + " " * 40_000 + "x}</answer>",
        "<answer>\\boxed{" + " " * 40_000 + "cm5}</answer>",
        "<answer>\\boxed{1" + "\u00a0" * 40_000 + "000}</answer>",
    ]
    scores = compute_rewards(hostile, ["5"] * len(hostile), workers=2, timeout_s=60)
    assert [s["timed_out"] for s in scores] == [False] * len(hostile)
    assert [s["accuracy"] for s in scores] == [0.0] * len(hostile)


# ---------------------------------------------------------------------------------------------
# A sign is never lost: -x is not x unless x is 0
# ---------------------------------------------------------------------------------------------

SIGNED_GOLDS = [
    "7", "1000000", "3628800", "0.5", "3.14159", "0.001", "2.5e3", "1.5e-7", "12.5%", "3/4", "\\frac{3}{4}",
    "\\dfrac{22}{7}", "\\frac{3^{1008}-1}{3^{1009}}", "\\frac{1}{3^{40}}", "3^{-40}", "2^{100}", "\\frac{2^{100}}{3}",
    "10^{-20}", "45°", "45^{\\circ}", "\\frac{90}{23}^{\\circ}", "30 degrees", "3\\pi", "\\frac{\\pi}{4}",
    "\\frac{3\\pi}{2}", "\\pi", "\\sqrt{2}", "2\\sqrt{3}", "\\frac{\\sqrt{3}}{2}", "e^{-50}", "5 cm", "3.5 kg",
    "9\\pi \\mathrm{cm}^{2}", "12 \\text{ m}", "\\frac{1}{3^{40}} \\mathrm{cm}", "1,000",
]  # fmt: skip


def negations(x: str) -> list[str]:
    """-x as answers write it: a minus before it, before it in parentheses, the Unicode minus."""
    return [f"-{x}", f"-({x})", f"\u2212{x}"]


def generated_golds(n: int, seed: int = 0) -> list[str]:
    """Gold forms drawn from a seeded generator: integers, decimals, fractions, \\frac with powers (tiny
    and large magnitudes), \\pi multiples, degrees and units."""
    import random

    rng = random.Random(seed)
    units = ["cm", "m", "kg", "units", "\\mathrm{cm}^{2}"]
    forms = [
        lambda: str(rng.randint(1, 10**9)),
        lambda: f"{rng.randint(0, 999)}.{rng.randint(1, 999):03d}",
        lambda: f"\\frac{{{rng.randint(1, 99)}}}{{{rng.randint(2, 99)}}}",
        lambda: f"\\frac{{{rng.randint(1, 9)}}}{{{rng.randint(2, 9)}^{{{rng.randint(20, 60)}}}}}",
        lambda: (
            f"\\frac{{{rng.randint(2, 9)}^{{{rng.randint(50, 900)}}}-1}}{{{rng.randint(2, 9)}^{{{rng.randint(50, 900)}}}}}"
        ),
        lambda: f"\\frac{{{rng.randint(1, 9)}\\pi}}{{{rng.randint(2, 12)}}}",
        lambda: f"{rng.randint(1, 359)}^{{\\circ}}",
        lambda: f"\\frac{{{rng.randint(1, 180)}}}{{{rng.randint(2, 30)}}}^{{\\circ}}",
        lambda: f"{rng.randint(1, 99)} {rng.choice(units)}",
    ]
    return [forms[i % len(forms)]() for i in range(n)]


@pytest.mark.parametrize("gold", SIGNED_GOLDS + generated_golds(27))
def test_a_sign_is_never_lost(gold):
    """is_equivalent (training's accuracy and eval's free-form rule) and the reward of a boxed answer:
    the negation of a non-zero gold never matches it, on either side; the gold itself does."""
    assert is_equivalent(gold, gold) and accuracy_reward(f"<answer>\\boxed{{{gold}}}</answer>", gold) == 1.0
    for negated in negations(gold):
        assert not is_equivalent(negated, gold), (negated, gold)
        assert not is_equivalent(gold, negated), (gold, negated)
    assert accuracy_reward(f"<answer>\\boxed{{-{gold}}}</answer>", gold) == 0.0


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("-(\\frac{90}{23}^{\\circ})", "\\frac{90}{23}^{\\circ}"),  # MATH-Vision: '°', then the minus dropped
        ("-(\\frac{3^{1008}-1}{3^{1009}})", "\\frac{3^{1008}-1}{3^{1009}}"),  # Math-Verify: 'equal' to its negation
    ],
)
def test_the_sign_flips_math_verify_accepted_score_0(pred, gold):
    assert not is_equivalent(pred, gold) and accuracy_reward(f"<answer>\\boxed{{{pred}}}</answer>", gold) == 0.0


@pytest.mark.parametrize("zero", ["0", "0.0", "0°", "0 cm", "\\sin(\\pi)"])
def test_minus_zero_is_zero_and_equal_forms_still_match(zero):
    assert all(is_equivalent(negated, zero) for negated in negations(zero))
    assert is_equivalent("3^{-40}", "\\frac{1}{3^{40}}") and is_equivalent("-3^{-40}", "-\\frac{1}{3^{40}}")
    assert is_equivalent("-(\\frac{90}{23}^{\\circ})", "-\\frac{90}{23}^{\\circ}")
