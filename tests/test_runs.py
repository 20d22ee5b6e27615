"""The run layer: one way from a config to resolved targets, adapter and saved tensors; finished runs open
without their training data; the NTK stopping rule measures the slices a run trains."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import data_dir
from qkvtune import attach, io, runs
from qkvtune.config import build_config
from qkvtune.errors import OutputError, check_output_dir, check_output_file
from qkvtune.train import train


def _cfg(tmp_path, model, **kw):
    base = dict(model=model, task="builtin/vader", max_train_samples=48, max_eval_samples=16, batch_size=8,
                max_steps=3, eval_strategy="no", output_dir=str(tmp_path / "run"), lr=5e-3)
    return build_config({**base, **kw})


def test_a_parameter_walks_from_config_to_saved_tensor(tmp_path, tiny_bert_dir):
    """targets / layers / lr_ratio / method: the run's resolved targets are the adapter's slices, the optimizer
    groups and the saved tensors, and nothing else."""
    cfg = _cfg(tmp_path, tiny_bert_dir, method="dora", targets=["q", "v"], layers="last:1", lr_ratio=4.0)
    run = runs.build(cfg)
    names = [t.name for t in run.targets]
    assert names == ["bert.encoder.layer.1.attention.self.query[q]", "bert.encoder.layer.1.attention.self.value[v]"]
    assert [d.target for _, d in attach.iter_deltas(run.model)] == run.targets
    train(cfg)
    meta = json.load(open(tmp_path / "run" / io.QKV_CONFIG))
    assert [f"{t['module']}[{t['kind']}]" for t in meta["targets"]] == names and meta["method"] == "dora"
    assert meta["hparams"] == {"rank": 8, "alpha": 16.0, "rslora": False, "dropout": 0.0}
    rates = meta["settings"]["learning_rates"]
    assert rates["q.A"] == 5e-3 and rates["v.A"] == pytest.approx(2e-2) and rates["v.magnitude"] == pytest.approx(2e-2)
    saved = load_file(str(tmp_path / "run" / io.QKV_WEIGHTS))
    assert sorted({k.split(".")[-2] for k in saved if k.startswith("deltas.")}) == ["q", "v"]
    assert all(".layer.1." in k for k in saved if k.startswith("deltas."))
    assert meta["settings"]["task"] == {"kind": "classification", "num_labels": 2,
                                        "label_names": run.info.label_names}
    opened = runs.open_run(str(tmp_path / "run"), with_task=False)
    assert opened.targets == run.targets and opened.task is None and opened.info == run.info


def test_ntk_early_stopping_measures_the_trained_slices(tmp_path, tiny_bert_dir):
    """With explicit target_modules (an MLP projection named as kind 'up') the kernel is taken over exactly
    the slices the run trains; looking targets up again by kind would fail or measure others."""
    cfg = _cfg(tmp_path, tiny_bert_dir, target_modules={"intermediate.dense": "up"}, targets=["up"], layers=[1],
               early_stopping="ntk", max_steps=4)
    metrics = train(cfg)
    record = json.load(open(tmp_path / "run" / "ntk_stopping.json"))
    assert record["ntk_targets"] == ["bert.encoder.layer.1.intermediate.dense[up]"]
    meta = json.load(open(tmp_path / "run" / io.QKV_CONFIG))
    assert [f"{t['module']}[{t['kind']}]" for t in meta["targets"]] == record["ntk_targets"]
    assert metrics["global_step"] == record["ntk_stopped_at"]


@pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")
def test_export_and_eval_need_no_training_data(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    """A finished run exports from its folder and the base model alone (the data folder is gone); eval names
    the missing data."""
    folder = tmp_path / "data" / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for split in ("train", "dev"):
        with open(os.path.join(data_dir(), "glue", "SST-2", f"{split}.tsv")) as f:
            (folder / f"{split}.tsv").write_text("".join(f.readlines()[:41]))
    cfg = _cfg(tmp_path, tiny_bert_dir, task="glue/sst2", data_dir=str(tmp_path / "data"))
    train(cfg)
    shutil.rmtree(tmp_path / "data")
    monkeypatch.setenv("QKVTUNE_DATA", "")
    from qkvtune.cli import main

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qkvtune")]
    assert len(err) == 1 and "data" in err[0]


def test_open_runs_share_one_base(tmp_path, tiny_bert_dir):
    dirs = []
    for name, kinds in (("a", ["q", "v"]), ("b", ["v"])):
        cfg = _cfg(tmp_path, tiny_bert_dir, targets=kinds, output_dir=str(tmp_path / name), seed=len(dirs))
        train(cfg)
        dirs.append(str(tmp_path / name))
    a, b = runs.open_runs(dirs)
    assert a.model is b.model and (a.adapter, b.adapter) == ("r0", "r1")
    assert [t.kind for t in a.targets] == ["q", "v", "q", "v"] and [t.kind for t in b.targets] == ["v", "v"]
    assert attach.active_adapters(a.model) == []
    # each adapter reproduces its own run's outputs
    single = runs.open_run(dirs[1])
    batch = single.task.collator(single.examples("eval", 4))
    batch.pop("labels")
    attach.set_adapter(a.model, "r1")
    with torch.no_grad():
        # the same weights and adapter on the same batch, one process: the same path, so bit-exact
        assert torch.equal(a.model.eval()(**batch).logits, single.model.eval()(**batch).logits)


def test_output_paths(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for path, match in [(str(f), "is a file"), (str(f / "sub"), "lies under"), ("", "must not be empty")]:
        with pytest.raises(OutputError, match=match):
            check_output_dir(path)
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(str(tmp_path), "--report")
    check_output_dir(str(tmp_path / "new" / "deeper"))  # creatable: fine, and nothing is created
    assert not (tmp_path / "new").exists()


def _peft_adapter(base_dir, out, seed, rank, task_type="SEQ_CLS"):
    """An adapter trained outside qkvtune: PEFT's own LoRA on query/value with random B, saved by PEFT."""
    import peft
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type=task_type, r=rank, lora_alpha=2 * rank,
                                                       target_modules=["query", "value"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    return model


def test_analyze_plain_peft_adapters(tmp_path, tiny_bert_dir, capsys):
    """PEFT folders with no qkvtune files go through analyze subspace/amplification: the base model comes from
    base_model_name_or_path (or model=…), the label count from the saved head; ΔW equals PEFT's own."""
    from qkvtune.analysis.subspace import delta_weights
    from qkvtune.cli import main

    a = _peft_adapter(tiny_bert_dir, str(tmp_path / "a"), 0, 4)
    _peft_adapter(tiny_bert_dir, str(tmp_path / "b"), 1, 8)
    assert main(["analyze", "subspace", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "s")]) == 0
    phi = json.load(open(tmp_path / "s" / "subspace.json"))["phi"]
    assert len(phi) == 4 and len(next(iter(phi.values()))) == 4 and len(next(iter(phi.values()))[0]) == 8
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.load(open(cfg_path))
    cfg["base_model_name_or_path"] = None
    cfg_path.write_text(json.dumps(cfg))
    assert main(["analyze", "amplification", str(tmp_path / "a"), "--out", str(tmp_path / "x")]) == 2
    assert "model=" in capsys.readouterr().err
    assert main(["analyze", "amplification", str(tmp_path / "a"), f"model={tiny_bert_dir}", "--out",
                 str(tmp_path / "amp")]) == 0
    run, = runs.open_runs([str(tmp_path / "a")], {"model": tiny_bert_dir})
    assert run.info.num_labels == 3 and {t.kind for t in run.targets} == {"q", "v"}
    for name, (dw, _) in delta_weights(run.model, run.adapter).items():
        module = name.split("[")[0]
        layer = a.base_model.model.get_submodule(module)
        torch.testing.assert_close(dw, layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)
