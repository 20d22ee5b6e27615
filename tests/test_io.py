"""Adapters on disk: PEFT itself loads what qkvtune writes (same logits), qkvtune loads what PEFT writes,
the qkvtune format round-trips every method exactly, and bad files are refused with one clear line."""

import copy
import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import randomize_deltas, tiny
from qkvtune import attach, files, io
from qkvtune.targets import find_targets


CASES = [("bert", 2, ["q", "v"], "lora"), ("bert", 2, ["q", "k", "v", "o"], "dora"), ("llama", 2, ["q", "v"], "lora"),
         ("gpt2", None, ["q", "v"], "lora"), ("neox", None, ["v"], "lora"), ("phi3", None, ["q", "k"], "dora"),
         ("llama", None, ["q", "v"], "lora")]


@pytest.mark.parametrize("arch,labels,kinds,method", CASES)
def test_peft_loads_our_adapter_with_same_logits(arch, labels, kinds, method, ids, tmp_path):
    base = tiny(arch, labels)
    model = copy.deepcopy(base)
    attach.add_adapter(model, find_targets(model, kinds, layers="last:1" if arch == "llama" else None), method,
                       rank=4, alpha=8, rslora=arch == "neox")
    randomize_deltas(model, heads=True)
    io.save_adapter(model, str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == (method == "dora")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        y = model(ids).logits
        assert (pm(ids).logits - y).abs().max() <= 1e-4
        assert (base(ids).logits - y).abs().max() > 1e-3
        merged = attach.unwrap(model)
        assert (merged(ids).logits - y).abs().max() <= 1e-4


@pytest.mark.parametrize("arch,labels,dora", [("bert", 2, False), ("gpt2", None, False), ("llama", 2, True),
                                              ("neox", None, False)])
def test_we_load_peft_adapter_with_same_logits(arch, labels, dora, ids, tmp_path):
    base = tiny(arch, labels)
    targets = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"],
               "neox": ["query_key_value"]}[arch]
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False, use_dora=dora,
                          fan_in_fan_out=arch == "gpt2", task_type="SEQ_CLS" if labels else "CAUSAL_LM")
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    if labels:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save" in n:
                    p.add_(0.3)
    pm.save_pretrained(str(tmp_path))
    model = copy.deepcopy(base)
    io.load_adapter(model, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pm(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora", "dense"])
def test_qkvtune_format_round_trip(method, ids, tmp_path):
    base = tiny("gpt2")
    model = copy.deepcopy(base)
    attach.add_adapter(model, find_targets(model, ["q", "v"]), method, rank=2, alpha=4)
    randomize_deltas(model, heads=True)
    io.save_adapter(model, str(tmp_path), extra={"lr": 1e-3})
    again = copy.deepcopy(base)
    meta = io.load_adapter(again, str(tmp_path))
    assert meta["settings"] == {"lr": 1e-3} and meta["method"] == method
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)  # reloaded: the same path
    assert os.path.exists(tmp_path / "adapter_config.json") == (method != "dense")


def _saved(tmp_path, arch="bert"):
    base = tiny(arch, 2)
    model = copy.deepcopy(base)
    attach.add_adapter(model, find_targets(model, ["q", "v"]), "dense")
    io.save_adapter(model, str(tmp_path))
    return base


def test_corrupted_tensors_refused(tmp_path):
    base = _saved(tmp_path)
    f = tmp_path / io.QKV_WEIGHTS
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(io.AdapterError, match="checksum"):
        io.load_adapter(base, str(tmp_path))
    assert attach.adapter_names(base) == []


def test_truncated_and_mismatched_refused(tmp_path):
    base = _saved(tmp_path)
    meta = json.load(open(tmp_path / io.QKV_CONFIG))
    # a tensor of the wrong shape, with a checksum that matches the (replaced) file
    tensors = load_file(tmp_path / io.QKV_WEIGHTS)
    key = next(k for k in tensors if k.startswith("deltas."))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / io.QKV_WEIGHTS)
    meta["tensors_sha256"] = files.sha256_file(tmp_path / io.QKV_WEIGHTS)
    json.dump(meta, open(tmp_path / io.QKV_CONFIG, "w"))
    with pytest.raises(io.AdapterError, match="shape"):
        io.load_adapter(base, str(tmp_path))
    assert attach.adapter_names(base) == []
    (tmp_path / io.QKV_WEIGHTS).write_bytes(b"\x10\x00")
    meta["tensors_sha256"] = files.sha256_file(tmp_path / io.QKV_WEIGHTS)
    json.dump(meta, open(tmp_path / io.QKV_CONFIG, "w"))
    with pytest.raises(io.AdapterError, match="safetensors"):
        io.load_adapter(base, str(tmp_path))


def test_wrong_base_model_refused(tmp_path):
    _saved(tmp_path)
    other = tiny("bert", 2, seed=5)
    with pytest.raises(io.AdapterError, match="different base weights"):
        io.load_adapter(other, str(tmp_path))
    io.load_adapter(other, str(tmp_path), check_base=False)


def test_pickle_only_folder_refused(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(io.AdapterError, match="safetensors only"):
        io.load_adapter(tiny("bert", 2), str(tmp_path))


def test_written_files_get_the_umask_permissions_not_the_temporary_files(tmp_path):
    # atomic writes go through a mkstemp file (0600); the renamed result must be what open() would have made
    mask = os.umask(0o022)
    try:
        files.write_json(str(tmp_path / "a.json"), {"x": float("nan")})
        files.save_tensors(str(tmp_path / "w.safetensors"), {"w": torch.zeros(2)})
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(mask)
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in ("a.json", "w.safetensors", "plain")}
    assert modes == {"a.json": 0o644, "w.safetensors": 0o644, "plain": 0o644}
    assert json.load(open(tmp_path / "a.json")) == {"x": None}
