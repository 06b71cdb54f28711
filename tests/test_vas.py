"""vas.py: OVS, self-BLEU against NLTK, distinct-n and edit distance against naive code, VPS, the sampler."""

import collections
import random
import warnings

import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from nltk.util import ngrams

import vas


def nltk_self_bleu(group):
    if len(group) < 2:
        return 0.0
    smooth = SmoothingFunction().method1
    scores = [
        sentence_bleu(group[:i] + group[i + 1 :], group[i], weights=(1 / 3, 1 / 3, 1 / 3), smoothing_function=smooth)
        for i in range(len(group))
    ]
    return float(np.mean(scores))


def reference_self_bleu(group):
    """The readable self-BLEU: mean over responses of vas.reference_sentence_bleu(response | the other N-1)."""
    if len(group) < 2:
        return 0.0
    return float(np.mean([vas.reference_sentence_bleu(y, group[:i] + group[i + 1 :]) for i, y in enumerate(group)]))


def random_group(rng):
    n = rng.choice([1, 2, 3, 5, 8, 16])
    vocab = rng.choice([2, 3, 8, 50, 151_936])
    base = [rng.randrange(vocab) for _ in range(rng.choice([5, 20, 60]))]
    group = []
    for _ in range(n):
        length = rng.choice([0, 1, 2, 3, 4, 7, 20, 60])
        if rng.random() < 0.5:  # overlapping responses: noisy copies of a shared base
            seq = [t if rng.random() < 0.8 else rng.randrange(vocab) for t in base[:length]]
        else:
            seq = [rng.randrange(vocab) for _ in range(length)]
        group.append(seq)
    return group


def test_outcome_variance():
    assert np.allclose(vas.outcome_variance([0, 0.25, 0.5, 0.75, 1]), [0, 0.1875, 0.25, 0.1875, 0])


def test_reference_self_bleu_equals_nltk_and_the_fast_path():
    """The readable definition equals NLTK; the fast kernel equals the readable definition."""
    rng = random.Random(7)
    for _ in range(150):
        group = random_group(rng)
        reference = reference_self_bleu(group)
        assert abs(reference - nltk_self_bleu(group)) < 1e-12
        assert abs(vas.self_bleu(group) - reference) < 1e-12


def test_self_bleu_equals_nltk_on_random_groups():
    rng = random.Random(0)
    for _ in range(400):
        group = random_group(rng)
        assert abs(vas.self_bleu(group) - nltk_self_bleu(group)) < 1e-9, group


@pytest.mark.parametrize(
    "group",
    [[], [[1, 2, 3]], [[], []], [[1], [1]], [[1], [2]], [[5], [5, 5, 5]], [[1, 2, 3, 4]] * 4, [[1, 2], [], [1, 2, 3]],
     [[7, 7, 7, 7], [7, 7], [7]], [[1, 2, 3], [3, 2, 1]]],
)  # fmt: skip
def test_self_bleu_edge_cases_equal_nltk(group):
    assert abs(vas.self_bleu(group) - nltk_self_bleu(group)) < 1e-9


def test_identical_responses_have_no_diversity():
    group = [[1, 2, 3, 4, 5]] * 4
    assert vas.self_bleu(group) == pytest.approx(1.0)
    assert vas.trajectory_diversity(group) == pytest.approx(0.0)
    assert vas.trajectory_diversity([[1, 2, 3], [4, 5, 6]]) == 1.0
    assert vas.trajectory_diversity([[1, 2, 3]]) == 0.0


def test_large_token_ids_and_many_responses():
    rng = random.Random(1)
    group = [[rng.randrange(2**40) for _ in range(30)] for _ in range(20)]  # forces dense renumbering
    assert abs(vas.self_bleu(group) - nltk_self_bleu(group)) < 1e-9


def naive_distinct(group, n):
    grams = [g for seq in group for g in ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def naive_edit(a, b):
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
        prev = cur
    return prev[-1]


def test_distinct_n_and_edit_distance_against_naive():
    rng = random.Random(2)
    for _ in range(150):
        group = random_group(rng)
        for n in (1, 2, 3):
            assert vas.distinct_n(group, n) == pytest.approx(naive_distinct(group, n))
        if len(group) >= 2:
            a, b = group[0], group[1]
            assert vas.edit_distance(a, b) == naive_edit(a, b)
    assert vas.edit_distance([1, 2, 3], [1, 3]) == 1 and vas.edit_distance([], [4, 5]) == 2
    assert vas.edit_diversity([[1, 2], [1, 2]]) == 0.0 and vas.edit_diversity([[1, 2], [3, 4]]) == 1.0
    assert vas.trajectory_diversity([[1, 2, 3], [1, 2, 4]], "distinct") == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="unknown TDS kind"):
        vas.trajectory_diversity([[1]], "bleu4")


def test_vps_and_weight_normalisation():
    vps = vas.variance_promotion_score([0.25, 0.0, 0.1], [0.5, 0.0, 1.0], alpha=0.8, beta=0.2)
    assert np.allclose(vps, [0.3, 0.0, 0.28])
    w = vas.normalise_weights(vps)
    assert np.allclose(w, [1.0, 0.0, 0.28 / 0.3])
    assert np.allclose(vas.normalise_weights([0.2, 0.2, 0.2]), 1.0)  # all equal: uniform
    assert np.allclose(vas.normalise_weights([0.1, np.nan, 0.3]), 1.0)  # NaN: uniform
    assert np.allclose(vas.normalise_weights(vps, old=np.ones(3), momentum=0.5), 0.5 + 0.5 * w)


def test_score_prompts():
    responses = [[[1, 2, 3]] * 4, [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 5, 9]]]
    accuracies = [[1, 1, 1, 1], [1, 0, 1, 0]]
    s = vas.score_prompts(responses, accuracies, alpha=0.8, beta=0.2)
    assert np.allclose(s["pass_rate"], [1.0, 0.5]) and np.allclose(s["ovs"], [0.0, 0.25])
    assert s["tds"][0] == pytest.approx(0.0) and s["tds"][1] == pytest.approx(1 - nltk_self_bleu(responses[1]))
    assert np.allclose(s["vps"], 0.8 * s["ovs"] + 0.2 * s["tds"])


def take(sampler, k):
    return [sampler.next_batch() for _ in range(k)]


def test_sampler_split_and_uniform_coverage():
    sampler = vas.MixedSampler(num_prompts=20, batch_size=8, mix_ratio=0.5, seed=3)
    assert sampler.n_weighted == 4
    sampler.update_weights(np.eye(20)[7])  # all weight on prompt 7
    batches = take(sampler, 10)  # 10 x 4 uniform = 40 = exactly 2 passes
    assert all(len(b) == 8 and b[:4] == [7, 7, 7, 7] for b in batches)
    uniform = [i for b in batches for i in b[4:]]
    assert sorted(uniform[:20]) == list(range(20)) and sorted(uniform[20:]) == list(range(20))
    assert uniform[:20] != uniform[20:]  # reshuffled each pass
    assert vas.MixedSampler(10, 7, mix_ratio=0.3).n_weighted == 2  # floor(0.3 * 7)
    assert vas.MixedSampler(10, 4, mix_ratio=1.0).n_weighted == 4


def test_sampler_weighted_part_follows_the_weights():
    weights = np.array([1.0, 2.0, 3.0, 4.0, 0.0])
    sampler = vas.MixedSampler(5, 10, mix_ratio=1.0, seed=0)
    sampler.update_weights(weights)
    counts = collections.Counter(i for b in take(sampler, 2000) for i in b)
    observed = np.array([counts[i] for i in range(5)])
    expected = 20000 * weights / weights.sum()
    assert observed[4] == 0
    chi2 = (((observed[:4] - expected[:4]) ** 2) / expected[:4]).sum()
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, p = 0.001


def test_sampler_is_deterministic_and_resumes_exactly():
    def fresh(seed):
        s = vas.MixedSampler(13, 6, mix_ratio=0.5, seed=seed)
        s.update_weights(np.arange(13.0))
        return s

    a, b = fresh(1), fresh(1)
    assert take(a, 7) == take(b, 7)
    assert take(fresh(1), 5) != take(fresh(2), 5)
    run = fresh(1)
    take(run, 3)  # mid-pass: 3 x 3 uniform of 13
    state = run.state_dict()
    expected = take(run, 9)
    resumed = vas.MixedSampler(13, 6, mix_ratio=0.5, seed=99)
    resumed.load_state_dict(state)
    assert take(resumed, 9) == expected
    # the public iterator (DESIGN.md's names): the same batches as next_batch, forever
    batches = iter(fresh(1))
    assert [next(batches) for _ in range(7)] == take(fresh(1), 7)


def test_degenerate_weights_fall_back_to_uniform():
    sampler = vas.MixedSampler(4, 4, mix_ratio=1.0)
    for bad in (np.zeros(4), np.array([np.nan, 1, 1, 1]), np.array([-1.0, 1, 1, 1]), np.array([np.inf, 1, 1, 1])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sampler.update_weights(bad)
        assert caught and np.allclose(sampler.weights, 1.0)
        assert len(sampler.next_batch()) == 4
    with pytest.raises(ValueError, match="shape"):
        sampler.update_weights(np.ones(3))


def test_rank_shares_are_disjoint_and_cover_the_batch():
    """dist.shard is the one way work is split over ranks (training batches, scoring, validation)."""
    import torch

    from mmr1 import dist

    batch = list(range(100, 112))
    parts = [dist.shard(batch, dist.Dist(r, 4, r, torch.device("cpu"))) for r in range(4)]
    assert sum((p for p, _ in parts), []) == batch and all(len(p) == n == 3 for p, n in parts)
    uneven = [dist.shard(batch, dist.Dist(r, 5, r, torch.device("cpu"))) for r in range(5)]
    assert all(len(p) == 3 for p, _ in uneven)  # equal work on every rank: padded
    assert sum((p[:n] for p, n in uneven), []) == batch  # the real items, once each


def test_rollout_scores_owns_rounds_and_seeds():
    """vas.rollout_scores: rounds of prompts_per_call prompts, each generated in one call seeded by
    scoring_seed(seed, step, round) at the given temperature, and every score back on its own row."""
    import torch

    import reward
    from mmr1 import dist, rollout

    class Engine:  # answers "4" with 1-3 tokens by row, and records each call
        def __init__(self):
            self.calls = []

        def generate(self, rows, n, sampling):
            self.calls.append((len(rows), sampling.seed, sampling.temperature))
            return [rollout.Rollout(i, [1] * (1 + int(r["problem"][1:]) % 3), "<answer>4</answer>", "stop")
                    for i, r in enumerate(rows) for _ in range(n)]  # fmt: skip

    rows = [{"problem": f"q{i}", "answer": "4" if i % 3 else "5"} for i in range(17)]
    engine, one = Engine(), dist.Dist(0, 1, 0, torch.device("cpu"))
    scores = vas.rollout_scores(engine, rows, one, n=2, sampling=rollout.Sampling(temperature=0.9), seed=7, step=5,
                                pool=None, scoring=reward.Scoring(), prompts_per_call=5)  # fmt: skip
    seeds = [vas.scoring_seed(7, 5, k) for k in range(4)]  # step 5's refresh, rounds 0-3
    assert engine.calls == [(5, seeds[0], 0.9), (5, seeds[1], 0.9), (5, seeds[2], 0.9), (2, seeds[3], 0.9)]
    assert scores["pass_rate"].tolist() == [0.0 if i % 3 == 0 else 1.0 for i in range(17)]
    assert scores["tokens"].tolist() == [2.0 * (1 + i % 3) for i in range(17)]
    assert np.allclose(scores["vps"], 0.8 * scores["ovs"] + 0.2 * scores["tds"])
    assert len({vas.scoring_seed(7, step, k) for step in range(4) for k in range(4)}) == 16  # all streams apart


def test_transition_matrix_rows_are_shares():
    bins = np.array([0.0, 0.5, 1.0])
    m = vas.transition_matrix(np.array([0.1, 0.2, 0.7, 0.9]), np.array([0.6, 0.1, 0.8, 0.2]), bins)
    assert np.allclose(m, [[0.5, 0.5], [0.5, 0.5]])
    m = vas.transition_matrix(np.array([0.1, 0.2]), np.array([0.1, 0.3]), bins)
    assert np.allclose(m, [[1.0, 0.0], [0.0, 0.0]])  # an empty row stays zero


def test_score_cli_on_the_toy(toy_dir, tmp_path):
    import datasets

    from conftest import run_script

    out = tmp_path / "vps.parquet"
    run_script(["vas.py", "--model", str(toy_dir / "model"), "--data", f"{toy_dir / 'data' / 'rl'}@val", "--limit", "6",
                "--rollouts", "3", "--max-new-tokens", "6", "--engine", "hf", "--reward-workers", "1", "--out", str(out)])  # fmt: skip
    table = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert table.column_names == ["id", "index", "pass_rate", "ovs", "tds", "vps", "tokens"] and len(table) == 6
    rows = table.to_list()
    assert all(abs(r["ovs"] - r["pass_rate"] * (1 - r["pass_rate"])) < 1e-12 for r in rows)
    assert all(abs(r["vps"] - (0.8 * r["ovs"] + 0.2 * r["tds"])) < 1e-12 for r in rows)
    assert all(r["pass_rate"] * 3 == round(r["pass_rate"] * 3) for r in rows)  # k of 3 right
