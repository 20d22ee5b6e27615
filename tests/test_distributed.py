"""Two CPU processes (torchrun, gloo) train the same adapter as one process with the same global batch.

SGD, not Adam: Adam's first steps are lr·g/(|g|+eps), which turns float-rounding differences in tiny
gradients into visible ones and would hide real disagreements behind a loose tolerance."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, data_dir
from qkvtune import io


@pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")
def test_two_processes_match_one(tmp_path, tiny_bert_dir):
    common = [f"model={tiny_bert_dir}", "task=glue/sst2", f"data_dir={data_dir()}", "max_train_samples=48",
              "max_eval_samples=16", "max_steps=6", "optim=sgd", "lr=0.5", "lr_ratio=4", "eval_strategy=no", "warmup_ratio=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    one = subprocess.run([sys.executable, "-m", "qkvtune", "train", *common, "batch_size=8",
                          f"output_dir={tmp_path / 'one'}"], capture_output=True, text=True, cwd=REPO, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "qkvtune", "train", *common, "batch_size=4", f"output_dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_file(tmp_path / "one" / io.QKV_WEIGHTS)
    b = load_file(tmp_path / "two" / io.QKV_WEIGHTS)
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
        moved += int("lora_B" in k and a[k].abs().max() > 0)
    assert moved == 4  # every B left its exact-zero start, so agreement is not vacuous


def _train(args, out, nproc=1, **env_extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env_extra}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    r = subprocess.run([*launch, "-m", "qkvtune", "train", *args, f"output_dir={out}"], capture_output=True,
                       text=True, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(out / io.QKV_WEIGHTS)


@pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")
@pytest.mark.parametrize("method", ["lora", "smt"])
def test_fsdp_two_processes_match_one_and_resume(tmp_path, tiny_bert_dir, method):
    """FSDP2 across two CPU processes (gloo): the adapter equals one process's with the same global batch; SMT
    selects the same blocks; a run cut back to its first checkpoint resumes to the same adapter."""
    common = [f"model={tiny_bert_dir}", "task=glue/sst2", f"data_dir={data_dir()}", "max_train_samples=48",
              "max_eval_samples=16", "epochs=2", "optim=sgd", "lr=0.5", "lr_ratio=4", "eval_strategy=no",
              "warmup_ratio=0", f"method={method}"]
    if method == "smt":
        common += ["block_size=8", "smt_budget=12", "smt_warmup_steps=2"]
    two = _train([*common, "batch_size=4", "fsdp=true"], tmp_path / "two", nproc=2)
    # SMT: the one process trains the blocks rank 0 selected and shared (its warm-up saw batches of 4, not 8);
    # had rank 1 trained other blocks, FSDP's gradient reduction would mix them and the adapters would differ
    fixed = [f"smt_selection={tmp_path / 'two' / 'smt_selection.json'}"] if method == "smt" else []
    one = _train([*common, "batch_size=8", *fixed], tmp_path / "one")
    ckpt = tmp_path / "two" / "checkpoint-6"
    assert (ckpt / "optimizer.bin").exists()  # FSDP's optimizer state: the sharded path really ran
    assert a_keys_equal(one, two)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4, msg=k)
    started_at_zero = [k for k in one if k.endswith(("lora_B", "values"))]
    assert started_at_zero and all(one[k].abs().max() > 0 for k in started_at_zero)  # every delta moved

    if method != "smt":
        return
    # A run stopped after its first checkpoint (step 6 of 12) continues to the same adapter (SMT: its selection
    # comes back from the checkpoint).
    cut = tmp_path / "cut"
    import shutil

    shutil.copytree(tmp_path / "two", cut)
    shutil.rmtree(cut / "checkpoint-12")
    for f in os.listdir(cut):
        if not (cut / f).is_dir() and f != "config.yaml":
            os.remove(cut / f)
    resumed = _train([*common, "batch_size=4", "fsdp=true", "resume=true"], cut, nproc=2)
    for k in two:
        torch.testing.assert_close(resumed[k], two[k], atol=1e-6, rtol=1e-5, msg=k)


def a_keys_equal(a, b):
    return a.keys() == b.keys() and len(a) > 0
