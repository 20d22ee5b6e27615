"""Task families: every file in data/families/ is a family the registry finds, and what a task id is (its kind, main
metric, the keys it offers, its loader, its tasks in a data folder) is answered by its family alone — so adding a
family is adding one file, shown here with a family written into a temporary folder the registry is pointed at."""

import json
import pkgutil

import pytest
import transformers

from conftest import minilm_folder
from qkvtune.config import ConfigError, build_config
from qkvtune.data import DataError, families, load_task, main_metric, task_kind
from qkvtune.data.spec import DataSpec
from qkvtune.task import CAUSAL_LM, CLASSIFICATION, PREFERENCE, QA_GENERATION, REGRESSION, REWARD


def _tok():
    return transformers.AutoTokenizer.from_pretrained(minilm_folder())


def test_every_family_file_is_found_and_owns_its_ids():
    names = {m.name for m in pkgutil.iter_modules(families.__path__)}
    declared = {f.name for f in families.families()}
    assert names == {"builtin", "commonsense", "glue", "jsonl", "preference", "prompts", "sft", "tables", "text"}
    assert declared == {"builtin", "commonsense", "glue", "jsonl", "preference", "prompts", "sft", "text",
                        "classification", "regression"}
    cases = {"glue/sst2": (CLASSIFICATION, "accuracy"), "glue/STS-B": (REGRESSION, "pearson"),
             "glue/mrpc": (CLASSIFICATION, "f1"), "glue/cola": (CLASSIFICATION, "matthews_correlation"),
             "commonsense/ARC-Easy": (QA_GENERATION, "accuracy"), "sft": (CAUSAL_LM, "loss"),
             "sft/chats.jsonl": (CAUSAL_LM, "loss"), "text/book.txt": (CAUSAL_LM, "loss"),
             "builtin/vader": (CLASSIFICATION, "accuracy"), "builtin/pydoc": (CAUSAL_LM, "loss"),
             "classification": (CLASSIFICATION, "accuracy"), "regression": (REGRESSION, "pearson"),
             "jsonl/reviews.jsonl": (CLASSIFICATION, "accuracy"),
             "preference": (PREFERENCE, "rewards/accuracies"), "prompts": (REWARD, "reward")}
    for task, (kind, metric) in cases.items():
        assert (task_kind(task), main_metric(task)) == (kind, metric), task
    for bad in ("glue", "classification/x", "nosuch/task", ""):
        with pytest.raises(DataError, match="unknown task"):
            families.family_of(bad)


def test_optional_keys_are_refused_by_the_families_that_do_not_offer_them():
    DataSpec(task="glue/sst2", val_size=8, shuffle_labels=True).check()
    DataSpec(task="text/book.txt", packing=True).check()
    DataSpec(task="builtin/vader", shuffle_labels=True).check()
    for spec, key in ((dict(task="builtin/pydoc", shuffle_labels=True), "shuffle_labels"),
                      (dict(task="text/book.txt", val_size=8), "val_size"),
                      (dict(task="glue/sst2", packing=True), "packing"),
                      (dict(task="commonsense/piqa", as_chat=True), "as_chat"),
                      (dict(task="sft", train_file="x.jsonl", reward="answer"), "reward")):
        with pytest.raises(ConfigError, match=f"^{key}: "):
            DataSpec(**spec).check()
    # a family's own rule: your own table needs its text columns
    with pytest.raises(ConfigError, match="text_columns: task classification needs"):
        DataSpec(task="classification", train_file="x.csv").check()


EXTRA = '''
from qkvtune.data.examples import PadCollator, TaskData, tokenize_texts
from qkvtune.data.family import Family
from qkvtune.data.sources import read_text
from qkvtune.task import REGRESSION


class Lengths(Family):
    """lengths/<file>: each line of a text file under <data_dir>/lengths/, scored by its word count."""
    name, usage, kind, metric = "lengths", "lengths/<file>", REGRESSION, "pearson"
    offers = frozenset({"shuffle_labels"})

    def load(self, spec, tokenizer, seed):
        lines = read_text(f"{spec.data_dir}/lengths/{spec.task.partition('/')[2]}").split("\\n")
        cols = {"text_a": lines, "label": [float(len(x.split())) for x in lines]}
        ds = tokenize_texts(cols, tokenizer, spec.max_length, "lengths")
        return TaskData(name=spec.task, kind=REGRESSION, num_labels=1, train=ds, evals={"dev": ds},
                        collator=PadCollator(tokenizer), compute_metrics=None, metric_for_best="pearson",
                        greater_is_better=True)

    def discover(self, data_dir):
        import os
        folder = os.path.join(data_dir, "lengths")
        return [f"lengths/{f}" for f in sorted(os.listdir(folder))] if os.path.isdir(folder) else []


FAMILIES = (Lengths(),)
'''


@pytest.fixture
def extra_family(tmp_path, monkeypatch):
    """A family in one new file, in a folder the registry reads beside data/families/."""
    folder = tmp_path / "more_families"
    folder.mkdir()
    (folder / "lengths.py").write_text(EXTRA)
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(folder)])
    families.families.cache_clear()
    yield
    families.families.cache_clear()  # the monkeypatched __path__ is undone first: the next call reads data/families


def test_a_new_family_is_one_file(extra_family, tmp_path):
    from qkvtune.bench.suite import discover_tasks

    (tmp_path / "data" / "lengths").mkdir(parents=True)
    (tmp_path / "data" / "lengths" / "lines.txt").write_text("one\ntwo words\nthree more words\nfour of these words")
    data_dir = str(tmp_path / "data")
    # what the task id is: its kind and metric
    assert task_kind("lengths/lines.txt") == REGRESSION and main_metric("lengths/lines.txt") == "pearson"
    # the keys it offers, checked by the config as for every family
    build_config({"task": "lengths/lines.txt", "shuffle_labels": True, "data_dir": data_dir, "output_dir": "x"})
    with pytest.raises(ConfigError, match="^val_size: .*, not lengths/lines.txt$"):
        build_config({"task": "lengths/lines.txt", "val_size": 2, "output_dir": "x"})
    with pytest.raises(ConfigError, match=r"^shuffle_labels: .*\(task .*lengths/….*\), not text/b.txt$"):
        DataSpec(task="text/b.txt", shuffle_labels=True).check()  # the families that offer it: the new one too
    with pytest.raises(ConfigError, match="^chunked_loss: "):  # a regressor: no causal LM's loss to chunk
        build_config({"task": "lengths/lines.txt", "chunked_loss": "on", "output_dir": "x"})
    # its loader, behind load_task (and shuffle_labels, applied there to every family)
    data = load_task("lengths/lines.txt", _tok(), data_dir=data_dir)
    assert data.regression and data.train["labels"] == [1.0, 2.0, 3.0, 4.0]
    shuffled = load_task("lengths/lines.txt", _tok(), data_dir=data_dir, shuffle_labels=True, seed=1)
    assert sorted(shuffled.train["labels"]) == [1.0, 2.0, 3.0, 4.0]
    # its tasks in a data folder, for the benchmarks' task slots
    assert discover_tasks(data_dir)["lengths"] == ["lengths/lines.txt"]


def _records(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_records_read_as_a_classification_table(tmp_path, monkeypatch):
    words = ["good", "bad", "fine", "awful"]
    rows = [{"text": f"a {words[i % 4]} film {i}", "label": "pos" if i % 4 in (0, 2) else "neg"} for i in range(40)]
    _records(tmp_path / "jsonl" / "films.jsonl", rows)
    tok = _tok()
    mine = load_task("jsonl/films.jsonl", tok, data_dir=str(tmp_path), seed=2)
    table = load_task("classification", tok, seed=2, train_file=str(tmp_path / "jsonl" / "films.jsonl"),
                      text_columns=["text"], label_column="label")
    assert mine.name == "jsonl/films.jsonl" and mine.label_names == ["neg", "pos"] == table.label_names
    assert mine.train[:] == table.train[:] and mine.evals["dev"][:] == table.evals["dev"][:]
    pairs = [{"text": r["text"], "text_pair": "a film", "label": r["label"]} for r in rows]
    _records(tmp_path / "jsonl" / "pairs.jsonl", pairs)
    paired = load_task("jsonl/pairs.jsonl", tok, data_dir=str(tmp_path))
    assert all(ids.count(tok.sep_token_id) == 2 for ids in paired.train["input_ids"])  # [CLS] a [SEP] b [SEP]
    _records(tmp_path / "jsonl" / "bad.jsonl", rows[:5] + [{"text": "", "label": "pos"}])
    with pytest.raises(DataError, match=r"bad.jsonl row 6: empty or missing text in column 'text'"):
        load_task("jsonl/bad.jsonl", tok, data_dir=str(tmp_path))
    monkeypatch.delenv("QKVTUNE_DATA", raising=False)
    with pytest.raises(DataError, match="has no hub source"):
        load_task("jsonl/films.jsonl", tok)
