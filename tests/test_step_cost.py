"""Per-step host cost independent of the data size: GRPO's sampler draws (vas.MixedSampler) from a
cumulative distribution made once per re-weighting, bit for bit the draws of rng.choice; the bench
of docs/paper-scale.md runs (bench/step_cost_bench.py). sft.global_batch: tests/test_sft.py."""

import sys

import numpy as np

import vas
from conftest import ROOT


def test_sampler_draws_equal_rng_choice_across_reweightings():
    """The weighted draws equal numpy's rng.choice(P, B_w, p=w / w.sum()) of the same stream at every
    step (so runs and resumes from before keep their batches), through re-weightings with zeros, a
    degenerate (all-zero) vector that falls back to uniform, and a state_dict round trip."""
    for prompts, batch, mix in ((37, 8, 0.5), (1000, 64, 1.0), (5, 7, 0.3)):
        sampler, reference = vas.MixedSampler(prompts, batch, mix, seed=3), np.random.default_rng([3, 0])
        for step in range(12):
            if step % 4 == 1:
                w = np.random.default_rng(step).random(prompts)
                w[::3] = 0.0
                sampler.update_weights(w)
            if step == 6:
                sampler.update_weights(np.zeros(prompts))  # degenerate: uniform, with a warning
            if step == 9:
                restored = vas.MixedSampler(prompts, batch, mix, seed=99)
                restored.load_state_dict(sampler.state_dict())
                sampler = restored
            p = sampler.weights / sampler.weights.sum()
            expected = reference.choice(prompts, sampler.n_weighted, replace=True, p=p).tolist()
            assert sampler.next_batch()[: sampler.n_weighted] == expected, (prompts, step)


def test_step_cost_bench_prints_flat_tables(toy_dir, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import step_cost_bench

    text = step_cost_bench.main(["--sft-sizes", "200,2000", "--rl-sizes", "200,2000", "--steps", "2",
                                 "--model", str(toy_dir / "model")])  # fmt: skip
    for part in ("selection", "row access", "prompt building", "sampler", "VAS bookkeeping", "logging"):
        assert f"| {part} |" in text
    assert "| SFT (batch 32, rank 0 of 8): ms per step (median) | 200 rows | 2,000 rows |" in text
    totals = [line for line in text.splitlines() if line.startswith("| total |")]
    assert len(totals) == 2 and all(float(x) > 0 for line in totals for x in line.strip("| ").split("|")[1:])
