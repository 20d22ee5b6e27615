"""Config: YAML + overrides, validated as a whole with messages that name the key."""

import pytest

from qkvtune.config import ConfigError, TrainConfig, build_config, load_config, parse_override


def test_overrides_are_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: minilm\ntargets: [q, k, v]\nlr: 0.001\n")
    cfg = load_config(str(f), ["targets=[q,v]", "lr_ratio=4", "max_train_samples=2000", "resume=true", "lr_o=null", "lr_v=1e-3"])
    assert cfg.targets == ["q", "v"] and cfg.lr_ratio == 4.0 and isinstance(cfg.lr_ratio, float)
    assert cfg.max_train_samples == 2000 and cfg.resume is True and cfg.lr == 0.001 and cfg.lr_o is None
    assert cfg.lr_v == 1e-3
    assert parse_override("task=glue/sst2") == ("task", "glue/sst2")


@pytest.mark.parametrize("values,message", [
    ({"learning_rat": 1e-4}, "did you mean 'lr'"),  # the alias's meaning, not a lookalike spelling
    ({"deepspeed": "ds.json"}, "deepspeed: not a qkvtune setting"),
    ({"r": 4, "rank": 8}, "r and rank: both set 'rank'"),
    ({"lr": float("nan")}, "lr: must be a finite number"),
    ({"alpha": float("-inf")}, "alpha: must be a finite number"),
    ({"optim": "adamw"}, "did you mean 'adamw_torch"),
    ({"report_to": "nonsense"}, "report_to: 'nonsense' is not one of"),
    ({"dtype": "fp8"}, "dtype: 'fp8' is not one of"),
    ({"scheduler": "cosine_wrong"}, "scheduler:"),
    ({"task": "classification"}, "needs train_file"),
    ({"task": "regression", "train_file": "x.csv"}, "text_columns: task regression needs"),
    ({"text_columns": ["a", "b", "c"]}, "text_columns: one column name, or two"),
    ({"targets": None}, "targets: may be left out only with a list of target_modules"),
    ({"lr_ration": 2}, "did you mean 'lr_ratio'"),
    ({"rank": 0}, "rank: must be > 0"),
    ({"rank": 2.5}, "rank: expected int"),
    ({"lr_ratio": -1}, "lr_ratio: must be > 0"),
    ({"method": "prefix"}, "method: 'prefix' is not one of"),
    ({"targets": ["q", "x"]}, r"targets: \['x'\]"),
    ({"targets": []}, "targets: expected a non-empty list"),
    ({"dropout": 1.5}, "dropout"),
    ({"epochs": "three"}, "epochs: expected float"),
    ({"eval_strategy": "steps"}, "eval_steps: required"),
    ({"resume": 3}, "resume"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    f = tmp_path / "bad.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml line"):
        load_config(str(f))
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(f))
    f.write_text("rank: -3\n")
    with pytest.raises(ConfigError, match="bad.yaml: rank"):
        load_config(str(f))


def test_defaults_are_valid():
    assert build_config({}) == TrainConfig()


def test_shipped_recipes_validate():
    import glob
    import os

    from conftest import REPO

    paths = [p for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
             if os.sep + "claims" + os.sep not in p]  # configs/claims is the claims suite (tests/test_claims.py)
    launchers = [p for p in paths if os.sep + "accelerate" + os.sep in p]
    assert len(paths) - len(launchers) >= 8 and len(launchers) >= 2
    for p in paths:
        if p in launchers:  # accelerate launch --config_file: read by accelerate's own loader
            from accelerate.commands.config.config_args import ClusterConfig

            launcher = ClusterConfig.from_yaml_file(p)
            assert launcher.num_processes >= 2 and launcher.mixed_precision == "no", p
            continue
        cfg = load_config(p)
        assert cfg.targets and cfg.output_dir.startswith("runs/"), p


def test_trainer_and_peft_names_are_aliases():
    cfg = build_config({"learning_rate": 1e-3, "num_train_epochs": 2, "per_device_train_batch_size": 4,
                        "gradient_accumulation_steps": 2, "lr_scheduler_type": "cosine", "r": 4, "lora_alpha": 8,
                        "lora_dropout": 0.05, "use_rslora": True, "use_dora": True,
                        "target_modules": ["query", "value"]})
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.grad_accum, cfg.scheduler) == (1e-3, 2.0, 4, 2, "cosine")
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, cfg.method) == (4, 8.0, 0.05, True, "dora")
    assert cfg.target_modules == ["query", "value"] and cfg.targets is None  # every slice of those modules
    assert build_config({"targets": "q,v"}).targets == ["q", "v"] == load_config(None, ["targets=q,v"]).targets


def test_common_optimizer_names_are_transformers_names():
    from transformers.training_args import OptimizerNames

    from qkvtune.config import COMMON_OPTIMIZERS

    assert set(COMMON_OPTIMIZERS) <= {o.value for o in OptimizerNames}  # they skip the slow check: they must exist
