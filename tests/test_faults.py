"""Fault injection: SIGKILL at random moments then resume gives the uninterrupted run's adapter bit for
bit; incomplete checkpoints are never resumed; concurrent runs are refused; non-finite values stop the run
naming the step; fuzzed configs, data files and adapters end in success or one clean line, never a traceback."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import REPO, run_cli
from qkvtune import checkpoints, io
from qkvtune.config import ConfigError, build_config
from qkvtune.train import train
from qkvtune.trainer import NonFiniteError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _args(model_dir, out, *extra):
    return ["train", f"model={model_dir}", "task=builtin/vader", "max_train_samples=96", "max_eval_samples=32",
            "batch_size=8", "max_steps=12", "eval_strategy=steps", "eval_steps=2", "save_total_limit=3",
            "dropout=0.1", "lr=1e-2", "lr_ratio=4", "logging_steps=2", f"output_dir={out}", *extra]


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "qkvtune", *args], capture_output=True, text=True, cwd=REPO,
                          env=ENV, **kw)


def _adapter(out):
    return load_file(os.path.join(out, io.QKV_WEIGHTS))


@pytest.fixture(scope="module")
def reference(tiny_bert_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "run")
    r = _run(_args(tiny_bert_dir, out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _assert_same(a, b):
    """Bit for bit: a resumed run repeats the uninterrupted run's arithmetic (same path, same process count)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_at_random_moments_then_resume(reference, tiny_bert_dir, tmp_path):
    rng = random.Random(1234)
    expected = _adapter(reference)
    for i, after_step in enumerate([0, 8]):  # kill once the run has passed this many steps (start; with checkpoints)
        out = str(tmp_path / f"kill{i}")
        p = subprocess.Popen([sys.executable, "-m", "qkvtune", *_args(tiny_bert_dir, out)], cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            steps = [int(c.rsplit("-", 1)[1]) for c in checkpoints.checkpoints(out)]
            if (max(steps) if steps else 0) >= after_step and (after_step > 0 or os.path.isdir(out)):
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.4))  # land anywhere: mid-step, mid-checkpoint, mid-evaluation
        p.send_signal(signal.SIGKILL)
        p.wait()
        r = _run(_args(tiny_bert_dir, out, "resume=true"))
        assert r.returncode == 0, r.stderr[-2000:]
        _assert_same(_adapter(out), expected)


def test_incomplete_checkpoint_is_skipped_on_resume(reference, tiny_bert_dir, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(reference, out)
    for f in ("config.yaml", io.QKV_WEIGHTS):
        os.remove(os.path.join(out, f))
    last = checkpoints.checkpoints(out)[-1]
    with open(os.path.join(last, "optimizer.pt"), "r+b") as f:  # a write the kill cut short
        f.truncate(10)
    assert checkpoints.last_complete(out) == checkpoints.checkpoints(out)[-2]
    r = run_cli(*_args(tiny_bert_dir, out, f"resume={last}"))  # refused before training: in this process
    assert r.returncode == 2 and "incomplete or was modified" in r.stderr
    r = _run(_args(tiny_bert_dir, out, "resume=true"))
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same(_adapter(out), _adapter(reference))


def test_second_writer_is_refused(tiny_bert_dir, tmp_path):
    out = str(tmp_path / "run")
    lock = checkpoints.lock_output_dir(out)
    try:  # in process: flock conflicts between two open files of one process too
        r = run_cli(*_args(tiny_bert_dir, out))
        assert r.returncode == 2 and r.stderr.strip().endswith("another qkvtune run is writing there")
    finally:
        lock.close()
    assert os.listdir(out) == [checkpoints.LOCK]


def test_existing_run_needs_resume_or_overwrite(reference, tiny_bert_dir):
    r = run_cli(*_args(tiny_bert_dir, reference))
    assert r.returncode == 2 and "already holds a run" in r.stderr


def test_nonfinite_loss_stops_with_step_and_last_checkpoint(tiny_bert_dir, tmp_path):
    cfg = build_config(dict(model=tiny_bert_dir, task="builtin/vader", max_train_samples=96, batch_size=8,
                            max_steps=12, eval_strategy="steps", eval_steps=2, optim="sgd", lr=1e30,
                            warmup_ratio=0, output_dir=str(tmp_path / "run")))
    with pytest.raises(NonFiniteError, match=r"non-finite (loss|gradient) at step (\d+); last good checkpoint: "):
        train(cfg)
    for ckpt in checkpoints.checkpoints(cfg.output_dir):  # whatever was kept is complete and finite
        assert checkpoints.is_complete(ckpt)
        assert all(torch.isfinite(t).all() for t in load_file(os.path.join(ckpt, io.QKV_WEIGHTS)).values())


def test_nonfinite_skip_policy_counts(tiny_bert_dir, tmp_path, monkeypatch):
    """With skip, a step whose gradient is NaN leaves the weights untouched; past the limit the run stops."""
    from qkvtune import train as train_mod

    original = train_mod.QkvTrainer.training_step
    calls = {"n": 0}

    def poisoned(self, model, inputs, num_items_in_batch=None):
        calls["n"] += 1
        loss = original(self, model, inputs, num_items_in_batch)
        if calls["n"] in (3, 4, 5):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(train_mod.QkvTrainer, "training_step", poisoned)
    base = dict(model=tiny_bert_dir, task="builtin/vader", max_train_samples=64, batch_size=8, max_steps=8,
                eval_strategy="no", on_nonfinite="skip")
    metrics = train(build_config(dict(base, max_nonfinite_skips=3, output_dir=str(tmp_path / "a"))))
    assert metrics["global_step"] == 8
    assert all(torch.isfinite(t).all() for t in _adapter(str(tmp_path / "a")).values())
    calls["n"] = 0
    with pytest.raises(NonFiniteError, match="gradient at step 5"):
        train(build_config(dict(base, max_nonfinite_skips=2, output_dir=str(tmp_path / "b"))))


# --- fuzzing: every malformed input is a clean, named refusal --------------------------------------

values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.text(max_size=3), max_size=4),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
keys = st.sampled_from(["rank", "alpha", "lr", "lr_ratio", "targets", "method", "epochs", "batch_size", "layers",
                        "dropout", "resume", "eval_strategy", "eval_steps", "patience", "max_steps", "task",
                        "model", "lr_v", "loraplus_ratio", "save_total_limit", "target_modules", "lr_rate",
                        "on_nonfinite", "weight_decay", "warmup_ratio", "output_dir", "seed", "optim"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=5))
def test_fuzzed_configs_are_accepted_or_refused_cleanly(cfg):
    try:
        build_config(cfg)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.text(alphabet="ab 01\t\"'-.x", max_size=8), min_size=0, max_size=4), max_size=6),
       st.booleans())
def test_fuzzed_glue_files_are_accepted_or_refused_cleanly(tmp_path_factory, rows, header):
    from transformers import AutoTokenizer

    from conftest import minilm_folder
    from qkvtune.data import DataError, load_task

    root = tmp_path_factory.mktemp("fuzz")
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True)
    text = ("sentence\tlabel\n" if header else "") + "".join("\t".join(r) + "\n" for r in rows)
    (folder / "train.tsv").write_text(text)
    (folder / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    tok = _TOK.setdefault("t", AutoTokenizer.from_pretrained(minilm_folder()))
    try:
        task = load_task("glue/sst2", tok, data_dir=str(root))
        assert len(task.train) == sum(1 for r in rows if "\t".join(r) != "")  # blank lines are skipped
    except DataError as e:
        assert "\n" not in str(e) and "train.tsv" in str(e)


_TOK = {}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64), st.sampled_from(["json", "weights"]))
def test_fuzzed_adapter_files_are_refused_cleanly(tmp_path_factory, garbage, which):

    from conftest import tiny
    from qkvtune import attach
    from qkvtune.targets import find_targets

    folder = tmp_path_factory.mktemp("adapter")
    model = tiny("bert", 2)
    attach.add_adapter(model, find_targets(model, ["v"]), "lora", rank=2)
    io.save_adapter(model, str(folder))
    target = folder / (io.QKV_CONFIG if which == "json" else io.QKV_WEIGHTS)
    target.write_bytes(garbage)
    fresh = tiny("bert", 2)
    with pytest.raises(io.AdapterError) as e:
        io.load_adapter(fresh, str(folder))
    assert "\n" not in str(e.value) and target.name in str(e.value)
    assert attach.adapter_names(fresh) == []
