"""Two CPU processes (torchrun, gloo) train the same adapter as one process with the same global batch, under
DDP and under FSDP2; a sharded run cut back to a checkpoint resumes to the same adapter.

SGD, not Adam: Adam's first steps are lr·g/(|g|+eps), which turns float-rounding differences in tiny
gradients into visible ones and would hide real disagreements behind a loose tolerance."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, data_dir, run_cli
from qkvtune import io

pytestmark = pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")


def _train(args, out, nproc=1):
    """A run under torchrun with ``nproc`` processes; the one-process reference in this process (no interpreter
    start-up; it is compared with a tolerance anyway, being another path)."""
    if nproc == 1:
        r = run_cli("train", *args, f"output_dir={out}")
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        r = subprocess.run([*launch, "-m", "qkvtune", "train", *args, f"output_dir={out}"], capture_output=True,
                           text=True, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(out / io.QKV_WEIGHTS)


def _common(tiny_bert_dir, method):
    args = [f"model={tiny_bert_dir}", "task=glue/sst2", f"data_dir={data_dir()}", "max_train_samples=48",
            "max_eval_samples=16", "epochs=2", "optim=sgd", "lr=0.5", "lr_ratio=4", "lr_mlp_ratio=2",
            "eval_strategy=no", "warmup_ratio=0", f"method={method}"]
    # MLP kinds too: their deltas sit in the same FSDP units (layers) as attention's
    return args + (["block_size=8", "smt_budget=12", "smt_warmup_steps=2", "smt_targets=[q,k,v,mlp]"]
                   if method == "smt" else ["targets=[q,v,up,down]"])


def _same(reference, other, atol=1e-5, rtol=1e-4):
    assert reference.keys() == other.keys() and reference
    for k in reference:
        torch.testing.assert_close(other[k], reference[k], atol=atol, rtol=rtol, msg=k)
    started_at_zero = [k for k in reference if k.endswith(("lora_B", "values"))]
    assert started_at_zero and all(reference[k].abs().max() > 0 for k in started_at_zero)  # every delta moved


def test_ddp_and_fsdp_match_one_process(tmp_path, tiny_bert_dir):
    common = _common(tiny_bert_dir, "lora")
    one = _train([*common, "batch_size=8"], tmp_path / "one")
    assert any(".up." in k for k in one) and any(".down." in k for k in one)
    _same(one, _train([*common, "batch_size=4"], tmp_path / "ddp", nproc=2))
    _same(one, _train([*common, "batch_size=4", "fsdp=true"], tmp_path / "fsdp", nproc=2))
    assert (tmp_path / "fsdp" / "checkpoint-6" / "optimizer.bin").exists()  # FSDP's optimizer state: sharding ran
    assert (tmp_path / "ddp" / "checkpoint-6" / "optimizer.pt").exists()


def test_fsdp_smt_matches_one_process_and_resumes(tmp_path, tiny_bert_dir):
    common = _common(tiny_bert_dir, "smt")
    two = _train([*common, "batch_size=4", "fsdp=true"], tmp_path / "two", nproc=2)
    # The one process trains the blocks rank 0 selected and shared (its warm-up saw batches of 4, not 8); had
    # rank 1 trained other blocks, FSDP's gradient reduction would have mixed them and the adapters would differ.
    one = _train([*common, "batch_size=8", f"smt_selection={tmp_path / 'two' / 'smt_selection.json'}"],
                 tmp_path / "one")
    _same(one, two)
    assert any(".up." in k or ".down." in k for k in two)  # MLP blocks were selected and trained

    # A run stopped after its first checkpoint (step 6 of 12) continues to the same adapter, its selection
    # coming back from the checkpoint.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "two", cut)
    shutil.rmtree(cut / "checkpoint-12")
    for f in os.listdir(cut):
        if not (cut / f).is_dir() and f != "config.yaml":
            os.remove(cut / f)
    resumed = _train([*common, "batch_size=4", "fsdp=true", "resume=true"], cut, nproc=2)
    _same(two, resumed, atol=1e-6, rtol=1e-5)


def test_fsdp_chunked_lm_loss_matches_one_process(tmp_path, tiny_llama_dir):
    """A causal LM under FSDP2 with the chunked loss (the default) trains the adapter one process trains with
    transformers' own loss on the same global batch (assistant-only labels: the ranks' label counts differ)."""
    import json

    f = tmp_path / "pc.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"question {i} " + "word " * (i % 7),
                                     "completion": f"answer {i} " + "more " * (i % 5)}) + "\n" for i in range(36)))
    common = [f"model={tiny_llama_dir}", "task=sft", f"train_file={f}", "max_length=48", "max_steps=4", "optim=sgd",
              "lr=0.5", "lr_ratio=4", "eval_strategy=no", "warmup_ratio=0"]
    one = _train([*common, "batch_size=8", "chunked_loss=off"], tmp_path / "one")
    _same(one, _train([*common, "batch_size=4", "fsdp=true"], tmp_path / "fsdp", nproc=2))
