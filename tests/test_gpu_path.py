"""The GPU path checked on CPU (issues #22 and #29: the first 8-GPU launch and its second review):
PyTorch's varlen attention on packed rows and in the vision tower (through a CPU stand-in for the
CUDA-only kernel that refuses what it refuses), the attention choice, the LLM(...) arguments of every
engine, the memory plan against Qwen2.5-VL-3B/7B parameter counts, VAS re-scoring in rounds, the CUDA
check of --preset paper, FSDP2 over 2 gloo ranks where one rank's rows have no image, the eager AdamW
state, the engine keeping the global RNGs, and the non-GPU parts of gpu_smoke.sh and setup_gpu.sh."""

import subprocess
import sys
import types

import pytest
import torch
from test_packing import rl_micro_batch
from test_rollout import install_fake_vllm

import grpo
from conftest import ROOT, run_script
from mmr1 import attention, dist, logprobs, memory, modeling, rollout, vllm_engine

# ---------------------------------------------------------------------------------------------
# torch_varlen: PyTorch's fused varlen kernel on packed rows
# ---------------------------------------------------------------------------------------------


def sdpa_per_segment(calls, enable_gqa_keyword: bool = True):
    """A CPU stand-in for torch.nn.attention.varlen.varlen_attn with its signature (torch 2.14's, or
    with enable_gqa_keyword=False torch 2.11's, which has no `enable_gqa` and takes fewer key / value
    heads as they are): SDPA over each segment that cu_seq_q delimits, causal for window_size (-1, 0),
    both ways for (-1, -1) or a window that covers the longest segment, (N, heads, D) in and out. Like
    the CUDA kernel it refuses q, k, v that are not all fp16 or all bf16, and computes in fp32,
    returning the input dtype. Records what it receives."""

    def attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, enable_gqa):
        calls.append({"cu_q": cu_seq_q.tolist(), "cu_k": cu_seq_k.tolist(), "max": (max_q, max_k),
                      "window": window_size, "dtype": cu_seq_q.dtype, "gqa": enable_gqa, "scale": scale,
                      "qkv": (query.dtype, key.dtype, value.dtype)})  # fmt: skip
        if not (query.dtype == key.dtype == value.dtype and query.dtype in (torch.float16, torch.bfloat16)):
            raise RuntimeError(f"FlashAttention only supports fp16 and bf16, equal dtypes: {calls[-1]['qkv']}")
        covers = min(window_size) >= max_q - 1  # every key of the query's segment lies inside the window
        assert window_size in ((-1, 0), (-1, -1)) or covers  # causal, or full attention within each segment
        bounds = cu_seq_q.tolist()
        parts = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            q, k, v = (t[s:e].transpose(0, 1).float() for t in (query, key, value))  # (heads, L, D)
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa
            )
            parts.append(out.transpose(0, 1))
        return torch.cat(parts).to(query.dtype)

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    enable_gqa=False, return_aux=None, seqused_k=None, block_table=None, num_splits=None):  # fmt: skip
        return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, enable_gqa)

    def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                         window_size=(-1, -1)):  # fmt: skip
        gqa = query.shape[1] != key.shape[1]  # FA2 reads the head counts itself
        return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, gqa)

    return varlen_attn if enable_gqa_keyword else varlen_attn_2_11


class CountingCache(attention.BoundaryCache):
    """attention.BOUNDARIES that counts its reads of boundaries (each one a host sync on GPU)."""

    def __init__(self):
        super().__init__()
        self.computed = 0

    def read(self, key, compute):
        def counted():
            self.computed += 1
            return compute()

        return super().read(key, counted)


@pytest.fixture(scope="module")
def varlen_model(toy_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    attention.register_packed_attention()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        toy_dir / "model", attn_implementation=attention.TORCH_VARLEN
    )
    attention.use_vision_varlen(model)  # what load_model does for TORCH_VARLEN
    return model  # fp32 weights, as a trainable model's master weights


# bf16 tolerances. The kernel takes q, k, v in bf16 (8 mantissa bits), so the packed path and the padded
# one (SDPA under the same autocast) differ by rounding, no longer by fp32 summation order alone:
# measured 0.0034 at most on the toy's log-probs (values of -7 and above), so 0.02 keeps a 6x margin
# while one attended token of a neighbouring sequence still moves a log-prob by more (test_packing's
# leak test, in fp32, pins the boundaries themselves, and the calls' cu_seqlens are checked exactly).
# The vision tower: both paths attend in bf16 from the same bf16 q, k, v (measured: equal outputs); a
# 1% bound of the output's scale leaves room for another summation order (one bf16 step is 0.4%).
BF16_ATOL = 0.02
BF16_VISION_RTOL = 0.01


def test_torch_varlen_packed_equals_padded(toy_model, varlen_model, monkeypatch):
    """Packed log-probs through varlen_attn equal the padded ones under the GPU's precision context
    (bf16 autocast over fp32 weights): the kernel gets q, k, v in ONE dtype, bf16 (Qwen2.5-VL's rotary
    embedding returns fp32 q and k beside a bf16 v there), the sequence boundaries as int32
    cu_seqlens, causal, with GQA on, once per decoder layer; the boundaries are read once per forward."""
    import torch.nn.attention.varlen as varlen

    calls = []
    monkeypatch.setattr(varlen, "varlen_attn", sdpa_per_segment(calls))
    counting = CountingCache()
    monkeypatch.setattr(attention, "BOUNDARIES", counting)
    _, processor = toy_model
    inputs, mask = rl_micro_batch(processor, [2, 1, 0])
    lengths = inputs["attention_mask"].sum(1).tolist()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        padded, _ = logprobs.token_logprobs(varlen_model, inputs, chunk_size=64, temperature=0.6, packed=False)
        text_calls = [c for c in calls if c["window"] == (-1, 0)]
        assert text_calls == []  # a padded batch (with its mask) goes to SDPA
        calls.clear()
        counting.computed = 0
        packed, _ = logprobs.token_logprobs(varlen_model, inputs, chunk_size=64, temperature=0.6, packed=True)
    text_calls = [c for c in calls if c["window"] == (-1, 0)]
    layers = varlen_model.config.text_config.num_hidden_layers
    bounds = [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert len(text_calls) == layers
    config = varlen_model.config.text_config
    scale = (config.hidden_size // config.num_attention_heads) ** -0.5
    for c in calls:
        assert c["qkv"][0] == c["qkv"][1] == c["qkv"][2] == torch.bfloat16
    for c in text_calls:
        assert c["cu_q"] == bounds and c["cu_k"] == bounds and c["max"] == (max(lengths), max(lengths))
        assert c["dtype"] == torch.int32 and c["gqa"] == (config.num_key_value_heads != config.num_attention_heads)
        assert c["scale"] == pytest.approx(scale)
    # boundary reads of the packed forward: text positions -> list, list -> device tensor; the vision
    # tower's windows and whole images: 4 in all, not one per layer (4 text layers + 2 vision blocks)
    assert counting.computed == 4
    valid = inputs["attention_mask"][:, :-1].bool() & inputs["attention_mask"][:, 1:].bool()
    assert torch.allclose(packed[valid], padded[valid], atol=BF16_ATOL, rtol=0)
    assert (packed[~valid] == 0).all() and mask.sum() > 0


def test_torch_varlen_casts_fp32_without_autocast(monkeypatch):
    """No autocast, fp32 q, k, v (a trainable model run outside the precision context): the kernel
    gets bf16, the caller fp32 back; under autocast the autocast dtype, whatever the inputs."""
    import torch.nn.attention.varlen as varlen

    calls = []
    monkeypatch.setattr(varlen, "varlen_attn", sdpa_per_segment(calls))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 10, 8, generator=gen) for h in (4, 2, 2))  # (1, heads, N, D)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    module = types.SimpleNamespace(scaling=8**-0.5)
    out, _ = attention.torch_varlen(module, q, k, v, None, position_ids=positions)
    assert calls[-1]["qkv"] == (torch.bfloat16,) * 3 and out.dtype == torch.float32 and out.shape == (1, 10, 4, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        attention.torch_varlen(module, q, k, v.half(), None, position_ids=positions)
    assert calls[-1]["qkv"] == (torch.float16,) * 3 and calls[-1]["cu_q"] == [0, 4, 10]


@pytest.mark.parametrize("newer", [True, False], ids=["torch-2.14-signature", "torch-2.11-signature"])
def test_fused_varlen_passes_enable_gqa_only_where_taken(monkeypatch, newer):
    """torch 2.11's varlen_attn has no `enable_gqa` (a TypeError at the first packed forward if passed):
    fused_varlen passes it only where the installed signature takes it, and both give the same GQA
    attention (4 query heads over 2 key / value heads), causal and full, equal to SDPA per segment."""
    import torch.nn.attention.varlen as varlen

    calls = []
    monkeypatch.setattr(varlen, "varlen_attn", sdpa_per_segment(calls, enable_gqa_keyword=newer))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, h, 8, generator=gen).bfloat16() for h in (4, 2, 2))  # (N, heads, D)
    cu_seq = torch.tensor([0, 4, 10], dtype=torch.int32)
    for causal in (True, False):
        out = attention.fused_varlen(q, k, v, cu_seq, 6, None, causal=causal)
        expected = torch.cat([
            torch.nn.functional.scaled_dot_product_attention(
                *(t[s:e].transpose(0, 1).float() for t in (q, k, v)), is_causal=causal, enable_gqa=True
            ).transpose(0, 1)
            for s, e in ((0, 4), (4, 10))
        ])  # fmt: skip
        assert torch.allclose(out.float(), expected, atol=1e-2, rtol=0)  # one bf16 rounding of the output
    assert [c["gqa"] for c in calls] == [True, True] and [c["window"] for c in calls] == [(-1, 0), (6, 6)]
    assert attention.takes_keyword(varlen.varlen_attn, "enable_gqa") is newer


def test_vision_tower_one_varlen_call_per_block(toy_model, varlen_model, monkeypatch):
    """The vision tower under TORCH_VARLEN: one fused call per block (not one per window), with
    cu_seqlens the attention windows (block 0) and the whole images (block 1, the toy's full-attention
    block), full attention inside each segment; the output equals transformers' per-window SDPA."""
    import torch.nn.attention.varlen as varlen

    calls = []
    monkeypatch.setattr(varlen, "varlen_attn", sdpa_per_segment(calls))
    vision = varlen_model.config.vision_config
    assert vision.window_size == 112 and vision.fullatt_block_indexes == [1] and vision.spatial_merge_size == 2
    # two images of 16 x 16 and 8 x 12 patches (224 x 224, 112 x 168 px). A window is 112 px = 8 x 8
    # patches: the first image has 2 x 2 windows of 64 patches, the second one of 64 and one of 8 x 4 = 32
    grid = torch.tensor([[1, 16, 16], [1, 8, 12]])
    windows = [0, 64, 128, 192, 256, 320, 352]
    whole = [0, 256, 352]
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(352, patch, generator=torch.Generator().manual_seed(0))
    stock, _ = toy_model  # the same weights, transformers' per-window path (SDPA)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = stock.model.visual(pixels, grid_thw=grid).pooler_output.float()
        got = varlen_model.model.visual(pixels, grid_thw=grid).pooler_output.float()
    assert [c["cu_q"] for c in calls] == [windows, whole] and all(c["cu_k"] == c["cu_q"] for c in calls)
    # both directions through a window covering the longest segment, never (-1, -1): on sm90 / sm100 torch
    # sends a (-1, -1) call with max_q > 128 (here the 256-patch image of the full-attention block) to cuDNN
    assert [c["max"] for c in calls] == [(64, 64), (256, 256)] and [c["window"] for c in calls] == [
        (64, 64),
        (256, 256),
    ]
    assert not [c for c in calls if c["window"] == (-1, -1) and c["max"][0] > 128]
    assert all(c["dtype"] == torch.int32 and c["qkv"] == (torch.bfloat16,) * 3 for c in calls)
    scale = expected.abs().max()
    assert torch.allclose(got, expected, atol=BF16_VISION_RTOL * scale, rtol=0)


def test_attention_choice(monkeypatch):
    """CPU: per-sequence SDPA. A GPU without flash-attn: torch's varlen kernel (torch 2.14 has it).
    With flash-attn importable: flash_attention_2."""
    assert attention.attention_implementation(torch.device("cpu")) == attention.VARLEN_SDPA
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    assert attention.importable("torch.nn.attention.varlen", "varlen_attn")
    assert attention.attention_implementation(torch.device("cuda", 0)) == attention.TORCH_VARLEN
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert attention.attention_implementation(torch.device("cuda", 0)) == "flash_attention_2"


# ---------------------------------------------------------------------------------------------
# The LLM(...) arguments of every engine the code builds
# ---------------------------------------------------------------------------------------------


def test_engine_arguments_eval_grpo(monkeypatch, toy_model, toy_dir):
    """eval.py's engine: no sleep mode (a second sleep-mode engine in one process trips vLLM's one
    CuMem allocator). Every engine: the run's pixel range as mm_processor_kwargs, max_model_len
    clamped to the model's 4,096 positions (the toy eval asked for 4,160)."""
    import eval as evaluation

    model, processor = toy_model
    log = []
    install_fake_vllm(monkeypatch, log)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    gpu = dist.Dist(0, 1, 0, torch.device("cuda", 0))  # the GPU arguments; nothing here touches a device
    cfg = evaluation.EvalConfig(engine="vllm", min_pixels=3136, max_pixels=50176, max_new_tokens=64)
    assert cfg.max_new_tokens + cfg.max_prompt_length == 4160
    engine = evaluation.make_engine(cfg, str(toy_dir / "model"), None, processor, gpu)
    kwargs = log[0][1]
    assert kwargs["enable_sleep_mode"] is False and not engine.sleep_mode
    assert kwargs["max_model_len"] == 4096 == vllm_engine.max_positions(str(toy_dir / "model"))
    assert kwargs["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 50176}
    engine.sleep()
    assert log[-1][0] == "LLM"  # no sleep call without sleep mode

    log.clear()
    run = grpo.GRPOConfig(engine="vllm", gpu_memory_utilization=0.6, min_pixels=7056, max_pixels=200704)
    engine = grpo.make_engine(model, processor, str(toy_dir / "model"), 0, None, run, gpu)
    kwargs = log[0][1]
    assert kwargs["enable_sleep_mode"] is True and kwargs["gpu_memory_utilization"] == 0.6
    assert kwargs["max_model_len"] == run.max_prompt_length + run.max_response_length == 2112
    assert kwargs["mm_processor_kwargs"] == {"min_pixels": 7056, "max_pixels": 200704}
    assert kwargs == engine.engine_args


# ---------------------------------------------------------------------------------------------
# The memory plan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, billions", [("3B", 3.7546), ("7B", 8.2922)])
def test_parameter_counts_match_the_model_built_on_meta(size, billions):
    """The plan's arithmetic counts of each FSDP2 unit equal those of Qwen2.5-VL built from the
    real config on the meta device (no memory, no download)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = memory.qwen25_vl_config(size)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    counts = memory.parameter_counts(memory.shapes(config))
    inner = model.model
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert round(counts["total"] / 1e9, 4) == billions
    assert counts["text_layer"] == sum(p.numel() for p in inner.language_model.layers[0].parameters())
    assert counts["vision_block"] == sum(p.numel() for p in inner.visual.blocks[0].parameters())
    assert counts["vision_unit"] == sum(p.numel() for n, p in inner.visual.named_parameters() if "blocks." not in n)
    in_units = {id(p) for m in modeling.decoder_layers(model) + [inner.visual] for p in m.parameters()}
    assert counts["root"] == sum(p.numel() for p in model.parameters() if id(p) not in in_units)


def test_memory_plan_paper_7b():
    """7B, 8 x 80 GB: the issue's numbers (fp32 shard 3.9, AdamW 7.7, reference 1.9 + root 2.0 when
    it stays gathered), and a vLLM share that leaves the trainer of step 1 its room (AdamW state
    included), the CUDA context, NCCL's 2 GiB (8 ranks; none on one process) and 3 GiB against
    fragmentation; resharding the reference gives vLLM 2 GiB more KV cache."""
    config = memory.qwen25_vl_config("7B")
    card = memory.CARDS_GIB["80GB"]
    p = memory.plan(config, card)
    assert round(p["policy fp32 shard"], 2) == 3.86 and round(p["AdamW shard (2 x fp32)"], 2) == 7.72
    assert round(p["reference bf16 shard"], 2) == 1.93 and p["reference root, gathered"] == 0.0
    assert round(p["trainer resident"], 2) == 13.51 and round(p["vLLM weights bf16"], 2) == 15.45
    u = p["gpu_memory_utilization"]
    assert (p["CUDA context"], p["NCCL buffers"], p["fragmentation margin"]) == (1.0, 2.0, 3.0)
    assert u == 0.75 and p["rollout peak"] <= card - memory.FRAGMENTATION_GIB
    assert p["rollout peak"] + memory.FRAGMENTATION_GIB > card - 0.01 * card  # u rounded down by < 0.01
    assert p["training peak"] < card and p["KV sequences (prompt + response)"] > 100
    before = memory.plan(config, card, memory.RunSettings(reshard_reference=False))
    assert round(before["reference root, gathered"], 2) == 2.03 and round(before["trainer resident"], 2) == 15.54
    assert before["gpu_memory_utilization"] == 0.72 and before["vLLM KV cache"] < p["vLLM KV cache"] - 1.5
    big = memory.plan(config, memory.CARDS_GIB["141GB"])
    assert big["gpu_memory_utilization"] == 0.86 and big["KV tokens"] > 2 * p["KV tokens"]
    alone = memory.plan(config, memory.CARDS_GIB["141GB"], memory.RunSettings(world_size=1))
    assert (
        alone["NCCL buffers"] == 0.0 and alone["rollout peak"] <= memory.CARDS_GIB["141GB"] - memory.FRAGMENTATION_GIB
    )


def test_plan_memory_script_prints_the_table():
    out = run_script(["scripts/plan_memory.py"]).stdout
    assert "| GiB per rank | 7B / 80GB | 7B / 141GB | 3B / 80GB | 3B / 141GB |" in out
    assert "| gpu_memory_utilization | 0.75 | 0.86 | 0.84 | 0.91 |" in out
    assert "| NCCL buffers | 2.00 | 2.00 | 2.00 | 2.00 |" in out
    assert "| params (B) | 8.29 | 8.29 | 3.75 | 3.75 |" in out


# ---------------------------------------------------------------------------------------------
# VAS re-scoring batch, the CUDA check
# ---------------------------------------------------------------------------------------------


class CountingEngine:
    """Answers "4" to every prompt and records how many prompts each generate call got."""

    def __init__(self):
        self.calls = []

    def generate(self, rows, n, sampling):
        self.calls.append(len(rows))
        return [rollout.Rollout(i, [1, 2, 3], "<answer>4</answer>", "stop") for i in range(len(rows)) for _ in range(n)]

    def push_weights(self, model, version=None):
        pass

    def sleep(self):
        pass


def test_vas_rescoring_uses_prompts_per_call(tmp_path):
    rows = [{"problem": f"q{i}", "answer": "4"} for i in range(600)]
    engine = CountingEngine()
    cfg = grpo.GRPOConfig(vas_rollouts=2)
    assert cfg.vas_prompts_per_call == 256
    state = grpo.SamplerState(grpo.vas.MixedSampler(len(rows), 16, 0.5, 0), grpo.np.zeros(len(rows)))
    one = dist.Dist(0, 1, 0, torch.device("cpu"))
    scores = grpo.refresh_vps(engine, None, rows, state, cfg, one, None, 0, tmp_path)
    assert engine.calls == [256, 256, 88] and scores["pass_rate"].tolist() == [1.0] * 600


def test_vas_split_deals_rows_round_robin_in_rounds():
    """VAS re-scoring's split: rank r scores rows r, r + W, ... of each round (a slice of every part
    of the data, so rows grouped by source cost every rank alike), rounds of one call per rank."""
    rows = list(range(40))
    for world, per_call in ((4, 5), (3, 4), (8, 256)):
        order = dist.rounds(rows, per_call, world)
        assert sorted(x for part in order for x in part) == rows and all(len(p) <= per_call * world for p in order)
        for part in order:
            shares = [dist.shard(part, dist.Dist(r, world, r, torch.device("cpu"))) for r in range(world)]
            assert sorted(x for share, real in shares for x in share[:real]) == sorted(part)
            assert all(real <= per_call for _, real in shares)  # one generate call per rank and round
    first, second = dist.rounds(rows, 5, 4)  # two full rounds of 20
    mine = [dist.shard(part, dist.Dist(1, 4, 1, torch.device("cpu")))[0] for part in (first, second)]
    assert mine == [[1, 5, 9, 13, 17], [21, 25, 29, 33, 37]]  # rank 1: every 4th row of each round
    # 10 rows, 4 ranks: shard() shares of 3, 3, 3, 1, dealt round-robin until a share is full
    ten = dist.interleave(list(range(10)), 4)
    shares = [dist.shard(ten, dist.Dist(r, 4, r, torch.device("cpu"))) for r in range(4)]
    assert [share[:real] for share, real in shares] == [[0, 4, 7], [1, 5, 8], [2, 6, 9], [3]]
    # the contiguous split it replaces: rows of one source (a block) all on one rank
    assert dist.shard(rows, dist.Dist(0, 4, 0, torch.device("cpu")))[0] == list(range(10))


class AnsweringEngine(CountingEngine):
    """Answers "4" to every prompt: right for rows whose answer is 4, wrong for the others."""


def test_vas_rescoring_puts_each_score_on_its_row(tmp_path):
    """Rounds and interleaving reorder the prompts; every score must still land on its own row (every
    row passed the door, so every row is scored)."""
    rows = [{"problem": f"q{i}", "answer": "4" if i % 3 else "5"} for i in range(30)]
    engine = AnsweringEngine()
    cfg = grpo.GRPOConfig(vas_rollouts=2, vas_prompts_per_call=7)
    state = grpo.SamplerState(grpo.vas.MixedSampler(len(rows), 16, 0.5, 0), grpo.np.zeros(len(rows)))
    one = dist.Dist(0, 1, 0, torch.device("cpu"))
    scores = grpo.refresh_vps(engine, None, rows, state, cfg, one, None, 0, tmp_path)
    assert engine.calls == [7, 7, 7, 7, 2]
    expected = [0.0 if i % 3 == 0 else 1.0 for i in range(30)]
    assert scores["pass_rate"].tolist() == expected and scores["tokens"].tolist() == [6.0] * 30


def test_paper_preset_refuses_to_run_without_cuda():
    cmd = [sys.executable, "grpo.py", "--preset", "paper", "--model", "m", "--data", "d"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "grpo.py --preset paper needs CUDA GPUs" in last and "torch.cuda.is_available() is False" in last


# ---------------------------------------------------------------------------------------------
# FSDP2 with a rank whose micro-batch has no image
# ---------------------------------------------------------------------------------------------

NO_IMAGE_WORKER = """
import os
import sys
sys.path.insert(0, {root!r})
import torch
from data import toy
from mmr1 import batches, dist, logprobs, modeling
from mmr1.chat import PromptFormat

d = dist.setup_distributed(0)
model_dir = {model!r}
processor = modeling.load_processor(model_dir, 3136, 50176)
rows = [{{"problem": "<image>How many red squares?", "images": [toy.draw_grid(["red", "blue", "red", "green"])]}},
        {{"problem": "What is 2 + 3?"}}]  # rank 0 gets the image row, rank 1 the text-only one
text = processor.tokenizer.encode("the answer is four because I count", add_special_tokens=False)
responses = [text[:4], text[4:7]]


def loss_of(model, inputs, mask, total):
    logp, _ = logprobs.batch_logprobs(model, inputs, d.device, 16, False, 0.6, True)
    return -(logp * mask).sum() / total


total = 7.0  # response tokens of both ranks
# the reference: one process, both rows, the unsharded model
reference = modeling.load_model(model_dir, d.device, trainable=True)
for row, response in zip(rows, responses):
    inputs, mask = batches.rl_batch(processor, batches.build_prompts(processor, [row], PromptFormat(), 3136, 50176), [response])
    loss_of(reference, inputs, mask, total).backward()
expected = {{n: p.grad.clone() for n, p in reference.named_parameters()}}

model = modeling.shard_model(modeling.load_model(model_dir, d.device, trainable=True), d)
inputs, mask = batches.rl_batch(processor, batches.build_prompts(processor, [rows[d.rank]], PromptFormat(), 3136, 50176), [responses[d.rank]])
assert ("pixel_values" in inputs) == (d.rank == 0)
for _ in range(2):  # twice: the second forward after a backward must line up as well
    model.zero_grad()
    loss_of(model, inputs, mask, total).backward()
worst = 0.0
for n, p in model.named_parameters():
    grad = p.grad.full_tensor()
    worst = max(worst, (grad - expected[n]).abs().max().item() / (expected[n].abs().max().item() + 1e-12))
vision = [p.grad.full_tensor().abs().max().item() for n, p in model.named_parameters() if "visual.blocks" in n]
if d.master:
    print(f"RESULT worst_rel_grad_diff={{worst:.2e}} vision_grad_max={{max(vision):.3e}}")
assert worst < 1e-4, worst
assert max(vision) > 0  # the image row's gradient reaches the vision tower
dist.cleanup_distributed()
sys.stdout.flush()
os._exit(0)  # past the checks: skip interpreter teardown (a gloo thread there can abort a loaded rank)
"""


def test_fsdp2_rank_without_images(toy_dir, tmp_path):
    """2 gloo ranks, rank 1's micro-batch text-only: without the dummy vision pass the ranks' FSDP2
    all-gathers fall out of step ("Received data size doesn't match expected size"); with it the
    sharded gradient equals the one-process gradient of both rows."""
    script = tmp_path / "no_image_worker.py"
    script.write_text(NO_IMAGE_WORKER.format(root=str(ROOT), model=str(toy_dir / "model")))
    out = run_script([str(script)], torchrun=2, timeout=300).stdout
    assert "RESULT worst_rel_grad_diff=" in out


# ---------------------------------------------------------------------------------------------
# scripts/gpu_smoke.sh: its non-GPU parts
# ---------------------------------------------------------------------------------------------


def test_gpu_smoke_commands_parse_and_bad_arguments_stop():
    """--dry-run prints one command per stage; every flag of each is one its script accepts (parsed
    by the stage's own config); with vLLM the V1-runner rerun of grpo is listed; unknown engines, GPU
    counts and arguments stop with exit code 2."""
    import shlex

    import eval as evaluation
    import sft
    from mmr1 import config

    def smoke(*args):
        return subprocess.run(["bash", "scripts/gpu_smoke.sh", *args], cwd=ROOT, capture_output=True, text=True)

    configs = {"sft": (sft.SFTConfig, sft.PRESETS), "grpo": (grpo.GRPOConfig, grpo.PRESETS),
               "eval": (evaluation.EvalConfig, None)}  # fmt: skip
    for gpus, engine in (("2", "hf"), ("1", "vllm")):
        proc = smoke("--dry-run", "--gpus", gpus, "--engine", engine, "--steps", "2", "--out", "/tmp/smoke")
        assert proc.returncode == 0, proc.stderr
        lines = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
        stages = ["toy", "plan", "sft", "logprobs", "grpo", "eval"]
        assert list(lines) == stages + (["grpo-v1 (if grpo fails)"] if engine == "vllm" else [])
        for stage, (cls, presets) in configs.items():
            words = shlex.split(lines[stage])
            assert words[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", gpus]
            args = words[words.index(f"{stage}.py") + 1 :]
            cfg = config.parse_config(cls, presets, args)
            assert cfg.output_dir == f"/tmp/smoke/{stage}"
        assert f"--engine {engine}" in lines["grpo"] and "--max-steps 2" in lines["grpo"]
        plan = shlex.split(lines["plan"])
        assert plan[1:5] == ["scripts/gpu_checks.py", "plan", "--model", "runs/toy-init"] and plan[6] == gpus
        config.parse_config(grpo.GRPOConfig, grpo.PRESETS, plan[plan.index("--") + 1 :])  # the grpo stage's flags
        assert shlex.split(lines["logprobs"])[1:] == [
            "scripts/gpu_checks.py",
            "logprobs",
            "--model",
            "/tmp/smoke/sft/final",
        ]
        if engine == "vllm":
            rerun = shlex.split(lines["grpo-v1 (if grpo fails)"])
            assert rerun[0] == "VLLM_USE_V2_MODEL_RUNNER=0" and rerun[1:] == shlex.split(
                lines["grpo"].replace("/tmp/smoke/grpo", "/tmp/smoke/grpo-v1")
            )
    for bad in (["--engine", "sglang"], ["--gpus", "3"], ["--steps", "0"], ["--frobnicate"], ["--gpus"]):
        proc = smoke("--dry-run", *bad)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("gpu_smoke.sh: "), bad


def test_gpu_smoke_no_install_runs_hf_and_refuses_vllm():
    """--no-install (preinstalled torch + transformers, no vLLM): every stage on HF generate, the toy
    stage able to build the model without pyarrow; asking for vLLM with it stops with exit code 2."""
    import shlex

    def smoke(*args):
        return subprocess.run(["bash", "scripts/gpu_smoke.sh", *args], cwd=ROOT, capture_output=True, text=True)

    proc = smoke("--dry-run", "--no-install", "--gpus", "1")
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert list(lines) == ["toy", "plan", "sft", "logprobs", "grpo", "eval"]  # no vLLM V1 rerun
    assert "--engine hf" in lines["grpo"] and "--engine hf" in lines["eval"] and "--engine hf" in lines["plan"]
    assert "toy.build_toy_model()" in shlex.split(lines["toy"])[2]
    proc = smoke("--dry-run", "--no-install", "--engine", "vllm")
    assert proc.returncode == 2 and "--no-install runs without vLLM" in proc.stderr


def test_gpu_checks_run_on_the_cpu(toy_dir):
    """gpu_smoke.sh's two checks on the toy, here on the CPU: packed and padded log-probs agree (fp32:
    within 1e-4); the plan prints the peaks the smoke table puts beside the measured ones."""
    out = run_script(["scripts/gpu_checks.py", "logprobs", "--model", str(toy_dir / "model"), "--device", "cpu"]).stdout
    line = next(x for x in out.splitlines() if x.startswith("packed vs padded"))
    assert "(sdpa_varlen, fp32)" in line and float(line.split("max |diff| ")[1].split()[0]) < 1e-4
    assert "images up to 256 patches" in line  # the vision tower's full-attention call past 128 queries
    args = ["scripts/gpu_checks.py", "plan", "--model", str(toy_dir / "model"), "--gpus", "2", "--card-gib", "139.7"]
    out = run_script(args + ["--", "--vas", "--max-steps", "3"]).stdout
    line = next(x for x in out.splitlines() if x.startswith("plan:"))
    toy_plan = memory.plan(memory_config(toy_dir), 139.7, memory.RunSettings(world_size=2))
    assert f"(vLLM {toy_plan['gpu_memory_utilization']:.2f} of 139.7 GiB)" in line and "rollout peak" in line


def memory_config(toy_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(toy_dir / "model")


def test_grpo_takes_vllm_share_from_the_plan(tmp_path, monkeypatch):
    """grpo.py with --preset paper on 8 x 80 GB and a 7B checkpoint, no --gpu-memory-utilization:
    vLLM gets the plan's 0.75 (the card's size read from torch, here a stand-in for the 80 GB card)."""
    from mmr1 import config

    memory.qwen25_vl_config("7B").save_pretrained(tmp_path)
    card = types.SimpleNamespace(total_memory=int(memory.CARDS_GIB["80GB"] * memory.GIB))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    cfg = config.parse_config(grpo.GRPOConfig, grpo.PRESETS, ["--preset", "paper", "--model", "m", "--data", "d"])
    eight = dist.Dist(0, 8, 0, torch.device("cuda", 0))
    assert grpo.memory_plan_utilization(str(tmp_path), cfg, eight) == 0.75
    cfg.kl_coef = 0.0  # no reference model: more room
    assert grpo.memory_plan_utilization(str(tmp_path), cfg, eight) == 0.77  # 1.93 GiB less resident


# ---------------------------------------------------------------------------------------------
# Memory that fails fast: AdamW's state before vLLM starts; the engine keeps the run's RNGs
# ---------------------------------------------------------------------------------------------


def adamw_run(eager: bool, steps: int = 3, **options):
    """(parameters, optimizer state) after `steps` AdamW steps of a small seeded model on seeded
    gradients, its state created up front (eager) or by AdamW in its first step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    optimizer = torch.optim.AdamW([*model.parameters(), frozen], lr=1e-2, weight_decay=0.1, **options)
    if eager:
        modeling.create_optimizer_state(optimizer)
        assert len(optimizer.state) == 4 and frozen not in optimizer.state  # trainable parameters only
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(4, 6, generator=gen)).pow(2).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()], optimizer


@pytest.mark.parametrize("options", [{}, {"amsgrad": True}, {"foreach": False}])
def test_eager_adamw_state_is_bit_for_bit_the_lazy_one(options):
    lazy, lazy_opt = adamw_run(False, **options)
    eager, eager_opt = adamw_run(True, **options)
    assert all(torch.equal(a, b) for a, b in zip(lazy, eager))
    for a, b in zip(lazy_opt.state.values(), eager_opt.state.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_eager_adamw_state_keeps_a_resumed_state():
    """A resumed optimizer already holds its state: creating it again changes nothing, and the run
    continues as the uninterrupted one (exact resume)."""
    _, optimizer = adamw_run(False, steps=2)
    saved = {k: v.clone() for k, v in optimizer.state[optimizer.param_groups[0]["params"][0]].items()}
    modeling.create_optimizer_state(optimizer)
    kept = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert saved["step"] == 2 and all(torch.equal(saved[k], kept[k]) for k in saved)


def test_vllm_engine_keeps_the_global_rngs(monkeypatch, toy_model, toy_dir):
    """vLLM's engine start seeds python, numpy and torch with its own seed; a resumed run's restored
    states (and a fresh run's --seed) must survive it."""
    import random

    import numpy as np

    log = []
    install_fake_vllm(monkeypatch, log)
    fake = sys.modules["vllm"]

    class ReseedingLLM(fake.LLM):  # what vLLM's start does (set_random_seed)
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            random.seed(kwargs["seed"])
            np.random.seed(kwargs["seed"])
            torch.manual_seed(kwargs["seed"])

    monkeypatch.setattr(fake, "LLM", ReseedingLLM)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _, processor = toy_model
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    vllm_engine.VLLMEngine(str(toy_dir / "model"), processor, dist.Dist(0, 1, 0, torch.device("cpu")), min_pixels=3136,
                       max_pixels=50176)  # fmt: skip
    assert log[0][0] == "LLM" and (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert log[0][1]["limit_mm_per_prompt"] == {"image": 4, "video": 0}  # no video budget reserved


def test_sft_paper_preset_bounds_its_disk():
    """sft.py --preset paper saves every 1,000 of ~152k steps (1,620,490 rows x 3 epochs / 32): with
    every save kept, ~152 checkpoints of ~116 GB (docs/checkpoints.md) fill 17.5 TB. The preset keeps
    the newest 3 step-* folders and final/, at most one more briefly while a save completes."""
    import sft
    from mmr1 import config

    cfg = config.parse_config(sft.SFTConfig, sft.PRESETS, ["--preset", "paper", "--model", "m", "--data", "d"])
    steps = 1_620_490 * cfg.epochs // cfg.batch_size
    assert steps // cfg.save_every > 150 and cfg.save_total_limit == 3
    assert (cfg.save_total_limit + 2) * 116 <= 600  # GB of disk at most: 3 kept + final/ + one being written


# ---------------------------------------------------------------------------------------------
# scripts/setup_gpu.sh: what it checks before installing anything
# ---------------------------------------------------------------------------------------------


def test_setup_gpu_checks_python_and_nvcc_first(tmp_path):
    """Python 3.10 (Ubuntu 22.04's python3: pip would find no vllm 0.33.0) and --flash-attn without a
    CUDA 13 nvcc each stop with one line and exit 2 before the venv is made."""
    python310 = tmp_path / "python3.10"
    python310.write_text('#!/bin/sh\ncase "$2" in *version_info*) exit 1 ;; *) echo 3.10.12 ;; esac\n')
    python310.chmod(0o755)
    venv = tmp_path / "venv"

    def setup(*args, **env):
        cmd = ["bash", "scripts/setup_gpu.sh", "--venv", str(venv), *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env})

    proc = setup(PYTHON=str(python310))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"setup_gpu.sh: error: {python310} is Python 3.10.12; vllm 0.33.0 needs >= 3.11 (try PYTHON=python3.11 or python3.12)"
    )
    proc = setup("--flash-attn", PYTHON=sys.executable, CUDA_HOME=str(tmp_path / "no-cuda"))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("setup_gpu.sh: error: --flash-attn compiles flash-attn 2.8.3")
    assert "needs CUDA 13's nvcc" in last and "is missing" in last and not venv.exists()


def test_boundary_cache_reads_each_tensor_once_and_again_after_a_write():
    cache, reads = attention.BoundaryCache(size=2), []
    positions = torch.tensor([0, 1, 0, 1, 2])

    def boundaries(t):
        return lambda: reads.append(1) or (t == 0).nonzero().flatten().tolist()

    assert cache.read(positions, boundaries(positions)) == [0, 2] == cache.read(positions, boundaries(positions))
    assert len(reads) == 1  # one read per tensor
    positions[3] = 0  # written in place: read again
    assert cache.read(positions, boundaries(positions)) == [0, 2, 3] and len(reads) == 2
    equal = torch.tensor([0, 1, 0, 1, 2])  # same values, another tensor: its own read
    assert cache.read(equal, boundaries(equal)) == [0, 2] and len(reads) == 3


def test_hf_engine_gives_duplicate_prompts_different_groups(toy_model):
    """The HF engine's behaviour, which VLLMEngine now matches: one seeded random stream runs through
    all rows of a call, so a prompt drawn twice gets two different groups."""
    model, processor = toy_model
    engine = rollout.HFEngine(model, processor, dist.Dist(0, 1, 0, torch.device("cpu")), min_pixels=3136,
                              max_pixels=50176)  # fmt: skip
    row = {"problem": "How many red squares are there?", "answer": "2"}
    outs = engine.generate([row, row, row], 3, rollout.Sampling(temperature=1.0, max_new_tokens=8, seed=7))
    groups = [tuple(tuple(o.token_ids) for o in outs if o.row == r) for r in range(3)]
    assert len(set(groups)) == 3
