"""``qkvtune bench claims`` — one experiment per claim of the four papers, several seeds, a verdict by a
stated rule (``verdicts.py``) and a Markdown report with plots (``report.py``).

The suite is a folder of YAML files (default ``configs/claims/``): ``suite.yaml`` holds the seeds, the
settings shared by every run, the settings of each task family (``glue``: a sequence classifier such as
MiniLM; ``commonsense``: a causal LM such as SmolLM2), the learning-rate grid of each method family, the
testability gate and named profiles (``--profile quick``); each ``c*.yaml`` is one claim::

    id: C1
    title: tuning {q,v} matches or beats tuning {q,k,v} at equal rank
    source: arXiv 2410.02247
    paper: the paper's own numbers, quoted in the report
    tasks: [glue.0, glue.3, commonsense.1]     # task slots: the i-th task of a family (wrapping around)
    base: {method: lora, rank: 8}              # TrainConfig keys for every arm of this claim
    arms: {qv: {targets: [q, v]}, qkv: {targets: [q, k, v]}}
    reference: qv                              # the arm the gate reads (default: the first)
    measures: [...]                            # named analyses (measures.py) that turn runs into quantities
    checks: [{part: "QV ≥ QKV", rule: at_least, a: score:qv, b: score:qkv, margin: 0.02}]

Three splits: every run holds out ``val_size`` training rows (seeded) as its validation split; evaluation during
training, the best checkpoint, early stopping (``patience``: the budget adapts, up to ``max_steps``) and the
learning-rate search read only that; the task's dev/test file is the test split, scored once at the end
(``test_predictions.json``) and never selected on. Per arm and task, the learning rate is the grid value of
its method family with the best validation score on the first seed (λ multiplies η_Q, as in the paper);
all seeds then run at that rate (``lr_from: arm`` borrows another arm's rate, for controls such as shuffled
labels). The reference arm goes first: a task where it misses the gate (``scores.gate``) is "not testable at
this budget" and its other arms are not trained.

Task slots make the suite run unchanged on any data folder: the GLUE tasks under ``<data_dir>/glue`` and the
LLM-Adapters tasks under ``<data_dir>/commonsense`` are found and ordered (the suite's preferred order first),
or named with ``--tasks``. Every run is an ordinary ``qkvtune train`` run in ``<out>/runs/``, named by a hash
of its config, so runs shared by claims are trained once and an interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import yaml

from ..checkpoints import log_history
from ..config import ConfigError
from ..errors import check_output_dir, check_output_file
from . import scores
from .measures import MEASURES, TRAINING_MEASURES, mean
from .verdicts import COMPARISONS, FAILS, HOLDS, UNSURE, UNTESTABLE, Interval, combine, judge, power, seeds_needed, \
    t_interval

FAMILIES = ("glue", "commonsense")
GLUE_TASKS = ("sst2", "mrpc", "cola", "stsb", "qnli", "rte", "mnli", "qqp", "wnli")
CLAIM_KEYS = {"id", "title", "source", "paper", "tasks", "base", "arms", "measures", "checks", "derived", "notes",
              "reference"}
SUITE_KEYS = {"seeds", "base", "families", "prefer", "lr_grid", "gate", "not_learned", "profiles", "budgets"}
BUDGET_KEYS = ("max_train_samples", "max_steps", "eval_steps")  # what a budget factor multiplies
ARM_KEYS = {"only_tasks", "lr_from", "lr_search"}  # the suite's own arm keys; the rest are TrainConfig keys
METHOD_FAMILY = {"lora": "lora", "dora": "lora", "dense": "dense", "smt": "smt"}


def default_suite_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "configs", "claims")


# --- the suite ---------------------------------------------------------------------------------------------

@dataclass
class Claim:
    id: str
    title: str
    tasks: list[str]
    arms: dict[str, dict]
    source: str = ""
    paper: str = ""
    base: dict = field(default_factory=dict)
    measures: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    derived: list[dict] = field(default_factory=list)
    notes: str = ""
    reference: str | None = None
    path: str = ""

    @property
    def ref(self) -> str:
        return self.reference or next(iter(self.arms))


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys")
    return data


def load_settings(folder: str) -> dict:
    """suite.yaml of ``folder`` alone (seeds, shared and family settings, lr grid, gate), keys checked."""
    path = os.path.join(folder, "suite.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"--suite: {path} not found")
    suite = _read_yaml(path)
    for key in suite:
        if key not in SUITE_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (expected {sorted(SUITE_KEYS)})")
    return suite


def load_suite(folder: str) -> tuple[dict, list[Claim]]:
    """suite.yaml and every c*.yaml of ``folder``, checked: unknown keys, arms, slots, check operands."""
    suite = load_settings(folder)
    claims = []
    for cpath in sorted(glob.glob(os.path.join(folder, "c*.yaml"))):
        data = _read_yaml(cpath)
        bad = set(data) - CLAIM_KEYS
        if bad:
            raise ConfigError(f"{cpath}: unknown key {sorted(bad)[0]!r}")
        for key in ("id", "title", "tasks", "arms"):
            if key not in data:
                raise ConfigError(f"{cpath}: missing key {key!r}")
        claim = Claim(**{k: v for k, v in data.items()}, path=cpath)
        claim.base = claim.base or {}
        for slot in claim.tasks:
            family, _, index = str(slot).partition(".")
            if family not in FAMILIES or not index.isdigit():
                raise ConfigError(f"{cpath}: tasks: {slot!r} is not a slot like glue.0 or commonsense.1")
        if not isinstance(claim.arms, dict) or not all(isinstance(v, dict) or v is None for v in claim.arms.values()):
            raise ConfigError(f"{cpath}: arms: expected a mapping of arm name -> settings")
        for key in ("measures", "checks", "derived"):
            value = getattr(claim, key)
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{cpath}: {key}: expected a list of mappings")
        if not isinstance(claim.base, dict) or not isinstance(claim.tasks, list):
            raise ConfigError(f"{cpath}: base must be a mapping and tasks a list")
        if claim.reference is not None and claim.reference not in claim.arms:
            raise ConfigError(f"{cpath}: reference: {claim.reference!r} names no arm of this claim")
        for arm, spec in claim.arms.items():
            if (spec or {}).get("lr_from") not in (None, *claim.arms):
                raise ConfigError(f"{cpath}: arms: {arm}: lr_from {spec['lr_from']!r} names no arm of this claim")
        for m in claim.measures:
            if m.get("name") not in MEASURES and m.get("name") not in TRAINING_MEASURES:
                raise ConfigError(f"{cpath}: measures: unknown measure {m.get('name')!r} "
                                  f"(known: {sorted(MEASURES) + sorted(TRAINING_MEASURES)})")
        from .verdicts import RULES

        for check in claim.checks:
            if check.get("rule") not in RULES:
                raise ConfigError(f"{cpath}: checks: rule {check.get('rule')!r} is not one of {sorted(RULES)}")
            for side in ("a", "b"):
                name = str(check.get(side, ""))
                if name.startswith("score:") and name[len("score:"):].split("@")[0] not in claim.arms:
                    raise ConfigError(f"{cpath}: checks: {side}: {name!r} names no arm of this claim")
            if check["rule"] in ("above", "below") and not isinstance(check.get("threshold"), (int, float)):
                raise ConfigError(f"{cpath}: checks: rule {check['rule']} needs a numeric threshold")
        claims.append(claim)
    if not claims:
        raise ConfigError(f"--suite: {folder} holds no c*.yaml claim files")
    return suite, claims


def discover_tasks(data_dir: str | None, prefer: dict | None = None) -> dict[str, list[str]]:
    """Task ids per family found in a data folder laid out like shared/datasets (preferred order first)."""
    from ..data import resolve_data_dir

    data_dir = resolve_data_dir(data_dir)
    found = {f: [] for f in FAMILIES}
    if data_dir is None:
        return found
    norm = lambda s: s.lower().replace("-", "").replace("_", "")
    glue = os.path.join(data_dir, "glue")
    if os.path.isdir(glue):
        for entry in sorted(os.listdir(glue)):
            if norm(entry) in GLUE_TASKS and os.path.exists(os.path.join(glue, entry, "train.tsv")):
                found["glue"].append(f"glue/{norm(entry)}")
    cs = os.path.join(data_dir, "commonsense")
    if os.path.isdir(cs):
        for entry in sorted(os.listdir(cs)):
            if all(os.path.exists(os.path.join(cs, entry, f)) for f in ("train.json", "test.json")):
                found["commonsense"].append(f"commonsense/{entry}")
    for family, order in (prefer or {}).items():
        rank = {norm(t.split("/")[-1]): i for i, t in enumerate(order)}
        found[family] = sorted(found.get(family, []), key=lambda t: (rank.get(norm(t.split("/")[-1]), len(rank)), t))
    return found


def parse_tasks(spec: str) -> dict[str, list[str]]:
    out = {f: [] for f in FAMILIES}
    for t in filter(None, (s.strip() for s in spec.split(","))):
        family = t.split("/")[0]
        if family not in FAMILIES:
            raise ConfigError(f"--tasks: {t!r} is not glue/<task> or commonsense/<name>")
        out[family].append(t)
    return out


def slot_task(tasks: dict[str, list[str]], slot: str) -> str | None:
    family, _, index = slot.partition(".")
    found = tasks.get(family) or []
    return found[int(index) % len(found)] if found else None


# --- runs ----------------------------------------------------------------------------------------------------

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
    from ..io import write_json
    from ..train import train

    done = os.path.join(out_dir, "claims_run.json")
    if os.path.exists(done):
        with open(done) as f:
            rec = json.load(f)
        if rec.get("settings") == json.loads(json.dumps(settings, default=str)) and all(k in rec for k in RECORD_KEYS):
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
            family = METHOD_FAMILY.get(first.get("method", "lora"), "lora")
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


# --- the driver -----------------------------------------------------------------------------------------------

@dataclass
class ClaimResult:
    claim: Claim
    tasks: list[str]  # the claim's tasks, testable or not
    seeds: list[int]
    runs: dict  # seed -> task -> arm -> Run (testable tasks)
    quantities: dict  # name -> [value per seed]
    checks: list[dict]
    verdict: str
    arms: dict = field(default_factory=dict)  # task -> arm -> ArmResult
    gates: dict = field(default_factory=dict)  # task -> (passed, why)
    budgets: dict = field(default_factory=dict)  # task -> {"factor", max_train_samples, max_steps, eval_steps}
    constants: dict = field(default_factory=dict)  # task -> best constant predictor's test score
    not_learned: dict = field(default_factory=dict)  # task -> [arms within the margin of the constant predictor]
    skipped: str = ""
    seconds: float = 0.0

    @property
    def testable(self) -> list[str]:
        return [t for t in self.tasks if self.gates.get(t, (False,))[0]]


def _arm_on(claim: Claim, arm: str, task: str, tasks: dict) -> bool:
    """Whether ``arm`` trains on ``task``: every task of the claim unless the arm lists ``only_tasks`` slots."""
    slots = (claim.arms[arm] or {}).get("only_tasks")
    return slots is None or task in [slot_task(tasks, s) for s in slots]


def score_interval(result: ClaimResult, a: str, b: str, reps: int = 2000) -> tuple[Interval, float, str]:
    """The bootstrap interval of score(a) − score(b) on the test split (seeds and examples), pooled over the
    testable tasks where at least one of the two arms learned; (interval, test-example part of its error, note)."""
    from .stats import bootstrap_difference, interval as pct

    pooled, pooled_ex, points, used = [], [], [], []
    for i, task in enumerate(result.testable):
        runs_a = [result.runs[s][task].get(a) for s in result.seeds]
        runs_b = [result.runs[s][task].get(b) for s in result.seeds]
        if any(r is None for r in runs_a + runs_b):
            continue
        if {a, b} <= set(result.not_learned.get(task, [])):
            continue
        pa, pb = [r.predictions() for r in runs_a], [r.predictions() for r in runs_b]
        if any(p is None for p in pa + pb):
            continue
        labels = pa[0]["labels"]
        rows_a = [scores.encode(p["labels"], p["predictions"], task) for p in pa]
        rows_b = [scores.encode(p["labels"], p["predictions"], task) for p in pb]
        y = rows_a[0][0]
        A, B = np.stack([r[1] for r in rows_a]), np.stack([r[1] for r in rows_b])
        fn = scores.metric(task)
        pooled.append(bootstrap_difference(A, B, metric=fn, labels=y, reps=reps, seed=i))
        pooled_ex.append(bootstrap_difference(A, B, metric=fn, labels=y, reps=reps, seed=i, resample_seeds=False))
        score = (lambda x: float(x.mean())) if fn is None else (lambda x: float(np.mean([fn(y, row) for row in x])))
        points.append(score(A) - score(B))
        used.append(task)
    if not pooled:
        return Interval(math.nan, -math.inf, math.inf), math.nan, "neither arm learned on any testable task"
    reps_all, reps_ex = np.mean(pooled, axis=0), np.mean(pooled_ex, axis=0)
    low, high = pct(reps_all)
    ci = Interval(float(np.mean(points)), low, high, float(np.std(reps_all)), len(result.seeds), "bootstrap")
    return ci, float(np.std(reps_ex)), "on " + ", ".join(used)


def evaluate_check(result: ClaimResult, c: dict) -> dict:
    rule, a, b = c["rule"], c["a"], c.get("b")
    margin = float(c.get("margin", 0.0))
    part = c.get("part") or f"{rule}({a}{', ' + str(b) if b is not None else ''})"
    if not result.testable:
        return {**c, "part": part, "verdict": UNTESTABLE, "interval": Interval(math.nan, -math.inf, math.inf),
                "power": math.nan, "seeds_needed": None, "note": "no testable task"}
    note, se_ex = "", math.nan
    if rule in COMPARISONS and str(a).startswith("score:") and str(b).startswith("score:"):
        ci, se_ex, note = score_interval(result, a[len("score:"):], b[len("score:"):])
    else:
        xs = result.quantities.get(a, [])
        if isinstance(b, str):
            ys = result.quantities.get(b, [])
            xs = [x - y for x, y in zip(xs, ys)]
        elif b is not None:
            xs = [x - float(b) for x in xs]
        ci = t_interval(xs)
        if ci.n == 0 and len(result.testable) < len(result.tasks):
            return {**c, "part": part, "verdict": UNTESTABLE, "interval": ci, "power": math.nan,
                    "seeds_needed": None, "note": "needs " + ", ".join(t for t in result.tasks
                                                                       if t not in result.testable)}
    verdict = judge(rule, ci, margin, c.get("threshold"))
    if note.startswith("neither"):
        verdict = UNSURE
    if c.get("requires"):  # e.g. the rate is defined only where the fitted decay allows it
        name, low = c["requires"]["quantity"], float(c["requires"]["above"])
        vals = [v for v in result.quantities.get(name, []) if math.isfinite(v)]
        if not vals or mean(vals) <= low:
            verdict, note = UNSURE, f"not interpretable: {name} = {mean(vals):.3g} ≤ {low}"
    pw = power(rule, ci.se, margin)
    needed = seeds_needed(rule, ci.se, se_ex if math.isfinite(se_ex) else 0.0, max(ci.n, 1), margin) \
        if math.isfinite(pw) else None
    return {**c, "part": part, "verdict": verdict, "interval": ci, "power": pw, "seeds_needed": needed, "note": note}


def run_claim(claim: Claim, ctx: Context) -> ClaimResult:
    t0 = time.perf_counter()
    seeds, tasks = ctx.seeds, ctx.tasks
    claim_tasks, missing = [], []
    for slot in claim.tasks:
        t = slot_task(tasks, slot)
        if t is None:
            missing.append(slot.split(".")[0])
        elif t not in claim_tasks:
            claim_tasks.append(t)
    if not claim_tasks:
        return ClaimResult(claim, [], seeds, {}, {}, [], UNTESTABLE,
                           skipped=f"no {' or '.join(sorted(set(missing)))} task in the data folder")
    trained = [a for a in claim.arms if not any(m.get("arm") == a and m["name"] in TRAINING_MEASURES
                                                for m in claim.measures)]
    order = [claim.ref] + [a for a in trained if a != claim.ref] if claim.ref in trained else trained
    result = ClaimResult(claim, claim_tasks, seeds, {s: {} for s in seeds}, {}, [], UNSURE)
    for task in claim_tasks:
        chosen = {}
        result.arms[task] = {}
        for arm in order:
            if not _arm_on(claim, arm, task, tasks):
                continue
            if arm == claim.ref:  # the gate reads the search seed's run: an untestable task costs only the search
                res, result.gates[task] = ctx.reference(claim, task, arm)
                first = ctx.settings(claim, task, arm, seeds[0])
                result.budgets[task] = {"factor": ctx.budget[task], **{k: first.get(k) for k in BUDGET_KEYS}}
                if not result.gates[task][0]:
                    result.arms[task][arm] = res
                    break
                escalation = res.search_seconds
            res = ctx.arm(claim, task, arm, chosen)
            if arm == claim.ref:  # the grid's other runs and any budgets that missed the gate
                res.search_seconds = escalation
            chosen[arm] = res.lr
            result.arms[task][arm] = res
        if task not in result.gates:  # no reference arm on this task: nothing gates it
            result.gates[task] = (True, "no reference arm on this task")
        if result.gates[task][0]:
            labels = ctx.labels(ctx.settings(claim, task, order[0], seeds[0]))
            const = scores.constant_score(task, labels["test"], labels["choices"]) if labels["test"] else math.nan
            result.constants[task] = const
            margin = float(ctx.suite.get("not_learned", 0.02))
            result.not_learned[task] = [a for a, r in result.arms[task].items()
                                        if mean([x.score for x in r.runs.values()]) <= const + margin]
            for seed in seeds:
                result.runs[seed][task] = {a: r.runs[seed] for a, r in result.arms[task].items()}
    quantities = {}
    for seed in seeds:
        seed_runs = result.runs[seed]
        q = {}
        for arm in trained:
            on = [t for t in result.testable if arm in seed_runs.get(t, {})]
            if on:
                q[f"score:{arm}"] = mean([seed_runs[t][arm].score for t in on])
            for t in on:
                q[f"score:{arm}@{t}"] = seed_runs[t][arm].score
        for m in claim.measures if result.testable else []:
            params = {k: v for k, v in m.items() if k not in ("name", "only_task")}
            only = slot_task(tasks, m["only_task"]) if m.get("only_task") else None
            runs = {t: r for t, r in seed_runs.items() if only in (None, t) and t in result.testable}
            if m["name"] in TRAINING_MEASURES:
                if not runs and only in result.testable:
                    runs = {only: {}}
                q.update(TRAINING_MEASURES[m["name"]](ctx, claim, seed, runs, **params))
            else:
                q.update(MEASURES[m["name"]](runs, **params))
        for d in claim.derived:
            x, y = d["of"]
            q[d["name"]] = q.get(x, math.nan) - q.get(y, math.nan)
        for k, v in q.items():
            quantities.setdefault(k, []).append(v)
        ctx.log(f"{claim.id} seed {seed}: " + ", ".join(f"{k}={v:.4g}" for k, v in q.items() if "@" not in k))
    result.quantities = quantities
    result.checks = [evaluate_check(result, c) for c in claim.checks]
    result.verdict = combine(c["verdict"] for c in result.checks) if result.testable else UNTESTABLE
    result.seconds = time.perf_counter() - t0
    return result


def run_suite(suite_dir: str, data_dir, out: str, seeds: list[int] | None = None, only: list[str] | None = None,
              tasks_spec: str | None = None, overrides: dict | None = None, log=print,
              profile: str | None = None) -> list[ClaimResult]:
    suite, claims = load_suite(suite_dir)
    named = tasks_spec is not None  # tasks the user named are run as named, whatever the profile's families
    if profile is None and "default" in (suite.get("profiles") or {}):
        profile = "default"
    if profile:
        profiles = suite.get("profiles") or {}
        if profile not in profiles:
            raise ConfigError(f"--profile: {profile!r} is not one of {sorted(profiles)}")
        p = profiles[profile] or {}
        seeds = seeds or p.get("seeds")
        only = only or p.get("claims")
        tasks_spec = tasks_spec or p.get("tasks")
        overrides = {**(p.get("overrides") or {}), **(overrides or {})}
        for key in ("gate", "lr_grid", "not_learned", "budgets"):
            if key in p:
                suite = {**suite, key: p[key]}
    if overrides:  # e.g. model=roberta-base max_train_samples=null for the papers' scale
        suite = {**suite, "overrides": overrides}
    tasks = parse_tasks(tasks_spec) if tasks_spec else discover_tasks(data_dir, suite.get("prefer"))
    families = ((suite.get("profiles") or {}).get(profile) or {}).get("families") if profile else None
    if families and not named:  # a list of families, or family -> how many of its tasks (slots wrap around
        # within them): the default profile takes one GLUE task and no commonsense one (SmolLM2: minutes a run)
        counts = families if isinstance(families, dict) else {f: None for f in families}
        tasks = {f: (v[:counts[f]] if counts[f] else v) if f in counts else [] for f, v in tasks.items()}
    seeds = seeds or list(suite.get("seeds") or [0, 1, 2])
    if only:
        unknown = set(only) - {c.id for c in claims}
        if unknown:
            raise ConfigError(f"--claims: unknown claim {sorted(unknown)[0]!r} (have {[c.id for c in claims]})")
        claims = [c for c in claims if c.id in only]
    log(f"tasks: {tasks}; seeds {seeds}")
    ctx = Context(suite, tasks, seeds, data_dir, out, log)
    return [run_claim(c, ctx) for c in claims]


# --- CLI ----------------------------------------------------------------------------------------------------

def cmd_claims(args) -> int:
    from ..config import parse_override
    from .report import command_line, write_report

    check_output_dir(args.out, "--out")
    report = args.report or os.path.join(args.out, "REPORT.md")
    check_output_file(report, "--report")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    only = [c.strip() for c in args.claims.split(",")] if args.claims else None
    overrides = dict(parse_override(o) for o in args.overrides)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "claims.log")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    t0 = time.time()
    results = run_suite(args.suite, args.data_dir, args.out, seeds, only, args.tasks, overrides, log, args.profile)
    command = command_line("qkvtune bench claims …")
    preface = None
    if args.preface:
        try:
            with open(args.preface, encoding="utf-8") as f:
                preface = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--preface: {args.preface}: cannot be read ({e})") from None
    write_report(results, report, command=command, seconds=time.time() - t0, speed_dir=args.speed_results,
                 preface=preface)
    for r in results:
        print(f"{r.claim.id}: {r.verdict}" + (f" ({r.skipped})" if r.skipped else ""))
    print(f"report: {report}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("claims", help="reproduce the papers' claims: one experiment per claim, seeds, verdicts, report")
    p.add_argument("overrides", nargs="*", help="key=value for every run, or family.key=value for one family "
                   "(e.g. glue.model=roberta-base commonsense.model=meta-llama/Meta-Llama-3-8B for the papers' scale)")
    p.add_argument("--suite", default=default_suite_dir(), help="folder of suite.yaml + c*.yaml (default: configs/claims)")
    p.add_argument("--data-dir", help="folder laid out like shared/datasets (default: $QKVTUNE_DATA)")
    p.add_argument("--tasks", help="task ids instead of those found in the data folder, e.g. glue/rte,commonsense/piqa")
    p.add_argument("--claims", help="only these claims, e.g. C1,C3")
    p.add_argument("--seeds", help="comma-separated seeds (default: the suite's)")
    p.add_argument("--profile", help="a named profile of suite.yaml: quick (a ≤ 15-minute smoke version)")
    p.add_argument("--out", default="runs/claims", help="folder for the runs, the log and the report")
    p.add_argument("--report", help="Markdown report path (default: OUT/REPORT.md); plots go beside it")
    p.add_argument("--preface", help="a Markdown file placed under the report's header (e.g. what changed since the "
                   "previous report)")
    p.add_argument("--speed-results", help="folder of speed_*.json from `qkvtune bench speed` to include in the report "
                   "(e.g. benchmarks/results)")
    p.set_defaults(func=cmd_claims)
