"""bench sft: the report's ratios and targets from measured figures, and the --quick smoke run end to end
(its TRL rows only where TRL is installed)."""

import importlib.util
import json
import math

import pytest

from conftest import data_dir, run_cli
from qkvtune.bench.sft import QKV, TRL, report, spec_of

needs_data = pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")


def test_configuration_names_cover_the_grid():
    assert len(QKV) == 12 and TRL == ["trl-padded", "trl-packed"]
    assert spec_of("qkvtune-packed-nf4-ckpt-chunked") == {"lib": "qkvtune", "packing": True, "ckpt": True,
                                                          "quantize": "nf4", "chunked": True}
    assert spec_of("qkvtune-padded-eager-full")["chunked"] is False and spec_of("trl-packed")["packing"]


def test_report_ratios_and_targets():
    r = lambda tps, peak: {"tokens": 1000.0, "train_runtime": 1000.0 / tps, "peak_mb": peak, "steps": 4,
                           "train_loss": 1.0, "eval_loss": 1.0}
    results = {"trl-padded": r(100, 2000), "trl-packed": r(150, 1900), "qkvtune-padded-eager-full": r(110, 2100),
               "qkvtune-padded-eager-chunked": r(108, 1500), "qkvtune-packed-eager-chunked": r(140, 1800)}
    memory = {"train-eager-full-eval4": {"peak_mb": 4000.0}, "train-ckpt-chunked": {"peak_mb": 1700.0},
              "train-default": {"peak_mb": 3000.0}, "peft-eager-step": {"peak_mb": 2900.0}}
    rep = report(results, memory)
    rows = {x["config"]: x for x in rep["rows"]}
    assert rows["qkvtune-packed-eager-chunked"]["tokens_vs_trl-padded"] == pytest.approx(1.4)
    assert rows["qkvtune-padded-eager-chunked"]["peak_vs_trl-padded"] == pytest.approx(0.75)
    checks = {(c["config"], c["reference"], c["what"]): c for c in rep["checks"]}
    assert checks[("qkvtune-packed-eager-chunked", "trl-padded", "tokens/s")]["met"]        # 1.4 ≥ 1.3
    assert not checks[("qkvtune-packed-eager-chunked", "trl-packed", "tokens/s")]["met"]    # 0.93 < 1.0
    assert checks[("qkvtune-packed-eager-chunked", "trl-packed", "peak")]["met"]
    assert checks[("qkvtune-padded-eager-chunked", "qkvtune-padded-eager-full", "tokens/s")]["met"]  # 0.98 ≥ 0.95
    assert ("qkvtune-packed-ckpt-chunked", "qkvtune-packed-ckpt-full", "tokens/s") not in checks     # not measured
    mem = {c["config"]: c for c in rep["memory_checks"]}
    assert mem["train-ckpt-chunked"]["ratio"] == pytest.approx(0.425) and mem["train-ckpt-chunked"]["met"]
    assert not mem["train-default"]["met"] and "train-nf4-ckpt-chunked" not in mem


@needs_data
def test_quick_run_writes_the_report(tmp_path):
    configs = ["qkvtune-padded-eager-full", "qkvtune-packed-eager-chunked", "trl-packed"]
    out = run_cli("bench", "sft", "--quick", "--data-dir", data_dir(), "--configs", ",".join(configs),
                  "--report", str(tmp_path / "SFT.md"), "--results", str(tmp_path / "sft.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["config"]: r for r in json.loads((tmp_path / "sft.json").read_text())["rows"]}
    have_trl = importlib.util.find_spec("trl") is not None
    assert set(rows) == set(configs[:2] + (configs[2:] if have_trl else []))
    for r in rows.values():
        assert "error" not in r, r
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["peak_mb"] > 0 and math.isfinite(r["eval_loss"])
    # packing changes the steps, not the tokens learned: the same real tokens in fewer, fuller steps
    assert rows["qkvtune-packed-eager-chunked"]["tokens"] == rows["qkvtune-padded-eager-full"]["tokens"]
    assert rows["qkvtune-packed-eager-chunked"]["steps"] < 2 * rows["qkvtune-padded-eager-full"]["steps"]
    assert (tmp_path / "SFT.md").read_text().startswith("# qkvtune bench sft") and (tmp_path / "SFT.png").exists()


def test_bad_options_are_named(tmp_path):
    out = run_cli("bench", "sft", "--data-dir", str(tmp_path))
    assert out.returncode == 2 and "--data-dir: needs text/alpaca_data_1k.json" in out.stderr
    if data_dir() is not None:
        out = run_cli("bench", "sft", "--configs", "qkvtune-padded-turbo", "--data-dir", data_dir())
        assert out.returncode == 2 and "--configs: 'qkvtune-padded-turbo' is not one of" in out.stderr
