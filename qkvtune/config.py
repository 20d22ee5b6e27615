"""One validated run configuration: YAML file + ``key=value`` overrides, checked as a whole before any work.

Every key is a field of ``TrainConfig`` below; that class is the config reference (README mirrors it).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
import os
import typing
from dataclasses import dataclass, field

import yaml

from .deltas import METHODS
from .data.spec import DataSpec
from .errors import ConfigError  # noqa: F401 (defined with the other errors; callers import it from here too)
from .files import atomic_write
from .quant import QUANTIZE
from .targets import ALL_LINEAR, GROUPS, MATRIX_KINDS


@dataclass
class TrainConfig(DataSpec):
    """Every key of a run. The data keys (task, data_dir, your own files and columns, splits, max_length, …) are
    ``DataSpec``'s (``data/spec.py``), defined and checked there; these are the model's, the method's, the
    schedule's and the run's."""

    # what to tune
    model: str = "minilm"                  # hub id, local folder, or alias: minilm, smollm2-135m
    pooling: str = "cls"                   # classifiers: cls (the model's own head) | mean (masked mean of the last
                                           # hidden states: how sentence-transformers models such as minilm pool)
    method: str = "lora"                   # lora | dora | dense | smt
    targets: list | None = field(default_factory=lambda: ["q", "v"])  # kinds among q, k, v, o, gate, up, down (mlp: the
                                           # MLP's), or [all-linear] alone (None: every slice of target_modules)
    layers: typing.Any = None              # all | [0, 5] | "last:2" | "a:b"
    target_modules: typing.Any = None      # PEFT's list of module names, or {module_suffix: kind | {kind: "a:b"}}
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0                   # dropout on the LoRA path
    # SMT (arXiv 2405.15525): block-sparse deltas on the blocks a gradient warm-up scores highest
    smt_budget: typing.Any = 0.01          # fraction of the model's parameters in (0, 1], or an integer block count
    block_size: int = 256
    smt_warmup_steps: int = 100
    smt_warmup_lr: float | None = None     # SGD steps on the eligible slices during the warm-up (the paper fine-tunes
                                           # there; undone after selection); none: gradients at the pretrained weights
    smt_warmup_head: bool = False          # the new task head trains in the warm-up too (SGD at smt_warmup_lr), and
                                           # keeps what it learned: the paper's warm-up fine-tunes the head as well
    smt_score: str = "abs_mean"            # abs_mean (mean |g|) | mean_abs (|mean g|) | l2
    smt_targets: list = field(default_factory=lambda: ["q", "k", "v"])  # eligible kinds, as targets ("mlp": the MLP's)
    smt_per_matrix: bool = False           # equal quotas per matrix instead of one global top-N
    smt_selection: str | None = None       # a fixed selection JSON instead of the warm-up
    # learning rates (arXiv 2410.02247): η_Q = lr, η_V = lr_ratio·lr
    lr: float | str = 5e-4                 # or "auto": chosen before the run (autolr.py), recorded in lr_auto
    lr_auto: dict | None = None            # how lr: auto chose the rate (written by the run; informational)
    lr_ratio: float = 1.0
    lr_mlp_ratio: float = 1.0              # η of the MLP's kinds (gate, up, down) = lr_mlp_ratio·lr
    lr_q: float | None = None
    lr_k: float | None = None
    lr_v: float | None = None
    lr_o: float | None = None
    lr_head: float | None = None          # 0 keeps the (fresh) task head fixed
    loraplus_ratio: float | None = None    # η_B = ratio·η_A
    weight_decay: float = 0.0
    optim: str = "adamw_torch"             # any transformers optimizer name (adamw_torch, sgd, adafactor, …)
    warmup_ratio: float = 0.06
    scheduler: str = "linear"
    # schedule and data
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1
    # evaluation, checkpoints, stopping
    eval_strategy: str = "epoch"           # epoch | steps | no
    eval_steps: int | None = None
    patience: int | None = None            # stop after this many evaluations without improvement
    early_stopping: str = "none"           # none | ntk: stop at the step the pretrained-kernel rule predicts
    save_total_limit: int = 2
    logging_steps: int = 10
    report_to: str = "none"                # none | tensorboard
    max_new_tokens: int = 16               # commonsense: generated tokens per answer
    # the objective (README "Preference and RL fine-tuning"): the task's own loss, DPO on pairs, GRPO on prompts
    objective: str = "auto"                # auto (dpo for task preference, grpo for task prompts, else the task's
                                           # loss) | dpo | grpo
    dpo_beta: float = 0.1                  # DPO's β (TRL's beta): how strongly the pretrained model anchors the policy
    dpo_loss_type: typing.Any = "sigmoid"  # TRL's DPO loss: sigmoid (DPO), ipo, hinge, robust, … or a list of them
    grpo_generations: int = 4              # GRPO: completions sampled per prompt (a group); batch_size counts them
    grpo_completion_length: int = 64       # GRPO: tokens generated per completion (and per evaluated answer)
    grpo_temperature: float = 1.0          # GRPO: sampling temperature of the completions
    grpo_beta: float = 0.0                 # GRPO: weight of the KL to the pretrained model (TRL's beta; 0: none)
    # run
    seed: int = 0
    output_dir: str = "runs/default"
    resume: typing.Any = False             # false | true (latest complete checkpoint in output_dir) | a checkpoint path
    overwrite: bool = False                # allow a fresh run in an output_dir that already holds one
    on_nonfinite: str = "stop"             # stop | skip: a non-finite loss/gradient stops the run, or skips the step
    max_nonfinite_skips: int = 10          # with skip: stop after this many skipped steps
    allow_pickle: bool = False             # load model weights from pickle files (.bin) when no safetensors exist
    dtype: str = "auto"                    # auto (bf16 where a GPU supports it natively, else fp32) | float32
                                           # | bfloat16 | float16 (CUDA, with a gradient scaler)
    fast_path: str = "auto"                # auto | on | off (qkvtune/fastpath.py): auto = cheap dropout masks on CPU
                                           # (same distribution, another random stream); on = also torch.compile on CUDA
    trust_remote_code: bool = False
    # models that do not fit (README "Bigger models")
    gradient_checkpointing: bool = False   # recompute activations in backward (transformers' own, non-reentrant)
    quantize: str | None = None            # nf4 | fp4 | int8: a frozen bitsandbytes base under the adapter (QLoRA)
    fsdp: bool = False                     # shard the model across processes (FSDP2) under torchrun / accelerate launch
    fsdp_min_params: int | None = None     # FSDP units: submodules of at least this many parameters (default: each layer)
    # causal LMs: less memory and less padding (README "Lean LM fine-tuning")
    chunked_loss: str = "auto"             # auto | on | off: the LM head's loss a chunk of tokens at a time, never the
                                           # whole B×T×V logits (qkvtune/chunked_loss.py); auto = where it is exactly the
                                           # model's own loss; on = refuse a model where it is not

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataSpec))
LOADING_KEYS = ("model", "dtype", "trust_remote_code", "allow_pickle")  # how a model is loaded, not trained

# The names users know from transformers' Trainer / TrainingArguments, PEFT's LoraConfig, TRL and LLaMA-Factory.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler", "evaluation_strategy": "eval_strategy", "max_seq_length": "max_length",
    "cutoff_len": "max_length", "r": "rank", "lora_r": "rank", "lora_rank": "rank", "lora_alpha": "alpha",
    "lora_dropout": "dropout", "use_rslora": "rslora", "use_dora": "method", "model_name_or_path": "model",
    "dataset_name": "dataset", "dataset_config_name": "dataset_config", "bnb_4bit_quant_type": "quantize",
    "fsdp_min_num_params": "fsdp_min_params",
}
# Settings of those tools that qkvtune does not take (yet): say so instead of suggesting a lookalike key.
FOREIGN = {
    "deepspeed": "DeepSpeed is not supported; multi-process training uses torchrun / accelerate launch",
    "load_in_4bit": "use quantize: nf4 (or fp4)", "load_in_8bit": "use quantize: int8",
    "fsdp_config": "use fsdp: true and fsdp_min_params; launch with torchrun or accelerate launch",
    "bf16": "use dtype: bfloat16", "fp16": "use dtype: float16", "do_train": "qkvtune train always trains",
    "do_eval": "evaluation follows eval_strategy", "bias": "qkvtune adapters have no bias terms",
    "modules_to_save": "task heads are found and trained with the adapter automatically",
    "task_type": "the task kind follows from task", "lora_target": "use target_modules (or targets: [q, v])",
    "save_steps": "checkpoints are saved at each evaluation (eval_steps)", "save_strategy": "follows eval_strategy",
}
_CHOICES = {"method": tuple(METHODS), "pooling": ("cls", "mean"), "smt_score": ("abs_mean", "mean_abs", "l2"), "eval_strategy": ("epoch", "steps", "no"),
            "on_nonfinite": ("stop", "skip"), "objective": ("auto", "dpo", "grpo"),
            "early_stopping": ("none", "ntk"), "fast_path": ("auto", "on", "off"), "chunked_loss": ("auto", "on", "off"),
            "scheduler": ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                          "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"),
            "dtype": ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")}


@functools.cache
def _type_hints() -> dict:
    """TrainConfig's field types, resolved once (get_type_hints costs ~1 ms a call; a config checks every key)."""
    return typing.get_type_hints(TrainConfig)


def _check_type(key: str, value):
    """Coerce ints to floats where a float is wanted; refuse anything else of the wrong type."""
    hint = _type_hints()[key]
    if hint is typing.Any:
        return value
    args = typing.get_args(hint)
    allowed = tuple(a for a in args if a is not type(None)) if args else (hint,)
    if value is None and type(None) in args:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and str in allowed and bool not in allowed:
        # YAML 1.1 reads no/off/yes/on as booleans (eval_strategy: no, fast_path: off): take the choice's word
        words = ("yes", "on") if value else ("no", "off")
        return next((w for w in words if w in _CHOICES.get(key, ())), words[0])
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{key}: expected {' or '.join(a.__name__ for a in allowed)}, got {value!r}")
    if not isinstance(value, tuple(typing.get_origin(a) or a for a in allowed)):
        raise ConfigError(f"{key}: expected {' or '.join(a.__name__ for a in allowed)}, got {value!r}")
    return value


def _validate(cfg: TrainConfig) -> None:
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"{key}: {getattr(cfg, key)!r} is not one of {', '.join(choices)}")
    tm = cfg.target_modules
    if tm is not None and not (isinstance(tm, dict) and tm) and not (
            isinstance(tm, list) and tm and all(isinstance(m, str) and m for m in tm)):
        raise ConfigError(f"target_modules: expected a list of module names or a mapping {{module: kind}}, got {tm!r}")
    if cfg.targets is None and not isinstance(tm, list):
        raise ConfigError("targets: may be left out only with a list of target_modules")
    if cfg.targets is not None and (not cfg.targets or not all(isinstance(t, str) for t in cfg.targets)):
        raise ConfigError(f"targets: expected a non-empty list such as [q, v], got {cfg.targets!r}")
    if not cfg.target_modules:
        bad = [t for t in cfg.targets if t not in (*MATRIX_KINDS, *GROUPS, ALL_LINEAR)]
        if bad:
            raise ConfigError(f"targets: {bad} are not matrix kinds ({', '.join(MATRIX_KINDS)}, mlp or all-linear)")
    if cfg.targets and ALL_LINEAR in cfg.targets and (len(cfg.targets) > 1 or cfg.target_modules):
        raise ConfigError(f"targets: {ALL_LINEAR} names every linear layer itself; give it alone, "
                          "without target_modules")
    if cfg.targets is not None and len(set(cfg.targets)) != len(cfg.targets):
        raise ConfigError(f"targets: {cfg.targets} names a matrix twice")
    cfg.check()  # the data keys (DataSpec)
    if isinstance(cfg.lr, str) and cfg.lr != "auto":
        raise ConfigError(f"lr: expected a number or auto, got {cfg.lr!r}")
    positive = {"rank": cfg.rank, "alpha": cfg.alpha, "lr": 1.0 if cfg.lr == "auto" else cfg.lr, "lr_ratio": cfg.lr_ratio,
                "lr_mlp_ratio": cfg.lr_mlp_ratio, "epochs": cfg.epochs,
                "batch_size": cfg.batch_size, "eval_batch_size": cfg.eval_batch_size, "grad_accum": cfg.grad_accum,
                "logging_steps": cfg.logging_steps, "max_new_tokens": cfg.max_new_tokens}
    if cfg.lr_head is not None and cfg.lr_head < 0:
        raise ConfigError(f"lr_head: must be >= 0 (0 keeps the task head fixed), got {cfg.lr_head!r}")
    for key in ("lr_q", "lr_k", "lr_v", "lr_o", "loraplus_ratio", "max_steps", "eval_steps", "patience"):
        if getattr(cfg, key) is not None:
            positive[key] = getattr(cfg, key)
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value!r}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"dropout: must be in [0, 1), got {cfg.dropout!r}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio: must be in [0, 1), got {cfg.warmup_ratio!r}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"weight_decay: must be >= 0, got {cfg.weight_decay!r}")
    if cfg.save_total_limit < 2:  # one complete checkpoint must survive while the next is written
        raise ConfigError(f"save_total_limit: must be >= 2, got {cfg.save_total_limit!r}")
    if cfg.max_nonfinite_skips < 0:
        raise ConfigError(f"max_nonfinite_skips: must be >= 0, got {cfg.max_nonfinite_skips!r}")
    budget = cfg.smt_budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0 or (
            isinstance(budget, float) and budget > 1):
        raise ConfigError(f"smt_budget: expected a fraction in (0, 1] or a block count >= 1, got {budget!r}")
    if cfg.smt_warmup_lr is not None and not cfg.smt_warmup_lr > 0:
        raise ConfigError(f"smt_warmup_lr: must be > 0 (or unset), got {cfg.smt_warmup_lr!r}")
    if cfg.smt_warmup_head and cfg.smt_warmup_lr is None:
        raise ConfigError("smt_warmup_head: the head trains at smt_warmup_lr during the warm-up; set smt_warmup_lr")
    if cfg.block_size <= 0 or cfg.smt_warmup_steps <= 0:
        raise ConfigError("block_size and smt_warmup_steps: must be > 0")
    bad = [t for t in cfg.smt_targets if t not in (*MATRIX_KINDS, *GROUPS)]
    if bad or not cfg.smt_targets:
        raise ConfigError(f"smt_targets: {bad or cfg.smt_targets} must be a non-empty subset of "
                          f"{', '.join((*MATRIX_KINDS, *GROUPS))}")
    if cfg.smt_selection and not os.path.isfile(cfg.smt_selection):
        raise ConfigError(f"smt_selection: {cfg.smt_selection} not found")
    _validate_scale(cfg)
    _validate_objective(cfg)
    if cfg.eval_strategy == "steps" and cfg.eval_steps is None:
        raise ConfigError("eval_steps: required when eval_strategy is steps")
    if cfg.patience is not None and cfg.eval_strategy == "no":
        raise ConfigError("patience: needs evaluation (eval_strategy epoch or steps)")
    if not isinstance(cfg.resume, (bool, str)):
        raise ConfigError(f"resume: expected true, false or a checkpoint path, got {cfg.resume!r}")
    if not cfg.output_dir:
        raise ConfigError("output_dir: must not be empty")
    _validate_integrations(cfg)
    if cfg.optim in COMMON_OPTIMIZERS:
        return
    from transformers.training_args import OptimizerNames  # seconds to import (it loads peft, bitsandbytes …)

    known = [o.value for o in OptimizerNames]
    if cfg.optim not in known:
        close = [k for k in known if k.startswith(cfg.optim)] or difflib.get_close_matches(cfg.optim, known, n=1, cutoff=0.8)
        raise ConfigError(f"optim: {cfg.optim!r} is not an optimizer transformers knows"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))


# Optimizer names every transformers 5.x knows: checking them needs no import of transformers' TrainingArguments.
COMMON_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "adagrad", "rmsprop", "adamw_8bit",
                     "paged_adamw_8bit", "paged_adamw_32bit", "lion_32bit", "lion_8bit")


def _trains_a_classifier(task: str) -> bool:
    from .data.families import find_family
    from .task import TaskInfo

    fam = find_family(task)
    return fam is not None and TaskInfo(fam.task_kind(task), 0).sequence_classifier


def _validate_objective(cfg: TrainConfig) -> None:
    """objective: dpo trains on preference pairs (task: preference), and a preference task trains by DPO."""
    from .data.families import find_family
    from .task import PREFERENCE, REWARD

    fam = find_family(cfg.task)
    kind = fam.task_kind(cfg.task) if fam is not None else None
    preference = kind == PREFERENCE
    if cfg.objective == "dpo" and not preference:
        raise ConfigError(f"objective: dpo trains on preference pairs (task: preference), not {cfg.task}")
    if cfg.objective == "grpo" and kind != REWARD:
        raise ConfigError(f"objective: grpo trains on prompts with a reward (task: prompts), not {cfg.task}")
    if kind == REWARD:
        for key in ("grpo_generations", "grpo_completion_length"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(cfg, key)!r}")
        if cfg.grpo_generations < 2 or cfg.batch_size % cfg.grpo_generations:
            raise ConfigError(f"batch_size: counts completions, a multiple of grpo_generations (>= 2: a group's "
                              f"advantages compare its members); got {cfg.batch_size} and {cfg.grpo_generations}")
        if not cfg.grpo_temperature > 0:
            raise ConfigError(f"grpo_temperature: must be > 0, got {cfg.grpo_temperature!r}")
        if not cfg.grpo_beta >= 0:
            raise ConfigError(f"grpo_beta: must be >= 0, got {cfg.grpo_beta!r}")
    if not cfg.dpo_beta > 0:
        raise ConfigError(f"dpo_beta: must be > 0, got {cfg.dpo_beta!r}")
    types = cfg.dpo_loss_type if isinstance(cfg.dpo_loss_type, list) else [cfg.dpo_loss_type]
    if not types or not all(isinstance(t, str) and t for t in types):
        raise ConfigError(f"dpo_loss_type: expected TRL's loss type or a list of them, got {cfg.dpo_loss_type!r}")
    if preference or kind == REWARD:
        what = "DPO" if preference else "GRPO"
        if METHODS[cfg.method].needs_selection:
            raise ConfigError(f"method: {cfg.method} selects its blocks by a warm-up on the task's loss, which "
                              f"{what}'s records do not give; use lora, dora or dense")
        if cfg.early_stopping == "ntk":
            raise ConfigError(f"early_stopping: ntk predicts the stop from the task loss's kernel, not {what}'s")
        if cfg.chunked_loss == "on":
            raise ConfigError(f"chunked_loss: {what} computes its own loss (TRL's, which forms no full logits)")


def _validate_scale(cfg: TrainConfig) -> None:
    """quantize / fsdp: the combinations that cannot work, refused before any work."""
    if cfg.quantize is not None:
        if cfg.quantize not in QUANTIZE:
            raise ConfigError(f"quantize: {cfg.quantize!r} is not one of {', '.join(QUANTIZE)} (or null)")
        if METHODS[cfg.method].needs_selection:
            raise ConfigError(f"quantize: {cfg.method} scores blocks by the gradient of the base weights and updates "
                              "them in its warm-up, which a quantized base does not allow; train it unquantized")
        if cfg.fsdp:
            raise ConfigError("quantize: a bitsandbytes base cannot be sharded with fsdp here; use one of them")
    if cfg.fsdp_min_params is not None and (cfg.fsdp_min_params < 1 or not cfg.fsdp):
        raise ConfigError(f"fsdp_min_params: needs fsdp: true and a positive count, got {cfg.fsdp_min_params!r}")
    if cfg.chunked_loss == "on" and _trains_a_classifier(cfg.task):
        raise ConfigError(f"chunked_loss: on is the loss of a causal LM's head; {cfg.task} trains a classifier")


# report_to: any integration Trainer supports; the package each needs (checked before any work)
INTEGRATIONS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                "neptune": "neptune", "clearml": "clearml", "dvclive": "dvclive", "codecarbon": "codecarbon",
                "swanlab": "swanlab", "trackio": "trackio", "azure_ml": "azureml", "dagshub": "dagshub",
                "flyte": "flytekit", "kubeflow": "kubeflow"}


def _validate_integrations(cfg: TrainConfig) -> None:
    names = [n.strip() for n in cfg.report_to.split(",") if n.strip()] if isinstance(cfg.report_to, str) else []
    if not names:
        raise ConfigError(f"report_to: expected none or an integration name, got {cfg.report_to!r}")
    for name in names:
        if name == "none" and len(names) == 1:
            continue
        if name not in INTEGRATIONS:
            raise ConfigError(f"report_to: {name!r} is not one of none, {', '.join(INTEGRATIONS)}")
        if importlib.util.find_spec(INTEGRATIONS[name]) is None:
            hint = " (pip install 'qkvtune[tensorboard]')" if name == "tensorboard" else f" (pip install {INTEGRATIONS[name]})"
            raise ConfigError(f"report_to: {name} is not installed{hint}")


def parse_override(item: str) -> tuple[str, typing.Any]:
    """``key=value`` with the value read as YAML (``targets=[q,v]``, ``lr=1e-4``, ``resume=true``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and raw.strip().lower() in ("none", "null"):
        value = None
    return key.strip(), value


def _finite(key: str, value):
    """No NaN or infinity anywhere in a setting (a lr of .inf would train to NaN, a .nan budget compares false)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for v in value.values():
            _finite(key, v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _finite(key, v)
    return value


def _unknown(key) -> ConfigError:
    if not isinstance(key, str):
        return ConfigError(f"unknown config key {key!r}")
    if key in FOREIGN:
        return ConfigError(f"{key}: not a qkvtune setting ({FOREIGN[key]})")
    names = {**{k: k for k in _FIELDS}, **{a: k for a, k in ALIASES.items()}}
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.75)
    if not close:
        return ConfigError(f"unknown config key {key!r}")
    meant = names[close[0]]
    alias = f" ({close[0]!r} is qkvtune's {meant!r})" if close[0] != meant else ""
    return ConfigError(f"unknown config key {key!r} (did you mean {meant!r}?{alias})")


def canonical(values: dict) -> dict:
    """Trainer's and PEFT's key names replaced by qkvtune's (``learning_rate`` → ``lr``, ``r`` → ``rank`` …);
    an alias given together with its own key, or twice, is refused."""
    out: dict = {}
    given: dict = {}
    for key, value in values.items():
        name = ALIASES.get(key, key) if isinstance(key, str) else key
        if key == "use_dora":  # PEFT's flag is a method choice here
            if value is not True and value is not False:
                raise ConfigError(f"use_dora: expected true or false, got {value!r}")
            if not value:
                continue
            value = "dora"
        if name in out:
            raise ConfigError(f"{given[name]} and {key}: both set {name!r}; give one")
        out[name], given[name] = value, key
    if isinstance(out.get("target_modules"), str) and out["target_modules"].lower() == ALL_LINEAR:
        if "targets" in out:  # PEFT's spelling of targets: all-linear
            raise ConfigError(f"{given['target_modules']} and targets: both say what to tune; give one")
        out["targets"], given["targets"] = [ALL_LINEAR], given.pop("target_modules")
        del out["target_modules"]
    if isinstance(out.get("target_modules"), str):  # PEFT accepts one module name as a string
        out["target_modules"] = [out["target_modules"]]
    for key in ("targets", "smt_targets", "text_columns"):  # targets=q,v as well as targets=[q,v]
        if isinstance(out.get(key), str):
            out[key] = [t.strip() for t in out[key].split(",") if t.strip()]
    return out


def build_config(values: dict) -> TrainConfig:
    """Validate a dict of settings into a TrainConfig (aliases resolved; unknown keys get a did-you-mean that
    knows the aliases, and Trainer/PEFT settings qkvtune does not take are named as such)."""
    kwargs = {}
    values = canonical(values)
    if isinstance(values.get("target_modules"), list) and "targets" not in values:
        values["targets"] = None  # PEFT's list of module names: tune whatever slices those modules hold
    for key, value in values.items():
        if not isinstance(key, str) or key not in _FIELDS:
            raise _unknown(key)
        kwargs[key] = _finite(key, _check_type(key, value))
    cfg = TrainConfig(**kwargs)
    _validate(cfg)
    return cfg


def save_config(cfg: TrainConfig, path: str) -> None:
    """A run's resolved config as YAML (``config.yaml``, ``plan.yaml``), atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    atomic_write(path, write)


def load_command_config(first: str | None, overrides: list[str]) -> TrainConfig:
    """``[CONFIG.yaml] [key=value …]`` as a command line gives it: a first word that is a key=value (and not a
    YAML path) is the first override, as in ``qkvtune train lr=1e-4``."""
    if first and "=" in first and not first.endswith((".yaml", ".yml")):
        return load_config(None, [first, *overrides])
    return load_config(first, overrides)


def read_yaml(path: str) -> dict:
    """A YAML file of settings (a config, the claims suite's files) as a mapping ({} when empty), or a
    ``ConfigError`` naming the file (and the line of a syntax error)."""
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a folder, not a config file")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return values


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    values = read_yaml(path) if path else {}
    for item in overrides:
        key, value = parse_override(item)
        values[key] = value
    try:
        return build_config(values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
