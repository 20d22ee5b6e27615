"""llama.cpp's GGUF layout, out: a run's LoRA as a llama.cpp LoRA adapter file, and the merged model as a GGUF
model file written beside the base's own GGUF.

An adapter file (what llama.cpp's ``convert_lora_to_gguf.py`` writes) holds ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha`` and, for each adapted base tensor ``blk.N.attn_q.weight``, the pair
``….lora_a`` (numpy (r, in): ggml's ne [in, r]) and ``….lora_b`` ((out, r)); llama.cpp adds
``alpha / r · B·(A·x)`` to the tensor's output (alpha 0: scale 1). Names come from the ``gguf`` library's map of
Hugging Face names for the architecture; rows are laid out as llama.cpp's converter lays out the base (Llama's q
and k rows interleaved for its rotary embedding, ``rope_rows``). Slices of one projection become one pair of rank
Σrᵢ whose B is zero outside each slice's rows, as for PEFT.

Only deltas that are a plain low-rank product (``Delta.low_rank``: LoRA, rsLoRA) are an adapter; any method can
be merged. Architectures are those whose layout was checked against the real llama.cpp (``ARCHS``)."""

from __future__ import annotations


import os

import numpy as np
import torch

from . import attach
from .errors import AdapterError
from .files import atomic_write

# model_type -> the gguf library's architecture, and the kinds whose rows llama.cpp's converter reorders (rope)
ARCHS = {"llama": ("LLAMA", ("q", "k"))}
TYPES = ("f32", "f16", "base")  # merged tensors: float32, float16, or requantized to the base tensor's own type


def arch_of(model) -> tuple[str, tuple[str, ...]]:
    """(gguf architecture name, kinds with rope-reordered rows) of a model, or an AdapterError saying why not."""
    import gguf

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise AdapterError(f"--format gguf: model type {model_type!r} is not one whose GGUF layout qkvtune checked "
                           f"against llama.cpp ({', '.join(ARCHS)}); export the merged Hugging Face folder "
                           "(--format hf) and convert it with llama.cpp's convert_hf_to_gguf.py")
    name, roped = ARCHS[model_type]
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, name)], roped


def rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (dim 0) reordered as llama.cpp's converter reorders a Llama q or k projection: within each head the
    two rotated halves interleaved (Hugging Face's rotate_half layout -> GGML's adjacent pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def row_layout(model, roped: tuple[str, ...]):
    """fn(kind, rows of a q/k/… projection) -> the rows in the GGUF file's order."""
    cfg = model.config
    heads = {"q": cfg.num_attention_heads, "k": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads}
    return lambda kind, w: rope_rows(w, heads[kind]) if kind in roped else w


def tensor_name(model, arch: str, module: str) -> str:
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    name = names.get_name(module + ".weight", try_suffixes=(".weight",))
    if name is None:
        raise AdapterError(f"--format gguf: {module} has no tensor name in llama.cpp's {arch} layout")
    return name


def _by_module(model, adapter: str | None) -> dict[str, tuple]:
    """module -> (its wrapper, its deltas)."""
    out: dict[str, tuple] = {}
    for wrapper, d in attach.iter_deltas(model, adapter):
        out.setdefault(d.target.module, (wrapper, []))[1].append(d)
    return out


def adapter_tensors(model, adapter: str | None = None) -> tuple[dict[str, np.ndarray], float, str]:
    """({name.lora_a / name.lora_b: float32 array}, alpha, architecture) of the adapter, as llama.cpp reads them."""
    arch, roped = arch_of(model)
    layout = row_layout(model, roped)
    if attach.head_modules(model, adapter):
        raise AdapterError("--format gguf: the adapter trains a task head, which a llama.cpp adapter cannot hold; "
                           "export the merged model (its GGUF needs the base as GGUF: --gguf-base)")
    pairs, ranks, scales = {}, set(), set()
    for module, (_, deltas) in _by_module(model, adapter).items():
        factors = [d.low_rank() for d in deltas]
        if any(f is None for f in factors):
            method = next(d.method for d, f in zip(deltas, factors) if f is None)
            raise AdapterError(f"--format gguf: {method} is not a plain low-rank update, which is all a llama.cpp "
                               "adapter applies; export the merged model instead (qkvtune export RUN OUT --format "
                               "gguf --merged-only, or --format hf)")
        out_features = deltas[0].target.out_features
        rank = sum(a.shape[0] for a, _, _ in factors)
        A = torch.cat([a.detach().float() for a, _, _ in factors], 0)
        B = torch.zeros(out_features, rank)
        col = 0
        for d, (a, b, s) in zip(deltas, factors):
            B[d.target.rows.index(), col:col + a.shape[0]] = b.detach().float().cpu()
            col += a.shape[0]
            scales.add(float(s))
        kind = deltas[0].kind if len(deltas) == 1 else None
        if kind is not None:
            B = layout(kind, B)
        elif any(d.kind in roped for d in deltas):  # not in ARCHS today: a fused projection with rope-reordered rows
            raise AdapterError(f"--format gguf: {module} fuses roped rows, which this export does not reorder")
        pairs[module] = (A, B, [float(s) for _, _, s in factors], [a.shape[0] for a, _, _ in factors])
        ranks.add(rank)
    if not pairs:
        raise AdapterError("--format gguf: the run has no adapter deltas")
    uniform = len(ranks) == 1 and len(scales) == 1
    alpha = scales.pop() * ranks.pop() if uniform else 0.0  # else every scale folded into B (alpha 0: scale 1)
    tensors = {}
    for module, (A, B, ss, rs) in pairs.items():
        if not uniform:
            col = 0
            for s, r in zip(ss, rs):
                B[:, col:col + r] *= s
                col += r
        name = tensor_name(model, arch, module)
        tensors[name + ".lora_a"] = A.numpy().astype(np.float32)
        tensors[name + ".lora_b"] = B.numpy().astype(np.float32)
    return tensors, alpha, arch


def write_adapter(model, path: str, adapter: str | None = None, name: str | None = None) -> dict:
    """The adapter as a llama.cpp LoRA GGUF at ``path`` (atomically). Returns what was written."""
    import gguf

    tensors, alpha, arch = adapter_tensors(model, adapter)

    def write(tmp):
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        if name:
            w.add_name(name)
        for key, value in tensors.items():
            w.add_tensor(key, value)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)
    return {"tensors": len(tensors) // 2, "alpha": alpha, "architecture": arch}


def merged_weights(model, base_gguf: str, adapter: str | None = None) -> dict[str, np.ndarray]:
    """{GGUF tensor name: base tensor (dequantized from the file) + ΔW in the file's row order}, float32, for every
    projection the adapter changes. The base is read from ``base_gguf`` itself, so what is written is exactly
    what llama.cpp reads plus the update."""
    import gguf

    arch, roped = arch_of(model)
    layout = row_layout(model, roped)
    reader = gguf.GGUFReader(base_gguf)
    file_arch = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if file_arch is None or file_arch.contents() != arch:
        raise AdapterError(f"--gguf-base: {base_gguf} is not a {arch} model file")
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for module, (wrapper, deltas) in _by_module(model, adapter).items():
        name = tensor_name(model, arch, module)
        t = tensors.get(name)
        shape = tuple(wrapper.weight_rows().shape)  # (out, in), Linear orientation
        if t is None or tuple(int(x) for x in reversed(t.shape.tolist())) != shape:
            raise AdapterError(f"--gguf-base: {base_gguf} has no tensor {name} of {module}'s shape {shape} "
                               "(another model than the run's base?)")
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        dw = torch.zeros_like(w)
        with torch.no_grad():
            for d in deltas:
                base = wrapper.slice_weight(d.target.rows)
                dw[d.target.rows.index()] += d.delta_weight(base).detach().float().cpu()
        kind = deltas[0].kind if len(deltas) == 1 else None
        out[name] = (w + (layout(kind, dw) if kind is not None else dw)).numpy()
    return out


def write_merged(model, base_gguf: str, path: str, adapter: str | None = None, dtype: str = "f16") -> dict:
    """A GGUF model file: every field and tensor of ``base_gguf``, the adapted projections replaced by their
    merged weights in ``dtype`` (``TYPES``; ``base`` requantizes them to the base tensor's type, which can erase an
    update smaller than its quantization step). Returns what was written."""
    import gguf

    if dtype not in TYPES:
        raise AdapterError(f"--gguf-type: {dtype!r} is not one of {', '.join(TYPES)}")
    merged = merged_weights(model, base_gguf, adapter)
    reader = gguf.GGUFReader(base_gguf)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    plain = {"f32": (np.float32, gguf.GGMLQuantizationType.F32), "f16": (np.float16, gguf.GGMLQuantizationType.F16)}

    def encoded(t):
        w = merged[t.name]
        if dtype != "base":
            np_type, qtype = plain[dtype]
            return w.astype(np_type), qtype
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return w.astype(np.float32 if t.tensor_type == gguf.GGMLQuantizationType.F32 else np.float16), \
                t.tensor_type
        try:
            return gguf.quants.quantize(w, t.tensor_type), t.tensor_type
        except NotImplementedError:
            raise AdapterError(f"--gguf-type base: the gguf library cannot write {t.tensor_type.name}; use f16") \
                from None

    def write(tmp):
        w = gguf.GGUFWriter(tmp, arch)
        _copy_fields(reader, w)
        data = {}
        for t in reader.tensors:
            if t.name in merged:
                arr, qtype = encoded(t)  # a quantized array is bytes (rows, bytes a row): the writer reads its type
                data[t.name] = arr
                w.add_tensor_info(t.name, arr.shape, arr.dtype, arr.nbytes, qtype if arr.dtype == np.uint8 else None)
            else:
                data[t.name] = t.data
                w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in reader.tensors:
            w.write_tensor_data(data[t.name])
        w.close()

    atomic_write(path, write)
    return {"tensors": len(merged), "type": dtype, "architecture": arch}


def _copy_fields(reader, writer) -> None:
    import gguf

    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        vtype = field.types[0]
        writer.add_key_value(field.name, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)


def dequantized_copy(src: str, dst: str) -> None:
    """``src`` with every tensor dequantized to float32: llama.cpp then computes without quantizing its
    activations, so an export can be checked against qkvtune to float rounding."""
    import gguf

    reader = gguf.GGUFReader(src)

    def write(tmp):
        w = gguf.GGUFWriter(tmp, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
        _copy_fields(reader, w)
        for t in reader.tensors:
            w.add_tensor(t.name, np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(dst, write)


def plain_lora(model, adapter: str | None = None) -> bool:
    """Whether llama.cpp can apply the adapter as it is: every delta a plain low-rank product, no trained head."""
    return all(d.low_rank() is not None for _, d in attach.iter_deltas(model, adapter)) and \
        not attach.head_modules(model, adapter)


def export(model, out: str, base_gguf: str | None, adapter: str | None = None, dtype: str = "f16",
           name: str | None = None) -> list[str]:
    """Into folder ``out``: adapter.gguf (a plain LoRA), model.gguf (merged, where the base is a GGUF file) and an
    Ollama Modelfile (``ollama create NAME -f Modelfile``). Returns a line for each file written."""
    arch_of(model)  # one line for an architecture whose llama.cpp layout is not known here
    plain = plain_lora(model, adapter)
    if not plain and base_gguf is None:
        raise AdapterError("--format gguf: this adapter is not a plain LoRA, so only the merged model can be "
                           "exported, which needs the base as GGUF: --gguf-base FILE (llama.cpp's "
                           "convert_hf_to_gguf.py makes one from a Hugging Face folder)")
    os.makedirs(out, exist_ok=True)
    written = []
    if plain:
        info = write_adapter(model, os.path.join(out, "adapter.gguf"), adapter, name=name)
        written.append(f"adapter.gguf ({info['tensors']} LoRA tensor pairs, alpha {info['alpha']:g})")
    if base_gguf is not None:
        info = write_merged(model, base_gguf, os.path.join(out, "model.gguf"), adapter, dtype)
        written.append(f"model.gguf ({info['tensors']} merged tensors in {info['type']}, the rest as in {base_gguf})")
    modelfile = f"FROM {os.path.abspath(base_gguf)}\nADAPTER ./adapter.gguf\n" if plain and base_gguf else \
        ("FROM ./model.gguf\n" if base_gguf else "FROM <the base model as GGUF>\nADAPTER ./adapter.gguf\n")

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(modelfile)

    atomic_write(os.path.join(out, "Modelfile"), write)
    written.append("Modelfile")
    return written
