"""Rewards for RL on prompts (``objective: grpo``), as TRL's reward functions take them: ``fn(prompts,
completions, **columns) -> [float]``, one reward per completion, the dataset's other columns (``answer``) passed by
name. A config names them in ``reward`` (one or a list, summed):

* ``answer``: 1 where the completion's final answer is the record's ``answer`` — the last choice label it names
  (answer1…answer5, true/false) when the answer is one, else its last number — 0 otherwise (verifiable);
* ``regex:<pattern>``: 1 where the completion matches the pattern (``re.search``), 0 otherwise (a format);
* ``module:function``: a function from your own code, imported by name (never read from a data file).
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from .errors import ConfigError

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
LABEL = re.compile(r"\b(answer\d|true|false)\b", re.IGNORECASE)


def text_of(completion) -> str:
    """A completion as text: TRL passes strings, or for chats the assistant's message list."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


def final_answer(completion: str, answer: str) -> str | None:
    """The completion's final answer, in the shape of ``answer``: its last choice label, or its last number."""
    if LABEL.fullmatch(answer.strip()):
        found = LABEL.findall(completion)
        return found[-1].lower() if found else None
    found = NUMBER.findall(completion.replace(",", ""))
    return found[-1] if found else None


def _same(found: str | None, answer: str) -> bool:
    if found is None:
        return False
    try:
        return float(found) == float(answer)
    except ValueError:
        return found.lower() == answer.strip().lower()


def answer_reward(prompts, completions, answer, **_) -> list[float]:
    return [float(_same(final_answer(text_of(c), str(a)), str(a))) for c, a in zip(completions, answer)]


def regex_reward(pattern: str) -> Callable:
    compiled = re.compile(pattern)

    def reward(prompts, completions, **_) -> list[float]:
        return [float(compiled.search(text_of(c)) is not None) for c in completions]

    reward.__name__ = f"regex:{pattern}"
    return reward


def reward_function(spec: str) -> Callable:
    """The reward ``spec`` names (see the module), or a ConfigError naming ``reward``."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"reward: expected answer, regex:<pattern> or module:function, got {spec!r}")
    if spec == "answer":
        return answer_reward
    if spec.startswith("regex:"):
        try:
            return regex_reward(spec[len("regex:"):])
        except re.error as e:
            raise ConfigError(f"reward: {spec!r} is not a regular expression ({e})") from None
    module, _, name = spec.rpartition(":")
    if not module or not name.isidentifier():
        raise ConfigError(f"reward: {spec!r} is not answer, regex:<pattern> or module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ConfigError(f"reward: cannot import {module!r} ({e})") from None
    except AttributeError:
        raise ConfigError(f"reward: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise ConfigError(f"reward: {spec} is not a function")
    return fn


def names(specs) -> list:
    """The reward specs a config's ``reward`` names (None: the default, ``answer``)."""
    return ["answer"] if specs is None else specs if isinstance(specs, list) else [specs]


def reward_functions(specs) -> list[Callable]:
    if not names(specs):
        raise ConfigError("reward: names no reward (give answer, regex:<pattern> or module:function, or a list)")
    return [reward_function(s) for s in names(specs)]
