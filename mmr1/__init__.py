"""The code the MMR1 stage scripts share, one module per idea (nothing runs at import time).

dist               process group, reductions over ranks, a rank's share of a batch, seed streams
config             dataclass -> CLI, metrics.jsonl logger, atomic files, one-line input errors
run                the run scaffolding sft.py and grpo.py share: setup, resume point, save, preemption, closers
families           the supported model families and every place they differ (one adapter)
modeling           loading a model + processor, FSDP2, precision, optimizer step
attention          attention kernel choice, packed-row attention (per-sequence SDPA, torch varlen), vision tower
logprobs           per-token log-probs: the naive definition, then chunked and packed
memory             the per-rank memory plan at paper scale, and what fits a card
perf               FLOPs of a token and of a GRPO step, the cards' peaks, MFU
chat               the recipe's prompts, rows -> chat messages
images             image decoding (regular files only), resizing, the processor's shape rules
batches            the one prompt builder, SFT labels, RL sequences, micro-batches by token budget
layouts            which files make a split, ShareGPT -> messages, the streamed JSON -> Arrow cache
data               opening sources (memory-mapped), the door's rows indexed, images decoded at use
prepare            the door: every row check once, one report; its table of normalised rows is the loop's input
checkpoint         atomic checkpoints, trainer state, resume checks
checkpoint_checks  reading checkpoint files without running them, the damage scan
guards             a diverged step, a second run into one folder, an unwritable output, a folder without a model
rollout            generation engines behind one interface; HF generate on the training model
vllm_engine        the colocated vLLM engine (GPU build or its CPU build), imported only when asked for
benchmarks         the five benchmarks: hub ids, rows -> prompts, reading their files, the registry, score_answer
benchmark_rules    each benchmark's official scoring rule, the fields it reads, a strict exact-match reading
"""
