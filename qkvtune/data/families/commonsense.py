"""``commonsense/<name>``: commonsense QA in the LLM-Adapters layout (<data_dir>/commonsense/<name>/{train,test}.json),
trained as instruction following and scored by generating and extracting the answer label (``answers.py``)."""

from __future__ import annotations

import os

from ...task import QA_GENERATION
from ..causal import alpaca_prompt, causal_task, tokenize_sft
from ..examples import TaskData
from ..family import Family
from ..rows import split_train, subsample
from ..sources import find_dir, local_dir, read_json_records

FIELDS = ("instruction", "input", "output", "answer")


class Commonsense(Family):
    name = "commonsense"
    usage = "commonsense/<name>"
    discovers = "commonsense/<name>"
    kind = QA_GENERATION
    metric = "accuracy"  # of the answers generated
    offers = frozenset({"val_size"})

    def load(self, spec, tokenizer, seed: int) -> TaskData:
        name = spec.task.partition("/")[2]
        folder = find_dir(os.path.join(local_dir(spec.task, spec.data_dir), "commonsense"), name)
        max_length, train_on_inputs = spec.max_length, spec.train_on_inputs
        test = read_json_records(os.path.join(folder, "test.json"), FIELDS)
        train = read_json_records(os.path.join(folder, "train.json"), FIELDS)
        choices = sorted({r["answer"] for r in train + test})  # from all the data, before subsampling

        def columns(records):
            return {"prompt": [alpaca_prompt(r["instruction"], r["input"]) for r in records],
                    "response": [r["output"] for r in records], "answer": [r["answer"] for r in records]}

        task = f"commonsense/{os.path.basename(folder)}"
        train, validation = split_train(columns(train), spec.max_train_samples, spec.val_size, seed)
        test = subsample(columns(test), spec.max_eval_samples, None)
        sets = {"test": (test, "test.json")} if validation is None else \
            {"validation": (validation, "train.json"), "test": (test, "test.json")}
        tokenized = {k: tokenize_sft(v, tokenizer, max_length, train_on_inputs, f"{task} {k}", os.path.join(folder, f))
                     for k, (v, f) in sets.items()}
        data = causal_task(task, tokenize_sft(train, tokenizer, max_length, train_on_inputs, f"{task} train",
                                              os.path.join(folder, "train.json")),
                           {k: v for k, v in tokenized.items() if validation is None or k == "validation"},
                           tokenizer, kind=QA_GENERATION)
        if validation is not None:  # test.json becomes the test split: scored once, never selected on
            data.tests = {"test": tokenized["test"]}
        data.generation_records = {k: [{"prompt": p, "answer": a} for p, a in zip(v["prompt"], v["answer"])]
                                   for k, (v, _) in sets.items()}
        data.answer_choices = choices
        return data

    def discover(self, data_dir: str) -> list[str]:
        """``commonsense/<name>`` for each folder with a train.json and a test.json."""
        cs = os.path.join(data_dir, "commonsense")
        if not os.path.isdir(cs):
            return []
        return [f"commonsense/{entry}" for entry in sorted(os.listdir(cs))
                if all(os.path.exists(os.path.join(cs, entry, f)) for f in ("train.json", "test.json"))]


FAMILIES = (Commonsense(),)
