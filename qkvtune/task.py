"""What a model needs to know about its task, asked in one place.

A task's *kind* decides the model class, the loss, what evaluation computes and what analyses read:

* ``classification``: a sequence classifier (a head over ``num_labels`` classes);
* ``regression``: a sequence classifier with one output (its score);
* ``causal_lm``: a causal LM trained and scored by its language-model loss;
* ``qa_generation``: a causal LM trained on responses and scored by the answers it generates;
* ``preference``: a causal LM trained on preference pairs (a chosen and a rejected answer to a prompt: DPO) and
  scored by how often it prefers the chosen one over the pretrained model (reward accuracy);
* ``reward``: a causal LM trained by RL on prompts (GRPO) and scored by the mean reward of its answers.

``TaskInfo`` holds the kind and labels; it is saved with every adapter (so a run opens without its data), is
the base of ``data.TaskData`` (so every loaded task answers the same questions), and is read off a model
folder's ``config.json`` or a PEFT adapter's ``task_type`` where there is no task. Nothing else compares kind
strings.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

CLASSIFICATION, REGRESSION, CAUSAL_LM, QA_GENERATION = "classification", "regression", "causal_lm", "qa_generation"
PREFERENCE, REWARD = "preference", "reward"
TASK_KINDS = (CLASSIFICATION, REGRESSION, CAUSAL_LM, QA_GENERATION, PREFERENCE, REWARD)


def is_causal_lm(model=None, *, architectures: list[str] | None = None) -> bool:
    """Whether a model (or a config's ``architectures``) is a causal LM: transformers' ``*ForCausalLM``."""
    names = architectures if architectures is not None else [type(model).__name__]
    return any(n.endswith("ForCausalLM") for n in names or ())


def is_sequence_classifier(model=None, *, architectures: list[str] | None = None) -> bool:
    """Whether a model (or a config's ``architectures``) is transformers' ``*ForSequenceClassification``."""
    names = architectures if architectures is not None else [type(model).__name__]
    return any(n.endswith("ForSequenceClassification") for n in names or ())


@dataclass
class TaskInfo:
    kind: str                      # one of TASK_KINDS
    num_labels: int                # classes; 1 for regression; 0 for causal LM kinds
    label_names: list[str] | None = None

    @property
    def causal_lm(self) -> bool:
        """A causal LM (language-model loss; label words; generation), not a sequence classifier."""
        return self.kind in (CAUSAL_LM, QA_GENERATION, PREFERENCE, REWARD)

    @property
    def sequence_classifier(self) -> bool:
        """A sequence-classification model with a task head (classes or a score)."""
        return self.kind in (CLASSIFICATION, REGRESSION)

    @property
    def regression(self) -> bool:
        return self.kind == REGRESSION

    @property
    def preference(self) -> bool:
        """A causal LM trained on preference pairs and scored by reward accuracy (TRL's DPO), not by its loss."""
        return self.kind == PREFERENCE

    @property
    def rewarded(self) -> bool:
        """A causal LM trained by RL on prompts (TRL's GRPO) and scored by the rewards of its answers."""
        return self.kind == REWARD

    @property
    def scored_by_generation(self) -> bool:
        """A causal LM scored by the answers it generates (not by its loss and perplexity)."""
        return self.kind == QA_GENERATION

    @property
    def peft_task_type(self) -> str:
        """PEFT's name for this task's model (``LoraConfig.task_type``; ``of_peft`` reads it back)."""
        return "CAUSAL_LM" if self.causal_lm else "SEQ_CLS"

    @property
    def kernel_output(self) -> str:
        """The scalar(s) the NTK differentiates: the margin of a binary classifier, else every logit."""
        return "margin" if self.kind == CLASSIFICATION and self.num_labels == 2 else "logits"

    def model_labels(self) -> int:
        """The output count a sequence classifier is built with (at least 1)."""
        return max(self.num_labels, 1)

    def as_info(self) -> "TaskInfo":
        """The plain ``TaskInfo`` (a ``TaskData`` without its data): what is saved with an adapter."""
        return TaskInfo(self.kind, self.num_labels, list(self.label_names) if self.label_names else None)

    def to_dict(self) -> dict:
        return asdict(self.as_info())

    @classmethod
    def of_model(cls, name: str, error: type[Exception], trained_head: bool = False) -> "TaskInfo":
        """A model's task by its ``config.json`` (a local folder, or a hub id through transformers): a
        ``*ForCausalLM`` architecture is a causal LM; a ``*ForSequenceClassification`` one a classifier whose
        labels are its ``id2label`` (a regressor when its problem type says so or it has one output). Other
        architectures (a bare encoder such as MiniLM's) load as classifiers with a fresh head, unless
        ``trained_head`` asks for a model that can predict as it is (then they are ``error``)."""
        path = os.path.join(name, "config.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise error(f"{path}: not a readable model config ({e})") from None
            if not isinstance(config, dict):
                raise error(f"{path}: expected a JSON object")
        else:
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(name).to_dict()
            except (OSError, ValueError) as e:
                raise error(f"model: cannot read the config of {name!r} ({str(e).splitlines()[0]})") from None
        archs = config.get("architectures") or []
        if is_causal_lm(architectures=archs):
            return cls(CAUSAL_LM, 0)
        classifier = is_sequence_classifier(architectures=archs)
        if trained_head and not classifier:
            raise error(f"{path if os.path.isfile(path) else name}: architectures {archs} are neither a sequence "
                        "classifier nor a causal LM")
        id2label = config.get("id2label") or {}
        names = [id2label.get(str(i), f"LABEL_{i}") for i in range(len(id2label))] or None
        if classifier and (config.get("problem_type") == "regression" or len(id2label) == 1):
            return cls(REGRESSION, 1)
        return cls(CLASSIFICATION, len(names) if names else 2, names)

    @classmethod
    def of_peft(cls, task_type, num_labels: int) -> "TaskInfo | None":
        """A PEFT adapter's ``task_type`` (``CAUSAL_LM``, ``SEQ_CLS`` with ``num_labels`` read off its saved
        head); None for the task types qkvtune does not train."""
        if task_type == "CAUSAL_LM":
            return cls(CAUSAL_LM, 0)
        if task_type == "SEQ_CLS":
            return cls(CLASSIFICATION, num_labels)
        return None
