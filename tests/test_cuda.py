"""On a CUDA GPU (skipped elsewhere): every method trains in bf16 with fp32 adapters, agrees with an fp32
reference within bf16 tolerance, merges exactly back, and a whole Trainer run uses bf16 automatically."""

import copy
import json

import pytest
import torch
import transformers

from conftest import tiny
from qkvtune import attach, files, io
from qkvtune.targets import find_targets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HPARAMS = {"lora": dict(rank=4, alpha=8), "dora": dict(rank=4, alpha=8), "dense": {},
           "smt": dict(block_size=8, blocks=[{"module": "model.layers.0.self_attn.v_proj", "kind": "v", "row": 1,
                                              "col": 2}, {"module": "model.layers.1.self_attn.q_proj", "kind": "q",
                                                          "row": 0, "col": 0}])}


def _attach(model, method):
    targets = find_targets(model, ["q", "v"])
    if method == "smt":
        keep = {(b["module"], b["kind"]) for b in HPARAMS["smt"]["blocks"]}
        targets = [t for t in targets if (t.module, t.kind) in keep]
    attach.add_adapter(model, targets, method, heads=[], **HPARAMS[method])
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for _, d in attach.iter_deltas(model):
            for _, p, _ in d.param_roles():
                p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.device))


@pytest.mark.parametrize("method", ["lora", "dora", "dense", "smt"])
def test_bf16_cuda_matches_fp32_and_merges_exactly(method):
    base = tiny("llama")
    ref = copy.deepcopy(base)
    _attach(ref, method)
    model = copy.deepcopy(ref).to("cuda", torch.bfloat16)
    for _, d in attach.iter_deltas(model):  # .to() casts everything; adapters train in fp32 on bf16 bases
        d.float()
    ids = torch.randint(2, 64, (2, 9))
    with torch.no_grad():
        y_ref = ref(ids).logits
        y = model(ids.cuda()).logits.float().cpu()
    assert (y - y_ref).abs().max() < 0.05 * y_ref.abs().max() + 0.05
    model.train()
    loss = model(ids.cuda(), labels=ids.cuda()).loss
    loss.backward()
    grads = [p.grad for _, d in attach.iter_deltas(model) for _, p, _ in d.param_roles()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    attach.merge_adapter(model)
    attach.unmerge_adapter(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _word_tokenizer():
    """A small word-level tokenizer built in memory (no model files needed on the GPU machine)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [chr(c) for c in range(33, 127)] + [f"w{i}" for i in range(400)]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]")


@pytest.mark.parametrize("method", ["lora", "smt"])
def test_trainer_run_in_bf16(tmp_path, method):
    pytest.importorskip("vaderSentiment")
    from qkvtune.config import build_config
    from qkvtune.train import train

    tok = _word_tokenizer()
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96)
    folder = tmp_path / "model"
    transformers.BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    extra = dict(block_size=16, smt_budget=4, smt_warmup_steps=2) if method == "smt" else {}
    metrics = train(build_config(dict(model=str(folder), task="builtin/vader", method=method, max_train_samples=256,
                                      max_eval_samples=64, batch_size=32, max_steps=8, eval_strategy="no",
                                      output_dir=str(tmp_path / "run"), **extra)))
    assert metrics["global_step"] == 8 and 0 <= metrics["eval_accuracy"] <= 1
    args = json.load(open(tmp_path / "run" / io.QKV_CONFIG))["settings"]["config"]
    assert args["dtype"] == "auto"
    saved = files.read_json(str(tmp_path / "run" / "checkpoint-8" / "trainer_state.json"))
    assert saved["global_step"] == 8
