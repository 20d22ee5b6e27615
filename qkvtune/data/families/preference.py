"""``task: preference``: preference pairs for DPO, as TRL's ``DPOTrainer`` reads them — a ``prompt``, the
``chosen`` answer and the ``rejected`` one, each plain text or a chat (``prompt``: a list of ``{role, content}``
turns; ``chosen``/``rejected``: the assistant's turn(s)), which TRL renders through the tokenizer's chat template.
``as_chat: true`` turns plain-text records into one-turn chats (user: the prompt, assistant: the answer).

Sources as for ``task: sft`` (``train_file``/``validation_file`` or ``dataset``; a seeded ``validation_fraction``
held out otherwise; with ``val_size`` the validation records become the test split). Every bad record is named by
file and row: one without a rejected answer, a chosen answer equal to the rejected one, an empty prompt. The
records stay text: TRL tokenizes them (``max_length`` truncates prompt + answer) and scores a run by its reward
accuracy, how often the trained model's log-ratio over the pretrained model is higher for the chosen answer."""

from __future__ import annotations

import datasets

from ...errors import DataError
from ...task import PREFERENCE
from ..examples import TaskData
from ..family import Family
from ..rows import record_splits
from ..tables import Table, read_splits
from .tables import needs_rows

KEYS = ("prompt", "chosen", "rejected")


def _text(value) -> str | None:
    """The text of a field: a string, or the contents of a chat's turns; None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return "\n".join(m["content"] for m in value)
    return None


def records(table: Table) -> list[dict]:
    """The table's rows as {prompt, chosen, rejected}, each checked and named by file and row when bad."""
    for key in KEYS:
        if key not in table.columns:
            raise DataError(f"{table.where[0][0]}: preference records need prompt, chosen and rejected; "
                            f"no {key!r} (the columns are {', '.join(table.columns)})")
    out, chat = [], None
    for i in range(len(table.where)):
        row = {k: table.columns[k][i] for k in KEYS}
        texts = {k: _text(v) for k, v in row.items()}
        if texts["rejected"] is None or not texts["rejected"].strip():
            raise DataError(f"{table.at(i)}: no rejected answer (a string, or the assistant's turns)")
        if texts["chosen"] is None or not texts["chosen"].strip():
            raise DataError(f"{table.at(i)}: no chosen answer (a string, or the assistant's turns)")
        if texts["prompt"] is None or not texts["prompt"].strip():
            raise DataError(f"{table.at(i)}: empty prompt")
        if texts["chosen"] == texts["rejected"]:
            raise DataError(f"{table.at(i)}: the chosen answer equals the rejected one")
        if isinstance(row["prompt"], str) != isinstance(row["chosen"], str) or \
                isinstance(row["chosen"], str) != isinstance(row["rejected"], str):
            raise DataError(f"{table.at(i)}: prompt, chosen and rejected must all be text or all be chats")
        if chat is None:
            chat = not isinstance(row["prompt"], str)
        elif chat == isinstance(row["prompt"], str):
            raise DataError(f"{table.at(i)}: {'text' if chat else 'chat'} records are expected, as in the first row")
        out.append(row)
    return out


def as_chats(rows: list[dict]) -> list[dict]:
    """Plain-text records as one-turn chats (user: the prompt; assistant: each answer)."""
    turn = lambda role, text: [{"role": role, "content": text}] if isinstance(text, str) else text
    return [{"prompt": turn("user", r["prompt"]), "chosen": turn("assistant", r["chosen"]),
             "rejected": turn("assistant", r["rejected"])} for r in rows]


class Preference(Family):
    name = usage = "preference"
    named = False
    kind = PREFERENCE
    metric = "rewards/accuracies"  # TRL's name: the share of pairs whose chosen answer gains the larger reward
    offers = frozenset({"val_size", "as_chat"})

    def check(self, spec) -> None:
        needs_rows(spec)

    def load(self, spec, tokenizer, seed: int) -> TaskData:
        train, dev, _ = read_splits(spec, seed)
        chosen, evals, tests = record_splits(records(train), records(dev), spec, seed)
        convert = as_chats if spec.as_chat else (lambda r: r)
        as_ds = lambda r: datasets.Dataset.from_list(convert(r))
        return TaskData(name="preference", kind=PREFERENCE, num_labels=0, label_names=None, train=as_ds(chosen),
                        evals={n: as_ds(r) for n, r in evals.items()}, tests={n: as_ds(r) for n, r in tests.items()},
                        collator=None, compute_metrics=None, metric_for_best=self.metric, greater_is_better=True)


FAMILIES = (Preference(),)
