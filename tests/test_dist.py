"""mmr1.dist: seed streams."""

from mmr1 import dist


def test_derive_seed_streams_never_collide():
    """Distinct (seed, stream, counters) give distinct seeds, including the seed-0 collisions the
    old `seed * K + step` arithmetic had (validation after step k vs rollouts of step k + 1)."""
    streams = ["rollout", "val", "vas", "rank", "call", "eval", "sft-order"]
    seen = {}
    for seed in (0, 1, 2):
        for stream in streams:
            for k in range(200):
                value = dist.derive_seed(seed, stream, k)
                assert 0 <= value < 2**31 and value == dist.derive_seed(seed, stream, k)
                seen.setdefault(value, (seed, stream, k))
    assert len(seen) == 3 * len(streams) * 200  # no two inputs share a seed
    assert dist.derive_seed(0, "val", 5) != dist.derive_seed(0, "rollout", 6)
