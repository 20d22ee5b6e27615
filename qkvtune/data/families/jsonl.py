"""``jsonl/<file>``: classification records in JSON lines, a file under ``<data_dir>/jsonl/``: ``{"text": …,
"label": …}`` per line, with ``"text_pair"`` for sentence pairs. Read as ``task: classification`` reads a table
(labels in sorted order, a seeded ``validation_fraction`` held out, every bad row named by file and row), so a
folder of such files is a set of tasks named by file."""

from __future__ import annotations

import dataclasses
import os

from ...errors import DataError
from ...task import CLASSIFICATION
from ..examples import TaskData
from ..family import Family
from ..sources import first_json_record, local_dir
from .tables import Tables


class JsonLines(Family):
    name = "jsonl"
    usage = "jsonl/<file>"
    offers = frozenset({"val_size", "shuffle_labels"})

    def load(self, spec, tokenizer, seed: int) -> TaskData:
        file = spec.task.partition("/")[2]
        path = os.path.join(local_dir(spec.task, spec.data_dir), "jsonl", file)
        if not file.endswith(".jsonl"):
            raise DataError(f"{path}: expected a .jsonl file of {{\"text\": …, \"label\": …}} records")
        first = first_json_record(path) or {}
        columns = ["text", "text_pair"] if "text_pair" in first else ["text"]
        table = dataclasses.replace(spec, task=CLASSIFICATION, train_file=path, dataset=None,
                                    text_columns=columns, label_column="label")
        data = Tables(CLASSIFICATION, self.metric).load(table, tokenizer, seed)
        data.name = f"jsonl/{file}"
        return data


FAMILIES = (JsonLines(),)
