"""chunked_loss: the LM head's cross-entropy a chunk of tokens at a time gives transformers' own loss and
gradients (-100 labels, assistant-only spans, num_items_in_batch, tied embeddings, checkpointing, a 4-bit base),
never forms the whole logits, is used by training and evaluation, and is refused where it would not be exact."""

import importlib.util
import json

import pytest
import torch
import transformers

from conftest import randomize_trainable, tiny
from qkvtune import attach, chunked_loss
from qkvtune.config import ConfigError, build_config
from qkvtune.io import QKV_WEIGHTS
from qkvtune.models import enable_checkpointing
from qkvtune.targets import find_targets
from qkvtune.task import TaskInfo

LM = TaskInfo("causal_lm", 0)

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


def _lora(model):
    attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", rank=4)
    randomize_trainable(model)
    return model


def _batch(vocab, seed=0):
    """Labels as sft makes them: prompts (and padding) -100, two assistant spans in the second row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, :3] = labels[1, 6:8] = -100
    labels[2, 7:] = -100  # a shorter row's padding
    return ids, labels


def _loss_and_grads(model, ids, labels, hooks=None, **kwargs):
    model.zero_grad()
    with hooks.active() if hooks else torch.enable_grad():
        out = model(input_ids=ids, labels=labels, **kwargs)
    (0.5 * out.loss).backward()  # a scalar after the loss (Trainer's accumulation, DDP): backward must carry it
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, out.logits


def _full_tied_gpt2():
    model = tiny("gpt2")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.requires_grad_(True)
    randomize_trainable(model)
    return model


def _checkpointed_llama():
    model = _lora(tiny("llama"))
    enable_checkpointing(model)
    return model


def _nf4_llama(folder):
    from transformers import AutoModelForCausalLM

    from qkvtune.quant import bnb_config, standard_layout

    model = standard_layout(AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config("nf4", torch.float32)))
    return _lora(model)


@pytest.mark.parametrize("case", ["lora", "tied-full", "checkpointing", "nf4"])
@pytest.mark.parametrize("items", [None, 40])
def test_loss_and_gradients_equal_transformers(case, items, tiny_llama_dir, monkeypatch):
    make = {"lora": lambda: _lora(tiny("llama")), "tied-full": _full_tied_gpt2,
            "checkpointing": _checkpointed_llama, "nf4": lambda: _nf4_llama(tiny_llama_dir)}[case]
    if case == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    model = make().train()
    vocab = model.get_output_embeddings().out_features
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 4 * vocab)  # chunks of 4 tokens: the chunk loop really runs
    ids, labels = _batch(min(vocab, 1000))
    kwargs = {} if items is None else {"num_items_in_batch": torch.tensor(items)}  # Trainer's accumulation count
    ref_loss, ref_grads, ref_logits = _loss_and_grads(model, ids, labels, **kwargs)

    hooks = chunked_loss.ChunkedLoss(model)
    saved = []  # what autograd keeps for backward, apart from the parameters themselves
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    keep = lambda t: saved.append(tuple(t.shape)) if t.untyped_storage().data_ptr() not in weights else None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: keep(t) or t, lambda t: t):
        loss, grads, logits = _loss_and_grads(model, ids, labels, hooks, **kwargs)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        assert ref_grads[n].abs().max() > 0, n
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-5, msg=n)
    assert logits.shape[1] == 0 and ref_logits.shape[1:] == (11, vocab)  # the head computed nothing V-wide
    head = tuple(model.get_output_embeddings().weight.shape)  # (a trained head's gradient has the head's shape)
    assert saved and not [s for s in saved if vocab in s and s != head]  # nor kept any logits for backward

    again, _, logits = _loss_and_grads(model, ids, labels, **kwargs)  # outside active(): the model's own path
    torch.testing.assert_close(again, ref_loss, atol=0, rtol=0)  # the reference's own path again: bit-exact
    assert logits.shape[1:] == (11, vocab)
    hooks.remove()


def test_chunked_cross_entropy_without_gradients_and_with_nothing_to_learn():
    h, w = torch.randn(2, 5, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (2, 5))
    ref = transformers.loss.loss_utils.ForCausalLMLoss(h @ w.T, labels, 30)
    with torch.no_grad():
        torch.testing.assert_close(chunked_loss.cross_entropy(h, w, None, labels), ref, atol=1e-6, rtol=1e-6)
    nothing = torch.full_like(labels, -100)
    assert chunked_loss.cross_entropy(h, w, None, nothing).isnan()  # 0/0, as transformers' mean
    assert chunked_loss.cross_entropy(h, w, None, nothing, num_items_in_batch=7) == 0  # a batch of accumulation without labels


def _gemma2():
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=48, head_dim=8)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def test_auto_keeps_full_logits_where_chunking_is_not_exact():
    model = _gemma2()  # final_logit_softcapping: its loss reads tanh-capped logits, not the head's output
    assert "softcapping or scaling" in chunked_loss.loss_mismatch(model)
    assert chunked_loss.for_run(model, "auto", LM) is None
    with pytest.raises(chunked_loss.ChunkedLossError, match="chunked_loss: Gemma2ForCausalLM changes its LM head's output"):
        chunked_loss.for_run(model, "on", LM)
    assert chunked_loss.loss_mismatch(tiny("llama")) is None and isinstance(chunked_loss.for_run(tiny("gpt2"), "auto", LM),
                                                                 chunked_loss.ChunkedLoss)
    assert chunked_loss.for_run(tiny("llama"), "off", LM) is None
    assert chunked_loss.for_run(tiny("bert", num_labels=2), "auto", TaskInfo("classification", 2)) is None
    with pytest.raises(ConfigError, match="chunked_loss: on is the loss of a causal LM's head; glue/sst2"):
        build_config({"task": "glue/sst2", "chunked_loss": "on"})
    assert build_config({"task": "text/x.txt", "chunked_loss": False}).chunked_loss == "off"


def _records(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i} " + "word " * (i % 7),
                                        "completion": f"answer {i} " + "more " * (i % 9)}) + "\n" for i in range(40)))
    return str(path)


def test_training_and_evaluation_use_it_with_gradient_accumulation(tmp_path, tiny_llama_dir, monkeypatch):
    """A Trainer run with gradient accumulation (num_items_in_batch over two micro-batches of different
    label counts) trains the same adapter, and evaluates the same loss, with the chunked loss as without."""
    from safetensors.torch import load_file

    from qkvtune.train import evaluate_run, train

    calls = {"grad": 0, "no_grad": 0}
    real, probe, probing = chunked_loss.cross_entropy, chunked_loss.loss_mismatch, []

    def counting(*args, **kwargs):
        if not probing:  # the exactness probe before training is not what is counted
            calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return real(*args, **kwargs)

    def quiet_probe(model):
        probing.append(1)
        try:
            return probe(model)
        finally:
            probing.pop()

    monkeypatch.setattr(chunked_loss, "cross_entropy", counting)
    monkeypatch.setattr(chunked_loss, "loss_mismatch", quiet_probe)
    f = _records(tmp_path)
    common = dict(model=tiny_llama_dir, task="sft", train_file=f, validation_fraction=0.2, max_steps=4, batch_size=2,
                  grad_accum=2,
                  optim="sgd", lr=0.5, lr_ratio=4, warmup_ratio=0, eval_strategy="no", max_length=48)
    full = train(build_config({**common, "chunked_loss": "off", "output_dir": str(tmp_path / "full")}))
    assert calls == {"grad": 0, "no_grad": 0}
    chunked = train(build_config({**common, "output_dir": str(tmp_path / "chunked")}))  # the default: auto
    # 4 steps × 2 micro-batches; the final evaluation's batch of 8 in slices of a training batch's 2 rows
    assert calls["grad"] == 8 and calls["no_grad"] == 4
    assert chunked["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)
    assert chunked["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
    a, b = load_file(tmp_path / "full" / QKV_WEIGHTS), load_file(tmp_path / "chunked" / QKV_WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("lora_B"))
    before = calls["no_grad"]
    assert evaluate_run(str(tmp_path / "chunked"))["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)
    assert calls["no_grad"] > before  # qkvtune eval: chunked too
