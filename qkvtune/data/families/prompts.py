"""``task: prompts``: prompts to answer, trained by RL (``objective: grpo``, TRL's GRPOTrainer) on the rewards the
config names (``rewards.py``): a ``prompt`` per record (plain text, or a chat: a list of ``{role, content}``), and
an ``answer`` where a reward checks one (``reward: answer``). ``as_chat: true`` turns a text prompt into a one-turn
chat (the user's), which TRL renders through the tokenizer's chat template.

Sources as for ``task: sft``; every bad record is named by file and row (an empty prompt, a missing or empty
answer). The records stay text: TRL tokenizes the prompts and generates the answers it rewards. A run is scored
by the mean reward of the model's greedy answers to the held-out prompts."""

from __future__ import annotations

import datasets

from ...errors import DataError
from ...task import REWARD
from ..examples import TaskData
from ..family import Family
from ..rows import record_splits
from ..tables import Table, read_splits
from .preference import _text
from .tables import needs_rows


def records(table: Table, need_answer: bool) -> list[dict]:
    if "prompt" not in table.columns:
        raise DataError(f"{table.where[0][0]}: prompt records need a 'prompt' (the columns are "
                        f"{', '.join(table.columns)})")
    if need_answer and "answer" not in table.columns:
        raise DataError(f"{table.where[0][0]}: reward answer checks each record's 'answer'; the file has none")
    out = []
    for i in range(len(table.where)):
        prompt = table.columns["prompt"][i]
        text = _text(prompt)
        if text is None or not text.strip():
            raise DataError(f"{table.at(i)}: empty prompt")
        row = {"prompt": prompt}
        if "answer" in table.columns:
            answer = table.columns["answer"][i]
            if need_answer and (answer is None or not str(answer).strip()):
                raise DataError(f"{table.at(i)}: no answer for the reward to check")
            row["answer"] = "" if answer is None else str(answer)
        out.append(row)
    return out


class Prompts(Family):
    name = usage = "prompts"
    named = False
    kind = REWARD
    metric = "reward"  # the mean reward of greedy answers to held-out prompts
    offers = frozenset({"val_size", "as_chat", "reward"})

    def check(self, spec) -> None:
        from ...rewards import reward_functions

        needs_rows(spec)
        reward_functions(spec.reward)  # one line naming reward for a spec that names no reward

    def load(self, spec, tokenizer, seed: int) -> TaskData:
        from ...rewards import names

        need_answer = "answer" in names(spec.reward)
        train, dev, _ = read_splits(spec, seed)
        chosen, evals, tests = record_splits(records(train, need_answer), records(dev, need_answer), spec, seed)
        chat = (lambda r: {**r, "prompt": [{"role": "user", "content": r["prompt"]}]}
                if isinstance(r["prompt"], str) else r) if spec.as_chat else (lambda r: r)
        as_ds = lambda rows: datasets.Dataset.from_list([chat(r) for r in rows])
        return TaskData(name="prompts", kind=REWARD, num_labels=0, label_names=None, train=as_ds(chosen),
                        evals={n: as_ds(r) for n, r in evals.items()}, tests={n: as_ds(r) for n, r in tests.items()},
                        collator=None, compute_metrics=None, metric_for_best=self.metric, greater_is_better=True)


FAMILIES = (Prompts(),)
