"""Peak memory and time of per-token log-probs: chunked lm_head + logsumexp vs the naive
full-vocabulary log_softmax, forward + backward, at Qwen2.5's vocabulary (151,936) on CPU.

    python bench/logprob_bench.py                 # prints a markdown table (runs each case in a fresh process)
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB, HIDDEN = 151_936, 896  # Qwen2.5's vocabulary; Qwen2.5-0.5B's hidden size


def one_case(method: str, length: int, chunk: int) -> dict:
    """Runs one forward + backward in this process; returns extra peak RSS (MiB) and seconds."""
    import torch

    sys.path.insert(0, str(ROOT))
    from mmr1 import logprobs

    torch.manual_seed(0)
    torch.set_num_threads(1)
    weight = torch.empty(VOCAB, HIDDEN).normal_(0, 0.02)  # in place: no transient copy to mask the peak
    hidden = torch.randn(1, length, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (1, length))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if method == "naive":
        logits = hidden @ weight.T  # (1, T, V) fp32
        logp = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    else:
        logp, _ = logprobs.logprobs_from_hidden(hidden, weight, targets, chunk_size=chunk)
    logp.sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak - base, "seconds": seconds, "checksum": float(hidden.grad.abs().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="256,1024,2048", help="sequence lengths")
    parser.add_argument("--chunk", type=int, default=128, help="positions per chunk")
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)  # internal: run one case and print JSON
    args = parser.parse_args()
    if args.case:
        method, length = args.case.split(":")
        print(json.dumps(one_case(method, int(length), args.chunk)))
        return
    print(f"| tokens | naive peak MiB | chunked ({args.chunk}) peak MiB | ratio | naive s | chunked s | same grads |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for length in [int(x) for x in args.lengths.split(",")]:
        runs = {}
        for method in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "--case", f"{method}:{length}", "--chunk", str(args.chunk)]
            runs[method] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        n, c = runs["naive"], runs["chunked"]
        same = abs(n["checksum"] - c["checksum"]) <= 1e-4 * abs(n["checksum"])
        print(f"| {length} | {n['peak_mib']:.0f} | {c['peak_mib']:.0f} | {c['peak_mib'] / n['peak_mib']:.2f} | "
              f"{n['seconds']:.2f} | {c['seconds']:.2f} | {same} |")  # fmt: skip


if __name__ == "__main__":
    main()
