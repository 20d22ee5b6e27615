"""Saving and loading adapters: the qkvtune format, and the adapter folder as a whole.

An adapter folder holds:

* ``qkvtune_adapter.safetensors`` + ``qkvtune_adapter.json``: every method, exactly as trained (deltas per
  slice, head copies), with the slices, hyperparameters, training settings, a fingerprint of the base
  weights and a checksum of the tensors, all checked on load;
* for LoRA and DoRA also ``adapter_model.safetensors`` + ``adapter_config.json`` in PEFT's layout, so
  ``peft.PeftModel.from_pretrained`` (and every tool built on it) loads the adapter. Slices of a fused
  projection become one LoRA of rank Σrᵢ on the whole module whose B is zero outside the slices' rows.

Weights are read only from safetensors; files are written atomically (``files.py``). The PEFT layout's
conversion is ``peft_format.py``.
"""

from __future__ import annotations

import hashlib
import os

import torch

from . import attach
from .deltas import delta_class
from .errors import AdapterError
from .files import read_json, read_tensors, require_file, save_tensors, sha256_file, write_json
from .peft_format import PEFT_CONFIG, PEFT_WEIGHTS, load_peft, module_tensors, save_peft  # noqa: F401 (a folder holds both)
from .quant import is_quantized
from .sharding import copy_into
from .targets import Target, is_projection, projection_shape, unwrapped

QKV_WEIGHTS = "qkvtune_adapter.safetensors"
QKV_CONFIG = "qkvtune_adapter.json"
FORMAT_VERSION = 1


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
        for pname, p in module_tensors(head):
            state[f"heads.{module}.{pname}"] = p
    return state


def save_adapter(model, path: str, name: str | None = None, extra: dict | None = None, peft: bool = True) -> None:
    """Write adapter ``name`` (default: the active one) to folder ``path``."""
    name = attach.resolve_name(model, name)
    info = attach.adapter_info(model, name)
    os.makedirs(path, exist_ok=True)
    weights = os.path.join(path, QKV_WEIGHTS)
    save_tensors(weights, adapter_state(model, name))
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
    meta = read_json(cfg_path, AdapterError)
    for key in ("format", "method", "hparams", "targets", "heads", "tensors_sha256"):
        if key not in meta:
            raise AdapterError(f"{cfg_path}: missing field {key!r}")
    if meta["format"] != "qkvtune-adapter" or meta.get("version") != FORMAT_VERSION:
        raise AdapterError(f"{cfg_path}: format {meta['format']!r} version {meta.get('version')!r} is not supported")
    require_file(weights, AdapterError)
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
    tensors = read_tensors(weights, AdapterError)
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
    meta = read_json(cfg_path, AdapterError)
    require_file(weights, AdapterError)
    if sha256_file(weights) != meta.get("tensors_sha256"):
        raise AdapterError(f"{weights}: checksum does not match {QKV_CONFIG} (corrupted or replaced file)")
    _load_state(model, attach.resolve_name(model, name), read_tensors(weights, AdapterError), weights)
