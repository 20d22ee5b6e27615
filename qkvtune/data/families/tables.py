"""``task: classification`` and ``task: regression``: your own tables (``tables.py``: files or a dataset) with the
text and label columns named in the config (``text_columns``, ``label_column``), as in transformers'
``run_glue.py``.

Labels: strings map to ids in sorted order unless ``labels`` gives the order; integers the same way (so
0..K-1 stay themselves); regression labels are floats. Without a validation file or split, a seeded
``validation_fraction`` of the training rows is held out. Every bad row is named by file and row.
"""

from __future__ import annotations

from ...errors import ConfigError, DataError
from ...task import CLASSIFICATION, REGRESSION
from ..examples import PadCollator, TaskData, tokenize_texts
from ..family import Family
from ..metrics import classification_metrics, regression_metrics
from ..rows import split_train, subsample, text_columns
from ..tables import Table, check_columns, class_ids, label_names, number, read_splits, texts

SOURCES = "train_file (CSV, TSV, JSON, JSONL or Parquet) or dataset"


def needs_rows(spec) -> None:
    """A family of your own data reads ``train_file`` or ``dataset``: exactly one of them."""
    if not spec.train_file and not spec.dataset:
        raise ConfigError(f"task: {spec.task} needs {SOURCES}")


class Tables(Family):
    named = False
    offers = frozenset({"val_size", "shuffle_labels"})

    def __init__(self, kind: str, metric: str):
        self.name = self.usage = self.kind = kind
        self.metric = metric

    def check(self, spec) -> None:
        needs_rows(spec)
        if spec.text_columns is None:
            raise ConfigError(f"text_columns: task {spec.task} needs the text column(s), e.g. text_columns: [sentence]")

    def load(self, spec, tokenizer, seed: int) -> TaskData:
        """With ``val_size`` the validation rows come out of the training rows and the validation data becomes
        the test split."""
        kind = self.kind
        train, dev, source = read_splits(spec, seed)
        text_cols = text_columns(spec.text_columns, train.columns, source)
        check_columns(train, text_cols + [spec.label_column], source)
        check_columns(dev, text_cols + [spec.label_column], dev.where[0][0] if dev.where else "validation")
        if kind == CLASSIFICATION:
            names = label_names([train, dev], spec.label_column, spec.labels)
            labels = {"train": class_ids(train, spec.label_column, names),
                      "dev": class_ids(dev, spec.label_column, names)}
            if len(names) < 2:
                raise DataError(f"{spec.label_column}: the training data has a single class {names}")
        else:
            names = None
            labels = {s: [number(v, t.at(i), spec.label_column) for i, v in enumerate(t.columns[spec.label_column])]
                      for s, t in (("train", train), ("dev", dev))}

        def columns(t: Table, split: str) -> dict[str, list]:
            out = {"text_a": texts(t, text_cols[0]), "label": labels[split]}
            if len(text_cols) == 2:
                out["text_b"] = texts(t, text_cols[1])
            return out

        tr, val = split_train(columns(train, "train"), spec.max_train_samples, spec.val_size, seed)
        dv = subsample(columns(dev, "dev"), spec.max_eval_samples, None)
        evals, tests = ({"validation": val}, {"test": dv}) if val is not None else ({"dev": dv}, {})
        tokenize = lambda sets: {k: tokenize_texts(v, tokenizer, spec.max_length, f"{kind} {k}")
                                 for k, v in sets.items()}
        return TaskData(
            name=kind, kind=kind, num_labels=len(names) if names else 1, label_names=names,
            train=tokenize_texts(tr, tokenizer, spec.max_length, f"{kind} train"),
            evals=tokenize(evals), tests=tokenize(tests),
            collator=PadCollator(tokenizer),
            compute_metrics=classification_metrics(len(names)) if names else regression_metrics,
            metric_for_best=self.metric, greater_is_better=True)


FAMILIES = (Tables(CLASSIFICATION, "accuracy"), Tables(REGRESSION, "pearson"))
