"""Malformed run folders and output paths, across commands: every case ends in success or in one line naming
the file, field or path (exit 2), never a traceback, and a failed command leaves nothing behind.

The run folder's files are mutated byte by byte (truncation, flipped bytes, invalid UTF-8, a folder in the
file's place, the file gone): the adapter's JSON and safetensors (qkvtune and PEFT layout), config.yaml,
metrics.json and trainer_state.json; then `export`, `eval` and `analyze` run on the folder in process."""

import os
import shutil

import pytest

from mutations import apply, mutations
from qkvtune import io
from qkvtune.cli import main
from qkvtune.config import build_config
from qkvtune.train import train

FILES = [io.QKV_CONFIG, io.QKV_WEIGHTS, "config.yaml", "metrics.json"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bert_dir):
    out = tmp_path_factory.mktemp("faults-runs") / "run"
    train(build_config(dict(model=tiny_bert_dir, task="builtin/vader", max_train_samples=16, max_eval_samples=8,
                            batch_size=8, max_steps=2, eval_strategy="steps", eval_steps=2, output_dir=str(out))))
    return str(out)


def _cases(run_dir: str, tmp_path, name: str, drop=()):
    """(i, label, folder) for each mutation of ``name``: a copy of the run folder, ``drop`` removed, the file
    mutated."""
    with open(os.path.join(run_dir, name), "rb") as f:
        original = f.read()
    for i, (label, mutation) in enumerate(mutations(original, name, flips=2)):
        case = str(tmp_path / f"case{i}")
        shutil.copytree(run_dir, case)
        for other in drop:
            os.remove(os.path.join(case, other))
        apply(os.path.join(case, name), mutation)
        yield i, label, case


def _check(rc: int, err: str, what: str, out: str | None = None) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("qkvtune: ") or "Traceback" in line]
    assert "Traceback" not in err, what
    assert rc in (0, 2), (what, rc)
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith("qkvtune: error: ") and len(lines[0]) > 20, (what, err[-500:])
        if out is not None:
            assert not os.path.exists(out) and not os.path.exists(out + ".partial"), what


@pytest.mark.parametrize("name", FILES)
def test_mutated_run_files_across_commands(run_dir, tmp_path, capsys, name, tiny_bert_dir):
    refused = 0
    for i, label, case in _cases(run_dir, tmp_path, name):
        what = f"{name} {label}"
        commands = [["export", case, str(tmp_path / f"merged{i}")]]
        if name == io.QKV_CONFIG or i % 3 == 0:  # analyze opens runs the same way: a sample suffices
            commands.append(["analyze", "amplification", case, "--out", str(tmp_path / f"amp{i}")])
        if name in ("config.yaml", io.QKV_CONFIG):
            commands.append(["eval", case])
        if name == "metrics.json":
            if i % 2:
                continue  # each case loads a model for the kernel: half of them
            commands = [["analyze", "ntk", "--n", "4", f"model={tiny_bert_dir}", "--run", case, "--out",
                         str(tmp_path / f"ntk{i}")]]
        for argv in commands:
            capsys.readouterr()
            rc = main(argv)
            err = capsys.readouterr().err
            out = argv[2] if argv[0] == "export" else None
            _check(rc, err, f"{' '.join(argv[:2])}: {what}", out)
            refused += rc == 2
            if rc == 2 and name in err:
                continue
            if rc == 2:  # the message names the run folder or the file (a missing file: the folder)
                assert case in err or name in err, (what, err)
    assert refused >= 3  # most mutations are refused, not silently accepted


@pytest.mark.parametrize("name", [io.PEFT_CONFIG, io.PEFT_WEIGHTS])
def test_mutated_peft_adapter_files(run_dir, tmp_path, name):
    """A PEFT-layout folder (no qkvtune files) loads through io.load_adapter or is refused naming its file."""
    from qkvtune import attach, runs

    base = runs.pretrained(runs.run_config(run_dir), n_train=1, n_eval=1).model
    refused = 0
    for i, label, case in _cases(run_dir, tmp_path, name, drop=(io.QKV_CONFIG, io.QKV_WEIGHTS)):
        try:
            io.load_adapter(base, case, f"a{i}")
            attach.delete_adapter(base, f"a{i}")
        except io.AdapterError as e:
            refused += 1
            assert "\n" not in str(e) and (name in str(e) or case in str(e)), (label, str(e))
            assert f"a{i}" not in attach.adapter_names(base)
    assert refused >= 6


def test_output_paths_that_cannot_be_written(run_dir, tmp_path, capsys, tiny_bert_dir):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = [
        (["train", f"model={tiny_bert_dir}", f"output_dir={a_file}"], "output_dir"),
        (["train", f"model={tiny_bert_dir}", f"output_dir={a_file}/run"], "output_dir"),
        (["export", run_dir, str(a_file)], "OUT_DIR"),
        (["export", run_dir, str(a_file), "--format", "gguf"], "OUT_DIR"),
        (["export", run_dir, str(tmp_path / "g"), "--format", "gguf", "--gguf-base", str(tmp_path)], "--gguf-base"),
        (["serve", str(a_file)], "no Modelfile"),
        (["analyze", "amplification", run_dir, "--out", str(a_file)], "--out"),
        (["analyze", "subspace", run_dir, run_dir, "--out", str(a_file / "x")], "--out"),
        (["bench", "claims", "--out", str(a_file)], "--out"),
        (["bench", "claims", "--out", str(tmp_path / "claims"), "--report", str(tmp_path)], "--report"),
        (["bench", "speed", "--model", "minilm", "--out", str(a_file)], "--out"),
        (["bench", "gguf", "--out", str(a_file)], "--out"),
    ]
    if os.path.isdir("/proc/self"):  # writable by the access check (root), yet no folder can be made there
        cases.append((["train", f"model={tiny_bert_dir}", "output_dir=/proc/qkvtune-x", "max_steps=1"], "output_dir"))
    for argv, key in cases:
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and key in err and "Traceback" not in err, (argv, err)
    assert a_file.read_text() == "not a folder" and not (tmp_path / "claims").exists() and not (tmp_path / "g").exists()
