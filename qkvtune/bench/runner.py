"""The experiment runner of ``bench claims`` and ``bench plan``: every run an ordinary ``qkvtune train`` run in
``<out>/runs/``, named by a hash of its settings, so runs shared by claims are trained once and an interrupted
suite resumes where it stopped; per arm, a learning-rate search on its method family's grid, seeds at the chosen
rate, and the reference arm's testability gate with its budget ladder."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

from ..checkpoints import log_history
from ..config import ConfigError
from ..deltas import delta_class
from . import scores
from .suite import Claim

def open_output(out: str, report: str | None, default_report: str, log_name: str):
    """(report path, log function) of a benchmark that trains runs: ``--out`` and ``--report`` checked before any
    work, the folder made, and a log that prints each line with its time and appends it to ``out/log_name``."""
    from ..errors import check_output_dir, check_output_file

    check_output_dir(out, "--out")
    report = report or os.path.join(out, default_report)
    check_output_file(report, "--report")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, log_name)

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    return report, log


BUDGET_KEYS = ("max_train_samples", "max_steps", "eval_steps")  # what a budget factor multiplies
ARM_KEYS = {"only_tasks", "lr_from", "lr_search"}  # the suite's own arm keys; the rest are TrainConfig keys


@dataclass
class Run:
    task: str
    arm: str
    seed: int
    dir: str
    metrics: dict
    score: float  # the test split's main metric (what is reported)
    val_score: float  # the validation split's (what selection reads)
    history: list[dict]
    seconds: float

    def predictions(self) -> dict | None:
        """The first test split's {"labels", "predictions"} (test_predictions.json), None if the run wrote none."""
        from ..train import PREDICTIONS_FILE

        path = os.path.join(self.dir, PREDICTIONS_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return next(iter(json.load(f).values()), None)


RECORD_KEYS = ("task", "arm", "seed", "metrics", "score", "val_score", "history", "seconds")


def run_dir(out: str, settings: dict, label: str) -> str:
    key = hashlib.sha256(json.dumps({k: v for k, v in settings.items() if k != "data_dir"}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:10]
    return os.path.join(out, "runs", f"{label}-{key}")


def ensure_run(settings: dict, out_dir: str, arm: str, log) -> Run:
    """Train the run unless ``out_dir`` already holds its finished result (then just read it)."""
    from ..config import build_config
    from ..files import write_json
    from ..train import train

    done = os.path.join(out_dir, "claims_run.json")
    if os.path.exists(done):
        with open(done) as f:
            rec = json.load(f)
        if rec.get("settings") == json.loads(json.dumps(settings, default=str)) and all(k in rec for k in RECORD_KEYS):
            rec.update({k: math.nan for k in ("score", "val_score") if rec[k] is None})  # JSON writes NaN as null
            return Run(**{k: rec[k] for k in RECORD_KEYS}, dir=out_dir)
    cfg = build_config({**settings, "output_dir": out_dir, "overwrite": True})
    log(f"train {settings['task']} {arm} seed={settings['seed']} lr={settings.get('lr')} -> {out_dir}")
    t0 = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - t0
    task = settings["task"]
    test, val = scores.score_of(metrics, task, "test"), scores.score_of(metrics, task, "eval")
    run = Run(task=task, arm=arm, seed=settings["seed"], dir=out_dir, metrics=metrics,
              score=math.nan if test is None else float(test), val_score=math.nan if val is None else float(val),
              history=log_history(out_dir), seconds=seconds)
    write_json(done, json.loads(json.dumps({"settings": settings, **{k: getattr(run, k) for k in RECORD_KEYS}},
                                           default=str)))
    return run


@dataclass
class ArmResult:
    lr: float | None
    grid: list[tuple[float, float]]  # (lr, validation score) on the search seed
    runs: dict[int, Run]  # seed -> run at the chosen lr
    search_seconds: float = 0.0  # grid runs not reused as a seed's run


class Context:
    """What every claim of one invocation shares: the suite, tasks, seeds, run folder, and the learning rates
    already chosen (an arm another claim already searched reads its runs back, it does not search again)."""

    def __init__(self, suite: dict, tasks: dict, seeds: list[int], data_dir, out: str, log):
        self.suite, self.tasks, self.seeds, self.data_dir, self.out, self.log = suite, tasks, seeds, data_dir, out, log
        self.labels_cache: dict = {}
        self.budget: dict[str, float] = {}  # task -> the budget factor its reference arms have needed so far

    def settings(self, claim: "Claim", task: str, arm: str, seed: int, lr: float | None = None) -> dict:
        settings = run_settings(self.suite, claim, task, arm, seed, self.data_dir)
        factor = self.budget.get(task, 1)
        for key in BUDGET_KEYS if factor != 1 else ():
            if settings.get(key) is not None:
                settings[key] = int(round(settings[key] * factor))
        if lr is not None:
            settings["lr"] = lr
        return settings

    def reference(self, claim: "Claim", task: str, arm: str) -> tuple[ArmResult, tuple[bool, str]]:
        """The reference arm's search on the first seed and its gate, at the task's budget; where it misses the
        gate, the next budget factor of ``budgets`` (examples, steps and evaluation interval multiplied) is
        tried: first at the rate the last budget chose (one run), and only if that passes, over the whole grid.
        At the largest budget a missed probe is followed by the whole grid: a task is untestable only when no
        rate of the grid passes there (a rate chosen where nothing was learned yet is a guess). The factor
        reached is the task's budget for every arm of this claim and the start of later claims'."""
        factors = [float(f) for f in self.suite.get("budgets") or [1]]
        start = self.budget.get(task, factors[0])
        res, passed, lr, spent = None, (False, ""), None, 0.0  # spent: runs at budgets that missed the gate
        for factor in [f for f in factors if f >= start]:
            self.budget[task] = factor
            if res is not None:  # a cheap probe at the last rate before a whole grid at this budget
                spent += res.search_seconds + res.runs[self.seeds[0]].seconds
                probe = self.run(self.settings(claim, task, arm, self.seeds[0], lr), task, arm)
                passed = self.gate(claim, task, arm, probe)
                self.log(f"{claim.id} {task}: budget ×{factor:g}, probe at lr={lr:g}: gate "
                         f"{'passed' if passed[0] else 'missed'} ({passed[1]})")
                if not passed[0] and factor != factors[-1]:
                    res = ArmResult(lr, [], {self.seeds[0]: probe})
                    continue
            res = self.arm(claim, task, arm, {}, self.seeds[:1])
            lr, passed = res.lr, self.gate(claim, task, arm, res.runs[self.seeds[0]])
            self.log(f"{claim.id} {task}: budget ×{factor:g}: gate {'passed' if passed[0] else 'missed'} "
                     f"({passed[1]})")
            if passed[0]:
                break
        res.search_seconds += spent
        return res, passed

    def gate(self, claim: "Claim", task: str, arm: str, run: Run) -> tuple[bool, str]:
        labels = self.labels(self.settings(claim, task, arm, self.seeds[0]))
        return scores.gate(task, run.metrics, labels["validation"], labels["choices"], self.suite.get("gate") or {})

    def run(self, settings: dict, task: str, arm: str) -> Run:
        label = f"{task.replace('/', '-')}-s{settings['seed']}"
        return ensure_run(settings, run_dir(self.out, settings, label), arm, self.log)

    def arm(self, claim: "Claim", task: str, arm: str, chosen: dict, seeds: list[int] | None = None) -> ArmResult:
        """Search the arm's learning rate on the first seed (unless it is fixed or borrowed), then run ``seeds``
        (default: every seed) at that rate."""
        spec = claim.arms[arm] or {}
        first = self.settings(claim, task, arm, self.seeds[0])
        grid, search_seconds = [], 0.0
        if spec.get("lr_from"):
            lr = chosen[spec["lr_from"]]
        elif spec.get("lr_search") is False or "lr" in spec:
            lr = first["lr"]
        else:
            family = delta_class(first.get("method", "lora")).rate_family
            values = (self.suite.get("lr_grid") or {}).get(family)
            if not values:
                raise ConfigError(f"suite.yaml: lr_grid has no values for method family {family!r}")
            searched = {v: self.run(self.settings(claim, task, arm, self.seeds[0], float(v)), task, arm)
                        for v in values}
            grid = [(float(v), r.val_score) for v, r in searched.items()]
            lr = max(grid, key=lambda p: p[1] if math.isfinite(p[1]) else -math.inf)[0]
            search_seconds = sum(r.seconds for v, r in searched.items() if float(v) != lr)
        runs = {seed: self.run(self.settings(claim, task, arm, seed, lr), task, arm) for seed in seeds or self.seeds}
        return ArmResult(lr, grid, runs, search_seconds)

    def labels(self, settings: dict) -> dict:
        """The task's validation and test labels (and answer choices) for the gate and the constant predictor."""
        from ..config import build_config
        from ..runs import task_data, tokenizer_of

        key = json.dumps({k: v for k, v in settings.items() if k in ("task", "seed", "val_size", "max_train_samples",
                                                                      "max_eval_samples", "model", "data_dir")},
                         sort_keys=True, default=str)
        if key not in self.labels_cache:
            cfg = build_config({**settings, "output_dir": "unused"})
            data = task_data(cfg, tokenizer_of(cfg), cfg.max_train_samples, cfg.max_eval_samples)
            if data.generation_records:
                recs = data.generation_records
                val = [r["answer"] for r in recs.get("validation", recs.get("test", []))]
                test = [r["answer"] for r in recs.get("test", [])]
            else:
                val = list(next(iter(data.evals.values()))["labels"])
                test = list(next(iter(data.tests.values()))["labels"]) if data.tests else []
            self.labels_cache[key] = {"validation": val, "test": test, "choices": data.answer_choices}
        return self.labels_cache[key]


def run_settings(suite: dict, claim: Claim, task: str, arm: str, seed: int, data_dir: str | None) -> dict:
    family = task.split("/")[0]
    arm_settings = {k: v for k, v in (claim.arms[arm] or {}).items() if k not in ARM_KEYS}
    settings = {**(suite.get("base") or {}), **((suite.get("families") or {}).get(family) or {}),
                **claim.base, **arm_settings}
    for key, value in (suite.get("overrides") or {}).items():  # the command line's key=value, over everything;
        scope, _, name = key.rpartition(".")                    # glue.model=… applies to one family only
        if scope in ("", family):
            settings[name] = value
    settings.update(task=task, seed=seed)
    if data_dir:
        settings["data_dir"] = os.path.abspath(data_dir)
    return settings
