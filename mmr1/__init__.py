"""The code the MMR1 stage scripts share, one module per idea (nothing runs at import time).

dist        process group, reductions over ranks, a rank's share of a batch, seed streams
config      dataclass -> CLI, metrics.jsonl logger, one-line input errors
modeling    loading Qwen2.5-VL + processor, attention choice, FSDP2, precision, optimizer step
logprobs    per-token log-probs: the naive definition, then chunked and packed
chat        the recipe's prompts, rows -> chat messages
images      image decoding, resizing, the processor's shape rules
batches     chat -> model inputs, SFT labels, RL sequences, micro-batches by token budget
data        loading and checking rows (the bad-input rules)
checkpoint  atomic checkpoints, trainer state, resume checks
rollout     generation engines: HF generate and colocated vLLM
"""
