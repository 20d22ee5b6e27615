"""The two pip-shipped pretrained models: real weights, real tokenizers, PEFT agreement at full size."""

import copy

import peft
import pytest
import torch

from qkvtune import attach, io
from qkvtune.models import load_model
from qkvtune.targets import find_targets


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, d in attach.iter_deltas(model):
            d.lora_B.normal_(0, 0.02, generator=g)


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm", "classification", 2)


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m", "causal_lm")


def test_minilm_lora_qv_peft_and_merge(minilm, tmp_path):
    base, tok, new = minilm
    assert new == ["classifier"]
    model = copy.deepcopy(base).eval()
    targets = find_targets(model, ["q", "v"])
    assert len(targets) == 12 and all(t.shape == (384, 384) for t in targets)
    attach.add_adapter(model, targets, "lora", heads=attach.find_heads(model, new), rank=8, alpha=16)
    _randomize(model)
    batch = tok(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        y = model(**batch).logits
        io.save_adapter(model, str(tmp_path))
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        assert (pm(**batch).logits - y).abs().max() <= 1e-4
        attach.merge_adapter(model)
        assert (model(**batch).logits - y).abs().max() <= 1e-4


def test_smollm2_gqa_targets_and_peft(smollm, tmp_path):
    base, tok, _ = smollm
    targets = find_targets(base, ["q", "k", "v", "o"])
    assert len(targets) == 4 * 30
    shapes = {t.kind: t.shape for t in targets}
    assert shapes == {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576)}
    model = copy.deepcopy(base).eval()
    attach.add_adapter(model, find_targets(model, ["q", "v"], layers="last:2"), "lora", rank=4, alpha=8)
    _randomize(model)
    batch = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        y = model(**batch).logits
        assert (base(**batch).logits - y).abs().max() > 1e-3
        io.save_adapter(model, str(tmp_path))
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        assert (pm(**batch).logits - y).abs().max() <= 1e-4
        # the pretrained model really is the instruct model: greedy answer to a known prompt
        out = base.generate(**batch, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1]:])
