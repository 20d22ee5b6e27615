"""Saving and loading adapters.

An adapter folder holds:

* ``qkvtune_adapter.safetensors`` + ``qkvtune_adapter.json``: every method, exactly as trained (deltas per
  slice, head copies), with the slices, hyperparameters, training settings, a fingerprint of the base
  weights and a checksum of the tensors, all checked on load;
* for LoRA and DoRA also ``adapter_model.safetensors`` + ``adapter_config.json`` in PEFT's layout, so
  ``peft.PeftModel.from_pretrained`` (and every tool built on it) loads the adapter. Slices of a fused
  projection become one LoRA of rank Σrᵢ on the whole module whose B is zero outside the slices' rows.

Weights are read only from safetensors. Files are written under a temporary name, fsynced and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import defaultdict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import attach
from .errors import QkvtuneError
from .deltas import lora_scale
from .targets import Rows, Target, all_projections, mlp_projections

QKV_WEIGHTS = "qkvtune_adapter.safetensors"
QKV_CONFIG = "qkvtune_adapter.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


class AdapterError(QkvtuneError):
    """An adapter file that does not fit the model (or is not a valid adapter)."""


# --- small file helpers ------------------------------------------------------------------------------

def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    _atomic_write(path, write)


def _save_tensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str, error: type[Exception] = AdapterError, expect: type | tuple = dict):
    """JSON from ``path``, or ``error`` with a one-line message naming the file."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, expect):
        raise error(f"{path}: expected a JSON {'object' if expect is dict else 'object or list'}")
    return obj


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise AdapterError(f"{path}: file not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None


def base_fingerprint(model: torch.nn.Module, targets: list[Target]) -> str:
    """A cheap identity of the base weights an adapter was trained on: shapes and a corner of each
    targeted weight (taken from the frozen base, unaffected by merged deltas only when unmerged)."""
    h = hashlib.sha256()
    for module in sorted({t.module for t in targets}):
        m = model.get_submodule(module)
        w = m.base.weight if isinstance(m, attach.DeltaProjection) else m.weight
        if isinstance(m, attach.DeltaProjection) and m.merged:
            raise AdapterError(f"{module}: unmerge adapters before fingerprinting the base")
        h.update(module.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.detach()[:4, :4].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --- qkvtune format -------------------------------------------------------------------------------

def adapter_state(model, name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under stable names: ``deltas.<module>.<kind>.<param>``, ``heads.<module>.<param>``."""
    state = {}
    for wrapper, delta in attach.iter_deltas(model, name):
        for pname, p in [*delta.named_parameters(), *delta.named_buffers()]:  # buffers: e.g. block indices
            state[f"deltas.{delta.target.module}.{delta.kind}.{pname}"] = p
    for module, head in attach.head_modules(model, name).items():
        for pname, p in head.state_dict().items():
            state[f"heads.{module}.{pname}"] = p
    return state


def save_adapter(model, path: str, name: str | None = None, extra: dict | None = None, peft: bool = True) -> None:
    """Write adapter ``name`` (default: the active one) to folder ``path``."""
    name = attach._name(model, name)
    info = attach._registry(model)[name]
    os.makedirs(path, exist_ok=True)
    weights = os.path.join(path, QKV_WEIGHTS)
    _save_tensors(weights, adapter_state(model, name))
    cfg = getattr(model, "config", None)
    meta = {
        "format": "qkvtune-adapter", "version": FORMAT_VERSION, "name": name, **info.to_dict(),
        "base_model": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None),
        "architecture": type(model).__name__,
        "base_fingerprint": base_fingerprint(model, info.targets),
        "tensors_sha256": sha256_file(weights),
        "settings": extra or {},
    }
    write_json(os.path.join(path, QKV_CONFIG), meta)
    if peft and info.method in ("lora", "dora"):
        save_peft(model, path, name)


def load_adapter(model, path: str, name: str = "default", activate: bool = True, check_base: bool = True) -> dict:
    """Attach the adapter saved in ``path`` (qkvtune format, else PEFT's) as ``name``; return its metadata."""
    if not os.path.isdir(path):
        raise AdapterError(f"{path}: adapter folder not found")
    if not os.path.exists(os.path.join(path, QKV_CONFIG)):
        if os.path.exists(os.path.join(path, PEFT_CONFIG)):
            return load_peft(model, path, name, activate)
        if any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in os.listdir(path)):
            raise AdapterError(f"{path}: only pickle weights found; qkvtune loads safetensors only")
        raise AdapterError(f"{path}: no {QKV_CONFIG} or {PEFT_CONFIG}")
    cfg_path, weights = os.path.join(path, QKV_CONFIG), os.path.join(path, QKV_WEIGHTS)
    meta = read_json(cfg_path)
    for key in ("format", "method", "hparams", "targets", "heads", "tensors_sha256"):
        if key not in meta:
            raise AdapterError(f"{cfg_path}: missing field {key!r}")
    if meta["format"] != "qkvtune-adapter" or meta.get("version") != FORMAT_VERSION:
        raise AdapterError(f"{cfg_path}: format {meta['format']!r} version {meta.get('version')!r} is not supported")
    if not os.path.exists(weights):
        raise AdapterError(f"{weights}: file not found")
    if sha256_file(weights) != meta["tensors_sha256"]:
        raise AdapterError(f"{weights}: checksum does not match {QKV_CONFIG} (corrupted or replaced file)")
    try:
        info = attach.AdapterInfo.from_dict(meta)
    except (KeyError, TypeError) as e:
        raise AdapterError(f"{cfg_path}: malformed target or head entry ({e})") from None
    _check_targets(model, info.targets, cfg_path)
    if check_base and meta.get("base_fingerprint") and meta["base_fingerprint"] != base_fingerprint(model, info.targets):
        raise AdapterError(f"{cfg_path}: trained on different base weights ({meta.get('base_model')}); "
                           "pass check_base=False to load anyway")
    tensors = _read_tensors(weights)
    attach.add_adapter(model, info.targets, info.method, name, heads=info.heads, activate=activate, **info.hparams)
    try:
        _load_state(model, name, tensors, weights)
    except AdapterError:
        attach.delete_adapter(model, name)
        raise
    return meta


def _check_targets(model, targets: list[Target], where: str) -> None:
    for t in targets:
        try:
            m = model.get_submodule(t.module)
        except AttributeError:
            raise AdapterError(f"{where}: model has no module {t.module!r}") from None
        w = m.base.weight if isinstance(m, attach.DeltaProjection) else getattr(m, "weight", None)
        if w is None:
            raise AdapterError(f"{where}: {t.module!r} is not a projection")
        shape = (w.shape[1], w.shape[0]) if t.transposed else tuple(w.shape)
        if shape != (t.out_features, t.in_features):
            raise AdapterError(f"{where}: {t.module} has weight {tuple(shape)}, the adapter expects "
                               f"{(t.out_features, t.in_features)}")
        if t.rows.stop > t.out_features or t.rows.start < 0:
            raise AdapterError(f"{where}: rows {t.rows} of {t.module}[{t.kind}] exceed {t.out_features} outputs")


def _load_state(model, name: str, tensors: dict, where: str) -> None:
    expected = adapter_state(model, name)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        bad = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
        raise AdapterError(f"{where}: tensors do not match the adapter's slices ({bad}; "
                           f"{len(missing)} missing, {len(unexpected)} unexpected)")
    with torch.no_grad():
        for key, p in expected.items():
            t = tensors[key]
            if t.shape != p.shape:
                raise AdapterError(f"{where}: {key} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            if t.is_floating_point() != p.is_floating_point():
                raise AdapterError(f"{where}: {key} has dtype {t.dtype}, expected {p.dtype}")
            if not p.is_floating_point() and not torch.equal(t.to(p.dtype), p):
                # integer buffers (indices) follow from the adapter's settings; they must agree with them
                raise AdapterError(f"{where}: {key} does not match the indices in {QKV_CONFIG}")
            p.copy_(t.to(p.dtype))


# --- PEFT layout ---------------------------------------------------------------------------------

def _combine_slices(wrapper, deltas: list) -> dict[str, torch.Tensor]:
    """One PEFT LoRA (A, B[, m]) for a module from its slice deltas, with the scale of the first slice."""
    d0 = deltas[0]
    if len(deltas) == 1 and d0.target.rows.covers(d0.target.out_features):
        out = {"lora_A.weight": d0.lora_A, "lora_B.weight": d0.lora_B}
        if d0.method == "dora":
            out["lora_magnitude_vector"] = d0.magnitude
        return out
    out_features = d0.target.out_features
    rank = sum(d.rank for d in deltas)
    scale = lora_scale(rank, _combined_alpha(deltas), d0.rslora)
    A = torch.cat([d.lora_A for d in deltas], 0)
    B = A.new_zeros(out_features, rank)
    col = 0
    for d in deltas:
        idx = d.target.rows.index(B.device)
        B[idx, col:col + d.rank] = d.lora_B * (d.scale / scale)
        col += d.rank
    out = {"lora_A.weight": A, "lora_B.weight": B}
    if d0.method == "dora":
        m = wrapper.weight_rows().detach().to(A.dtype).norm(dim=1)  # untouched rows keep W₀ exactly
        for d in deltas:
            m[d.target.rows.index(m.device)] = d.magnitude
        out["lora_magnitude_vector"] = m
    return out


def _combined_alpha(deltas) -> float:
    """Alpha that gives the combined rank the first slice's scale (so equal-scale slices copy B exactly)."""
    d0 = deltas[0]
    rank = sum(d.rank for d in deltas)
    return d0.scale * (rank ** 0.5 if d0.rslora else rank)


def save_peft(model, path: str, name: str | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's layout."""
    name = attach._name(model, name)
    info = attach._registry(model)[name]
    by_module = defaultdict(list)
    wrappers = {}
    for wrapper, delta in attach.iter_deltas(model, name):
        by_module[delta.target.module].append(delta)
        wrappers[delta.target.module] = wrapper
    tensors, ranks, alphas = {}, {}, {}
    for module, deltas in by_module.items():
        for key, t in _combine_slices(wrappers[module], deltas).items():
            tensors[f"base_model.model.{module}.{key}"] = t
        ranks[module] = sum(d.rank for d in deltas)
        alphas[module] = _combined_alpha(deltas) if len(deltas) > 1 or not deltas[0].target.rows.covers(
            deltas[0].target.out_features) else deltas[0].alpha
    for module, head in attach.head_modules(model, name).items():
        for pname, p in head.state_dict().items():
            tensors[f"base_model.model.{module}.{pname}"] = p
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    d0 = next(iter(by_module.values()))[0]
    cfg = getattr(model, "config", None)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else (
            "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else None),
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "r": r, "lora_alpha": alpha, "use_rslora": d0.rslora, "use_dora": d0.method == "dora",
        "lora_dropout": d0.dropout_p, "bias": "none", "fan_in_fan_out": d0.target.transposed,
        "target_modules": sorted(by_module), "modules_to_save": info.heads or None,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "init_lora_weights": True, "inference_mode": True,
    }
    _save_tensors(os.path.join(path, PEFT_WEIGHTS), tensors)
    write_json(os.path.join(path, PEFT_CONFIG), config)


def _pattern(patterns: dict, module: str, default):
    import re
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_peft(model, path: str, name: str = "default", activate: bool = True) -> dict:
    """Attach a PEFT LoRA/DoRA adapter. A LoRA on a fused projection becomes one delta per slice
    (B split by rows, A shared), which reproduces ΔW exactly."""
    cfg_path, weights = os.path.join(path, PEFT_CONFIG), os.path.join(path, PEFT_WEIGHTS)
    cfg = read_json(cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise AdapterError(f"{cfg_path}: field {key!r} must be a positive number")
    tensors = _read_tensors(weights)
    prefix = "base_model.model."
    modules = sorted({k[len(prefix):].rsplit(".lora_A.weight", 1)[0] for k in tensors if k.endswith(".lora_A.weight")})
    if not modules:
        raise AdapterError(f"{weights}: no lora_A tensors")
    known = {}
    for t in all_projections(model) + mlp_projections(model):
        known.setdefault(t.module, []).append(t)
    targets, parts = [], {}
    for module in modules:
        try:
            m = model.get_submodule(module)
        except AttributeError:
            raise AdapterError(f"{weights}: model has no module {module!r}") from None
        A, B = tensors[f"{prefix}{module}.lora_A.weight"], tensors.get(f"{prefix}{module}.lora_B.weight")
        if B is None:
            raise AdapterError(f"{weights}: missing {prefix}{module}.lora_B.weight")
        mag = tensors.get(f"{prefix}{module}.lora_magnitude_vector")
        base = m.base if isinstance(m, attach.DeltaProjection) else m
        fin, fout, transposed = (base.weight.shape[0], base.weight.shape[1], True) if type(base).__name__ == "Conv1D" \
            else (base.in_features, base.out_features, False)
        if A.shape[1] != fin or B.shape[0] != fout or A.shape[0] != B.shape[1]:
            raise AdapterError(f"{weights}: {module} lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit "
                               f"a {fout}×{fin} projection")
        slices = known.get(module) or [Target(module, module.rsplit(".", 1)[-1], None, Rows.range(0, fout),
                                              fin, fout, transposed)]
        for t in slices:
            idx = t.rows.index()
            targets.append(t)
            parts[(t.module, t.kind)] = (A, B[idx], None if mag is None else mag[idx])
    method = "dora" if cfg.get("use_dora") else "lora"
    heads = [h for h in (cfg.get("modules_to_save") or []) if any(k.startswith(f"{prefix}{h}.") for k in tensors)]
    ranks = {A.shape[0] for A, _, _ in parts.values()}
    if len(ranks) > 1:
        raise AdapterError(f"{cfg_path}: per-module ranks {sorted(ranks)} are not supported yet")
    alphas = {float(_pattern(cfg.get("alpha_pattern") or {}, t.module, cfg["lora_alpha"])) for t in targets}
    if len(alphas) > 1:
        raise AdapterError(f"{cfg_path}: per-module alphas are not supported yet")
    attach.add_adapter(model, targets, method, name, heads=heads, activate=activate, rank=ranks.pop(),
                       alpha=alphas.pop(), rslora=bool(cfg.get("use_rslora")), dropout=float(cfg.get("lora_dropout") or 0))
    with torch.no_grad():
        for _, delta in attach.iter_deltas(model, name):
            A, B, mag = parts[(delta.target.module, delta.kind)]
            delta.lora_A.copy_(A)
            delta.lora_B.copy_(B)
            if mag is not None:
                delta.magnitude.copy_(mag)
        for module, head in attach.head_modules(model, name).items():
            state = {k[len(prefix) + len(module) + 1:]: v for k, v in tensors.items() if k.startswith(f"{prefix}{module}.")}
            try:
                head.load_state_dict(state)
            except RuntimeError as e:
                attach.delete_adapter(model, name)
                raise AdapterError(f"{weights}: head {module} does not fit ({str(e).splitlines()[0]})") from None
    return {"method": method, "peft": cfg}


def export_merged(model, tokenizer, path: str) -> None:
    """Merge the active adapter and write an ordinary Hugging Face model folder (safetensors)."""
    attach.unwrap(model, merge=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def restore_adapter(model, path: str, name: str | None = None) -> None:
    """Load a saved adapter's tensors into the model's existing adapter ``name`` (checkpoints, best model)."""
    cfg_path, weights = os.path.join(path, QKV_CONFIG), os.path.join(path, QKV_WEIGHTS)
    meta = read_json(cfg_path)
    if sha256_file(weights) != meta.get("tensors_sha256"):
        raise AdapterError(f"{weights}: checksum does not match {QKV_CONFIG} (corrupted or replaced file)")
    _load_state(model, attach._name(model, name), _read_tensors(weights), weights)
