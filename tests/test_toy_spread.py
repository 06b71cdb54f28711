"""The `spread` toy variant (the sampler-study bench): right RL answers, SFT traces that slip at one rate per multiplier."""

import hashlib
import math
import re

import pytest
from test_toy import answer_from_pixels
from test_toy_slip import TRACE

from data import toy

SLIP_SHA256 = "c9c0c1b15f6af04f3e701e22d316d5dc36a0309243ed112fab0aac8cbe24f915"
DEFAULT_SHA256 = "2b2a6f732e6be97716ecae179ce071628f6a4aa5c92012db3279c15a0063087e"


@pytest.fixture(scope="module")
def train_rows() -> tuple[list[dict], list[dict]]:
    return toy.make_rows(3000, seed=0, split="train", variant="spread")


def multiplier(row: dict) -> int:
    return int(re.search(r"multiply by (\d)", row["problem"]).group(1))


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


def test_spread_traces_are_consistent_and_slips_change_the_answer(train_rows):
    rl_rows, sft_rows = train_rows
    for rl, sft in zip(rl_rows, sft_rows):
        k, k2, op, mul, m, m2, add, result, boxed = TRACE.fullmatch(sft["messages"][1]["content"]).groups()
        assert k == k2 and m == m2 and result == boxed and int(mul) == multiplier(rl)
        if sft["slip"]:
            assert op == "+" and int(m) == int(k) + int(mul) and boxed != rl["answer"]
        else:
            assert op == "x" and boxed == rl["answer"]


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
