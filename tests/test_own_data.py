"""Your own data: task classification|regression from CSV/TSV/JSON/JSONL/Parquet with your column names, and
``qkvtune predict`` reproducing the run's own evaluation row for row."""

import json

import pandas as pd
import pytest
import torch

from conftest import assert_same_predictions, minilm_folder
from qkvtune.cli import main
from qkvtune.config import build_config
from qkvtune.data import DataError, load_task
from qkvtune.train import train

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "nice", "dull"]


def _pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = (WORDS[j] for j in torch.randint(0, len(WORDS), (2,), generator=g).tolist())
        same = (WORDS.index(a) < 3 or WORDS.index(a) == 6) == (WORDS.index(b) < 3 or WORDS.index(b) == 6)
        rows.append({"premise": f"the film was {a}", "hypothesis": f"a {b} film", "verdict": "agree" if same else "clash",
                     "stars": float(WORDS.index(a) + 0.5 * i % 3)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("own")
    train, dev = _pairs(96, 0), _pairs(40, 1)
    train.to_csv(d / "train.csv", index=False)
    dev.to_csv(d / "dev.csv", index=False)
    train.to_json(d / "train.jsonl", orient="records", lines=True)
    train.to_parquet(d / "train.parquet")
    train.to_csv(d / "train.tsv", sep="\t", index=False)
    return d


def _tok():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(minilm_folder())


def test_every_format_reads_the_same_rows(files):
    tok = _tok()
    tasks = [load_task("classification", tok, train_file=str(files / f"train.{ext}"),
                                                                 validation_file=str(files / "dev.csv"),
                                                                 text_columns=["premise", "hypothesis"],
                                                                 label_column="verdict")
             for ext in ("csv", "jsonl", "parquet", "tsv")]
    for t in tasks[1:]:
        assert t.train[:]["input_ids"] == tasks[0].train[:]["input_ids"] and t.train[:]["labels"] == tasks[0].train[:]["labels"]
    assert tasks[0].label_names == ["agree", "clash"] and tasks[0].num_labels == 2  # sorted string labels
    ordered = load_task("classification", tok, train_file=str(files / "train.csv"), text_columns=["premise"],
                                                              label_column="verdict", labels=["clash", "agree"])
    assert ordered.label_names == ["clash", "agree"]
    # no validation file: a seeded 10% of the training rows is held out, the same every time
    a = load_task("classification", tok, seed=3, train_file=str(files / "train.csv"), text_columns=["premise"],
                                                                label_column="verdict")
    b = load_task("classification", tok, seed=3, train_file=str(files / "train.csv"), text_columns=["premise"],
                                                                label_column="verdict")
    assert len(a.evals["dev"]) == 10 and len(a.train) == 86 and a.evals["dev"][:] == b.evals["dev"][:]


@pytest.mark.parametrize("spec,match", [
    (dict(text_columns=["premis"], label_column="verdict"), "no column 'premis'; the columns are premise, hypothesis"),
    (dict(text_columns=["premise"], label_column="verdict", labels=["agree", "maybe"]), r"train.csv row \d+: label 'clash'"),
])
def test_bad_columns_and_labels_name_file_and_row(files, spec, match):
    with pytest.raises(DataError, match=match):
        load_task("classification", _tok(), train_file=str(files / "train.csv"), **spec)


def test_bad_rows_are_named(tmp_path):
    (tmp_path / "a.csv").write_text("text,score\nfine,1.5\n,2.0\n")
    with pytest.raises(DataError, match=r"a.csv row 2: empty or missing text in column 'text'"):
        load_task("regression", _tok(), train_file=str(tmp_path / "a.csv"), text_columns=["text"],
                                                       label_column="score", validation_file=str(tmp_path / "a.csv"))
    (tmp_path / "b.csv").write_text("text,score\nfine,1.5\nok,lots\n")
    with pytest.raises(DataError, match=r"b.csv row 2: score 'lots' is not a number"):
        load_task("regression", _tok(), train_file=str(tmp_path / "b.csv"), text_columns=["text"],
                                                       label_column="score", validation_file=str(tmp_path / "b.csv"))


def test_classification_run_then_predict_reproduces_its_accuracy(files, tmp_path, tiny_bert_dir, capsys):
    out = tmp_path / "run"
    metrics = train(build_config(dict(
        model=tiny_bert_dir, task="classification", train_file=str(files / "train.csv"),
        validation_file=str(files / "dev.csv"), text_columns="premise,hypothesis", label_column="verdict",
        targets="all-linear", max_steps=8, batch_size=8, eval_batch_size=16, lr=5e-3, eval_strategy="no",
        output_dir=str(out))))  # all-linear: attention, MLP and the pooler, predicted and exported alike
    assert {"eval_accuracy", "eval_f1", "eval_matthews_correlation"} <= set(metrics)
    assert main(["predict", str(out), str(files / "dev.csv"), "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    dev = pd.read_csv(files / "dev.csv")
    assert [r["premise"] for r in rows] == list(dev["premise"])  # order and count of the input
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 and r["label"] in ("agree", "clash") for r in rows)
    # the same path as the run's own evaluation (its batches and padding: eval_batch_size), so the same count
    assert sum(r["label"] == r["verdict"] for r in rows) / len(rows) == metrics["eval_accuracy"]
    # one command-line rule: key=value after the flags as before them; a key predict honours is honoured, a key
    # no command use of which fits is refused by name
    assert main(["predict", str(out), str(files / "dev.csv"), "--output", str(tmp_path / "p5.jsonl"),
                 "max_eval_samples=5"]) == 0
    # 5 rows in one batch against the first 5 of a batch of 16: other padding, so a tolerance (conftest.PROB_ATOL)
    assert_same_predictions([json.loads(line) for line in open(tmp_path / "p5.jsonl")], rows[:5])
    capsys.readouterr()
    assert main(["predict", str(out), str(files / "dev.csv"), "--output", str(tmp_path / "x.jsonl"), "lr=1"]) == 2
    assert main(["eval", str(out), "epochs=9"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("qkvtune: error: lr: qkvtune predict does not use it") and len(err) == 2
    assert err[1].startswith("qkvtune: error: epochs: qkvtune eval does not use it")
    assert not (tmp_path / "x.jsonl").exists()
    # the merged export names its labels, and predicts the same labels
    assert main(["export", str(out), str(tmp_path / "merged")]) == 0
    cfg = json.load(open(tmp_path / "merged" / "config.json"))
    assert cfg["id2label"] == {"0": "agree", "1": "clash"}
    assert main(["predict", str(tmp_path / "merged"), str(files / "dev.csv"), "text_columns=[premise,hypothesis]",
                 "--output", str(tmp_path / "m.csv")]) == 0
    merged = pd.read_csv(tmp_path / "m.csv")  # W + ΔW against W·x + ΔW·x: another path, so a tolerance
    assert_same_predictions([{"label": m, "probabilities": json.loads(p)} for m, p in zip(merged["label"], merged["probabilities"])],
                            [{"label": r["label"], "probabilities": r["probabilities"]} for r in rows])


def test_regression_run_and_predicted_scores(files, tmp_path, tiny_bert_dir):
    out = tmp_path / "run"
    metrics = train(build_config(dict(
        model=tiny_bert_dir, task="regression", train_file=str(files / "train.tsv"),
        validation_file=str(files / "dev.csv"), text_columns="premise", label_column="stars",
        max_steps=6, batch_size=8, eval_batch_size=16, lr=5e-3, eval_strategy="no", output_dir=str(out))))
    assert {"eval_pearson", "eval_spearmanr", "eval_mse"} <= set(metrics)
    assert main(["predict", str(out), str(files / "dev.csv"), "--output", str(tmp_path / "p.parquet")]) == 0
    pred = pd.read_parquet(tmp_path / "p.parquet")
    mse = float(((pred["score"] - pred["stars"]) ** 2).mean())
    assert mse == pytest.approx(metrics["eval_mse"], rel=1e-5)


def test_predict_refusals(files, tmp_path, tiny_bert_dir, tiny_llama_dir, capsys):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    cases = [
        (["predict", tiny_llama_dir, str(tmp_path / "chat.jsonl"), "--output", str(tmp_path / "o.jsonl")], "chat template"),
        (["predict", tiny_bert_dir, str(files / "dev.csv"), "--output", str(tmp_path / "o.xlsx")], "--output"),
        (["predict", str(tmp_path), str(files / "dev.csv"), "--output", str(tmp_path / "o.jsonl")], "neither a qkvtune run"),
        (["predict", tiny_bert_dir, str(tmp_path / "none.csv"), "--output", str(tmp_path / "o.jsonl")], "none.csv: file not found"),
    ]
    for argv, match in cases:
        capsys.readouterr()
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qkvtune")]
        assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "o.jsonl").exists()
    (tmp_path / "p.txt").write_text("the film was\n\nit was a\n")
    assert main(["predict", tiny_llama_dir, str(tmp_path / "p.txt"), "max_new_tokens=3", "--output",
                 str(tmp_path / "g.jsonl")]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "g.jsonl")]
    assert [r["text"] for r in rows] == ["the film was", "it was a"] and all(isinstance(r["completion"], str) for r in rows)


def test_a_local_dataset_folder_with_splits(files, tmp_path):
    import datasets

    frame = pd.read_csv(files / "train.csv")
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame[:80]),
                          "validation": datasets.Dataset.from_pandas(frame[80:])}).save_to_disk(str(tmp_path / "ds"))
    task = load_task("classification", _tok(), dataset=str(tmp_path / "ds"), validation_split="validation",
                                                              text_columns=["premise"], label_column="verdict")
    assert len(task.train) == 80 and len(task.evals["dev"]) == 16 and task.label_names == ["agree", "clash"]
    with pytest.raises(DataError, match="has no split 'test'"):
        load_task("classification", _tok(), dataset=str(tmp_path / "ds"), validation_split="test",
                                                           text_columns=["premise"], label_column="verdict")
