"""Three splits (val_size): a seeded validation split carved out of the training rows, the task's dev/test set
as a test split scored once at the end with per-example predictions; the shuffled-label control; and
``pooling: mean`` against a hand-computed masked mean."""

import json

import numpy as np
import pytest
import torch

from conftest import data_dir
from qkvtune.config import ConfigError, build_config
from qkvtune.data import DataError, load_task, split_train

needs_data = pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")


def test_split_train_is_disjoint_seeded_and_counts_training_rows():
    cols = {"x": list(range(100)), "label": [i % 2 for i in range(100)]}
    train, val = split_train(cols, 30, 20, seed=3)
    assert len(train["x"]) == 30 and len(val["x"]) == 20 and not set(train["x"]) & set(val["x"])
    assert split_train(cols, 30, 20, seed=3) == (train, val) and split_train(cols, 30, 20, seed=4)[1] != val
    assert len(split_train(cols, None, 0.25, seed=0)[1]["x"]) == 25
    assert split_train(cols, 30, None, seed=3)[1] is None
    with pytest.raises(DataError, match="val_size"):
        split_train(cols, None, 100, seed=0)


@needs_data
def test_glue_val_size_makes_the_dev_file_the_test_split():
    from qkvtune.models import load_tokenizer

    tok = load_tokenizer("minilm")
    plain = load_task("glue/sst2", tok, data_dir=data_dir(), max_train_samples=50, max_eval_samples=30, seed=1)
    split = load_task("glue/sst2", tok, data_dir=data_dir(), max_train_samples=50, max_eval_samples=30, seed=1,
                      val_size=40)
    assert list(plain.evals) == ["dev"] and plain.tests == {}
    assert list(split.evals) == ["validation"] and list(split.tests) == ["dev"]
    assert split.tests["dev"]["input_ids"] == plain.evals["dev"]["input_ids"]  # the same dev rows
    assert len(split.train) == 50 and len(split.evals["validation"]) == 40
    train_rows = {tuple(x) for x in split.train["input_ids"]}
    assert not train_rows & {tuple(x) for x in split.evals["validation"]["input_ids"]}
    shuffled = load_task("glue/sst2", tok, data_dir=data_dir(), max_train_samples=50, seed=1, shuffle_labels=True)
    assert sorted(shuffled.train["labels"]) == sorted(plain.train["labels"])
    assert shuffled.train["labels"] != plain.train["labels"] and shuffled.train["input_ids"] == plain.train["input_ids"]
    with pytest.raises(ConfigError, match="val_size"):
        build_config({"task": "text/x.txt", "val_size": 10})
    with pytest.raises(ConfigError, match="val_size"):
        build_config({"task": "glue/sst2", "val_size": 1.5})


@needs_data
def test_training_selects_on_validation_and_scores_the_test_split_once(tmp_path, tiny_bert_dir):
    from qkvtune.train import PREDICTIONS_FILE, train

    cfg = build_config({"model": str(tiny_bert_dir), "task": "glue/mrpc", "data_dir": data_dir(), "val_size": 16,
                        "max_train_samples": 32, "max_eval_samples": 24, "max_steps": 4, "batch_size": 8,
                        "eval_strategy": "steps", "eval_steps": 2, "output_dir": str(tmp_path / "run"), "lr": 1e-2})
    metrics = train(cfg)
    from qkvtune.checkpoints import log_history

    history = log_history(str(tmp_path / "run"))
    assert "test_f1" in metrics and "eval_f1" in metrics
    pred = json.load(open(tmp_path / "run" / PREDICTIONS_FILE))["dev"]
    y, p = np.array(pred["labels"]), np.array(pred["predictions"])
    assert len(y) == 24
    from sklearn.metrics import f1_score

    assert metrics["test_accuracy"] == pytest.approx(float((y == p).mean()))
    assert metrics["test_f1"] == pytest.approx(f1_score(y, p))
    # the best checkpoint is chosen on validation: its validation F1 is the final eval_f1
    best = max((h for h in history if "eval_f1" in h), key=lambda h: h["eval_f1"])
    assert metrics["eval_f1"] == pytest.approx(best["eval_f1"])


def test_mean_pooling_is_the_masked_mean_of_the_last_hidden_states(tmp_path, tiny_bert_dir):
    from qkvtune.models import MeanPooler, load_model

    model, tok, _ = load_model(str(tiny_bert_dir), "classification", 3, pooling="mean")
    assert isinstance(model.bert.pooler, MeanPooler)
    model.eval()
    enc = tok(["a short one", "a somewhat longer sentence than that"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
        h = model.bert(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = model.classifier((h * m).sum(1) / m.sum(1))
    torch.testing.assert_close(logits, ref)
    # padding does not change a row's pooled output (the mask keeps pad tokens out)
    alone = tok(["a short one"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**alone).logits[0], logits[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="pooling"):
        build_config({"pooling": "max"})
