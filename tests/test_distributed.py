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
