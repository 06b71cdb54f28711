"""mmr1.checkpoint: an atomic save loads back as the same model."""

import torch

from mmr1 import checkpoint, dist, modeling


def test_atomic_checkpoint_round_trip(tmp_path, toy_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    d = dist.Dist(0, 1, 0, torch.device("cpu"))
    model = modeling.load_model(str(toy_dir / "model"), d.device)
    processor = modeling.load_processor(str(toy_dir / "model"))
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    out = tmp_path / "ckpt"
    checkpoint.save_checkpoint(model, processor, out, d, {"step": 7})
    checkpoint.save_checkpoint(model, processor, out, d, {"step": 8})  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.load(out / "trainer_state.pt")["step"] == 8
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
