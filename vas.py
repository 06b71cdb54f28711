"""Variance-Aware Sampling: OVS, TDS, VPS and the mixed sampler (the paper's contribution).

For a prompt x with N sampled responses and 0/1 accuracies:
    P(x)   = mean accuracy                          pass rate
    OVS(x) = P(x) * (1 - P(x))                      Outcome Variance Score (max 0.25 at P = 0.5)
    TDS(x) = 1 - selfBLEU-123({y_i})                Trajectory Diversity Score (higher = more diverse)
    VPS(x) = alpha * OVS(x) + beta * TDS(x)         Variance Promotion Score
Per step, floor(lambda * B) prompts are drawn with replacement proportionally to the min-max
normalised VPS and the rest walk a shuffled permutation of the data set (Algorithm 1).

    python vas.py --model runs/toy-sft/final --data data/toy/rl@train --rollouts 16 --out vps.parquet
    torchrun --nproc_per_node 8 vas.py score --model M --data MMR1/MMR1-RL --rollouts 16 --out vps.parquet
    python vas.py plot runs/toy-grpo-vas          # Figure 3: VPS histograms + transition matrices
"""

from __future__ import annotations

import itertools
import math
import sys
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mmr1 import config  # the dataclass CLI: standard library only, so the math here needs numpy alone
from mmr1.config import field

EPSILON = 0.1  # Chen & Cherry smoothing method 1: a zero n-gram match count becomes 0.1


# --- OVS ---
def outcome_variance(pass_rates) -> np.ndarray:
    """OVS = p (1 - p) per prompt; pass_rates: (P,) in [0, 1] -> (P,) in [0, 0.25]."""
    p = np.asarray(pass_rates, dtype=np.float64)
    return p * (1.0 - p)


# --- TDS: self-BLEU-123 (NLTK sentence_bleu semantics), distinct-n, edit distance ---
def reference_sentence_bleu(hypothesis: list[int], references: list[list[int]], max_n: int = 3) -> float:
    """BLEU of one token sequence against several references, exactly as NLTK's `sentence_bleu` with
    uniform weights (1/max_n each) and smoothing method 1: BP * exp(mean_n log p_n), p_n the clipped n-gram
    precision (a zero match count becomes EPSILON), BP = 1 if longer than the closest reference length r
    (ties: the shorter) else exp(1 - r / c), 0 for an empty hypothesis; 0 when no unigram matches. The
    readable definition; the fast path below (`sentence_bleus`) is tested equal to it."""
    log_p = []
    for n in range(1, max_n + 1):
        grams = Counter(tuple(hypothesis[i : i + n]) for i in range(len(hypothesis) - n + 1))
        best: Counter = Counter()
        for ref in references:
            best |= Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))  # max count per n-gram
        matches = sum(min(count, best[g]) for g, count in grams.items())
        if n == 1 and matches == 0:
            return 0.0
        log_p.append(math.log((matches or EPSILON) / max(1, sum(grams.values()))))
    c = len(hypothesis)
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - c), length))
    bp = 1.0 if c > r else (math.exp(1 - r / c) if c else 0.0)
    return bp * math.exp(sum(log_p) / max_n)


# --- fast path, tested equal to the reference: every response against the others in O(T log T) ---
def _clipped_matches(
    flat: np.ndarray, owner: np.ndarray, n_resp: int, max_n: int, token_bits: int, owner_bits: int
) -> np.ndarray:
    """(max_n, N): per n and response, the sum over its distinct n-grams of min(own count, max count in
    any OTHER response), i.e. NLTK's clipped match count. flat: (T,) all responses' token ids
    concatenated (each < 2**token_bits); owner: (T,) response index (< 2**owner_bits). One exact int64
    key per n-gram (n | token ids | owner), ONE sort; the max over the other responses is the n-gram's
    top-1 count, or its top-2 for the one response credited with top-1 (docs/vas.md)."""
    order_shift = token_bits * max_n  # the n-gram order n sits above the token fields
    keys, n_straddling = [], 0
    for n in range(1, max_n + 1):
        span = len(flat) - n + 1
        if span <= 0:
            continue
        code = flat[:span] | (n << order_shift)
        for k in range(1, n):
            code |= flat[k : span + k] << (token_bits * k)
        # n-grams straddling two responses get order 0: they sort first and are cut off below
        straddling = np.flatnonzero(owner[:span] != owner[n - 1 :])
        code[straddling] &= (1 << order_shift) - 1
        n_straddling += len(straddling)
        code <<= owner_bits
        code |= owner[:span]
        keys.append(code)
    out = np.zeros((max_n, n_resp))
    if not keys:
        return out
    keys = np.concatenate(keys)
    keys.sort()  # by (n, n-gram), then owner
    keys = keys[n_straddling:]
    if len(keys) == 0:
        return out
    boundary = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    pair_start = np.concatenate(([0], boundary))
    counts = np.diff(pair_start, append=len(keys))  # occurrences of each (n-gram, owner)
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
    clipped = np.minimum(counts, max_other)
    # keys are sorted by n first: each order is one contiguous slice
    edges = np.searchsorted(gram, np.arange(1, max_n + 2) << order_shift)
    for n in range(max_n):
        out[n] = np.bincount(who[edges[n] : edges[n + 1]], weights=clipped[edges[n] : edges[n + 1]], minlength=n_resp)
    return out


def sentence_bleus(group: list[list[int]], max_n: int = 3) -> np.ndarray:
    """(N,) BLEU of each response against the other N-1 as references: reference_sentence_bleu (NLTK's
    sentence_bleu, smoothing method 1) for all at once, O(total tokens * log) numpy work per n."""
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
    """Self-BLEU of a group of token-id responses: mean over i of BLEU(y_i | others), in [0, 1]; 0 for
    fewer than 2 responses. TDS = 1 - self_bleu."""
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
    values = [edit_distance(a, b) / max(1, len(a), len(b)) for a, b in itertools.combinations(group, 2)]
    return float(np.mean(values)) if values else 0.0


TRAJECTORY_DIVERSITY = {  # --vas-tds
    "self_bleu": lambda group: 1.0 - self_bleu(group) if len(group) >= 2 else 0.0,  # 1 - self-BLEU-123
    "distinct": lambda group: distinct_n(group, 2),
    "edit": edit_diversity,
}


def trajectory_diversity(group: list[list[int]], kind: str = "self_bleu") -> float:
    """TDS of one prompt's responses, in [0, 1], higher = more diverse. kind: 'self_bleu' (1 - self-BLEU-123:
    the paper's definition; the released code weights raw self-BLEU, see the README's deviation table),
    'distinct' (distinct-2), 'edit' (mean normalised pairwise edit distance)."""
    if kind not in TRAJECTORY_DIVERSITY:
        raise ValueError(f"unknown TDS kind {kind!r}: {', '.join(TRAJECTORY_DIVERSITY)}")
    return TRAJECTORY_DIVERSITY[kind](group)


# --- VPS and sampling weights ---
def variance_promotion_score(ovs, tds, alpha: float = 0.8, beta: float = 0.2) -> np.ndarray:
    """VPS = alpha * OVS + beta * TDS per prompt; (P,) arrays in, (P,) out."""
    return alpha * np.asarray(ovs, dtype=np.float64) + beta * np.asarray(tds, dtype=np.float64)


def normalise_weights(vps, old: np.ndarray | None = None, momentum: float = 0.0) -> np.ndarray:
    """Sampling weights (P,) from VPS (P,): min-max normalised to [0, 1] (all ones for NaN / inf or all
    values equal), then w = m * old + (1 - m) * new."""
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
    """Per prompt: pass rate, OVS, TDS, VPS, each (P,), from responses[p] (the N token-id responses of
    prompt p) and accuracies[p] (their 0/1 verifier outcomes: accuracy only, not format)."""
    if len(responses) != len(accuracies):
        raise ValueError(f"{len(responses)} prompts of responses but {len(accuracies)} of accuracies")
    pass_rate = np.array([float(np.mean(a)) if len(a) else 0.0 for a in accuracies])
    ovs = outcome_variance(pass_rate)
    tds = np.array([trajectory_diversity(g, tds_kind) for g in responses])
    return {"pass_rate": pass_rate, "ovs": ovs, "tds": tds, "vps": variance_promotion_score(ovs, tds, alpha, beta)}


# --- The mixed sampler (Algorithm 1) ---
class MixedSampler:
    """Yields global batches of prompt indices forever: floor(mix_ratio * B) drawn with replacement
    proportionally to `weights` (P,), the rest in order from a seeded permutation reshuffled each pass (the
    uniform part covers every prompt once per pass). Every rank builds the same global batch from the
    same seed (`dist.shard` picks a rank's part); state_dict() captures everything, so a resumed run
    yields exactly the batches the uninterrupted run would have."""

    def __init__(self, num_prompts: int, batch_size: int, mix_ratio: float = 0.5, seed: int = 0):
        if num_prompts <= 0 or batch_size <= 0:
            raise ValueError("num_prompts and batch_size must be positive")
        if not 0.0 <= mix_ratio <= 1.0:
            raise ValueError(f"mix_ratio must be in [0, 1], got {mix_ratio}")
        self.num_prompts, self.batch_size, self.mix_ratio = num_prompts, batch_size, mix_ratio
        self.n_weighted = math.floor(mix_ratio * batch_size)  # B_w = floor(lambda B)
        self.update_weights(np.ones(num_prompts))
        self.rng_weighted = np.random.default_rng([seed, 0])
        self.rng_uniform = np.random.default_rng([seed, 1])
        self.perm = self.rng_uniform.permutation(num_prompts)
        self.pos, self.epoch = 0, 0  # next position in perm, completed passes of the uniform walk

    def update_weights(self, weights) -> None:
        """New sampling weights (P,), >= 0; NaN / inf / negative / all-zero fall back to uniform."""
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.num_prompts,):
            raise ValueError(f"weights must have shape ({self.num_prompts},), got {w.shape}")
        if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            warnings.warn("degenerate VAS weights (NaN, inf, negative or all zero): sampling uniformly", stacklevel=2)
            w = np.ones(self.num_prompts)
        # The cumulative distribution the draws search, made once per re-weighting (O(P)) rather than
        # in every step's rng.choice: a step's draws then cost O(B log P), the same draws bit for bit.
        self.weights = w
        cdf = (w / w.sum()).cumsum()
        self._cdf = cdf / cdf[-1]

    def next_batch(self) -> list[int]:
        """One global batch: B_w weighted draws, then B - B_w from the uniform walk."""
        # = rng_weighted.choice(P, B_w, replace=True, p=weights / weights.sum()), its cdf made once
        weighted = self._cdf.searchsorted(self.rng_weighted.random(self.n_weighted), side="right")
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
        """Weights, permutation, position, pass count and both RNG streams (picklable)."""
        return {
            "weights": self.weights.tolist(),
            "perm": self.perm.tolist(),
            "pos": self.pos,
            "epoch": self.epoch,
            "rng_weighted": self.rng_weighted.bit_generator.state,
            "rng_uniform": self.rng_uniform.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict() captured; the next batch is the one the saved sampler would draw."""
        self.update_weights(state["weights"])
        self.perm = np.asarray(state["perm"], dtype=np.int64)
        self.pos, self.epoch = state["pos"], state["epoch"]
        self.rng_weighted.bit_generator.state = state["rng_weighted"]
        self.rng_uniform.bit_generator.state = state["rng_uniform"]


# --- Scoring prompts with fresh rollouts (grpo.py's refresh and the offline CLI share this) ---
def scoring_seed(seed: int, step: int, round_: int) -> int:
    """The sampling seed of round `round_` of the re-scoring after `step` updates (0: the initial
    scoring, and vas.py score's) of a run seeded `seed`: derived by refresh, then round, then the
    round's one generate call per rank."""
    from mmr1 import dist

    refresh = dist.derive_seed(seed, "vas", step)
    return dist.derive_seed(dist.derive_seed(refresh, "round", round_), "call", 0)


def rollout_scores(engine, rows: list[dict], d, *, n: int, sampling, seed: int, step: int, pool, scoring,
                   alpha: float = 0.8, beta: float = 0.2, tds_kind: str = "self_bleu", prompts_per_call: int = 64,
                   desc: str = "vas scoring") -> dict[str, np.ndarray]:  # fmt: skip
    """Pass rate, OVS, TDS, VPS and `tokens` (response tokens generated: the scoring's cost), each
    (len(rows),) in row order, from n fresh rollouts per row; every rank returns the full arrays.
    Rounds of prompts_per_call rows per rank dealt round-robin (dist.rounds; docs/vas.md "Re-scoring
    every prompt"), one generate call per rank and round seeded by scoring_seed(seed, step, round),
    scored by reward.score_responses under `scoring` (accuracy only), one all-gather per round."""
    from tqdm import tqdm

    import reward
    from mmr1 import dist

    scored: dict[int, tuple[float, ...]] = {}
    bar = tqdm(total=len(rows), disable=not d.master, desc=desc, leave=False)
    for round_, part in enumerate(dist.rounds(list(range(len(rows))), prompts_per_call, d.world_size)):
        mine, n_real = dist.shard(part, d)  # this rank's share, padded to the same length on every rank
        chunk = [rows[i] for i in mine]
        outs = engine.generate(chunk, n, replace(sampling, seed=scoring_seed(seed, step, round_)))
        accuracies = reward.score_responses([o.text for o in outs], [chunk[o.row] for o in outs], scoring, pool=pool)
        groups: list[list[list[int]]] = [[] for _ in chunk]  # the n token-id responses of each prompt
        outcomes: list[list[float]] = [[] for _ in chunk]
        for o, s in zip(outs, accuracies):
            groups[o.row].append(o.token_ids)
            outcomes[o.row].append(s["accuracy"])
        stats = score_prompts(groups, outcomes, alpha, beta, tds_kind)
        local = [
            (index, *(float(stats[k][j]) for k in ("pass_rate", "ovs", "tds", "vps")), float(sum(map(len, groups[j]))))
            for j, index in enumerate(mine[:n_real])  # the padding is not counted
        ]
        scored.update((r[0], r[1:]) for r in dist.all_gather_list(local, d))
        bar.update(len(part))
    bar.close()
    table = np.array([scored[i] for i in range(len(rows))]).reshape(len(rows), 5)
    return {k: table[:, j].copy() for j, k in enumerate(("pass_rate", "ovs", "tds", "vps", "tokens"))}


# --- Figure 3: VPS histograms per refresh and bin-to-bin transition matrices ---
def load_refreshes(run_dir: str | Path) -> list[dict]:
    """The VPS refreshes a grpo.py --vas run wrote to <run>/vas/refresh-<step>.npz, by step; a BadRowError
    naming the file for one that does not load (cut short, not an .npz, no `vps` array)."""
    files = [(int(p.stem[8:]), p) for p in Path(run_dir, "vas").glob("refresh-*.npz") if p.stem[8:].isdigit()]
    refreshes = []
    for step, path in sorted(files, key=lambda f: f[0]):
        try:
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise config.BadRowError(f"{path} is unreadable ({config.first_line(e)})") from e
        if "vps" not in arrays:
            raise config.BadRowError(f"{path} holds no 'vps' array (not a grpo.py --vas refresh)")
        refreshes.append({"step": step, **arrays})
    return refreshes


def transition_matrix(before: np.ndarray, after: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """(K, K) row-normalised share of prompts moving from VPS bin i (before) to bin j (after)."""
    k = len(bins) - 1
    a, b = (np.clip(np.digitize(x, bins) - 1, 0, k - 1) for x in (before, after))  # bin of each prompt
    counts = np.zeros((k, k))
    np.add.at(counts, (a, b), 1)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1)


def plot_refreshes(run_dir: str | Path, out: str | Path | None = None, n_bins: int = 5) -> Path:
    """Draws the VPS histogram of each refresh and the transition matrices between consecutive
    refreshes into one PNG (default <run>/vas/vps_dynamics.png); returns its path."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit(
            "error: vas.py plot needs matplotlib: pip install matplotlib (or -r requirements-dev.txt)"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refreshes = load_refreshes(run_dir)
    if not refreshes:
        raise SystemExit(f"error: no VPS refreshes in {Path(run_dir) / 'vas'} (run grpo.py --vas first)")
    all_vps = np.concatenate([r["vps"] for r in refreshes])
    bins = np.linspace(all_vps.min(), all_vps.max() + 1e-9, n_bins + 1)
    cols = len(refreshes)
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 6.4), squeeze=False)
    for i, r in enumerate(refreshes):
        axes[0, i].hist(r["vps"], bins=20, color="tab:blue")
        axes[0, i].set_title(f"VPS at step {r['step']}")
        if i + 1 < cols:
            m = transition_matrix(r["vps"], refreshes[i + 1]["vps"], bins)
            axes[1, i].imshow(m, vmin=0, vmax=1, cmap="viridis")
            axes[1, i].set_title(f"bins {r['step']} -> {refreshes[i + 1]['step']}")
            axes[1, i].set(xlabel="bin after", ylabel="bin before")
            for (a, b), v in np.ndenumerate(m):
                axes[1, i].text(b, a, f"{v:.2f}", ha="center", va="center", color="w", fontsize=7)
        else:
            axes[1, i].axis("off")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "vas" / "vps_dynamics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --- CLI ---
@dataclass
class ScoreConfig:
    """vas.py score: pass rate, OVS, TDS and VPS of every prompt of a data set, to a parquet file."""

    model: str = field("runs/toy-sft/final", "hub id or local folder of the policy")
    data: str = field("data/toy/rl@train", "RL rows: hub id, parquet/jsonl file or folder, name@split")
    out: str = field("vps.parquet", "output parquet: id, index, pass_rate, ovs, tds, vps")
    rollouts: int = field(16, "responses sampled per prompt (N)")
    temperature: float = field(0.6, "sampling temperature")
    top_p: float = field(1.0, "nucleus sampling")
    max_new_tokens: int = field(64, "response length limit (paper: 4096)")
    alpha: float = field(0.8, "weight of OVS in VPS")
    beta: float = field(0.2, "weight of TDS in VPS")
    tds: str = field("self_bleu", "TDS measure: self_bleu (the paper's), distinct (distinct-n) or edit",
                     choices=list(TRAJECTORY_DIVERSITY))  # fmt: skip
    engine: str = field("auto", "generation engine: vllm, hf, or auto (vLLM on a GPU when installed)",
                        choices=["auto", "hf", "vllm"])  # fmt: skip
    limit: int = field(0, "score only the first N prompts (0 = all)")
    prompts_per_call: int = field(64, "prompts per generation call")
    min_pixels: int = field(3136, "images resized to at least this many pixels")
    max_pixels: int = field(50176, "images resized to at most this many pixels")
    reward_workers: int = field(2, "reward scoring processes per rank")
    instruction: str = field("", "text put before every problem (as grpo.py --instruction; 'recipe' = Table 7)")
    max_prompt_length: int = field(2048, "prompt token limit (vLLM context)")
    seed: int = field(0, "sampling seed (the stream grpo.py's initial scoring uses)")
    skip_bad_rows: bool = field(False, "skip and count malformed rows")


@dataclass
class PlotConfig:
    """vas.py plot: VPS histograms and transition matrices of a grpo.py --vas run (Figure 3)."""

    run_dir: str = field("", "the run's --output-dir", positional=True)
    out: str = field("", "PNG path (default <run>/vas/vps_dynamics.png)")
    bins: int = field(5, "VPS bins of the transition matrices")


USAGE = """usage: vas.py {score,plot} [flags]   (no command: score)

  score   pass rate, OVS, TDS, VPS of every prompt of a data set   (vas.py score --help)
  plot    VPS histograms + transition matrices of a --vas run      (vas.py plot --help)"""


def main(argv: list[str] | None = None) -> None:
    """CLI: `score` a data set's prompts (pass rate, OVS, TDS, VPS) or `plot` a run's VPS refreshes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):  # no command named: both commands, then score's flags
        print(USAGE + "\n")
    command = argv.pop(0) if argv and argv[0] in ("score", "plot") else "score"  # flags alone mean score
    if command == "plot":
        cfg = config.parse_config(PlotConfig, argv=argv, prog="vas.py plot")
        config.exit_on_input_error(lambda: print(f"wrote {plot_refreshes(cfg.run_dir, cfg.out or None, cfg.bins)}"))
        return
    cfg = config.parse_config(ScoreConfig, argv=argv, prog="vas.py score")
    config.exit_on_input_error(lambda: score_data_set(cfg))  # bad data: one line, exit 1


def score_data_set(args: ScoreConfig) -> None:
    """`vas.py score`: pass rate, OVS, TDS, VPS of every prompt of --data, to a parquet file."""
    import reward
    from mmr1 import chat, dist, guards, modeling, prepare, rollout

    guards.check_model_dir(args.model)
    guards.check_output_dir(Path(args.out).parent, "--out")  # before the scoring, not after it
    d = dist.setup_distributed(args.seed)
    processor = modeling.load_processor(args.model, args.min_pixels, args.max_pixels)
    prompt_format = chat.PromptFormat(instruction=chat.INSTRUCTIONS.get(args.instruction, args.instruction))
    door = prepare.Door("rl", args.min_pixels, args.max_pixels, args.max_prompt_length, prompt_format)
    rows = prepare.prepare_split(args.data, door, processor, d, skip_bad_rows=args.skip_bad_rows, limit=args.limit)
    model = None if args.engine == "vllm" else modeling.shard_model(modeling.load_model(args.model, d.device), d)
    engine = rollout.make_engine(
        args.engine, model, processor, d, model_path=args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        prompt_format=prompt_format, max_model_len=args.max_prompt_length + args.max_new_tokens,
    )  # fmt: skip
    sampling = rollout.Sampling(args.temperature, args.top_p, args.max_new_tokens)
    # step 0: the seeds of grpo.py's initial scoring; Scoring(): grpo.py's default weights (VAS reads accuracy only)
    with reward.RewardPool(args.reward_workers) as pool:
        scores = rollout_scores(
            engine, rows, d, n=args.rollouts, sampling=sampling, seed=args.seed, step=0, pool=pool,
            scoring=reward.Scoring(), alpha=args.alpha, beta=args.beta, tds_kind=args.tds,
            prompts_per_call=args.prompts_per_call,
        )  # fmt: skip
    engine.close()
    if d.master:
        import datasets

        ids = [str(r.get("id", i)) for i, r in enumerate(rows)]
        table = {"id": ids, "index": list(range(len(rows))), **{k: v.tolist() for k, v in scores.items()}}
        datasets.Dataset.from_dict(table).to_parquet(args.out)
        zero = float(np.mean(scores["ovs"] == 0))
        print(
            f"{len(rows)} prompts: mean pass rate {scores['pass_rate'].mean():.3f}, "
            f"zero-variance share {zero:.3f}, mean VPS {scores['vps'].mean():.4f} -> {args.out}"
        )
    dist.cleanup_distributed()


if __name__ == "__main__":
    main()
