"""Smoke test of ``qkvtune bench speed`` on tiny models: every configuration runs and is reported (no timing asserts)."""

import json
import math
import os

import pytest

from qkvtune.bench import speed
from qkvtune.cli import main


@pytest.mark.parametrize("folder", ["tiny_bert_dir", "tiny_llama_dir"])
def test_bench_speed_runs_every_configuration(folder, request, tmp_path, capsys):
    model_dir = request.getfixturevalue(folder)
    rc = main(["bench", "speed", "--model", model_dir, "--rounds", "1", "--warmup", "0", "--device", "cpu",
               "--batch", "2", "--seq", "8", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    files = os.listdir(tmp_path)
    assert files == [f"speed_{os.path.basename(model_dir)}_cpu.json"]
    report = json.loads((tmp_path / files[0]).read_text())
    assert list(report["results"]) == speed.configurations("both")
    for r in report["results"].values():
        assert r["median_s"] > 0 and math.isfinite(r["x_forward"]) and math.isfinite(r["x_floor"])
    names = {r["ratio"] for r in report["ratios"]}
    assert {"qkvtune-lora-qv / peft-lora-qv", "fast-qkvtune-lora-qkv / peft-lora-qkv", "merged-forward / base-forward",
            "unmerged-forward / base-forward", "qkvtune-dense-qv / full", "qkvtune-smt / full"} <= names
    assert "| qkvtune-smt / qkvtune-lora-qv |" in capsys.readouterr().out
