"""Generated answers, scored: the choice a generated text names (``extract_answer``) and the accuracy of a causal
LM's greedy answers to prompts (``generation_accuracy``): how a task of kind ``qa_generation`` is scored, whatever
family it comes from."""

from __future__ import annotations

import re

from ..errors import DataError
from .causal import encode_prompts


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
