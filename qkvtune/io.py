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
import math
import os
import re
import tempfile
from collections import defaultdict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import attach
from .deltas import delta_class, peft_class
from .errors import QkvtuneError, first_line
from .quant import is_quantized
from .sharding import copy_into
from .targets import (Rows, Target, all_projections, is_projection, mlp_projections, projection_shape,
                      unwrapped)

QKV_WEIGHTS = "qkvtune_adapter.safetensors"
QKV_CONFIG = "qkvtune_adapter.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


class AdapterError(QkvtuneError):
    """An adapter file that does not fit the model (or is not a valid adapter)."""


# --- small file helpers ------------------------------------------------------------------------------

def atomic_write(path: str, write) -> None:
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


def save_config(cfg, path: str) -> None:
    """A run's resolved config as YAML (``config.yaml``), atomically."""
    import yaml

    def write(tmp):
        with open(tmp, "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    atomic_write(path, write)


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, write)


def _save_tensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    # copies: safetensors reads through numpy, which pins a storage (FSDP must free gathered parameters after)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def require_file(path: str, error: type[Exception] = AdapterError) -> None:
    """``error`` naming ``path`` unless it is an existing regular file."""
    if not os.path.exists(path):
        raise error(f"{path}: file not found")
    if not os.path.isfile(path):
        raise error(f"{path}: is not a file")


def read_json(path: str, error: type[Exception] = AdapterError, expect: type | tuple = dict):
    """JSON from ``path``, or ``error`` with a one-line message naming the file."""
    require_file(path, error)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(obj, expect):
        raise error(f"{path}: expected a JSON {'object' if expect is dict else 'object or list'}")
    return obj


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    require_file(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None


def base_fingerprint(model: torch.nn.Module, targets: list[Target]) -> str | None:
    """A cheap identity of the base weights an adapter was trained on: shapes and a corner of each
    targeted weight (taken from the frozen base, unaffected by merged deltas only when unmerged). None for a
    quantized base: it only approximates the weights, and its adapter is meant for the full ones too."""
    h = hashlib.sha256()
    for module in sorted({t.module for t in targets}):
        m = model.get_submodule(module)
        if is_quantized(unwrapped(m)):
            return None
        w = unwrapped(m).weight
        if isinstance(m, attach.DeltaProjection) and m.merged:
            raise AdapterError(f"{module}: unmerge adapters before fingerprinting the base")
        h.update(module.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.detach()[:4, :4].to("cpu", torch.float32, copy=True).numpy().tobytes())
    return h.hexdigest()[:16]


# --- qkvtune format -------------------------------------------------------------------------------

def adapter_state(model, name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under stable names: ``deltas.<module>.<kind>.<param>``, ``heads.<module>.<param>``."""
    state = {}
    for wrapper, delta in attach.iter_deltas(model, name):
        for pname, p in [*delta.named_parameters(), *delta.named_buffers()]:  # buffers: e.g. block indices
            state[f"deltas.{delta.target.module}.{delta.kind}.{pname}"] = p
    for module, head in attach.head_modules(model, name).items():
        for pname, p in _tensors(head):
            state[f"heads.{module}.{pname}"] = p
    return state


def _tensors(module: torch.nn.Module):
    """A module's parameters and buffers as they are now (its state_dict(), but FSDP2's hook there would hand
    back the shards while the adapter is being saved from gathered parameters)."""
    return [*module.named_parameters(), *module.named_buffers()]


def save_adapter(model, path: str, name: str | None = None, extra: dict | None = None, peft: bool = True) -> None:
    """Write adapter ``name`` (default: the active one) to folder ``path``."""
    name = attach.resolve_name(model, name)
    info = attach.adapter_info(model, name)
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
    if peft and delta_class(info.method).peft_type is not None:
        save_peft(model, path, name)


def load_adapter(model, path: str, name: str = "default", activate: bool = True, check_base: bool = True) -> dict:
    """Attach the adapter saved in ``path`` (qkvtune format, else PEFT's) as ``name``; return its metadata."""
    if not os.path.isdir(path):
        raise AdapterError(f"{path}: adapter folder not found")
    if not os.path.lexists(os.path.join(path, QKV_CONFIG)):
        if os.path.lexists(os.path.join(path, PEFT_CONFIG)):
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
    require_file(weights)
    if sha256_file(weights) != meta["tensors_sha256"]:
        raise AdapterError(f"{weights}: checksum does not match {QKV_CONFIG} (corrupted or replaced file)")
    info = _adapter_info(meta, cfg_path)
    _check_targets(model, info.targets, cfg_path)
    for h in info.heads:
        try:
            model.get_submodule(h)
        except AttributeError:
            raise AdapterError(f"{cfg_path}: heads: the model has no module {h!r}") from None
    current = base_fingerprint(model, info.targets) if check_base and meta.get("base_fingerprint") else None
    if current and current != meta["base_fingerprint"]:
        raise AdapterError(f"{cfg_path}: trained on different base weights ({meta.get('base_model')}); "
                           "pass check_base=False to load anyway")
    tensors = read_tensors(weights)
    try:
        attach.add_adapter(model, info.targets, info.method, name, heads=info.heads, activate=activate, **info.hparams)
    except (ValueError, TypeError) as e:  # hyperparameters the method refuses (an edited rank, blocks …)
        if name in attach.adapter_names(model):
            attach.delete_adapter(model, name)
        raise AdapterError(f"{cfg_path}: hparams do not build a {info.method} adapter ({e})") from None
    try:
        _load_state(model, name, tensors, weights)
    except AdapterError:
        attach.delete_adapter(model, name)
        raise
    return meta


def _is_int(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _adapter_info(meta: dict, where: str) -> "attach.AdapterInfo":
    """The adapter's method, hyperparameters, slices and heads from its JSON, each field checked."""
    method = meta["method"]
    try:
        delta_class(method if isinstance(method, str) else repr(method))
    except ValueError as e:
        raise AdapterError(f"{where}: {e}") from None
    if not isinstance(meta["hparams"], dict) or not all(isinstance(k, str) for k in meta["hparams"]):
        raise AdapterError(f"{where}: field 'hparams' must be an object")
    if not isinstance(meta["heads"], list) or not all(isinstance(h, str) and h for h in meta["heads"]):
        raise AdapterError(f"{where}: field 'heads' must be a list of module names")
    if not isinstance(meta["targets"], list) or not meta["targets"]:
        raise AdapterError(f"{where}: field 'targets' must be a non-empty list")
    if meta.get("settings") is not None and not isinstance(meta["settings"], dict):
        raise AdapterError(f"{where}: field 'settings' must be an object")
    targets = []
    for i, t in enumerate(meta["targets"]):
        at = f"{where}: targets[{i}]"
        r = t.get("rows") if isinstance(t, dict) else None
        if not isinstance(t, dict) or not isinstance(r, dict):
            raise AdapterError(f"{at}: expected an object with 'rows'")
        if not (isinstance(t.get("module"), str) and t["module"] and isinstance(t.get("kind"), str) and t["kind"]):
            raise AdapterError(f"{at}: 'module' and 'kind' must be non-empty strings")
        if not (t.get("layer") is None or _is_int(t["layer"])) or not isinstance(t.get("transposed"), bool):
            raise AdapterError(f"{at}: 'layer' must be an integer or null and 'transposed' true or false")
        if not (_is_int(t.get("in_features"), 1) and _is_int(t.get("out_features"), 1)):
            raise AdapterError(f"{at}: 'in_features' and 'out_features' must be positive integers")
        if not (_is_int(r.get("start")) and _is_int(r.get("width"), 1) and _is_int(r.get("stride"), 1)
                and _is_int(r.get("count", 1), 1) and (r.get("count", 1) == 1 or r["stride"] >= r["width"])):
            raise AdapterError(f"{at}: 'rows' must have start >= 0, width >= 1, count >= 1 and stride >= width")
        try:
            targets.append(Target.from_dict(t))
        except TypeError as e:
            raise AdapterError(f"{at}: {e}") from None
    return attach.AdapterInfo(method, dict(meta["hparams"]), targets, list(meta["heads"]))


def _check_targets(model, targets: list[Target], where: str) -> None:
    for t in targets:
        try:
            m = model.get_submodule(t.module)
        except AttributeError:
            raise AdapterError(f"{where}: model has no module {t.module!r}") from None
        if not is_projection(m):
            raise AdapterError(f"{where}: {t.module!r} is not a projection")
        fin, fout, transposed = projection_shape(m)
        if (fout, fin, transposed) != (t.out_features, t.in_features, t.transposed):
            raise AdapterError(f"{where}: {t.module} has weight {(fout, fin)}, the adapter expects "
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
            copy_into(p, t)


# --- PEFT layout ---------------------------------------------------------------------------------

def save_peft(model, path: str, name: str | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's layout; each delta class
    converts its own tensors (``Delta.to_peft``)."""
    name = attach.resolve_name(model, name)
    info = attach.adapter_info(model, name)
    by_module: dict[str, list] = defaultdict(list)
    wrappers = {}
    for wrapper, delta in attach.iter_deltas(model, name):
        by_module[delta.target.module].append(delta)
        wrappers[delta.target.module] = wrapper
    cls = delta_class(info.method)
    tensors, ranks, alphas = {}, {}, {}
    for module, deltas in by_module.items():
        module_tensors, settings = cls.to_peft(deltas, wrappers[module].weight_rows())
        for key, t in module_tensors.items():
            tensors[f"base_model.model.{module}.{key}"] = t
        ranks[module], alphas[module] = settings["r"], settings["lora_alpha"]
    for module, head in attach.head_modules(model, name).items():
        for pname, p in _tensors(head):
            tensors[f"base_model.model.{module}.{pname}"] = p
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    first = next(iter(by_module.values()))
    cfg = getattr(model, "config", None)
    config = {
        "peft_type": cls.peft_type,
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else (
            "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else None),
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "r": r, "lora_alpha": alpha, **cls.peft_config(first),
        "bias": "none", "fan_in_fan_out": first[0].target.transposed,
        "target_modules": sorted(by_module), "modules_to_save": info.heads or None,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "init_lora_weights": True, "inference_mode": True,
    }
    _save_tensors(os.path.join(path, PEFT_WEIGHTS), tensors)
    write_json(os.path.join(path, PEFT_CONFIG), config)


def _pattern(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_peft(model, path: str, name: str = "default", activate: bool = True) -> dict:
    """Attach a PEFT LoRA/DoRA adapter. A LoRA on a fused projection becomes one delta per slice
    (B split by rows, A shared), which reproduces ΔW exactly."""
    cfg_path, weights = os.path.join(path, PEFT_CONFIG), os.path.join(path, PEFT_WEIGHTS)
    cfg = read_json(cfg_path)
    try:
        cls = peft_class(cfg)
    except ValueError as e:
        raise AdapterError(f"{cfg_path}: {e}") from None
    if not isinstance(cfg.get("lora_dropout") or 0, (int, float)) or isinstance(cfg.get("lora_dropout"), bool):
        raise AdapterError(f"{cfg_path}: field 'lora_dropout' must be a number")
    for key in ("r", "lora_alpha"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), (int, float)) or not 0 < cfg[key] < math.inf:
            raise AdapterError(f"{cfg_path}: field {key!r} must be a positive number")
    for key in ("alpha_pattern", "rank_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise AdapterError(f"{cfg_path}: field {key!r} must be an object")
    tensors = read_tensors(weights)
    prefix = "base_model.model."
    modules = sorted({k[len(prefix):].rsplit(".lora_A.weight", 1)[0] for k in tensors if k.endswith(".lora_A.weight")})
    if not modules:
        raise AdapterError(f"{weights}: no lora_A tensors")
    known = {}
    for t in all_projections(model) + mlp_projections(model):
        known.setdefault(t.module, []).append(t)
    targets, parts, ranks = [], {}, set()
    for module in modules:
        try:
            m = model.get_submodule(module)
        except AttributeError:
            raise AdapterError(f"{weights}: model has no module {module!r}") from None
        if not is_projection(m):
            raise AdapterError(f"{weights}: {module!r} is not a projection")
        own = {k[len(prefix) + len(module) + 1:]: v for k, v in tensors.items() if k.startswith(f"{prefix}{module}.lora_")}
        A, B = own.get("lora_A.weight"), own.get("lora_B.weight")
        if B is None:
            raise AdapterError(f"{weights}: missing {prefix}{module}.lora_B.weight")
        fin, fout, transposed = projection_shape(m)
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != fin or B.shape[0] != fout or A.shape[0] != B.shape[1]:
            raise AdapterError(f"{weights}: {module} lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit "
                               f"a {fout}×{fin} projection")
        mag = own.get("lora_magnitude_vector")
        if mag is not None and tuple(mag.shape) != (fout,):
            raise AdapterError(f"{weights}: {module} lora_magnitude_vector has shape {tuple(mag.shape)}, expected ({fout},)")
        slices = known.get(module) or [Target(module, module.rsplit(".", 1)[-1], None, Rows.range(0, fout),
                                              fin, fout, transposed)]
        ranks.add(A.shape[0])
        for t in slices:
            try:
                parts[(t.module, t.kind)] = cls.from_peft(own, t)
            except KeyError as e:
                raise AdapterError(f"{weights}: missing {prefix}{module}.{e.args[0]}") from None
            targets.append(t)
    heads = [h for h in (cfg.get("modules_to_save") or []) if isinstance(h, str) and
             any(k.startswith(f"{prefix}{h}.") for k in tensors)]
    if len(ranks) > 1:
        raise AdapterError(f"{cfg_path}: per-module ranks {sorted(ranks)} are not supported yet")
    try:
        alphas = {float(_pattern(cfg.get("alpha_pattern") or {}, t.module, cfg["lora_alpha"])) for t in targets}
    except (TypeError, ValueError, re.error):
        raise AdapterError(f"{cfg_path}: field 'alpha_pattern' must map module patterns to numbers") from None
    if len(alphas) > 1:
        raise AdapterError(f"{cfg_path}: per-module alphas are not supported yet")
    alpha = alphas.pop()
    if not 0 < alpha < math.inf:
        raise AdapterError(f"{cfg_path}: alpha {alpha!r} must be a positive number")
    hparams = cls.hparams_from_peft(cfg, ranks.pop(), alpha)
    if not 0 <= hparams.get("dropout", 0) < 1:
        raise AdapterError(f"{cfg_path}: field 'lora_dropout' must be in [0, 1)")
    attach.add_adapter(model, targets, cls.method, name, heads=heads, activate=activate, **hparams)
    try:
        with torch.no_grad():
            for _, delta in attach.iter_deltas(model, name):
                params = dict(delta.named_parameters())
                for pname, value in parts[(delta.target.module, delta.kind)].items():
                    if value.shape != params[pname].shape:
                        raise AdapterError(f"{weights}: {delta.target.name} {pname} has shape {tuple(value.shape)}, "
                                           f"expected {tuple(params[pname].shape)}")
                    params[pname].copy_(value)
            for module, head in attach.head_modules(model, name).items():
                state = {k[len(prefix) + len(module) + 1:]: v for k, v in tensors.items()
                         if k.startswith(f"{prefix}{module}.")}
                try:
                    head.load_state_dict(state)
                except RuntimeError as e:
                    raise AdapterError(f"{weights}: head {module} does not fit ({first_line(e)})") from None
    except AdapterError:
        attach.delete_adapter(model, name)
        raise
    return {"method": cls.method, "peft": cfg}


def export_merged(model, tokenizer, path: str, label_names: list[str] | None = None) -> None:
    """Merge the active adapter and write an ordinary Hugging Face model folder (safetensors); a classifier's
    ``label_names`` become its config's id2label/label2id."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.dequantize()  # transformers' own: plain Linear layers with the dequantized weights (quant.py)
    attach.unwrap(model, merge=True)
    if label_names and getattr(model, "config", None) is not None:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: i for i, name in enumerate(label_names)}
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def restore_adapter(model, path: str, name: str | None = None) -> None:
    """Load a saved adapter's tensors into the model's existing adapter ``name`` (checkpoints, best model)."""
    cfg_path, weights = os.path.join(path, QKV_CONFIG), os.path.join(path, QKV_WEIGHTS)
    meta = read_json(cfg_path)
    require_file(weights)
    if sha256_file(weights) != meta.get("tensors_sha256"):
        raise AdapterError(f"{weights}: checksum does not match {QKV_CONFIG} (corrupted or replaced file)")
    _load_state(model, attach.resolve_name(model, name), read_tensors(weights), weights)
