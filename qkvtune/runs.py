"""The run layer: a config becomes a ``Run`` — model, tokenizer, task data and the *resolved* targets — in
one place, for training, evaluation, analysis and benchmarks; a finished run folder is opened the same way.

Everything above this layer (``train``, ``analysis``, ``bench``, the CLI) takes a ``Run`` and uses its
``targets`` (``Target`` objects: module, kind, rows) and its adapter; nothing above looks targets up again
from kind strings.

* ``pretrained(cfg)``: the model at its pretrained weights with the slices the config names (no adapter);
  the NTK, the stopping rule and the planner measure there.
* ``build(cfg)``: ``pretrained`` + the method's adapter on those slices (SMT first selects its blocks).
* ``open_run(dir)``: a finished run: its config, base model and saved adapter. The model class and labels
  come from the adapter's metadata, so evaluation data is loaded only when asked for.
* ``open_runs(dirs)``: several finished runs' adapters on one shared base model (``r0``, ``r1``, …).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from torch import nn

from . import attach, fastpath, io, sharding
from .config import ConfigError, TrainConfig, build_config, load_config
from .deltas import Delta, delta_class
from .errors import AdapterError, QkvtuneError
from .files import read_json, read_tensors
from .models import enable_checkpointing, load_model, load_tokenizer
from .targets import Target, find_targets
from .task import TaskInfo


class RunError(QkvtuneError):
    """A run folder that cannot be opened."""


@dataclass
class Run:
    cfg: TrainConfig
    model: nn.Module
    tokenizer: object
    task: object | None            # data.TaskData, or None for a run opened without its data
    info: TaskInfo
    targets: list[Target]          # the resolved slices: what is trained, measured and saved
    heads: list[str] = field(default_factory=list)  # task-head modules created at load (trained with the adapter)
    adapter: str | None = None     # this run's adapter on ``model`` (None: pretrained weights only)
    dir: str | None = None         # the run folder, for finished runs

    @property
    def method(self) -> type[Delta]:
        return delta_class(self.cfg.method)

    def examples(self, split: str = "train", n: int | None = None) -> list[dict]:
        """The first ``n`` tokenized examples of the training set (``"train"``), of the first evaluation set
        (``"eval"``: the validation split with ``val_size``) or of the test split (``"test"``: the dev/test
        file, which is the evaluation set itself without ``val_size``)."""
        if self.task is None:
            raise RunError(f"{self.dir or 'run'}: opened without its task data")
        if self.info.preference or self.info.rewarded:
            raise RunError(f"task {self.cfg.task}: its records are text that TRL tokenizes, not examples")
        sets = self.task.tests if split == "test" and self.task.tests else self.task.evals
        ds = self.task.train if split == "train" else next(iter(sets.values()), None)
        if ds is None:
            raise RunError(f"task {self.cfg.task}: has no {split} set")
        return [ds[i] for i in range(min(len(ds), n or len(ds)))]

    @property
    def kernel_output(self) -> str:
        return self.info.kernel_output

    def label_token_ids(self, words: str | None) -> list[int] | None:
        """Causal LMs: the first token of each comma-separated label word (the logits the NTK reads)."""
        if not self.info.causal_lm:
            return None
        if not words:
            raise ConfigError("--label-words: a causal LM needs the label words, e.g. --label-words negative,positive")
        return [self.tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"][0] for w in words.split(",")]


# --- building ---------------------------------------------------------------------------------------------

def resolve_targets(cfg: TrainConfig, model: nn.Module, kinds: list[str] | None = None,
                    heads: list[str] | None = None) -> list[Target]:
    """The slices a config names on ``model``: ``targets`` (or ``kinds`` instead), restricted to ``layers``,
    among ``target_modules`` when given; for a method that selects its slices (SMT), those eligible.
    ``heads`` (trained whole) are never targets, also not of all-linear."""
    if kinds is None and delta_class(cfg.method).needs_selection:
        from .smt import eligible_targets

        return eligible_targets(model, cfg.smt_targets, layers=cfg.layers)
    return find_targets(model, kinds or cfg.targets, cfg.layers, cfg.target_modules, heads)


def task_data(cfg: TrainConfig, tokenizer, n_train: int | None, n_eval: int | None):
    """The config's task, tokenized: at most ``n_train`` training and ``n_eval`` evaluation examples."""
    from .data import DataSpec, load_task

    return load_task(DataSpec.of(cfg), tokenizer, seed=cfg.seed, max_train_samples=n_train, max_eval_samples=n_eval)


def tokenizer_of(cfg: TrainConfig):
    """The config's tokenizer, with its chat_template when one is given."""
    from .data.causal import set_chat_template

    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    set_chat_template(tokenizer, cfg.chat_template)
    return tokenizer


def _model(cfg: TrainConfig, tokenizer, info: TaskInfo):
    return load_model(cfg.model, info.kind, info.model_labels(), cfg.dtype, cfg.trust_remote_code, tokenizer,
                      cfg.allow_pickle, cfg.quantize, cfg.pooling)


def pretrained(cfg: TrainConfig, *, n_train: int | None = None, n_eval: int | None = None,
               kinds: list[str] | None = None) -> Run:
    """The model at its pretrained weights (fresh task head, seeded) with the config's slices resolved.
    ``n_train``/``n_eval`` cap the examples (default: the config's max_train_samples / max_eval_samples);
    ``kinds`` replaces the config's ``targets`` (analyses of other matrices)."""
    from transformers import set_seed

    set_seed(cfg.seed)  # the fresh task head is random: seed it
    tokenizer = tokenizer_of(cfg)
    task = task_data(cfg, tokenizer, n_train or cfg.max_train_samples, n_eval or cfg.max_eval_samples)
    info = task.as_info()
    model, tokenizer, new_modules = _model(cfg, tokenizer, info)
    heads = attach.find_heads(model, new_modules)
    return Run(cfg, model, tokenizer, task, info, resolve_targets(cfg, model, kinds, heads), heads=heads)


def _smt_selection(run: Run, resume: str | None) -> list[dict]:
    """SMT's blocks: the selection of the checkpoint being resumed (never re-selected), or a fresh warm-up
    and selection (report written to output_dir by the main process), or the user's fixed selection."""
    from . import smt

    cfg = run.cfg
    smallest = min(min(t.shape) for t in run.targets)
    if cfg.block_size > smallest:
        raise ConfigError(f"block_size: {cfg.block_size} is larger than the smallest eligible matrix side "
                          f"({smallest}); use a block size that fits, e.g. {smallest // 2 or 1}")
    if resume:
        path = os.path.join(resume, io.QKV_CONFIG)
        selection = (read_json(path, AdapterError).get("hparams") or {}).get("blocks")
        if not isinstance(selection, list) or not selection:
            raise smt.SelectionError(f"{path}: hparams.blocks must be the non-empty list of selected blocks")
        smt.check_selection(run.model, selection, cfg.block_size, path)
        return selection
    try:
        selection = smt.prepare_smt(
            run.model, run.task.train, run.task.collator, batch_size=cfg.batch_size,
            warmup_steps=cfg.smt_warmup_steps, warmup_lr=cfg.smt_warmup_lr, block_size=cfg.block_size, budget=cfg.smt_budget,
            score=cfg.smt_score, kinds=cfg.smt_targets, per_matrix=cfg.smt_per_matrix, seed=cfg.seed,
            selection_path=cfg.smt_selection, out_dir=cfg.output_dir if is_main_process() else None,
            layers=cfg.layers, heads=[run.model.get_submodule(h) for h in run.heads] if cfg.smt_warmup_head else [])
    except QkvtuneError:
        raise
    except ValueError as e:  # e.g. the data ran out before the warm-up's steps: a config problem
        raise ConfigError(str(e)) from None
    return sharding.broadcast(selection)  # several processes train the same blocks: rank 0's


def build(cfg: TrainConfig, resume: str | None = None) -> Run:
    """``pretrained(cfg)`` with the method's adapter attached (``"default"``, active and trainable) on the
    run's slices, and the fast path enabled when the config asks for it. No training."""
    run = pretrained(cfg)
    if cfg.gradient_checkpointing:  # before SMT's warm-up, which trains too
        enable_checkpointing(run.model)
    method = run.method
    hparams = method.hparams_from_config(cfg)
    if method.needs_selection:
        from .smt import targets_of

        hparams["blocks"] = _smt_selection(run, resume)
        run.targets = targets_of(run.model, hparams["blocks"])
    try:
        attach.add_adapter(run.model, run.targets, cfg.method, heads=run.heads, **hparams)
    except QkvtuneError:
        raise
    except ValueError as e:  # e.g. a rank above the matrix size: a config problem, named by its key
        raise ConfigError(str(e)) from None
    run.adapter = "default"
    fast = fastpath.resolve(cfg.fast_path)
    if fast is not None:  # after the adapter, so its dropout is covered too
        fastpath.enable(run.model, **fast)
    return run


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# --- opening finished runs -----------------------------------------------------------------------------

def run_config(run_dir: str, overrides: dict | None = None) -> TrainConfig:
    """A finished run's resolved config (``config.yaml``), with ``overrides`` applied and checked."""
    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir}: run folder not found")
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise RunError(f"{run_dir}: no config.yaml (pass a run folder written by qkvtune train)")
    cfg = load_config(path)
    return build_config({**cfg.to_dict(), **overrides}) if overrides else cfg


def _peft_folder(run_dir: str, overrides: dict | None) -> tuple[TrainConfig, TaskInfo]:
    """A plain PEFT adapter folder (no qkvtune config.yaml): the base model is ``model=…`` when given, else
    adapter_config.json's base_model_name_or_path; the model class is its task_type (SEQ_CLS, CAUSAL_LM) and
    a classifier's label count is read off its saved head."""
    path = os.path.join(run_dir, io.PEFT_CONFIG)
    peft_cfg = read_json(path, AdapterError)
    overrides = dict(overrides or {})
    model = overrides.pop("model", None) or peft_cfg.get("base_model_name_or_path")
    if not isinstance(model, str) or not model:
        raise RunError(f"{path}: no base_model_name_or_path; name the base model with model=…")
    task_type, num_labels = peft_cfg.get("task_type"), 2
    if task_type == "SEQ_CLS":  # the label count is read off the saved head
        weights = os.path.join(run_dir, io.PEFT_WEIGHTS)
        heads = [h for h in peft_cfg.get("modules_to_save") or [] if isinstance(h, str)]
        shapes = [t.shape for k, t in read_tensors(weights, AdapterError).items()
                  if any(f".{h}." in k for h in heads) and k.endswith("weight") and t.dim() == 2]
        num_labels = min(s[0] for s in shapes) if shapes else 2
    info = TaskInfo.of_peft(task_type, num_labels)
    if info is None:
        raise RunError(f"{path}: task_type {task_type!r}: only SEQ_CLS and CAUSAL_LM adapters can be opened")
    cfg = build_config({"model": model, **overrides, "output_dir": run_dir})
    return cfg, info


def _saved_task_info(run_dir: str) -> TaskInfo | None:
    meta = read_json(os.path.join(run_dir, io.QKV_CONFIG), AdapterError)
    settings = meta.get("settings")
    saved = settings.get("task") if isinstance(settings, dict) else None
    if not isinstance(saved, dict):
        return None  # written before the task was saved with the adapter: the task data decides
    try:
        info = TaskInfo(**saved)
    except TypeError:
        raise RunError(f"{os.path.join(run_dir, io.QKV_CONFIG)}: malformed settings.task {saved!r}") from None
    if not isinstance(info.num_labels, int) or isinstance(info.num_labels, bool) or info.num_labels < 0:
        raise RunError(f"{os.path.join(run_dir, io.QKV_CONFIG)}: settings.task.num_labels must be an integer >= 0")
    return info


def open_run(run_dir: str, overrides: dict | None = None, *, with_task: bool = True, n_train: int = 1,
             n_eval: int | None = None, name: str = "default", model: nn.Module | None = None,
             tokenizer=None) -> Run:
    """A finished run: its config (+ ``overrides``), base model and saved adapter (attached as ``name``,
    active). ``with_task=False`` loads no data (export, predict). Given ``model`` (a base another run opened),
    the adapter is attached there instead, inactive."""
    plain_peft = os.path.isdir(run_dir) and not os.path.exists(os.path.join(run_dir, "config.yaml")) and \
        os.path.exists(os.path.join(run_dir, io.PEFT_CONFIG)) and not os.path.exists(os.path.join(run_dir, io.QKV_CONFIG))
    if plain_peft:  # an adapter trained elsewhere: data only when a task is named
        cfg, info = _peft_folder(run_dir, overrides)
        with_task = with_task and "task" in (overrides or {})
    else:
        cfg = run_config(run_dir, overrides)
        info = _saved_task_info(run_dir)
    task = None
    shared = model is not None
    try:  # model and data are named by the run's config.yaml: say so when they cannot be loaded
        tokenizer = tokenizer or tokenizer_of(cfg)
        if with_task or info is None:
            task = task_data(cfg, tokenizer, n_train, n_eval or cfg.max_eval_samples)
            info = info or task.as_info()
        if not shared:
            from transformers import set_seed

            set_seed(cfg.seed)
            model, tokenizer, _ = _model(cfg, tokenizer, info)
    except QkvtuneError as e:
        source = io.PEFT_CONFIG if plain_peft else "config.yaml"
        raise type(e)(f"{os.path.join(run_dir, source)}: {e}") from None
    meta = io.load_adapter(model, run_dir, name, activate=not shared)
    targets = attach.adapter_info(model, name).targets
    return Run(cfg, model, tokenizer, task, info, targets, heads=list(meta.get("heads") or []), adapter=name,
               dir=run_dir)


def open_runs(run_dirs: list[str], overrides: dict | None = None, *, n_train: int = 1,
              n_eval: int | None = None) -> list[Run]:
    """Finished runs (or plain PEFT adapter folders) on one shared base model, the first one's: each adapter
    attached as r0, r1, …, none active; each ``Run`` has its own config, task and targets. ``overrides``
    (``model=…``) apply to every folder."""
    if not run_dirs:
        raise RunError("runs: none given")
    first = open_run(run_dirs[0], overrides, n_train=n_train, n_eval=n_eval, name="r0")
    attach.set_adapter(first.model, [], trainable=False)
    runs = [first]
    for i, d in enumerate(run_dirs[1:], 1):
        run = open_run(d, overrides, with_task=False, n_train=n_train, n_eval=n_eval, name=f"r{i}",
                       model=first.model, tokenizer=first.tokenizer)
        if run.cfg.task == first.cfg.task and run.cfg.data_dir == first.cfg.data_dir:
            run = replace(run, task=first.task)
        elif first.task is not None:  # another task: its own data
            run = replace(run, task=task_data(run.cfg, first.tokenizer, n_train, n_eval or run.cfg.max_eval_samples))
        runs.append(run)
    return runs


def task_settings(run: Run) -> dict:
    """What ``open_run`` needs to rebuild the model without data; saved in the adapter's settings."""
    return run.info.to_dict()
