"""``load_task``: a data spec (a task id and its data keys) becomes a tokenized ``TaskData``, through the loader of
its family; and where the data lies (``data_dir``, ``$QKVTUNE_DATA``, the hub).

Task ids: classification, regression and sft (your own CSV/TSV/JSON/JSONL/Parquet files or dataset, files.py and
sft.py), glue/<task> (nine GLUE tasks), commonsense/<name> (LLM-Adapters JSON), text/<file> (.txt, .json,
.jsonl) and builtin/vader, builtin/pydoc (offline data).

Adding a task family: its loader module (returning ``TaskData``), one branch in ``_load`` below, its id in
``spec.py``'s family tables where it offers labels or a test split, and its main metric in ``metrics.py``.
"""

from __future__ import annotations

import dataclasses
import os
import random

from ..errors import DataError
from ..files import require_file
from .spec import OWN_TABLES, DataSpec


def read_text(path: str, encoding: str = "utf-8") -> str:
    """The whole text of a data file, or a DataError naming it (missing, a folder, unreadable, not UTF-8)."""
    require_file(path, DataError)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path} row {line}: not UTF-8 text (byte {e.start})") from None


def resolve_data_dir(data_dir: str | None) -> str | None:
    """The argument, else $QKVTUNE_DATA, else None (meaning: the Hugging Face hub)."""
    data_dir = data_dir or os.environ.get("QKVTUNE_DATA") or None
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: data folder not found")
    return data_dir


def find_dir(parent: str, name: str) -> str:
    """`parent/name`, matching the folder name case-insensitively and ignoring '-' and '_'."""
    path = os.path.join(parent, name)
    if os.path.isdir(path):
        return path
    norm = lambda s: s.lower().replace("-", "").replace("_", "")
    if os.path.isdir(parent):
        for entry in sorted(os.listdir(parent)):
            if norm(entry) == norm(name) and os.path.isdir(os.path.join(parent, entry)):
                return os.path.join(parent, entry)
    raise DataError(f"{path}: folder not found")


def kind_of(task: str) -> str:
    """A task id's kind (``task.KINDS``) without loading its data: GLUE's by its label (STS-B's score is a
    regression), commonsense answers are generated, sft/text/pydoc are language modelling, your own tables are
    what their id says."""
    from ..task import CAUSAL_LM, CLASSIFICATION, QA_GENERATION, REGRESSION

    family, _, rest = task.partition("/")
    family = family.lower()
    if family == "glue":
        from .glue import TASKS

        spec = TASKS.get(rest.lower().replace("-", "").replace("_", ""))
        return REGRESSION if spec is not None and spec.values is None else CLASSIFICATION
    if family == "commonsense":
        return QA_GENERATION
    if family in ("sft", "text") or task.lower() == "builtin/pydoc":
        return CAUSAL_LM
    return REGRESSION if family == "regression" else CLASSIFICATION


def load_task(spec: DataSpec | str, tokenizer, *, seed: int = 0, **keys):
    """Load, subsample and tokenize a task: ``spec`` (a ``DataSpec``, or a task id with its data keys as keyword
    arguments: ``load_task("glue/sst2", tok, data_dir=…, max_train_samples=50)``), checked first.

    ``val_size``: hold out that many training rows (or that fraction) as the validation split that selection
    reads; the task's own dev/test set becomes ``tests``. ``shuffle_labels``: permute the training labels
    (seeded), a control run whose labels carry no information about the texts."""
    spec = DataSpec(task=spec, **keys) if isinstance(spec, str) else dataclasses.replace(spec, **keys)
    spec.check()
    if tokenizer.pad_token_id is None:
        from .examples import no_pad_message

        raise DataError(no_pad_message(tokenizer))
    data = _load(spec, tokenizer, seed)
    if spec.shuffle_labels:
        labels = list(data.train["labels"])
        random.Random(f"shuffle_labels:{seed}").shuffle(labels)
        data.train = data.train.remove_columns("labels").add_column("labels", labels)
    return data


def _load(spec: DataSpec, tokenizer, seed: int):
    task = spec.task
    family, _, rest = task.partition("/")
    family = family.lower()
    opts = dict(max_length=spec.max_length, max_train_samples=spec.max_train_samples,
                max_eval_samples=spec.max_eval_samples, seed=seed)
    held = {"val_size": spec.val_size} if spec.val_size else {}
    # Submodules are imported here, not at the top, because they import from this module.
    if family in OWN_TABLES and not rest:
        from .own import load_files_task
        return load_files_task(family, spec, tokenizer, **opts, **held)
    if family == "sft" and not rest:
        from .sft import load_sft
        return load_sft(spec, tokenizer, train_on_inputs=spec.train_on_inputs, **opts, **held)
    if family == "glue" and rest:
        from .glue import load_glue
        return load_glue(rest, tokenizer, resolve_data_dir(spec.data_dir), **opts, **held)
    if family == "commonsense" and rest:
        from .commonsense import load_commonsense
        return load_commonsense(rest, tokenizer, _local_dir(task, spec.data_dir),
                                train_on_inputs=spec.train_on_inputs, **opts, **held)
    if family == "text" and rest:
        from .text import load_text
        return load_text(rest, tokenizer, _local_dir(task, spec.data_dir), train_on_inputs=spec.train_on_inputs,
                         **opts)
    if family == "builtin" and rest:
        from .builtin import load_builtin
        return load_builtin(rest, tokenizer, **opts)
    raise DataError(f"task: unknown task {task!r}: expected classification, regression, sft, glue/<task>, "
                    "commonsense/<name>, text/<file> or builtin/vader, builtin/pydoc")


def _local_dir(task: str, data_dir: str | None) -> str:
    data_dir = resolve_data_dir(data_dir)
    if data_dir is None:
        raise DataError(f"{task} has no hub source: pass data_dir or set QKVTUNE_DATA to the data folder")
    return data_dir
