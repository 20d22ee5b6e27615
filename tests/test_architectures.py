"""q/k/v/o in more architectures: DeBERTa-v2, ModernBERT, MPT, Falcon (three fused layouts), Bloom, GPT-BigCode
(multi-query and per head), Phi-2, and Gemma/Gemma2/Qwen2/Mistral. Each fused layout is checked against the
model's own split of the fused output; a LoRA on q and v moves only the q and v rows; PEFT loads the saved
adapter to the same logits; a fused projection that does not fit its config is refused, not guessed."""

import peft
import pytest
import torch
import transformers as T

from qkvtune import attach, io
from own_attention import own_qkv
from qkvtune.targets import Rows, TargetError, find_targets

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)


def _config(arch):
    if arch == "deberta-v2":
        return T.DebertaV2Config(**SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16,
                                 type_vocab_size=0, pad_token_id=0), "seq"
    if arch == "modernbert":
        return T.ModernBertConfig(**SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                  sep_token_id=2, global_attn_every_n_layers=1), "seq"
    if arch == "mpt":
        return T.MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=64, expansion_ratio=2, pad_token_id=0), "lm"
    if arch.startswith("falcon"):
        layout = {"falcon-grouped": dict(new_decoder_architecture=True, num_kv_heads=2),
                  "falcon-per-head": dict(new_decoder_architecture=False, multi_query=False),
                  "falcon-multi-query": dict(new_decoder_architecture=False, multi_query=True)}[arch]
        return T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              hidden_dropout=0.0, attention_dropout=0.0, alibi=False, pad_token_id=0, **layout), "lm"
    if arch.startswith("bigcode"):  # attn.c_attn is a Linear, laid out unlike GPT-2's Conv1D thirds
        return T.GPTBigCodeConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, multi_query=arch == "bigcode-mq",
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager"), "lm"
    if arch == "bloom":
        return T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0), "lm"
    if arch == "phi":
        return T.PhiConfig(**SMALL, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0), "lm"
    cls = {"gemma": T.GemmaConfig, "gemma2": T.Gemma2Config, "qwen2": T.Qwen2Config, "mistral": T.MistralConfig}[arch]
    return cls(**SMALL, num_key_value_heads=2, head_dim=8, pad_token_id=0), "lm"


def _model(arch, seed=0):
    cfg, kind = _config(arch)
    torch.manual_seed(seed)
    if kind == "seq":
        cfg.num_labels = 2
        return T.AutoModelForSequenceClassification.from_config(cfg).eval()
    return T.AutoModelForCausalLM.from_config(cfg).eval()


ARCHS = ["deberta-v2", "modernbert", "mpt", "falcon-grouped", "falcon-per-head", "falcon-multi-query", "bloom",
         "bigcode-mq", "bigcode", "phi", "gemma", "gemma2", "qwen2", "mistral"]


# how each fused architecture's attention gets its q, k, v (own_attention.py): through transformers'
# AttentionInterface, or as operands of its hand-written eager attention's products
ROUTE = {"modernbert": "interface", "falcon-grouped": "interface", "falcon-per-head": "interface",
         "falcon-multi-query": "interface", "bigcode-mq": "interface", "bigcode": "interface",
         "mpt": "products", "bloom": "products"}


@pytest.mark.parametrize("arch", ARCHS)
def test_slices_match_the_models_own_split(arch):
    """Each fused slice, cut from the fused projection's real output, is exactly the q, k or v that the model's
    own attention receives in the same forward pass (per head, kv heads before any broadcasting)."""
    model = _model(arch)
    targets = find_targets(model, ["q", "k", "v", "o"])
    layers = {t.layer for t in targets}
    assert len(layers) == 2 and all(sum(t.layer == la and t.kind == k for t in targets) == 1
                                    for la in layers for k in "qkvo")
    fused = [t for t in targets if not t.rows.covers(t.out_features)]
    if arch in ("deberta-v2", "phi", "gemma", "gemma2", "qwen2", "mistral"):
        assert not fused  # separate projections
        o = [t.module for t in targets if t.kind == "o"]
        assert all(m.endswith(("attention.output.dense", "self_attn.dense", "self_attn.o_proj")) for m in o), o
        return
    layer0 = [t for t in fused if t.module == fused[0].module]
    assert [t.kind for t in layer0] == ["q", "k", "v"]
    attention = model.get_submodule(fused[0].module.rsplit(".", 1)[0])
    ys = []
    hook = model.get_submodule(fused[0].module).register_forward_hook(lambda m, i, o: ys.append(o))
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    try:
        received = own_qkv(model, attention, ids, ROUTE[arch])
    finally:
        hook.remove()
    for t, want in zip(layer0, received):  # want: (batch, heads, seq, head_dim)
        mine = t.outputs(ys[0]).unflatten(-1, (-1, want.shape[-1])).transpose(1, 2)
        assert mine.shape == want.shape and torch.equal(mine, want), (arch, t.kind)  # same values, indexed: bit-exact


@pytest.mark.parametrize("arch", ["modernbert", "mpt", "falcon-grouped", "falcon-multi-query", "bloom", "bigcode-mq",
                                  "phi", "deberta-v2"])
def test_lora_on_q_and_v_moves_only_their_rows_and_round_trips_through_peft(arch, tmp_path):
    model = _model(arch)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    kv = find_targets(model, ["q", "k", "v"])
    outs = {}

    def hook(name):
        def fn(mod, inp, out):
            outs[name] = out.detach().clone()
        return fn

    modules = sorted({t.module for t in kv})
    handles = [model.get_submodule(m).register_forward_hook(hook(m)) for m in modules]
    with torch.no_grad():
        model(input_ids=ids)
    before = dict(outs)
    for h in handles:
        h.remove()
    attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", rank=2, alpha=4)
    with torch.no_grad():
        for _, d in attach.iter_deltas(model):
            d.factors()[1].normal_(0, 0.5)
    handles = [model.get_submodule(m).register_forward_hook(hook(m)) for m in modules]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    q0 = min((t for t in kv if t.kind == "q"), key=lambda t: t.layer)
    assert not torch.equal(q0.outputs(outs[q0.module]), q0.outputs(before[q0.module]))  # q of layer 0 moved
    for t in kv:
        if t.kind == "k" and t.layer == min(x.layer for x in kv):  # k of the first layer sees the same input
            # bit-exact: the same weights on the same input, computed the same way
            assert torch.equal(t.outputs(outs[t.module]), t.outputs(before[t.module])), (arch, t.name)
    io.save_adapter(model, str(tmp_path))
    base = _model(arch)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-4)


def test_fused_projections_that_do_not_fit_the_config_are_refused():
    single = T.AutoModelForCausalLM.from_config(T.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, new_decoder_architecture=True,
        num_kv_heads=1, pad_token_id=0))
    rows = {t.kind: t.rows for t in find_targets(single, ["q", "k", "v"])}
    assert rows == {"q": Rows.range(0, 32), "k": Rows.range(32, 40), "v": Rows.range(40, 48)}  # one group: ranges
    for arch, key, value, module in [("falcon-grouped", "num_kv_heads", 3, "self_attention.query_key_value"),
                                     ("falcon-grouped", "num_kv_heads", 0, "self_attention.query_key_value"),
                                     ("falcon-multi-query", "num_attention_heads", 2, "self_attention.query_key_value"),
                                     ("falcon-per-head", "hidden_size", 40, "self_attention.query_key_value"),
                                     ("bigcode-mq", "n_head", 2, "attn.c_attn"),
                                     ("mpt", "d_model", 40, "attn.Wqkv")]:  # e.g. a grouped-query remote-code MPT
        model = _model(arch)
        setattr(model.config, key, value)
        with pytest.raises(TargetError, match=rf"{module.replace('.', '[.]')}: .*target_modules"):
            find_targets(model, ["q"])


@pytest.mark.parametrize("arch", ["falcon-grouped", "modernbert"])
def test_qkvtune_train_moves_only_q_and_v(arch, tmp_path):
    """A saved tiny model of the architecture through `qkvtune train targets=q,v`: merging the trained
    adapter changes the q and v slices of the base weights and nothing else."""
    from conftest import minilm_folder
    from qkvtune.config import build_config
    from qkvtune.runs import open_run
    from qkvtune.train import train

    tok = T.AutoTokenizer.from_pretrained(minilm_folder())
    tok.eos_token = tok.sep_token
    cfg, kind = _config(arch)
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    (T.AutoModelForSequenceClassification if kind == "seq" else T.AutoModelForCausalLM).from_config(cfg) \
        .save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    train(build_config(dict(model=str(tmp_path / "base"), task="builtin/vader" if kind == "seq" else "builtin/pydoc",
                            targets="q,v", max_train_samples=16, max_eval_samples=4, max_length=32, batch_size=4,
                            max_steps=2, eval_strategy="no", lr=1e-2, output_dir=str(tmp_path / "run"))))
    run = open_run(str(tmp_path / "run"), with_task=False)
    slices = find_targets(run.model, ["q", "k", "v", "o"])
    before = {t.name: t.weight(run.model).clone() for t in slices}
    attach.merge_adapter(run.model)
    moved = {t.kind for t in slices if not torch.equal(before[t.name], t.weight(run.model))}
    assert moved == {"q", "v"}
