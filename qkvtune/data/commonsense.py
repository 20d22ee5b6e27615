"""Commonsense QA in the LLM-Adapters layout (<data_dir>/commonsense/<name>/{train,test}.json),
trained as instruction following and scored by generating and extracting the answer label."""
import os
import re

from ..errors import DataError
from ..task import QA_GENERATION
from .examples import TaskData
from .load import find_dir
from .spec import split_train, subsample
from .text import alpaca_prompt, causal_task, encode_prompts, read_json_records, tokenize_sft

FIELDS = ("instruction", "input", "output", "answer")


def load_commonsense(name: str, tokenizer, data_dir: str, *, max_length: int, max_train_samples, max_eval_samples,
                     seed, train_on_inputs: bool, val_size: int | float | None = None) -> TaskData:
    folder = find_dir(os.path.join(data_dir, "commonsense"), name)
    test = read_json_records(os.path.join(folder, "test.json"), FIELDS)
    train = read_json_records(os.path.join(folder, "train.json"), FIELDS)
    choices = sorted({r["answer"] for r in train + test})  # from all the data, before subsampling

    def columns(records):
        return {"prompt": [alpaca_prompt(r["instruction"], r["input"]) for r in records],
                "response": [r["output"] for r in records], "answer": [r["answer"] for r in records]}

    task = f"commonsense/{os.path.basename(folder)}"
    train, validation = split_train(columns(train), max_train_samples, val_size, seed)
    test = subsample(columns(test), max_eval_samples, None)
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


def extract_answer(text: str, choices: list[str]) -> str | None:
    """The choice occurring first in `text` as a whole word, case-insensitively; None if none does.

    A generic form of LLM-Adapters' per-dataset regexes. Alternatives are tried longest first and
    must not touch a word character on either side, so "answer10" never reads as "answer1".
    """
    if not choices:
        return None
    alts = "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))
    m = re.search(rf"(?<!\w)(?:{alts})(?!\w)", text, flags=re.IGNORECASE)
    if m is None:
        return None
    found = m.group(0).lower()
    return next(c for c in choices if c.lower() == found)


def generation_accuracy(model, tokenizer, records: list[dict], *, batch_size: int = 8, max_new_tokens: int = 32,
                        choices: list[str] | None = None) -> dict:
    """Greedy-generate a response to each record's prompt and score the extracted answer (``predictions``: the
    answer extracted from each response, None where none was found).

    records: [{"prompt": str, "answer": str}]; choices defaults to the distinct answers in records
    (pass TaskData.answer_choices to extract over the full label set).
    """
    from ..inference import generate

    if tokenizer.pad_token_id is None:
        raise DataError("tokenizer has no pad token; set one, e.g. tokenizer.pad_token = tokenizer.eos_token")
    choices = choices if choices is not None else sorted({r["answer"] for r in records})
    texts = generate(model, tokenizer, encode_prompts(tokenizer, [r["prompt"] for r in records]),
                     batch_size=batch_size, max_new_tokens=max_new_tokens)
    predictions = [extract_answer(text, choices) for text in texts]
    correct = sum(p == r["answer"] for p, r in zip(predictions, records))
    return {"accuracy": correct / len(records) if records else 0.0, "n": len(records), "predictions": predictions}
