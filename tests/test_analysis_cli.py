"""``qkvtune analyze …`` end to end on a tiny BERT and real SST-2 rows: every subcommand writes its JSON and PNG
files, reports what it should, and bad arguments end in one line naming the argument."""

import argparse
import json
import os

import pytest

from conftest import data_dir
from qkvtune.analyze import register
from qkvtune.analysis.samples import fit_slope, geometric_grid
from qkvtune.cli import main
from qkvtune.config import build_config
from qkvtune.train import train

pytestmark = pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir):
    """Two short LoRA runs on SST-2 (ranks 4 and 8, different seeds)."""
    root = tmp_path_factory.mktemp("analysis-runs")
    out = []
    for name, rank, seed in (("a", 4, 0), ("b", 8, 1)):
        cfg = build_config(dict(model=tiny_bert_dir, task="glue/sst2", data_dir=data_dir(), max_train_samples=48,
                                max_eval_samples=16, batch_size=8, epochs=2, lr=5e-3, rank=rank, seed=seed,
                                logging_steps=50, output_dir=str(root / name)))
        train(cfg)
        out.append(str(root / name))
    return out


def _common(model):
    return [f"model={model}", "task=glue/sst2", f"data_dir={data_dir()}", "max_train_samples=48", "batch_size=8",
            "epochs=2", "lr=5e-3"]


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_ntk_with_kernel_predictions(tmp_path, tiny_bert_dir, runs):
    out = tmp_path / "ntk"
    assert main(["analyze", "ntk", *_common(tiny_bert_dir), "--n", "32", "--eval-n", "16", "--kinds", "q,v",
                 "--run", runs[0], "--out", str(out)]) == 0
    s = _read(out / "ntk.json")
    assert s["n"] == 32 and s["kinds"] == ["q", "v"] and len(s["eigenvalues"]) == 32
    assert s["kernel_predictions"]["ridge"]["n_test"] == 16
    assert 0 <= s["kernel_predictions"]["ridge"]["accuracy"] <= 1 and "logistic" in s["kernel_predictions"]
    assert "eval_accuracy" in s["fine_tuning"]
    assert (out / "ntk_spectrum.png").stat().st_size > 0 and (out / "ntk_kernel.safetensors").exists()


def test_ntk_on_mlp_kinds(tmp_path, tiny_bert_dir):
    """--kinds names MLP kinds ("mlp" for all of the model's): BERT's up and down kernels beside v's."""
    out = tmp_path / "ntk"
    assert main(["analyze", "ntk", *_common(tiny_bert_dir), "--n", "12", "--kinds", "v,mlp", "--out", str(out)]) == 0
    s = _read(out / "ntk.json")
    assert s["kinds"] == ["down", "up", "v"] and all(s["per_kind_trace"][k] > 0 for k in s["kinds"])
    assert sum(s["per_kind_trace"].values()) == pytest.approx(s["trace"])
    assert sum(t.endswith(("intermediate.dense[up]", "output.dense[down]")) for t in s["targets"]) == 4


def test_stopping_prediction_next_to_observed_best(tmp_path, tiny_bert_dir, runs, capsys):
    out = tmp_path / "stop"
    assert main(["analyze", "stopping", *_common(tiny_bert_dir), "--n", "32", "--kinds", "v", "--run", runs[0],
                 "--out", str(out)]) == 0
    s = _read(out / "stopping.json")
    assert 0 <= s["predicted_step"] <= s["horizon"] == 12 and s["steps_per_epoch"] == 6
    assert s["observed_best_step"] in (6, 12) and s["sigma"] > 0
    assert (out / "stopping.png").exists()
    assert "predicted_step" in capsys.readouterr().out


def test_adapter_analyses(tmp_path, runs):
    assert main(["analyze", "subspace", runs[0], runs[1], "--out", str(tmp_path / "sub")]) == 0
    s = _read(tmp_path / "sub" / "subspace.json")
    phi = next(iter(s["phi"].values()))
    assert len(phi) == 4 and len(phi[0]) == 8 and all(0 <= v <= 1 + 1e-9 for row in phi for v in row)
    assert main(["analyze", "amplification", runs[0], "--out", str(tmp_path / "amp")]) == 0
    a = _read(tmp_path / "amp" / "amplification.json")
    assert all(m["factor"] > 0 and m["r"] <= 4 for m in a["matrices"].values())
    assert all(s["numerical_rank"] <= 4 for s in a["spectra"].values())
    for f in ("amplification.png", "projections.png", "spectra.png"):
        assert (tmp_path / "amp" / f).exists()
    assert main(["analyze", "task-vectors", *runs, "--kernel-n", "6", "--eval-n", "16", "--coefs", "0,0.5,1",
                 "--out", str(tmp_path / "tv")]) == 0
    t = _read(tmp_path / "tv" / "task_vectors.json")
    assert t["cosine"][0][0] == pytest.approx(1.0) and t["kernel_alignment"][1][1] == pytest.approx(1.0)
    assert t["coefficient_search"]["coef"] in (0.0, 0.5, 1.0) and set(t["accuracy"]) == {"a", "b"}
    assert set(t["accuracy"]["a"]) == {"base", "sum_at_coef", "fine_tuned"}
    assert (tmp_path / "tv" / "coefficient.png").exists()


def test_sample_size_study(tmp_path, tiny_bert_dir):
    out = tmp_path / "samples"
    assert main(["analyze", "samples", *_common(tiny_bert_dir), "epochs=1", "max_eval_samples=16", "--ns", "16,32",
                 "--kernel-n", "16", "--out", str(out)]) == 0
    s = _read(out / "samples.json")
    assert s["ns"] == [16, 32] and len(s["runs"]) == 2 and "kernel_rate" in s
    assert (out / "samples.png").exists() and (out / "n16" / "metrics.json").exists()


def test_helpers_and_errors(tmp_path, tiny_bert_dir, capsys):
    assert geometric_grid(64, 512, 4) == [64, 128, 256, 512]
    assert fit_slope([10, 100, 1000], [1.0, 0.1, 0.01]) == pytest.approx(-1.0)
    rc = main(["analyze", "ntk", *_common(tiny_bert_dir), "--n", "8", "--chunk-size", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "qkvtune: error: --chunk-size: must be >= 1, got 0"  # before loading anything
    rc = main(["analyze", "samples", *_common(tiny_bert_dir), "--grid", "64:32:3", "--out", str(tmp_path)])
    assert rc == 2 and "--grid" in capsys.readouterr().err
    parser = argparse.ArgumentParser(prog="qkvtune")
    register(parser.add_subparsers(dest="command"))  # how the main CLI wires it
    args = parser.parse_args(["analyze", "amplification", "RUN", "--out", "x"])
    assert args.command == "analyze" and args.analysis == "amplification" and callable(args.func)
    assert not os.path.exists(tmp_path / "ntk.json")
