"""Raw-byte mutations of every input file a run reads before training — the config YAML, each data format
(GLUE TSV, LLM-Adapters JSON, text .txt/.jsonl) and the files of a model folder: each mutation is accepted or
refused with one line naming the file (and the row where there is one), never a traceback."""

import os
import shutil

import pytest
import transformers

from conftest import minilm_folder
from mutations import apply, mutations
from qkvtune.cli import main
from qkvtune.data import DataError, load_task
from qkvtune.models import ModelError, load_model, load_tokenizer


_TOK = {}


def _tok():
    return _TOK.setdefault("t", transformers.AutoTokenizer.from_pretrained(minilm_folder()))


DATA = {
    "glue/sst2": ("glue/SST-2/train.tsv",
                  "sentence\tlabel\n" + "".join(f"a {w} film\t{i % 2}\n" for i, w in enumerate(["good", "bad"] * 6))),
    "commonsense/toy": ("commonsense/toy/train.json",
                        '[' + ",".join('{"instruction": "Q%d?", "input": "", "output": "the answer is %s", '
                                       '"answer": "%s"}' % (i, a, a) for i, a in enumerate(["yes", "no"] * 3)) + ']'),
    "text/notes.jsonl": ("text/notes.jsonl",
                         "".join('{"instruction": "say %d", "output": "%d"}\n' % (i, i) for i in range(6))),
    "text/story.txt": ("text/story.txt", "Once upon a time there was a small model. " * 40),
}
SIDE = {"glue/SST-2/dev.tsv": "sentence\tlabel\nok\t1\nno\t0\n",
        "commonsense/toy/test.json": '[{"instruction": "Q?", "input": "", "output": "yes", "answer": "yes"}]'}


@pytest.mark.parametrize("task", list(DATA))
def test_mutated_data_files(tmp_path, task):
    rel, text = DATA[task]
    refused = 0
    for i, (label, mutation) in enumerate(mutations(text.encode(), task)):
        root = tmp_path / f"case{i}"
        for r, t in [(rel, text), *SIDE.items()]:
            (root / r).parent.mkdir(parents=True, exist_ok=True)
            (root / r).write_text(t)
        apply(str(root / rel), mutation)
        try:
            load_task(task, _tok(), data_dir=str(root), max_length=32)
        except DataError as e:
            refused += 1
            msg = str(e)
            assert "\n" not in msg and os.path.basename(rel) in msg, (label, msg)
    assert refused >= 5, task


# The caps and the output folder come first: a truncated copy that still parses trains one step of a small
# job into the test's folder, whatever the length of the paths puts the cuts.
CONFIG = "max_steps: 1\nmax_train_samples: 8\nmax_eval_samples: 4\nbatch_size: 4\noutput_dir: {out}\n" \
         "eval_strategy: 'no'\nlr: 1.0e-3\ntargets: [q, v]\ntask: builtin/vader\nmodel: {model}\n"


def test_mutated_config_yaml(tmp_path, tiny_bert_dir, capsys, monkeypatch):
    # A copy reduced to nothing means the defaults: the whole default job into runs/default. Here that folder
    # already holds a run, so it is refused at once instead of training MiniLM for minutes.
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/default")
    open("runs/default/config.yaml", "w").close()
    refused = 0
    out = tmp_path / "out"
    text = CONFIG.format(model=tiny_bert_dir, out=out).encode()
    for i, (label, mutation) in enumerate(mutations(text, "config")):
        path = tmp_path / f"c{i}.yaml"
        path.write_bytes(text)
        apply(str(path), mutation)
        shutil.rmtree(out, ignore_errors=True)
        capsys.readouterr()
        rc = main(["train", str(path)])
        err = capsys.readouterr().err
        assert rc in (0, 2) and "Traceback" not in err, (label, err[-300:])
        if rc == 2:
            refused += 1
            lines = [x for x in err.splitlines() if x.startswith("qkvtune:")]
            assert len(lines) == 1 and lines[0].startswith("qkvtune: error: "), (label, err[-300:])
            assert not out.exists(), label
    assert refused >= 6


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
def test_mutated_model_folder(tmp_path, tiny_bert_dir, name):
    with open(os.path.join(tiny_bert_dir, name), "rb") as f:
        original = f.read()
    refused = 0
    muts = list(mutations(original, name))
    for i, (label, mutation) in enumerate(muts[:1] + muts[2:4] + muts[-4:]):  # a model loads slowly: fewer cases
        folder = str(tmp_path / f"m{i}")
        shutil.copytree(tiny_bert_dir, folder)
        apply(os.path.join(folder, name), mutation)
        try:
            tok = load_tokenizer(folder)
            load_model(folder, "classification", 2, tokenizer=tok)
        except ModelError as e:
            refused += 1
            assert "\n" not in str(e) and folder in str(e), (label, str(e))
    assert refused >= 3


def test_inputs_that_parse_but_do_not_fit(tmp_path, tiny_bert_dir, tiny_llama_dir):
    """Valid JSON/YAML of the wrong shape or depth, model configs edited to disagree with their weights."""
    import json

    from qkvtune.config import ConfigError, load_config

    deep = tmp_path / "deep.yaml"
    deep.write_text("targets: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: nested too deeply"):
        load_config(str(deep))
    for i, edit in enumerate([{"hidden_act": "gemu"}, {"vocab_size": 10}, None]):
        folder = tmp_path / f"m{i}"
        shutil.copytree(tiny_bert_dir, folder)
        cfg = json.load(open(folder / "config.json"))
        (folder / "config.json").write_text(json.dumps([1, 2] if edit is None else {**cfg, **edit}))
        with pytest.raises(ModelError, match=str(folder)):
            load_model(str(folder), "classification", 2, tokenizer=load_tokenizer(tiny_bert_dir))
    rec = {"instruction": "q?", "input": "", "output": "the answer is yes", "answer": "yes"}
    root = tmp_path / "data" / "commonsense" / "toy"
    root.mkdir(parents=True)
    (root / "test.json").write_text(json.dumps([rec] * 2))
    for text, match in [("[" * 100000 + "]" * 100000, "nested too deeply"),
                        (json.dumps([rec] * 4).replace("q?", "q\\udc80"), "record 0: 'instruction' holds an invalid"),
                        (json.dumps([dict(rec, instruction="word " * 300)] * 4), "every record's prompt fills max_length")]:
        (root / "train.json").write_text(text)
        with pytest.raises(DataError, match=match):
            load_task("commonsense/toy", load_tokenizer(tiny_llama_dir), data_dir=str(tmp_path / "data"), max_length=64)
