"""``builtin/vader`` and ``builtin/pydoc``: offline tasks from data that ships with installed packages (no
download needed): the VADER sentiment lexicon's human-rated words (classification) and CPython's documentation
topics (a causal LM)."""

from __future__ import annotations

import importlib.util
import os
import random

import pydoc_data.topics

from ...errors import DataError
from ...task import CAUSAL_LM, CLASSIFICATION
from ..causal import blocks_task, text_blocks
from ..examples import PadCollator, TaskData, tokenize_texts
from ..family import Family
from ..metrics import accuracy
from ..rows import subsample

SPLIT_SEED = 0  # the vader train/dev split never moves with the training seed


def vader_lexicon() -> dict[str, list]:
    """Columns text_a, label of the VADER sentiment lexicon: words rated |mean| >= 1 by humans."""
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("builtin/vader needs the vaderSentiment package: pip install 'qkvtune[offline]'")
    path = os.path.join(spec.submodule_search_locations[0], "vader_lexicon.txt")
    means = {}  # a few tokens appear twice; the later line wins, as in vaderSentiment itself
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\r\n").split("\t")
            if not fields[0]:
                continue
            try:
                means[fields[0]] = float(fields[1])
            except (IndexError, ValueError):
                raise DataError(f"{path} row {n}: expected token<TAB>mean<TAB>std<TAB>scores") from None
    strong = [(w, m) for w, m in means.items() if abs(m) >= 1.0]  # near-neutral words have no clear polarity
    return {"text_a": [w for w, _ in strong], "label": [int(m > 0) for _, m in strong]}


class Builtin(Family):
    name = "builtin"
    usage = "builtin/vader, builtin/pydoc"
    offers = frozenset({"shuffle_labels"})  # vader's labels
    TASKS = {"vader": (CLASSIFICATION, "accuracy"), "pydoc": (CAUSAL_LM, "loss")}

    def _of(self, task: str) -> tuple[str, str]:
        return self.TASKS.get(task.partition("/")[2].lower(), (CLASSIFICATION, "accuracy"))

    def task_kind(self, task: str) -> str:
        return self._of(task)[0]

    def main_metric(self, task: str) -> str:
        return self._of(task)[1]

    def offered(self, task: str) -> frozenset[str]:
        return self.offers if task.partition("/")[2].lower() == "vader" else frozenset()

    def load(self, spec, tokenizer, seed: int) -> TaskData:
        name = spec.task.partition("/")[2].lower()
        if name == "pydoc":
            topics = pydoc_data.topics.topics
            text = "\n\n".join(topics[k] for k in sorted(topics))
            blocks = text_blocks(text, tokenizer, spec.max_length, "pydoc_data.topics")
            return blocks_task("builtin/pydoc", blocks, tokenizer, spec.max_train_samples, spec.max_eval_samples, seed)
        if name != "vader":
            raise DataError(f"unknown builtin task {name!r}; known: vader, pydoc")
        lex = vader_lexicon()
        order = list(range(len(lex["label"])))
        random.Random(SPLIT_SEED).shuffle(order)
        k = int(0.8 * len(order))
        split = lambda idx: {c: [v[i] for i in idx] for c, v in lex.items()}
        train = subsample(split(order[:k]), spec.max_train_samples, seed)
        dev = subsample(split(order[k:]), spec.max_eval_samples, None)
        return TaskData(
            name="builtin/vader", kind=CLASSIFICATION, num_labels=2, label_names=["negative", "positive"],
            train=tokenize_texts(train, tokenizer, spec.max_length, "builtin/vader train"),
            evals={"dev": tokenize_texts(dev, tokenizer, spec.max_length, "builtin/vader dev")},
            collator=PadCollator(tokenizer), compute_metrics=accuracy, metric_for_best="accuracy",
            greater_is_better=True,
        )


FAMILIES = (Builtin(),)
