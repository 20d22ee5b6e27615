"""MLP kinds (gate, up, down) and all-linear across the architecture families: each MLP slice is what the model's
own MLP computes (down receives act(gate)·up, or act(up), in the model's own forward pass); a LoRA on up moves up's
rows and nothing else; PEFT loads the saved adapter to the same logits; all-linear is the set of modules PEFT
itself wraps for target_modules="all-linear"; a kind a model lacks or that does not exist is one line naming it."""

import copy
import os

import peft
import pytest
import torch
import transformers as T
from peft.tuners.tuners_utils import BaseTunerLayer

from conftest import randomize_deltas, run_cli, tiny
from qkvtune import attach, io
from qkvtune.config import ConfigError, build_config
from qkvtune.targets import ATTENTION_KINDS, MLP_KINDS, TargetError, find_targets
from test_architectures import _model

SMALL = dict(vocab_size=64, num_attention_heads=4)


def _extra(arch):
    """Families test_architectures does not build: T5 (plain and gated), OPT, GPT-J, DistilBERT."""
    torch.manual_seed(0)
    if arch.startswith("t5"):
        cfg = T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
                         decoder_start_token_id=0, feed_forward_proj="gated-gelu" if arch == "t5-gated" else "relu")
        return T.T5ForConditionalGeneration(cfg).eval()
    if arch == "opt":
        return T.OPTForCausalLM(T.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=48, word_embed_proj_dim=32,
                                            dropout=0.0, pad_token_id=1, **SMALL)).eval()
    if arch == "gptj":
        return T.GPTJForCausalLM(T.GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    return T.DistilBertForSequenceClassification(T.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4,
                                                                    hidden_dim=48, dropout=0.0)).eval()


TINY = {"llama": None, "bert": 2, "roberta": 2, "gpt2": None, "neox": None, "phi3": None}
EXTRA = ("t5", "t5-gated", "opt", "gptj", "distilbert")
ARCHS = [*TINY, "deberta-v2", "modernbert", "mpt", "falcon-grouped", "bloom", "bigcode", "phi", "gemma", "gemma2",
         "qwen2", "mistral", *EXTRA]
GATED = {"llama", "phi3", "modernbert", "gemma", "gemma2", "qwen2", "mistral", "t5-gated"}


def _build(arch):
    if arch in TINY:
        return tiny(arch, TINY[arch])
    return _extra(arch) if arch in EXTRA else _model(arch)


def _ids():
    return torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def _forward(model, ids):
    if model.config.is_encoder_decoder:
        return model(input_ids=ids, decoder_input_ids=ids)
    return model(input_ids=ids)


def _first_mlp(model):
    """The first block's MLP targets by kind (T5: its first encoder block)."""
    targets = find_targets(model, "mlp")
    return {t.kind: t for t in targets if _block(t.module) == _block(targets[0].module)}


def _activation(model, up):
    """The activation the model's own MLP applies (its module's public attribute; OPT keeps it on the layer)."""
    parent = model.get_submodule(up.module.rsplit(".", 1)[0])
    for name in ("act_fn", "activation_fn", "act", "intermediate_act_fn", "gelu_impl", "activation"):
        if callable(getattr(parent, name, None)):
            return getattr(parent, name)
    raise AssertionError(f"no activation found on {type(parent).__name__}")


def _block(name):
    """The module path up to its layer index: ``encoder.block.0.layer.1.DenseReluDense.wi`` → ``encoder.block.0``."""
    parts = name.split(".")
    return ".".join(parts[:next(i for i, p in enumerate(parts) if p.isdigit()) + 1])


def _capture(model, modules, ids):
    """Each module's (input, output) in one forward pass of the model."""
    seen = {}

    def keep(name):
        def hook(module, inputs, output):  # the first call: T5's decoder reuses nothing, but be explicit
            seen.setdefault(name, (inputs[0].detach().clone(), output.detach().clone()))
        return hook

    handles = [model.get_submodule(m).register_forward_hook(keep(m)) for m in modules]
    try:
        with torch.no_grad():
            _forward(model, ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_slices_are_what_the_models_own_mlp_computes(arch):
    """What down receives in the model's forward is act(gate)·up (gated MLPs) or act(up), each cut from its
    projection's real output by the slice's rows; every layer has each kind once, disjoint from attention."""
    model = _build(arch)
    by_layer = {}
    for t in find_targets(model, "mlp"):
        by_layer.setdefault(_block(t.module), []).append(t.kind)
    kinds = ["gate", "up", "down"] if arch in GATED else ["up", "down"]
    assert len(by_layer) >= 2 and all(sorted(k) == sorted(kinds) for k in by_layer.values()), by_layer
    attention = {(t.module, t.kind) for t in find_targets(model, list(ATTENTION_KINDS))}
    assert not {t.module for t in find_targets(model, "mlp")} & {m for m, _ in attention}
    mlp = _first_mlp(model)
    seen = _capture(model, {t.module for t in mlp.values()}, _ids())
    act = _activation(model, mlp["up"])
    up = mlp["up"].outputs(seen[mlp["up"].module][1])
    want = act(mlp["gate"].outputs(seen[mlp["gate"].module][1])) * up if "gate" in mlp else act(up)
    received = seen[mlp["down"].module][0]
    assert received.shape == want.shape and torch.equal(received, want), arch  # the model's own ops on the same tensors


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_on_up_moves_only_up_and_peft_loads_it(arch, tmp_path):
    base = _build(arch)
    model = copy.deepcopy(base)
    ids = _ids()
    up = _first_mlp(model)["up"]
    # the first block's attention slices and its MLP's gate and up: computed before up's output is used
    first = [t for t in find_targets(model, list(ATTENTION_KINDS) + ["mlp"]) if _block(t.module) == _block(up.module)
             and t.kind != "down"]
    before = _capture(model, {t.module for t in first}, ids)
    attach.add_adapter(model, find_targets(model, ["up"]), "lora", rank=2, alpha=4)
    randomize_deltas(model, scale=0.3)
    after = _capture(model, {t.module for t in first}, ids)
    assert {t.kind for t in first} >= {"q", "up"}
    for t in first:
        moved = not torch.equal(t.outputs(after[t.module][1]), t.outputs(before[t.module][1]))
        assert moved == (t == up), (arch, t.name)
    for wrapper, d in attach.iter_deltas(model):  # on any input, a wrapper changes the up rows and no others
        x = torch.randn(3, d.target.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y, y0 = wrapper(x), wrapper.base(x)
        rest = torch.ones(y.shape[-1], dtype=torch.bool)
        rest[d.target.rows.index()] = False
        assert torch.equal(y[:, rest], y0[:, rest]) and not torch.equal(d.target.outputs(y), d.target.outputs(y0))
    io.save_adapter(model, str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        ours, theirs, plain = _forward(model, ids).logits, _forward(loaded, ids).logits, _forward(base, ids).logits
    assert (ours - plain).abs().max() > 1e-3
    assert (theirs - ours).abs().max() <= 1e-5


@pytest.mark.parametrize("arch,method", [("llama", "dora"), ("modernbert", "dora"), ("phi3", "lora"),
                                         ("t5-gated", "lora"), ("gpt2", "lora")])
def test_all_linear_round_trips_through_peft(arch, method, tmp_path):
    """Every linear layer at once (fused attention and MLP slices, Conv1D, the pooler-like leftovers) saves to
    PEFT's layout, which PEFT loads to the same logits, and merging gives them too."""
    base = _build(arch)
    model = copy.deepcopy(base)
    attach.add_adapter(model, find_targets(model, "all-linear"), method, rank=2, alpha=4)
    randomize_deltas(model, scale=0.3)
    ids = _ids()
    io.save_adapter(model, str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        ours = _forward(model, ids).logits
        assert (_forward(loaded, ids).logits - ours).abs().max() <= 1e-5
        assert (_forward(attach.unwrap(model), ids).logits - ours).abs().max() <= 1e-4  # merged: W + ΔW rounded


def _peft_all_linear(base, task_type):
    """The module paths PEFT itself wraps for target_modules="all-linear"."""
    cfg = peft.LoraConfig(r=2, target_modules="all-linear", task_type=task_type)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize("arch,task_type", [("llama", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("gpt2", "CAUSAL_LM"),
                                            ("phi3", "CAUSAL_LM"), ("modernbert", "SEQ_CLS"), ("t5", "SEQ_2_SEQ_LM")])
def test_all_linear_is_what_peft_wraps(arch, task_type):
    base = _build(arch)
    ours = find_targets(base, "all-linear")
    assert {t.module for t in ours} == _peft_all_linear(base, task_type)
    assert {t.kind for t in ours} >= {"q", "k", "v", "o", "up", "down"}
    if arch == "bert":  # the pooler is a linear layer outside the blocks: PEFT's all-linear takes it, whole
        assert [t.kind for t in ours if t.module == "bert.pooler.dense"] == ["dense"]
    # on a model with an adapter attached (wrappers, head copies) all-linear still names the same slices
    attach.add_adapter(base, find_targets(base, ["q", "up"]), "lora", rank=2)
    assert [(t.module, t.kind) for t in find_targets(base, "all-linear")] == [(t.module, t.kind) for t in ours]


@pytest.mark.parametrize("arch", ["llama", "phi3", "bert"])
def test_peft_all_linear_adapter_loads_with_same_logits(arch, tmp_path):
    base = _build(arch)
    seq = TINY[arch] is not None
    cfg = peft.LoraConfig(r=2, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                          task_type="SEQ_CLS" if seq else "CAUSAL_LM")
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(str(tmp_path))
    model = copy.deepcopy(base)
    meta = io.load_adapter(model, str(tmp_path))
    ids = _ids()
    with torch.no_grad():
        assert (model(ids).logits - pm(ids).logits).abs().max() <= 1e-5
    kinds = {t.kind for t in attach.adapter_info(model).targets}
    assert meta["method"] == "lora" and kinds >= set(MLP_KINDS if arch != "bert" else ("up", "down"))


def test_unknown_and_missing_kinds_are_one_line_errors(tmp_path, tiny_bert_dir):
    for values, match in [({"targets": ["q", "upp"]}, r"targets: \['upp'\] are not matrix kinds"),
                          ({"targets": ["all-linear", "q"]}, "targets: all-linear names every linear layer itself"),
                          ({"smt_targets": ["v", "mlp_up"]}, r"smt_targets: \['mlp_up'\]"),
                          ({"lr_mlp_ratio": 0}, "lr_mlp_ratio: must be > 0"),
                          ({"target_modules": "all-linear", "targets": ["q"]}, "target_modules and targets: both")]:
        with pytest.raises(ConfigError, match=match):
            build_config(values)
    assert build_config({"target_modules": "all-linear"}).targets == ["all-linear"]  # PEFT's spelling
    with pytest.raises(TargetError, match=r"targets: \['gate'\] not found in BertForSequenceClassification"):
        find_targets(tiny("bert", 2), ["up", "gate"])
    out = tmp_path / "run"
    r = run_cli("train", f"model={tiny_bert_dir}", "targets=[v,gate]", "max_train_samples=8", f"output_dir={out}")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].endswith(
        "targets: ['gate'] not found in BertForSequenceClassification; it has ['down', 'k', 'o', 'q', 'up', 'v']")
    assert not os.path.exists(out)


def test_qkvtune_train_tunes_mlp_kinds_at_their_rate(tmp_path, tiny_llama_dir):
    """`qkvtune train targets=[q,up,down] lr_mlp_ratio=3`: the recorded groups give up and down 3·lr, and merging
    the trained adapter changes the q, up and down slices of the base weights and nothing else."""
    from qkvtune.runs import open_run
    from qkvtune.train import train

    train(build_config(dict(model=tiny_llama_dir, task="builtin/pydoc", targets="q,up,down", lr=1e-2, lr_mlp_ratio=3,
                            max_train_samples=16, max_eval_samples=4, max_length=32, batch_size=4, max_steps=2,
                            eval_strategy="no", output_dir=str(tmp_path / "run"))))
    run = open_run(str(tmp_path / "run"), with_task=False)
    rates = io.read_json(str(tmp_path / "run" / io.QKV_CONFIG))["settings"]["learning_rates"]
    assert rates == pytest.approx({"q.A": 1e-2, "q.B": 1e-2, "up.A": 3e-2, "up.B": 3e-2, "down.A": 3e-2,
                                   "down.B": 3e-2})
    slices = find_targets(run.model, "all-linear")
    before = {t.name: t.weight(run.model).clone() for t in slices}
    attach.merge_adapter(run.model)
    assert {t.kind for t in slices if not torch.equal(before[t.name], t.weight(run.model))} == {"q", "up", "down"}
