"""``glue/<task>``: the nine GLUE tasks, from the original TSV download (<data_dir>/glue/<FOLDER>/) or from the
hub (nyu-mll/glue), each with GLUE's own main metric."""
from __future__ import annotations

import csv
import functools
import io
import math
import os
from dataclasses import dataclass

import datasets

from ...errors import DataError
from ...task import CLASSIFICATION, REGRESSION
from ..examples import PadCollator, TaskData, tokenize_texts
from ..family import Family
from ..metrics import accuracy, accuracy_f1, correlations, matthews
from ..rows import split_train, subsample
from ..sources import find_dir, normalise, read_text, resolve_data_dir


@dataclass(frozen=True)
class Spec:
    folder: str
    a: str | int  # text column: header name, or position in a header-less file (CoLA)
    b: str | int | None  # second text of a pair
    label: str | int
    values: tuple[str, ...] | None  # raw label strings in the hub's index order; None = float score
    names: tuple[str, ...] | None  # hub label names
    hub: tuple[str, str | None]  # text columns on the hub
    metric: str = "accuracy"  # GLUE's main metric of the task (every one greater-is-better)


NLI2 = ("entailment", "not_entailment")
TASKS = {
    "cola": Spec("CoLA", 3, None, 1, ("0", "1"), ("unacceptable", "acceptable"), ("sentence", None),
                 "matthews_correlation"),
    "sst2": Spec("SST-2", "sentence", None, "label", ("0", "1"), ("negative", "positive"), ("sentence", None)),
    "mrpc": Spec("MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("not_equivalent", "equivalent"),
                 ("sentence1", "sentence2"), "f1"),
    "stsb": Spec("STS-B", "sentence1", "sentence2", "score", None, None, ("sentence1", "sentence2"), "pearson"),
    "qqp": Spec("QQP", "question1", "question2", "is_duplicate", ("0", "1"), ("not_duplicate", "duplicate"),
                ("question1", "question2"), "f1"),
    "mnli": Spec("MNLI", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"),
                 ("entailment", "neutral", "contradiction"), ("premise", "hypothesis")),
    "qnli": Spec("QNLI", "question", "sentence", "label", NLI2, NLI2, ("question", "sentence")),
    "rte": Spec("RTE", "sentence1", "sentence2", "label", NLI2, NLI2, ("sentence1", "sentence2")),
    "wnli": Spec("WNLI", "sentence1", "sentence2", "label", ("0", "1"), ("not_entailment", "entailment"),
                 ("sentence1", "sentence2")),
}
COLA_COLUMNS = 4  # source, label, original label, sentence
COMPUTE = {"accuracy": accuracy, "f1": accuracy_f1, "matthews_correlation": matthews, "pearson": correlations}


def read_tsv(path: str, spec: Spec) -> dict[str, list]:
    """Columns text_a, (text_b), label of one GLUE TSV file, validated row by row. Read once per version of the
    file (its path, inode, size and modification time): a process that loads a task many times (the claims suite's
    runs) parses SST-2's 67k rows once. The caller gets its own lists."""
    try:
        st = os.stat(path)
    except OSError:
        return _read_tsv(path, spec)  # let the reader name the problem
    cols = _read_tsv_cached(os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, spec)
    return {k: list(v) for k, v in cols.items()}


@functools.lru_cache(maxsize=8)
def _read_tsv_cached(path: str, inode: int, size: int, mtime_ns: int, spec: Spec) -> dict[str, list]:
    return _read_tsv(path, spec)


def _read_tsv(path: str, spec: Spec) -> dict[str, list]:
    text = read_text(path, "utf-8-sig")  # utf-8-sig: MRPC starts with a BOM
    if "\0" in text:
        raise DataError(f"{path} row {text[:text.index(chr(0))].count(chr(10)) + 1}: NUL byte in a text file")
    try:
        return _read_rows(text, path, spec)
    except csv.Error as e:  # e.g. a field beyond the csv module's size limit
        raise DataError(f"{path}: not a readable TSV file ({e})") from None


def _read_rows(text: str, path: str, spec: Spec) -> dict[str, list]:
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = ((reader.line_num, row) for row in reader if row)  # skip blank lines
        first = next(rows, None)
        if first is None:
            raise DataError(f"{path}: empty file")
        if isinstance(spec.label, int):  # header-less: the first row is data
            ncols, rows = COLA_COLUMNS, _chain(first, rows)
            cols = [spec.a, spec.b, spec.label]
        else:
            line, header = first
            ncols = len(header)
            for name in (spec.a, spec.b, spec.label):
                if name is not None and name not in header:
                    raise DataError(f"{path} row {line}: header has no column {name!r}")
            cols = [header.index(c) if c is not None else None for c in (spec.a, spec.b, spec.label)]
        a, b, y = cols
        out = {"text_a": [], "text_b": [], "label": []}
        for line, row in rows:
            if len(row) != ncols:
                raise DataError(f"{path} row {line}: expected {ncols} tab-separated columns, found {len(row)}")
            out["text_a"].append(row[a])
            if b is not None:
                out["text_b"].append(row[b])
            out["label"].append(_label(row[y].strip(), spec, path, line))
    if not out["label"]:
        raise DataError(f"{path}: no data rows")
    if b is None:
        del out["text_b"]
    return out


def _chain(first, rest):
    yield first
    yield from rest


def _label(raw: str, spec: Spec, path: str, line: int):
    if spec.values is None:
        try:
            score = float(raw)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise DataError(f"{path} row {line}: score {raw!r} is not a number")
        return score
    if raw not in spec.values:
        raise DataError(f"{path} row {line}: label {raw!r} is not one of {', '.join(spec.values)}")
    return spec.values.index(raw)


def _from_hub(task: str, spec: Spec, eval_splits: dict[str, str]):
    try:
        ds = datasets.load_dataset("nyu-mll/glue", task)
    except Exception as e:  # offline, no hub access, ...: say how to use local files instead
        raise DataError(f"GLUE {task}: could not load from the Hugging Face hub ({e}); "
                        "pass data_dir or set QKVTUNE_DATA to a folder with glue/<TASK>/*.tsv") from e
    a, b = spec.hub

    def columns(split):
        out = {"text_a": list(ds[split][a]), "label": list(ds[split]["label"])}
        if b is not None:
            out["text_b"] = list(ds[split][b])
        return out

    return columns("train"), {name: columns(split) for name, split in eval_splits.items()}


class Glue(Family):
    name = "glue"
    usage = "glue/<task>"
    discovers = "glue/<task>"
    offers = frozenset({"val_size", "shuffle_labels"})

    def spec(self, task: str) -> Spec:
        name = task.partition("/")[2]
        spec = TASKS.get(normalise(name))
        if spec is None:
            raise DataError(f"unknown GLUE task {name!r}; known: {', '.join(TASKS)}")
        return spec

    def task_kind(self, task: str) -> str:
        spec = TASKS.get(normalise(task.partition("/")[2]))
        return REGRESSION if spec is not None and spec.values is None else CLASSIFICATION

    def main_metric(self, task: str) -> str:
        spec = TASKS.get(normalise(task.partition("/")[2]))
        return spec.metric if spec is not None else "accuracy"

    def load(self, spec_, tokenizer, seed: int) -> TaskData:
        spec = self.spec(spec_.task)
        task = normalise(spec_.task.partition("/")[2])
        data_dir = resolve_data_dir(spec_.data_dir)
        if data_dir is None:
            hub_splits = {"matched": "validation_matched", "mismatched": "validation_mismatched"} \
                if task == "mnli" else {"dev": "validation"}
            train, evals = _from_hub(task, spec, hub_splits)
        else:
            folder = find_dir(os.path.join(data_dir, "glue"), spec.folder)
            files = {"matched": "dev_matched.tsv", "mismatched": "dev_mismatched.tsv"} \
                if task == "mnli" else {"dev": "dev.tsv"}
            evals = {k: read_tsv(os.path.join(folder, f), spec) for k, f in files.items()}
            train = read_tsv(os.path.join(folder, "train.tsv"), spec)

        train, validation = split_train(train, spec_.max_train_samples, spec_.val_size, seed)
        evals = {k: subsample(v, spec_.max_eval_samples, None) for k, v in evals.items()}
        tests = {}
        if validation is not None:  # the dev files become the test split: scored once, never selected on
            tests, evals = evals, {"validation": validation}
        max_length = spec_.max_length
        tokenize = lambda sets: {k: tokenize_texts(v, tokenizer, max_length, f"glue/{task} {k}") for k, v in sets.items()}
        return TaskData(
            name=f"glue/{task}",
            kind=REGRESSION if spec.values is None else CLASSIFICATION,
            num_labels=1 if spec.values is None else len(spec.values),
            label_names=list(spec.names) if spec.names else None,
            train=tokenize_texts(train, tokenizer, max_length, f"glue/{task} train"),
            evals=tokenize(evals),
            tests=tokenize(tests),
            collator=PadCollator(tokenizer),
            compute_metrics=COMPUTE[spec.metric],
            metric_for_best=spec.metric,
            greater_is_better=True,
        )

    def discover(self, data_dir: str) -> list[str]:
        """``glue/<task>`` for each GLUE folder with a train.tsv."""
        glue = os.path.join(data_dir, "glue")
        if not os.path.isdir(glue):
            return []
        return [f"glue/{normalise(entry)}" for entry in sorted(os.listdir(glue))
                if normalise(entry) in TASKS and os.path.exists(os.path.join(glue, entry, "train.tsv"))]


FAMILIES = (Glue(),)
