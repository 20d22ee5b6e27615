"""lm-evaluation-harness on qkvtune's results: a local lm-eval task holding the questions qkvtune evaluates, scored
the way qkvtune scores them, so the two numbers can be compared (and lm-eval's other tasks run beside it).

qkvtune's generation accuracy (``data/commonsense.py``): greedy decoding of up to ``max_new_tokens`` after the
prompt, then the first answer label that occurs as a whole word, case-insensitively, against the gold label.
The task written here is the same in lm-eval's terms: ``generate_until`` (greedy, ``max_gen_toks``, stopping at
end of sequence only), a ``regex`` filter over the same alternation (longest label first, word boundaries
by look-around), ``take_first``, and ``exact_match`` ignoring case. The prompts are stored in the JSONL file
exactly as qkvtune builds them.

    qkvtune lm-eval-task tasks/ task=commonsense/ARC-Easy data_dir=../shared/datasets max_eval_samples=200
    lm_eval --model hf --model_args pretrained=EXPORTED --include_path tasks --tasks qkvtune_arc_easy
    lm_eval --model hf --model_args pretrained=BASE,peft=RUN_DIR --include_path tasks --tasks qkvtune_arc_easy
"""

from __future__ import annotations

import json
import os
import re

import yaml

from .errors import QkvtuneError


def task_name(task: str) -> str:
    """``commonsense/ARC-Easy`` → ``qkvtune_arc_easy`` (lm-eval task names: lower case, no slashes)."""
    return "qkvtune_" + re.sub(r"[^a-z0-9]+", "_", task.split("/")[-1].lower()).strip("_")


def answer_pattern(choices: list[str]) -> str:
    """The regex qkvtune's ``extract_answer`` uses, as one pattern (case-insensitive inline flag)."""
    alts = "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))
    return rf"(?i)(?<!\w)(?:{alts})(?!\w)"


def task_config(name: str, data_file: str, choices: list[str], max_new_tokens: int) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.abspath(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_new_tokens},
        "filter_list": [{"name": "qkvtune", "filter": [
            {"function": "regex", "regex_pattern": answer_pattern(choices), "group_select": 0},
            {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True}],
        "metadata": {"version": 1.0, "source": "qkvtune lm-eval-task"},
    }


def write_task(out_dir: str, task: str, records: list[dict], choices: list[str], max_new_tokens: int) -> str:
    """Write ``<name>.yaml`` and ``<name>.jsonl`` (records: ``{"prompt", "answer"}``) into ``out_dir``; returns
    the task name for ``lm_eval --include_path out_dir --tasks NAME``."""
    if not records or not choices:
        raise QkvtuneError(f"task {task}: no generation questions to write (a commonsense/* task has them)")
    name = task_name(task)
    os.makedirs(out_dir, exist_ok=True)
    data = os.path.join(out_dir, f"{name}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n")
    with open(os.path.join(out_dir, f"{name}.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(task_config(name, data, choices, max_new_tokens), f, sort_keys=False)
    return name


def cmd_lm_eval_task(args) -> int:
    from .config import load_command_config
    from .errors import check_output_dir
    from .runs import task_data, tokenizer_of

    check_output_dir(args.out_dir, "OUT_DIR")
    cfg = load_command_config(args.config, args.overrides)
    data = task_data(cfg, tokenizer_of(cfg), 1, cfg.max_eval_samples)  # the questions qkvtune eval asks
    records = next(iter((getattr(data, "generation_records", None) or {}).values()), [])
    name = write_task(args.out_dir, cfg.task, records, getattr(data, "answer_choices", None) or [], cfg.max_new_tokens)
    print(f"lm-eval task {name} written to {args.out_dir} ({len(records)} questions); run it with\n"
          f"  lm_eval --model hf --model_args pretrained=MODEL[,peft=ADAPTER] --include_path {args.out_dir} "
          f"--tasks {name}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("lm-eval-task", help="write a local lm-eval task with qkvtune's questions and scoring: "
                                            "qkvtune lm-eval-task OUT_DIR [CONFIG.yaml] [key=value ...]")
    p.add_argument("out_dir")
    p.add_argument("config", nargs="?", help="YAML config naming task, data_dir, max_eval_samples, max_new_tokens")
    p.add_argument("overrides", nargs="*")
    from .config import DATA_KEYS, LOADING_KEYS

    p.set_defaults(func=cmd_lm_eval_task, honours=({*DATA_KEYS, *LOADING_KEYS, "max_new_tokens", "seed"},
                                                   "data, generation and model-loading keys"))
