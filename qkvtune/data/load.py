"""``load_task``: a data spec (a task id and its data keys) becomes a tokenized ``TaskData``, through the loader of
the task's family (``families/``)."""

from __future__ import annotations

import dataclasses
import random

from ..errors import DataError
from .families import family_of
from .spec import DataSpec


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
    data = family_of(spec.task).load(spec, tokenizer, seed)
    if spec.shuffle_labels:
        labels = list(data.train["labels"])
        random.Random(f"shuffle_labels:{seed}").shuffle(labels)
        data.train = data.train.remove_columns("labels").add_column("labels", labels)
    return data
