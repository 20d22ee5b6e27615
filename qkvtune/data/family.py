"""The task-family contract: one file in ``data/families/`` declares everything qkvtune knows about the task ids
it owns, as a ``Delta`` subclass does for a method.

A family is named by a task id's first part: ``glue/sst2`` belongs to ``glue``, ``classification`` to itself
(an id without "/"). It declares

* the task's **kind** (``task.TASK_KINDS``: classification, regression, causal LM, generated answers), which
  decides the model, the loss, chunked loss and generation scoring (``TaskInfo`` answers those from the kind);
* its **main metric** (what selection, reports, the claims suite and plan compare);
* which **data keys it offers** beyond those every family takes (``val_size``, ``shuffle_labels``, ``packing``,
  ``as_chat``), and any rule of its own on the keys (``check``);
* its **loader** (``load``: a checked ``DataSpec`` to a tokenized ``TaskData``);
* how a data folder holds its tasks (``discover``, for the benchmarks) and the run settings that name one.

``families.family_of`` finds the family of a task id; nothing else asks what a task id looks like.
"""

from __future__ import annotations

from ..task import CLASSIFICATION

OPTIONAL_KEYS = ("val_size", "shuffle_labels", "packing", "as_chat", "reward")  # data keys only some families honour


class Family:
    name: str = ""                 # the id's first part (glue), or the whole id (classification)
    named: bool = True             # ids are <name>/<task>; False: the id is the name alone
    usage: str = ""                # how its ids are written, for messages: "glue/<task>"
    kind: str = CLASSIFICATION     # task.TASK_KINDS, for every id of the family (else override task_kind)
    metric: str = "accuracy"       # its main metric (else override main_metric)
    discovers: str = ""            # the ids ``discover`` returns, for messages: "sft/<file under text/>"
    offers: frozenset[str] = frozenset()  # of OPTIONAL_KEYS, by some id of the family (override offered to
                                          # say which ids)

    def owns(self, task: str) -> bool:
        first, slash, rest = task.partition("/")
        return first.lower() == self.name and (bool(rest) if self.named else not slash)

    def task_kind(self, task: str) -> str:
        return self.kind

    def main_metric(self, task: str) -> str:
        return self.metric

    def offered(self, task: str) -> frozenset[str]:
        """The optional data keys (``OPTIONAL_KEYS``) a run of ``task`` may set."""
        return self.offers

    def check(self, spec) -> None:
        """The family's own rules on the data keys (a ``ConfigError`` naming the key), before any data is read."""

    def load(self, spec, tokenizer, seed: int):
        """The task's ``TaskData``: ``spec`` (a checked ``DataSpec``) says what to read and how much."""
        raise NotImplementedError

    def discover(self, data_dir: str) -> list[str]:
        """The ids of this family's tasks that a data folder laid out like shared/datasets holds (the benchmarks'
        task slots); [] for a family whose tasks are not found that way."""
        return []

    def run_settings(self, task: str, data_dir: str | None) -> dict:
        """The run settings that name a task ``discover`` found (its id, where that is a task id itself)."""
        return {"task": task}

    @property
    def short(self) -> str:
        """The family in a list of families: "glue/…" or "sft"."""
        return f"{self.name}/…" if self.named else self.name
