"""Variance-Aware Sampling: OVS, TDS, VPS and the mixed sampler (the paper's contribution).

For a prompt x with N sampled responses and 0/1 accuracies:
    P(x)   = mean accuracy                          pass rate
    OVS(x) = P(x) * (1 - P(x))                      Outcome Variance Score (max 0.25 at P = 0.5)
    TDS(x) = 1 - selfBLEU-123({y_i})                Trajectory Diversity Score (higher = more diverse)
    VPS(x) = alpha * OVS(x) + beta * TDS(x)         Variance Promotion Score
Per step, floor(lambda * B) prompts are drawn with replacement proportionally to the min-max
normalised VPS and the rest walk a shuffled permutation of the data set (Algorithm 1).

    python vas.py score --model runs/toy-sft/final --data data/toy/rl@train --rollouts 16 --out vps.parquet
    torchrun --nproc_per_node 8 vas.py score --model M --data MMR1/MMR1-RL --rollouts 16 --out vps.parquet
    python vas.py plot runs/toy-grpo-vas          # Figure 3: VPS histograms + transition matrices
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np

EPSILON = 0.1  # Chen & Cherry smoothing method 1: a zero n-gram match count becomes 0.1


# ---------------------------------------------------------------------------------------------
# OVS
# ---------------------------------------------------------------------------------------------


def outcome_variance(pass_rates) -> np.ndarray:
    """OVS = p (1 - p) per prompt; pass_rates: (P,) in [0, 1] -> (P,) in [0, 0.25]."""
    p = np.asarray(pass_rates, dtype=np.float64)
    return p * (1.0 - p)


# ---------------------------------------------------------------------------------------------
# TDS: self-BLEU-123 (exact NLTK sentence_bleu semantics), distinct-n, edit distance
# ---------------------------------------------------------------------------------------------


def _clipped_matches(flat: np.ndarray, owner: np.ndarray, n_resp: int, max_n: int, token_bits: int,
                     owner_bits: int) -> np.ndarray:  # fmt: skip
    """(max_n, N): per n and response, the sum over its distinct n-grams of
    min(own count, max count in any OTHER response), i.e. NLTK's clipped match count.

    flat: (T,) all responses' token ids concatenated (each < 2**token_bits); owner: (T,) response
    index (< 2**owner_bits). Each n-gram becomes one exact int64 key (n | token ids as bit fields |
    owner; no hashing), so ONE sort groups equal (n-gram, owner) pairs and, within an n-gram, its
    owners. The max over the other responses is the n-gram's top-1 count, or its top-2 for the one
    response credited with top-1.
    """
    keys, valid = [], []
    for n in range(1, max_n + 1):
        span = len(flat) - n + 1
        if span <= 0:
            continue
        code = flat[:span] | (n << (token_bits * max_n))  # n in the top bits keeps orders apart
        for k in range(1, n):
            code |= flat[k : span + k] << (token_bits * k)
        code <<= owner_bits
        code |= owner[:span]
        keys.append(code)
        valid.append(owner[:span] == owner[n - 1 :])  # n-grams must not straddle two responses
    out = np.zeros((max_n, n_resp))
    if not keys:
        return out
    keys = np.concatenate(keys).take(np.flatnonzero(np.concatenate(valid)))
    if len(keys) == 0:
        return out
    keys.sort()  # by (n, n-gram), then owner
    boundary = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    pair_start = np.concatenate(([0], boundary))
    counts = np.empty(len(pair_start), dtype=np.int64)  # occurrences of each (n-gram, owner)
    np.subtract(pair_start[1:], pair_start[:-1], out=counts[:-1])
    counts[-1] = len(keys) - pair_start[-1]
    keys = keys[pair_start]
    gram = keys >> owner_bits
    same_as_next = gram[1:] == gram[:-1]
    keep = np.flatnonzero(np.concatenate((same_as_next, [False])) | np.concatenate(([False], same_as_next)))
    if len(keep) == 0:  # n-grams held by one response clip to 0: only shared ones matter
        return out
    gram, counts, who = gram.take(keep), counts.take(keep), keys.take(keep) & ((1 << owner_bits) - 1)
    new_gram = np.concatenate(([True], gram[1:] != gram[:-1]))
    g_start = np.flatnonzero(new_gram)
    g_id = np.cumsum(new_gram) - 1
    top1 = np.maximum.reduceat(counts, g_start)[g_id]
    is_top = counts == top1
    sole_top = is_top & (np.add.reduceat(is_top, g_start)[g_id] == 1)
    top2 = np.maximum.reduceat(np.where(is_top, 0, counts), g_start)[g_id]  # used only where sole_top
    max_other = np.where(sole_top, top2, top1)
    order = (gram >> (token_bits * max_n)) - 1  # n - 1
    clipped = np.bincount(order * n_resp + who, weights=np.minimum(counts, max_other), minlength=max_n * n_resp)
    return clipped.reshape(max_n, n_resp)


def sentence_bleus(group: list[list[int]], max_n: int = 3) -> np.ndarray:
    """(N,) BLEU of each response against the other N-1 as references, NLTK semantics.

    Exactly `nltk.translate.bleu_score.sentence_bleu(others, y_i, weights=(1/max_n,)*max_n,
    smoothing_function=SmoothingFunction().method1)`: clipped n-gram precisions against all
    references at once, brevity penalty from the closest reference length (ties: the shorter),
    0 when no unigram matches, a zero higher-order match count smoothed to EPSILON.
    Cost: O(total tokens * log) numpy work per n, no Python loop over reference pairs.
    """
    n_resp = len(group)
    if n_resp < 2:
        return np.zeros(n_resp)
    lengths = np.array([len(g) for g in group], dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(group), dtype=np.int64, count=int(lengths.sum()))
    owner = np.repeat(np.arange(n_resp, dtype=np.int64), lengths)
    owner_bits = max(1, (n_resp - 1).bit_length())
    token_bits = max(1, int(flat.max()).bit_length()) if len(flat) else 1
    fits = lambda bits: bits * max_n + max_n.bit_length() + owner_bits <= 62  # noqa: E731
    if not fits(token_bits):  # codes would overflow int64: renumber the tokens densely
        _, flat = np.unique(flat, return_inverse=True)
        token_bits = max(1, int(flat.max()).bit_length())
        if not fits(token_bits):
            raise ValueError(f"{flat.max() + 1} distinct tokens do not fit exact {max_n}-gram codes in int64")

    numerator = _clipped_matches(flat, owner, n_resp, max_n, token_bits, owner_bits)  # (max_n, N)
    denominator = np.maximum(1, lengths[None, :] - np.arange(max_n)[:, None])  # (max_n, N) n-gram counts
    log_p = np.log(np.where(numerator == 0, EPSILON, numerator) / denominator)
    unigram_hits = numerator[0]

    # brevity penalty: reference length closest to the hypothesis length, ties to the shorter
    others = np.broadcast_to(lengths, (n_resp, n_resp)).astype(np.float64).copy()
    np.fill_diagonal(others, np.inf)
    key = np.abs(others - lengths[:, None]) * (4 * lengths.max() + 4) + others  # (distance, length)
    closest = others[np.arange(n_resp), np.argmin(key, axis=1)]
    with np.errstate(divide="ignore"):
        bp = np.where(lengths > closest, 1.0, np.exp(1.0 - closest / np.maximum(lengths, 1)))
    bp = np.where(lengths == 0, 0.0, bp)

    scores = np.exp((log_p / max_n).sum(0)) * bp  # geometric mean of the n-gram precisions
    return np.where(unigram_hits == 0, 0.0, scores)


def self_bleu(group: list[list[int]], max_n: int = 3) -> float:
    """Self-BLEU of a group of token-id responses: mean over i of BLEU(y_i | others), in [0, 1].

    Groups of fewer than 2 responses have self-BLEU 0. TDS = 1 - self_bleu.
    """
    scores = sentence_bleus(group, max_n)
    return float(scores.mean()) if len(scores) else 0.0


def distinct_n(group: list[list[int]], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over the whole group, in [0, 1]; 0 when there are none."""
    total, seen = 0, set()
    for seq in group:
        grams = [tuple(seq[k : k + n]) for k in range(len(seq) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two token sequences (unit costs), row-vectorised."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if len(a) == 0 or len(b) == 0:
        return int(max(len(a), len(b)))
    cols = np.arange(len(b) + 1)
    row = cols.copy()
    for i in range(1, len(a) + 1):
        sub = row[:-1] + (b != a[i - 1])  # diagonal move (match or substitute)
        best = np.empty_like(row)
        best[0] = i
        best[1:] = np.minimum(row[1:] + 1, sub)  # deletion or diagonal
        row = np.minimum.accumulate(best - cols) + cols  # insertions: a running min along the row
    return int(row[-1])


def edit_diversity(group: list[list[int]]) -> float:
    """Mean over pairs of edit distance / max length, in [0, 1]; 0 for groups of fewer than 2."""
    pairs = [(i, j) for i in range(len(group)) for j in range(i + 1, len(group))]
    values = [edit_distance(group[i], group[j]) / max(1, len(group[i]), len(group[j])) for i, j in pairs]
    return float(np.mean(values)) if values else 0.0


def trajectory_diversity(group: list[list[int]], kind: str = "self_bleu") -> float:
    """TDS of one prompt's responses, in [0, 1], higher = more diverse.

    kind: 'self_bleu' (1 - self-BLEU-123, the recipe's default), 'distinct' (distinct-2),
    'edit' (mean normalised pairwise edit distance).
    """
    if kind == "self_bleu":
        return 1.0 - self_bleu(group) if len(group) >= 2 else 0.0
    if kind == "distinct":
        return distinct_n(group, 2)
    if kind == "edit":
        return edit_diversity(group)
    raise ValueError(f"unknown TDS kind {kind!r}: self_bleu, distinct or edit")


# ---------------------------------------------------------------------------------------------
# VPS and sampling weights
# ---------------------------------------------------------------------------------------------


def variance_promotion_score(ovs, tds, alpha: float = 0.8, beta: float = 0.2) -> np.ndarray:
    """VPS = alpha * OVS + beta * TDS per prompt; (P,) arrays in, (P,) out."""
    return alpha * np.asarray(ovs, dtype=np.float64) + beta * np.asarray(tds, dtype=np.float64)


def normalise_weights(vps, old: np.ndarray | None = None, momentum: float = 0.0) -> np.ndarray:
    """Sampling weights from VPS: min-max normalised to [0, 1], then w = m * old + (1 - m) * new.

    Degenerate input (NaN / inf, or all values equal) gives uniform weights (all ones).
    """
    v = np.asarray(vps, dtype=np.float64)
    if len(v) == 0 or not np.all(np.isfinite(v)) or v.max() == v.min():
        new = np.ones_like(v)
    else:
        new = (v - v.min()) / (v.max() - v.min())
    if old is not None and momentum > 0:
        return momentum * np.asarray(old, dtype=np.float64) + (1 - momentum) * new
    return new


def score_prompts(responses: list[list[list[int]]], accuracies: list[list[float]], alpha: float = 0.8,
                  beta: float = 0.2, tds_kind: str = "self_bleu") -> dict[str, np.ndarray]:  # fmt: skip
    """Per prompt: pass rate, OVS, TDS, VPS, each (P,).

    responses[p] is the list of N token-id responses of prompt p; accuracies[p] their 0/1
    verifier outcomes (accuracy only, not format).
    """
    if len(responses) != len(accuracies):
        raise ValueError(f"{len(responses)} prompts of responses but {len(accuracies)} of accuracies")
    pass_rate = np.array([float(np.mean(a)) if len(a) else 0.0 for a in accuracies])
    ovs = outcome_variance(pass_rate)
    tds = np.array([trajectory_diversity(g, tds_kind) for g in responses])
    return {"pass_rate": pass_rate, "ovs": ovs, "tds": tds, "vps": variance_promotion_score(ovs, tds, alpha, beta)}


# ---------------------------------------------------------------------------------------------
# The mixed sampler (Algorithm 1)
# ---------------------------------------------------------------------------------------------


class MixedSampler:
    """Yields global batches of prompt indices forever: floor(mix_ratio * B) drawn with
    replacement proportionally to the weights, the rest taken in order from a seeded shuffled
    permutation (reshuffled each pass, so the uniform part covers every prompt once per pass).

    Every rank builds the same global batch from the same seed; `rank_slice` picks a rank's part.
    `state_dict()` / `load_state_dict()` capture everything, so a resumed run yields exactly the
    batches the uninterrupted run would have.
    """

    def __init__(self, num_prompts: int, batch_size: int, mix_ratio: float = 0.5, seed: int = 0):
        if num_prompts <= 0 or batch_size <= 0:
            raise ValueError("num_prompts and batch_size must be positive")
        if not 0.0 <= mix_ratio <= 1.0:
            raise ValueError(f"mix_ratio must be in [0, 1], got {mix_ratio}")
        self.num_prompts, self.batch_size, self.mix_ratio = num_prompts, batch_size, mix_ratio
        self.n_weighted = math.floor(mix_ratio * batch_size)  # B_w = floor(lambda B)
        self.weights = np.ones(num_prompts)
        self.rng_weighted = np.random.default_rng([seed, 0])
        self.rng_uniform = np.random.default_rng([seed, 1])
        self.perm = self.rng_uniform.permutation(num_prompts)
        self.pos = 0  # next position in perm
        self.epoch = 0  # completed passes of the uniform walk

    def update_weights(self, weights) -> None:
        """New sampling weights (P,), >= 0; NaN / inf / negative / all-zero fall back to uniform."""
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.num_prompts,):
            raise ValueError(f"weights must have shape ({self.num_prompts},), got {w.shape}")
        if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            warnings.warn("degenerate VAS weights (NaN, inf, negative or all zero): sampling uniformly", stacklevel=2)
            w = np.ones(self.num_prompts)
        self.weights = w

    def next_batch(self) -> list[int]:
        """One global batch: B_w weighted draws, then B - B_w from the uniform walk."""
        weighted = self.rng_weighted.choice(
            self.num_prompts, self.n_weighted, replace=True, p=self.weights / self.weights.sum()
        )
        uniform = []
        while len(uniform) < self.batch_size - self.n_weighted:
            if self.pos == self.num_prompts:
                self.perm, self.pos, self.epoch = self.rng_uniform.permutation(self.num_prompts), 0, self.epoch + 1
            take = min(self.batch_size - self.n_weighted - len(uniform), self.num_prompts - self.pos)
            uniform += self.perm[self.pos : self.pos + take].tolist()
            self.pos += take
        return weighted.tolist() + uniform

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "weights": self.weights.tolist(),
            "perm": self.perm.tolist(),
            "pos": self.pos,
            "epoch": self.epoch,
            "rng_weighted": self.rng_weighted.bit_generator.state,
            "rng_uniform": self.rng_uniform.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        self.perm = np.asarray(state["perm"], dtype=np.int64)
        self.pos, self.epoch = state["pos"], state["epoch"]
        self.rng_weighted.bit_generator.state = state["rng_weighted"]
        self.rng_uniform.bit_generator.state = state["rng_uniform"]


def rank_slice(batch: list[int], rank: int, world_size: int) -> list[int]:
    """The contiguous part of a global batch that `rank` trains on (batch divisible by world)."""
    if len(batch) % world_size:
        raise ValueError(f"global batch of {len(batch)} does not split over {world_size} ranks")
    per = len(batch) // world_size
    return batch[rank * per : (rank + 1) * per]
