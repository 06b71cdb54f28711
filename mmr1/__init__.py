"""The code the MMR1 stage scripts share, one module per idea (nothing runs at import time).

dist        process group, reductions over ranks, a rank's share of a batch, seed streams
config      dataclass -> CLI, metrics.jsonl logger, atomic files, one-line input errors
families    the supported model families and every place they differ (one adapter)
modeling    loading a model + processor, FSDP2, precision, optimizer step
attention   attention kernel choice, packed-row attention (per-sequence SDPA, torch varlen), vision tower
logprobs    per-token log-probs: the naive definition, then chunked and packed
chat        the recipe's prompts, rows -> chat messages
images      image decoding, resizing, the processor's shape rules
batches     chat -> model inputs, SFT labels, RL sequences, micro-batches by token budget
data        loading and checking rows (the bad-input rules)
checkpoint  atomic checkpoints, trainer state, resume checks
checkpoint_checks  reading checkpoint files without running them, the damage scan
guards      a diverged step, a second run into one folder, an unwritable output, a folder without a model
rollout     generation engines: HF generate and colocated vLLM
benchmarks  the five benchmarks: hub ids, rows -> prompts, reading their files, the registry, score_answer
benchmark_rules  each benchmark's official scoring rule, the fields it reads, a strict exact-match reading
"""
