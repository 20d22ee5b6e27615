"""Quantized frozen bases (QLoRA): ``quantize: nf4 | fp4 | int8`` through bitsandbytes.

transformers quantizes the projections at load time (``BitsAndBytesConfig``); qkvtune's deltas then wrap
the quantized ``Linear4bit``/``Linear8bitLt`` like any Linear and train in the adapter dtype on top. The
base output comes from bitsandbytes' own kernels; where a delta needs the base weight itself (DoRA's row
norms, merging, export, analysis) it reads a dequantized copy. Nothing is ever written into a quantized
weight: export first has transformers replace the quantized layers by plain ones holding the dequantized
weights (``model.dequantize()``, in the compute dtype) and merges there, so the exported model computes what
the quantized run computed.

Task heads and ``lm_head`` stay unquantized (they train, or are tied to the embeddings).
"""

from __future__ import annotations

import importlib.util
import logging
import sys

import torch
from torch import nn

from .errors import QkvtuneError

# On AVX512-BF16 CPUs bitsandbytes (0.50) tries, when imported, to fetch a CPU kernel from a hub repository and
# warns on every command where it may not. That kernel serves the repacked layout standard_layout() turns off.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

QUANTIZE = ("nf4", "fp4", "int8")
SKIP_MODULES = ["lm_head", "pre_classifier", "classifier", "score", "qa_outputs"]


class QuantizeError(QkvtuneError):
    """A quantized base that cannot do what was asked (write into its weights, no bitsandbytes)."""


def bnb_config(quantize: str, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for ``quantize`` (nf4 | fp4 | int8)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizeError(f"quantize: {quantize} needs bitsandbytes: pip install 'qkvtune[quant]'")
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_MODULES)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=SKIP_MODULES)


def _bnb_classes() -> tuple[type, ...]:
    # any bitsandbytes layer means bitsandbytes is loaded: never import it here (a cheap import of qkvtune)
    bnb = sys.modules.get("bitsandbytes.nn")
    return (bnb.Linear4bit, bnb.Linear8bitLt) if bnb is not None else ()


def is_quantized(module: nn.Module) -> bool:
    classes = _bnb_classes()
    return bool(classes) and isinstance(module, classes)


def standard_layout(model: nn.Module) -> nn.Module:
    """Keep every 4-bit layer of ``model`` on bitsandbytes' standard layout and kernels.

    On a CPU with AVX512-BF16, bitsandbytes (0.49+) repacks a ``Linear4bit``'s weight in place, on its first
    no-grad forward in eval mode, into another layout for a bf16 kernel. qkvtune reads the weights
    (``dequantized``: DoRA's norms, merge, export, analysis) in the standard layout, evaluation would compute
    in bf16 what training computed in fp32, and the repacking fails outright for layers narrower than a
    quantization block. Training never takes that path; this keeps evaluation and inference on it too.
    ``support_avx512bf16_for_cpu`` is the layer's own (public) switch for it."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def dequantized(module: nn.Module) -> torch.Tensor:
    """The weight of a bitsandbytes layer as a plain (out, in) tensor in its compute dtype (a copy)."""
    import bitsandbytes.functional as F

    w = module.weight
    if getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
        raise QuantizeError("a 4-bit layer was repacked for bitsandbytes' AVX512-BF16 CPU kernel before qkvtune "
                            "wrapped it; call qkvtune.quant.standard_layout(model) right after loading")
    if type(w).__name__ == "Params4bit":
        out = F.dequantize_4bit(w.data, w.quant_state)
    else:  # Int8Params: int8 rows and their absmax scales (moved to the layer's state after its first forward)
        scales = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        out = F.int8_vectorwise_dequant(w.data, scales)
    dtype = getattr(module, "compute_dtype", None) or (module.bias.dtype if module.bias is not None else torch.float32)
    return out.reshape(module.out_features, module.in_features).to(dtype)

