"""``text/<file>``: a causal LM on a file under ``<data_dir>/text/``: plain text (.txt) cut into blocks of
``max_length`` tokens, or Alpaca-style instruction records (.json, .jsonl) trained on their responses; the last
10% is the dev set."""

from __future__ import annotations

import os

from ...errors import DataError
from ...task import CAUSAL_LM
from ..causal import alpaca_prompt, blocks_task, causal_task, n_dev, text_blocks, tokenize_sft
from ..examples import TaskData
from ..family import Family
from ..rows import subsample
from ..sources import local_dir, read_json_records, read_text


class Text(Family):
    name = "text"
    usage = "text/<file>"
    kind = CAUSAL_LM
    metric = "loss"
    offers = frozenset({"packing"})

    def load(self, spec, tokenizer, seed: int) -> TaskData:
        file = spec.task.partition("/")[2]
        path = os.path.join(local_dir(spec.task, spec.data_dir), "text", file)
        name = f"text/{file}"
        if file.endswith(".txt"):
            blocks = text_blocks(read_text(path), tokenizer, spec.max_length, path)
            return blocks_task(name, blocks, tokenizer, spec.max_train_samples, spec.max_eval_samples, seed)
        if not file.endswith((".json", ".jsonl")):
            raise DataError(f"{path}: unsupported file type (expected .txt, .json or .jsonl)")
        records = read_json_records(path, ("instruction", "output"), ("input",))
        if len(records) < 2:
            raise DataError(f"{path}: {len(records)} record, need at least 2 (train and dev)")
        columns = {"prompt": [alpaca_prompt(r["instruction"], r.get("input", "")) for r in records],
                   "response": [r["output"] for r in records]}
        k = len(records) - n_dev(len(records))
        train = subsample({c: v[:k] for c, v in columns.items()}, spec.max_train_samples, seed)
        dev = subsample({c: v[k:] for c, v in columns.items()}, spec.max_eval_samples, None)
        encode = lambda cols, split: tokenize_sft(cols, tokenizer, spec.max_length, spec.train_on_inputs,
                                                  f"{name} {split}", path)
        return causal_task(name, encode(train, "train"), {"dev": encode(dev, "dev")}, tokenizer)


FAMILIES = (Text(),)
