"""The `spread` toy variant (the sampler-study bench): right RL answers, SFT traces that slip in a different way
and at a different rate per multiplier."""

import hashlib
import math
import re

import pytest
from test_toy import answer_from_pixels, cell_colours

import reward
from data import toy

SLIP_SHA256 = "c9c0c1b15f6af04f3e701e22d316d5dc36a0309243ed112fab0aac8cbe24f915"
DEFAULT_SHA256 = "2b2a6f732e6be97716ecae179ce071628f6a4aa5c92012db3279c15a0063087e"


@pytest.fixture(scope="module")
def train_rows() -> tuple[list[dict], list[dict]]:
    return toy.make_rows(3000, seed=0, split="train", variant="spread")


# "I see k red squares." then one or more steps "a <op> b = c." and the boxed answer
TRACE = re.compile(
    r"<think>I see (\d) red squares\.((?: -?\d+ [x+-] \d = -?\d+\.)+)</think><answer>\\boxed\{(-?\d+)\}</answer>"
)
STEP = re.compile(r" (-?\d+) ([x+-]) (\d) = (-?\d+)\.")
APPLY = {"x": lambda a, b: a * b, "+": lambda a, b: a + b, "-": lambda a, b: a - b}
# multiplier -> the (operator, operand) of each step of its slipped trace ("mul" / "add": the question's)
SLIP_SHAPES = {
    3: [("+", "mul"), ("+", "add")],  # adds 3 instead of multiplying
    4: [("x", "mul"), ("-", "add")],  # subtracts the addend
    5: [("x", "mul")],  # forgets the add
    6: [("x", "mul"), ("+", "add"), ("+", "mul")],  # adds 6 once more
}
RIGHT_SHAPE = [("x", "mul"), ("+", "add")]


def multiplier(row: dict) -> int:
    return int(re.search(r"multiply by (\d)", row["problem"]).group(1))


def addend(row: dict) -> int:
    return int(re.search(r"then add (\d)", row["problem"]).group(1))


def test_spread_generation_is_deterministic():
    a = toy.make_rows(60, seed=3, split="train", variant="spread")
    assert a == toy.make_rows(60, seed=3, split="train", variant="spread")
    assert a[0] != toy.make_rows(60, seed=3, split="val", variant="spread")[0]
    assert a[0] != toy.make_rows(60, seed=3, split="train", variant="slip")[0]


def test_the_default_and_slip_variants_are_unchanged_by_the_spread_variant():
    """The default and slip toys' rows (on which the committed bench numbers were measured) hash to
    what the generator gave before the spread variant existed (hashes taken from that code)."""
    _, sft = toy.make_rows(400, seed=0, split="train", variant="slip")
    traces = "".join(s["messages"][1]["content"] for s in sft)
    assert hashlib.sha256(traces.encode()).hexdigest() == SLIP_SHA256
    rl, sft = toy.make_rows(400, seed=0, split="train")
    text = "".join(s["messages"][1]["content"] + r["problem"] for r, s in zip(rl, sft))
    assert hashlib.sha256(text.encode()).hexdigest() == DEFAULT_SHA256


def test_spread_rl_answers_are_right_and_every_multiplier_appears(train_rows):
    rl_rows, _ = train_rows
    for split in ("val", "test"):
        rl_rows = rl_rows + toy.make_rows(200, seed=0, split=split, variant="spread")[0]
    for row in rl_rows[::7] + rl_rows[-400:]:  # decoding every image is slow; a stride plus all val / test rows
        assert row["family"] == "arith" and answer_from_pixels(row) == row["answer"]
    assert {multiplier(r) for r in rl_rows} == set(toy.SPREAD_SHARES)
    assert {addend(r) for r in rl_rows} == set(range(1, 10))  # never 0: a forgotten add must change the answer


def test_every_slip_changes_the_answer_at_every_count_and_addend():
    """Each multiplier's slip, at every count 0..4 and addend 1..9: a wrong answer, and one the reward
    scores 0 against the right one (so "-4" is not read as 4)."""
    assert set(toy.SPREAD_SLIPS) == {m for m, share in toy.SPREAD_SHARES.items() if share > 0}
    for mul, slip in toy.SPREAD_SLIPS.items():
        for k in range(5):
            for add in range(1, 10):
                ex = toy.ToyExample(["red"] * k + ["blue"] * (4 - k), "arith", "red", mul=mul, add=add)
                _, right = toy.solve(ex)
                assert right == str(k * mul + add)
                reasoning, wrong = slip(ex)
                response = f"<think>{reasoning}</think><answer>\\boxed{{{wrong}}}</answer>"
                assert wrong != right and reward.accuracy_reward(response, right) == 0.0, (mul, k, add)


def test_spread_traces_are_consistent_and_each_multiplier_slips_its_own_way(train_rows):
    """Every trace's arithmetic holds step by step and it boxes its last result; a right trace is
    "k x mul, + add", a slipped one has its multiplier's shape (SLIP_SHAPES) and a wrong boxed answer;
    the count is right (read back from the pixels on a stride of the rows)."""
    rl_rows, sft_rows = train_rows
    for i, (rl, sft) in enumerate(zip(rl_rows, sft_rows)):
        k, steps, boxed = TRACE.fullmatch(sft["messages"][1]["content"]).groups()
        if i % 7 == 0:
            assert int(k) == cell_colours(rl["images"][0]["bytes"]).count("red")
        value, shape = int(k), []
        for a, op, b, c in STEP.findall(steps):
            assert int(a) == value and APPLY[op](int(a), int(b)) == int(c)  # each step starts from the last result
            shape.append((op, int(b)))
            value = int(c)
        assert int(boxed) == value
        operand = {"mul": multiplier(rl), "add": addend(rl)}
        expected = SLIP_SHAPES[multiplier(rl)] if sft["slip"] else RIGHT_SHAPE
        assert shape == [(op, operand[name]) for op, name in expected]
        assert (boxed == rl["answer"]) != sft["slip"]


def test_spread_slip_rates_follow_the_shares(train_rows):
    """Per multiplier, slips ~ Binomial(M, share): the 4.5-sigma bound of test_toy_slip (fails for a
    correct generator with probability < 1e-5 per multiplier); share 0 means no slip at all."""
    rl_rows, sft_rows = train_rows
    for mul, share in toy.SPREAD_SHARES.items():
        draws = [s["slip"] for r, s in zip(rl_rows, sft_rows) if multiplier(r) == mul]
        rate = sum(draws) / len(draws)
        if share == 0.0:
            assert rate == 0.0
        else:
            assert abs(rate - share) <= 4.5 * math.sqrt(share * (1 - share) / len(draws)), (mul, rate)
