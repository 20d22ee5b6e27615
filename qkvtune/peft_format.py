"""PEFT's adapter layout (``adapter_config.json`` + ``adapter_model.safetensors``): qkvtune's LoRA/DoRA deltas
written so ``peft.PeftModel.from_pretrained`` loads them, and PEFT LoRA/DoRA adapters read into qkvtune's deltas.

Each delta class converts its own tensors (``Delta.to_peft`` / ``from_peft``). Slices of a fused projection
become one LoRA of rank Σrᵢ on the whole module whose B is zero outside the slices' rows; a PEFT LoRA on a
fused projection becomes one delta per slice (B split by rows, A shared), which reproduces ΔW exactly.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict

import torch

from . import attach
from .deltas import delta_class, peft_class
from .errors import AdapterError, first_line
from .files import read_json, read_tensors, save_tensors, write_json
from .targets import Rows, Target, all_projections, is_projection, mlp_projections, projection_shape
from .task import is_causal_lm, is_sequence_classifier

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def module_tensors(module: torch.nn.Module):
    """A module's parameters and buffers as they are now (its state_dict(), but FSDP2's hook there would hand
    back the shards while the adapter is being saved from gathered parameters)."""
    return [*module.named_parameters(), *module.named_buffers()]


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
        converted, settings = cls.to_peft(deltas, wrappers[module].weight_rows())
        for key, t in converted.items():
            tensors[f"base_model.model.{module}.{key}"] = t
        ranks[module], alphas[module] = settings["r"], settings["lora_alpha"]
    for module, head in attach.head_modules(model, name).items():
        for pname, p in module_tensors(head):
            tensors[f"base_model.model.{module}.{pname}"] = p
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    first = next(iter(by_module.values()))
    cfg = getattr(model, "config", None)
    config = {
        "peft_type": cls.peft_type,
        "task_type": "CAUSAL_LM" if is_causal_lm(model) else ("SEQ_CLS" if is_sequence_classifier(model) else None),
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "r": r, "lora_alpha": alpha, **cls.peft_config(first),
        "bias": "none", "fan_in_fan_out": first[0].target.transposed,
        "target_modules": sorted(by_module), "modules_to_save": info.heads or None,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "init_lora_weights": True, "inference_mode": True,
    }
    save_tensors(os.path.join(path, PEFT_WEIGHTS), tensors)
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
    cfg = read_json(cfg_path, AdapterError)
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
    tensors = read_tensors(weights, AdapterError)
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
