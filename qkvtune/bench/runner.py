"""The experiment runner of ``bench claims`` and ``bench plan``: every run an ordinary ``qkvtune train`` run in
``<out>/runs/``, named by a hash of its settings, so runs shared by claims are trained once and an interrupted
suite resumes where it stopped.

Rates (claims suite v3): per arm, a learning-rate search on its method family's grid on the first seed that ends
*interior* — a best rate at an edge of the grid extends it one log-step past that edge (up to the family's bound
in ``lr_bounds``) and searches again — with ties broken by a further evaluation (the tied rates on the next seed;
then the lower validation loss), never by order. Each task has a reference arm (``reference`` in suite.yaml, per
family): its budget ladder re-searches the whole grid at every budget until some rate passes the testability
gate with a curve that is no longer rising at the step cap (a rate chosen where nothing learned is a guess), and
for families with a task head its chosen rate becomes every run's ``lr_head``, so arms differ only in their ΔW.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

from ..checkpoints import log_history
from ..config import ConfigError
from ..deltas import delta_class
from . import scores
from .suite import Claim, task_settings


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
ARM_KEYS = {"only_tasks", "lr_from", "lr_search", "params_from", "steps_from", "warmup_in_cap"}  # the suite's own arm keys; the rest: TrainConfig's
HEAD_ARM = "reference"  # the name of a task's reference arm (suite.yaml ``reference``)


@dataclass
class SuiteRun:
    task: str
    arm: str
    seed: int
    dir: str
    metrics: dict
    score: float  # the test split's main metric (what is reported)
    val_score: float  # the validation split's (what selection reads)
    history: list[dict]
    seconds: float
    max_steps: int | None = None  # the run's step cap (None: epochs)

    def predictions(self) -> dict | None:
        """The first test split's {"labels", "predictions"} (test_predictions.json), None if the run wrote none."""
        from ..train import PREDICTIONS_FILE

        path = os.path.join(self.dir, PREDICTIONS_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return next(iter(json.load(f).values()), None)

    @property
    def val_loss(self) -> float:
        v = self.metrics.get("eval_loss")
        return math.nan if v is None else float(v)

    def rising(self, margin: float) -> bool:
        """Still rising at the step cap (``scores.still_rising``): trained to its cap and its last validation
        evaluation beats every earlier one by more than ``margin``."""
        return scores.still_rising(self.history, self.task, self.metrics.get("global_step"), self.max_steps, margin)


RECORD_KEYS = ("task", "arm", "seed", "metrics", "score", "val_score", "history", "seconds")


def run_dir(out: str, settings: dict, label: str) -> str:
    key = hashlib.sha256(json.dumps({k: v for k, v in settings.items() if k != "data_dir"}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:10]
    return os.path.join(out, "runs", f"{label}-{key}")


def expected_seconds(longest: dict[float, float], factor: float) -> float:
    """How long the next run at budget ``factor`` is expected to take: the longest run at the nearest budget tried
    (``longest``: factor -> seconds), scaled by the ratio of the budgets — examples, steps and evaluations all grow
    with it, and the first run at ×8 takes about twice the longest at ×4 (the longest run overall would let it
    start with half the time it needs). 0 before any run."""
    if not longest:
        return 0.0
    nearest = min(longest, key=lambda f: (abs(math.log(f / factor)), -f))
    return longest[nearest] * factor / nearest


class OutOfTime(Exception):
    """The suite's time bound (``--max-minutes``) leaves no room for another run: none is started."""


def ensure_run(settings: dict, out_dir: str, arm: str, log, task: str | None = None,
               may_train=None) -> SuiteRun:
    """Train the run unless ``out_dir`` already holds its finished result (then just read it). ``task``: the
    suite's name of the task (default: the settings' ``task``; an sft file's name differs from its ``task: sft``).
    ``may_train()`` is asked before training (it raises ``OutOfTime`` past the suite's bound)."""
    from ..config import build_config
    from ..files import write_json
    from ..train import train

    task = task or settings["task"]
    done = os.path.join(out_dir, "claims_run.json")
    if os.path.exists(done):
        with open(done) as f:
            rec = json.load(f)
        if rec.get("settings") == json.loads(json.dumps(settings, default=str)) and all(k in rec for k in RECORD_KEYS):
            rec.update({k: math.nan for k in ("score", "val_score") if rec[k] is None})  # JSON writes NaN as null
            return SuiteRun(**{k: rec[k] for k in RECORD_KEYS}, dir=out_dir, max_steps=settings.get("max_steps"))
    if may_train is not None:
        may_train()
    cfg = build_config({**settings, "output_dir": out_dir, "overwrite": True})
    log(f"train {task} {arm} seed={settings['seed']} lr={settings.get('lr')} -> {out_dir}")
    t0 = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - t0
    test, val = scores.score_of(metrics, task, "test"), scores.score_of(metrics, task, "eval")
    run = SuiteRun(task=task, arm=arm, seed=settings["seed"], dir=out_dir, metrics=metrics,
              score=math.nan if test is None else float(test), val_score=math.nan if val is None else float(val),
              history=log_history(out_dir), seconds=seconds, max_steps=settings.get("max_steps"))
    write_json(done, json.loads(json.dumps({"settings": settings, **{k: getattr(run, k) for k in RECORD_KEYS}},
                                           default=str)))
    return run


@dataclass
class ArmResult:
    lr: float | None
    grid: list[tuple[float, float]]  # (lr, validation score) on the search seed, every rate searched, in order
    runs: dict[int, SuiteRun]  # seed -> run at the chosen lr
    search_seconds: float = 0.0  # grid runs not reused as a seed's run
    at_bound: str | None = None  # "lower"/"upper": the best rate is at a bound the grid could not pass
    ties: list[dict] = field(default_factory=list)  # ties broken by a further evaluation: rates and what decided
    grid_runs: dict = field(default_factory=dict)  # lr -> the search seed's run (the gate's "every rate's score")


def next_rate(edge: float, ratio: float) -> float:
    """One log-step of ``ratio`` past ``edge``, on the 1–3 half-decade ladder when it lands near it (3e-3 × 3 → 1e-2),
    else to two significant digits."""
    x = edge * ratio
    k = math.floor(math.log10(x))
    for m in (1.0, 3.0, 10.0):
        if abs(math.log10(x) - math.log10(m * 10 ** k)) < 0.1:
            return float(f"{m * 10 ** k:.3g}")
    return float(f"{x:.2g}")


class Runner:
    """Trains and caches the suite's runs, and holds what every claim of one invocation shares: the suite, tasks,
    seeds, run folder, each task's budget and head rate, and the learning rates already chosen (an arm another
    claim already searched reads its runs back, it does not search again)."""

    def __init__(self, suite: dict, tasks: dict, seeds: list[int], data_dir, out: str, log,
                 all_tasks: dict | None = None, max_minutes: float | None = None):
        self.suite, self.tasks, self.seeds, self.data_dir, self.out, self.log = suite, tasks, seeds, data_dir, out, log
        self.all_tasks = all_tasks or tasks  # before a profile kept only some (kind slots look here)
        self.labels_cache: dict = {}
        self.budget: dict[str, float] = {}  # task -> the budget factor its reference arm needed
        self.head_lr: dict[str, float] = {}  # task -> the task head's rate (families with a head)
        self.references: dict[str, tuple] = {}  # task -> (ArmResult, gate) of the task's reference arm
        self.ranks: dict[tuple, dict] = {}  # (claim, task, arm) -> the rank/α of a ``params_from`` arm
        # the time bound: no run starts that would end past it, by the longest run so far at the nearest budget
        # scaled to the next one's (a report is always written)
        self.max_minutes, self.started = max_minutes, time.monotonic()
        self.longest: dict[float, float] = {}  # budget factor -> the longest run at it
        self.factor = 1.0  # the budget of the run about to start
        # ... and room for the claim's scoring after its last run (head-only scores, measures): seconds per run of
        # the claim, the largest a finished claim took (C10's 2.6 min past its last run once ended the suite 5 s
        # past a 60-min bound)
        self.wrapup, self.claim_runs, self.last_run_end = 0.0, 0, None
        self.tried: dict[str, dict] = {}  # run folder -> task, arm, budget, seed, lr, score: every run trained or read

    # --- settings of one run ------------------------------------------------------------------------------
    def settings(self, claim: "Claim", task: str, arm: str, seed: int, lr: float | None = None) -> dict:
        settings = run_settings(self.suite, claim, task, arm, seed, self.data_dir)
        factor = self.budget.get(task, 1)
        for key in BUDGET_KEYS if factor != 1 else ():
            if settings.get(key) is not None:
                settings[key] = int(round(settings[key] * factor))
        if lr is not None:
            settings["lr"] = lr
        spec = claim.arms[arm] or {}
        if spec.get("warmup_in_cap") and settings.get("max_steps"):  # SMT's warm-up counted inside the step cap
            settings["max_steps"] -= int(settings.get("smt_warmup_steps") or 0)
            if settings["max_steps"] < 1:
                raise ConfigError(f"{claim.id} arm {arm}: warmup_in_cap: smt_warmup_steps leaves no step of the "
                                  f"cap ({settings['max_steps'] + int(settings['smt_warmup_steps'])}) to train")
        if spec.get("params_from"):
            settings.update(self.matched_rank(claim, task, arm, seed))
        head = self.head_lr.get(task)
        if head is not None and "lr_head" not in settings:
            settings["lr_head"] = head
        return settings

    def matched_rank(self, claim: "Claim", task: str, arm: str, seed: int) -> dict:
        """``params_from: other``: the rank (and α, keeping the other arm's α/r) at which this arm's adapter has
        as many trainable parameters as ``other``'s on this model, as the method's own deltas count them."""
        key = (claim.id, task, arm)
        if key not in self.ranks:
            self.ranks[key] = self._matched_rank(claim, task, arm, seed)
        return self.ranks[key]

    def _matched_rank(self, claim: "Claim", task: str, arm: str, seed: int) -> dict:
        other = claim.arms[arm]["params_from"]
        mine = run_settings(self.suite, claim, task, arm, seed, self.data_dir)
        theirs = run_settings(self.suite, claim, task, other, seed, self.data_dir)
        target = adapter_parameters(theirs)
        one, two = adapter_parameters({**mine, "rank": 1}), adapter_parameters({**mine, "rank": 2})
        rank = max(1, round((target - (2 * one - two)) / (two - one)))
        ratio = float(theirs.get("alpha", 16)) / float(theirs.get("rank", 8))
        return {"rank": rank, "alpha": ratio * rank}

    def run(self, settings: dict, task: str, arm: str) -> SuiteRun:
        label = f"{task.replace('/', '-')}-s{settings['seed']}"
        self.factor = float(self.budget.get(task, 1))
        run = ensure_run(settings, run_dir(self.out, settings, label), arm, self.log, task, self.may_train)
        self.longest[self.factor] = max(self.longest.get(self.factor, 0.0), run.seconds)
        self.claim_runs, self.last_run_end = self.claim_runs + 1, time.monotonic()
        self.tried.setdefault(run.dir, {"task": task, "arm": arm, "budget": self.budget.get(task, 1), "seed": run.seed,
                                        "lr": settings.get("lr"), "val_score": run.val_score})  # a run read again: once
        return run

    def begin_claim(self) -> None:
        self.claim_runs, self.last_run_end = 0, None

    def end_claim(self) -> None:
        """The claim's scoring after its last run, per run of the claim (the reserve ``may_train`` keeps)."""
        if self.claim_runs and self.last_run_end is not None:
            self.wrapup = max(self.wrapup, (time.monotonic() - self.last_run_end) / self.claim_runs)

    def may_train(self) -> None:
        if self.max_minutes is None:
            return
        elapsed = time.monotonic() - self.started
        expected = expected_seconds(self.longest, self.factor)
        reserve = self.wrapup * (self.claim_runs + 1)
        if elapsed + expected + reserve > 60 * self.max_minutes:
            raise OutOfTime(f"the bound of {self.max_minutes:g} min ({elapsed / 60:.1f} min gone, the next run "
                            f"expected to take {expected / 60:.1f} min"
                            + (f", the claim's scoring after it {reserve / 60:.1f} min" if reserve else "") + ")")

    def tried_text(self, tasks: list[str]) -> str:
        """Every rate and budget tried on ``tasks`` so far, with each run's validation score."""
        groups: dict[tuple, list[str]] = {}
        for t in self.tried.values():
            if t["task"] in tasks:
                groups.setdefault((t["task"], t["arm"], t["budget"]), []).append(
                    f"{t['lr']:g} (seed {t['seed']}): {t['val_score']:.3f}" if t["lr"] is not None
                    else f"seed {t['seed']}: {t['val_score']:.3f}")
        return "; ".join(f"{task} {arm} ×{b:g}: {', '.join(v)}" for (task, arm, b), v in groups.items()) or \
            "no run had started"

    # --- the task's reference arm: its budget and head rate ----------------------------------------------
    def task_reference(self, task: str) -> tuple["ArmResult", tuple[bool, str]] | None:
        """The task's reference arm (suite.yaml ``reference`` of its family), searched and gated once per task by
        the budget ladder; its chosen rate becomes the task's head rate. None where the family names none."""
        if task in self.references:
            return self.references[task]
        family = task.split("/")[0]
        spec = (self.suite.get("reference") or {}).get(family)
        if spec is None:
            return None
        claim = Claim(id="reference", title="the task's reference arm", tasks=[], arms={HEAD_ARM: dict(spec)})
        res, passed = self.ladder(claim, task, HEAD_ARM, head=self.has_head(task))
        self.references[task] = (res, passed)
        if passed[0] and res.lr is not None and self.has_head(task):
            self.head_lr[task] = res.lr
            self.log(f"{task}: head rate {res.lr:g} (the reference arm's), budget ×{self.budget[task]:g}")
        return res, passed

    def has_head(self, task: str) -> bool:
        """A sequence classifier trains a new task head; a causal LM has none."""
        from ..data.families import task_kind
        from ..task import TaskInfo

        return TaskInfo(task_kind(task), 0).sequence_classifier

    def reference(self, claim: "Claim", task: str, arm: str) -> tuple["ArmResult", tuple[bool, str]]:
        """A claim's reference arm on ``task``: the task's reference arm fixes the budget (and head rate) first;
        then this arm is searched at that budget and gated. Without a task reference arm (a family that names
        none) this arm climbs the ladder itself."""
        if self.task_reference(task) is None:
            return self.ladder(claim, task, arm)
        ref, gate = self.references[task]
        if not gate[0]:
            return ArmResult(None, ref.grid, {}, ref.search_seconds, grid_runs=ref.grid_runs), \
                (False, "the task's reference arm: " + gate[1])
        res = self.arm(claim, task, arm, {}, self.seeds[:1])
        passed = self.gate(claim, task, arm, res.runs[self.seeds[0]])
        self.log(f"{claim.id} {task}: budget ×{self.budget[task]:g}: gate {'passed' if passed[0] else 'missed'} "
                 f"({passed[1]})")
        return res, passed

    def ladder(self, claim: "Claim", task: str, arm: str, head: bool = False) -> tuple["ArmResult", tuple[bool, str]]:
        """The budget ladder: at each factor of ``budgets`` (examples, steps and evaluation interval multiplied),
        the whole grid is searched again (a rate chosen where nothing learned is no choice) until the best rate
        passes the gate in every seed (one lucky seed is not a budget at which the arm learns: the other seeds run
        at that rate, as they would anyway) with no seed's curve still rising at the step cap. A budget where it
        passes but still rises is not converged: the next is tried; at the largest, the last budget that passed
        is kept (flagged rising). No pass anywhere: "not testable", with every rate's score at every budget in
        the log."""
        factors = [float(f) for f in self.suite.get("budgets") or [1]]
        start = self.budget.get(task, factors[0])
        margin = float(self.suite.get("rising", 0.01))
        tried, kept = [], None  # tried: (result, cost) per budget; kept: the last budget that passed the gate
        for factor in [f for f in factors if f >= start]:
            self.budget[task] = factor
            res = self.arm(claim, task, arm, {}, self.seeds[:1], head=head)
            run = res.runs[self.seeds[0]]
            passed = self.gate(claim, task, arm, run)
            cost, others = res.search_seconds + run.seconds, []
            if passed[0] and len(self.seeds) > 1:
                others = [self.run(self.at_rate(claim, task, arm, seed, res.lr, head), task, arm)
                          for seed in self.seeds[1:]]
                cost += sum(r.seconds for r in others)  # search cost where this budget is not kept
                missed = next(((r.seed, g[1]) for r in others if not (g := self.gate(claim, task, arm, r))[0]), None)
                if missed:
                    passed = (False, f"seed {missed[0]}: {missed[1]}")
            rising = passed[0] and any(r.rising(margin) for r in [run, *others])
            every = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in res.grid) or f"{res.lr:g}: {run.val_score:.3f}"
            self.log(f"{claim.id} {task}: budget ×{factor:g}, rates {every}: gate "
                     f"{'passed' if passed[0] else 'missed'} ({passed[1]})" + (", still rising at the cap" if rising else ""))
            tried.append((res, cost))
            if passed[0]:
                kept = (res, passed, factor)
                if not rising:
                    break
        res, passed = (kept[0], kept[1]) if kept else (tried[-1][0], passed)
        if kept:
            self.budget[task] = kept[2]
        res.search_seconds += sum(cost for r, cost in tried if r is not res)  # budgets not kept: search cost
        return res, passed

    def gate(self, claim: "Claim", task: str, arm: str, run: SuiteRun) -> tuple[bool, str]:
        rule = self.suite.get("gate") or {}
        if not scores.higher_better(task):  # a loss: against the same run with ΔW removed
            from .measures import without_delta

            off = without_delta(run)
            return scores.loss_gate(off["val_score_with"], off["val_score"], float(rule.get("loss", 0.02)))
        labels = self.labels(self.settings(claim, task, arm, run.seed))  # the run's own validation split
        return scores.gate(task, run.metrics, labels["validation"], labels["choices"], rule)

    # --- one arm -----------------------------------------------------------------------------------------
    def arm(self, claim: "Claim", task: str, arm: str, chosen: dict, seeds: list[int] | None = None,
            head: bool = False, done: dict | None = None) -> ArmResult:
        """Search the arm's learning rate on the first seed (unless it is fixed or borrowed), then run ``seeds``
        (default: every seed) at that rate. ``head``: the task's reference arm, whose head trains at its own
        searched rate (lr_head = lr). ``done``: the claim's arms already run (``steps_from`` reads their steps)."""
        spec = claim.arms[arm] or {}
        first = self.settings(claim, task, arm, self.seeds[0])
        res = ArmResult(None, [], {})
        if spec.get("lr_from"):
            res.lr = chosen[spec["lr_from"]]
        elif spec.get("lr_search") is False or "lr" in spec:
            res.lr = first["lr"]
        else:
            res = self.search(claim, task, arm, first, head)
        def at(seed):
            s = self.at_rate(claim, task, arm, seed, res.lr, head)
            if spec.get("steps_from"):  # exactly the steps the other arm trained in this seed, no early stop
                s.update(max_steps=int((done or {})[spec["steps_from"]].runs[seed].metrics["global_step"]),
                         patience=None)
            return s

        res.runs = {seed: self.run(at(seed), task, arm) for seed in seeds or self.seeds}
        return res

    def at_rate(self, claim: "Claim", task: str, arm: str, seed: int, lr: float, head: bool = False) -> dict:
        """An arm's settings at a chosen rate; a reference arm (``head``) trains its head at that rate too."""
        s = self.settings(claim, task, arm, seed, lr)
        return {**s, "lr_head": lr} if head else s

    def search(self, claim: "Claim", task: str, arm: str, first: dict, head: bool = False) -> ArmResult:
        family = delta_class(first.get("method", "lora")).rate_family
        values = sorted(float(v) for v in (self.suite.get("lr_grid") or {}).get(family) or [])
        if not values:
            raise ConfigError(f"suite.yaml: lr_grid has no values for method family {family!r}")
        low, high = [float(b) for b in (self.suite.get("lr_bounds") or {}).get(family) or (values[0], values[-1])]
        greater = scores.higher_better(task)

        def settings(lr, seed):
            return self.at_rate(claim, task, arm, seed, lr, head)

        runs = {lr: self.run(settings(lr, self.seeds[0]), task, arm) for lr in values}
        res = ArmResult(None, [], {}, grid_runs=runs)
        while True:
            best = self._best(runs, greater, claim, task, arm, settings, res)
            grid = sorted(runs)
            if len(grid) > 1 and best == grid[0] and grid[0] > low * (1 + 1e-9):
                lr = max(next_rate(grid[0], grid[0] / grid[1]), low)
            elif len(grid) > 1 and best == grid[-1] and grid[-1] < high * (1 - 1e-9):
                lr = min(next_rate(grid[-1], grid[-1] / grid[-2]), high)
            else:
                break
            self.log(f"{claim.id} {task} {arm}: best rate {best:g} at the grid's edge: extending to {lr:g}")
            runs[lr] = self.run(settings(lr, self.seeds[0]), task, arm)
        grid = sorted(runs)
        res.lr = best
        res.grid = [(lr, runs[lr].val_score) for lr in grid]
        if len(grid) > 1 and best in (grid[0], grid[-1]):
            res.at_bound = "lower" if best == grid[0] else "upper"
        res.search_seconds = sum(r.seconds for lr, r in runs.items() if lr != best) + \
            sum(r.seconds for t in res.ties for lr, r in t.pop("runs", {}).items() if lr != best)
        return res

    def _best(self, runs: dict, greater: bool, claim, task, arm, settings, res: ArmResult) -> float:
        """The rate with the best validation score; a tie goes to a further evaluation — the tied rates on the
        next seed (the mean of both seeds decides) — and, if that ties too or there is no next seed, to the lower
        validation loss of the search seed."""
        sign = 1.0 if greater else -1.0
        key = lambda lr: sign * runs[lr].val_score if math.isfinite(runs[lr].val_score) else -math.inf
        top = max(key(lr) for lr in runs)
        tied = sorted(lr for lr in runs if key(lr) == top)
        if len(tied) == 1:
            return tied[0]
        record = {"rates": tied, "score": sign * top}
        if len(self.seeds) > 1:
            more = {lr: self.run(settings(lr, self.seeds[1]), task, arm) for lr in tied}
            record["runs"] = more  # their cost counts as search (popped by ``search``)
            mean = {lr: (key(lr) + (sign * more[lr].val_score if math.isfinite(more[lr].val_score) else -math.inf)) / 2
                    for lr in tied}
            record["next_seed"] = {lr: more[lr].val_score for lr in tied}
            top2 = max(mean.values())
            tied = [lr for lr in tied if mean[lr] == top2]
        if len(tied) > 1:
            record["decided_by"] = "validation loss"
            best = min(tied, key=lambda lr: runs[lr].val_loss if math.isfinite(runs[lr].val_loss) else math.inf)
        else:
            record["decided_by"] = "the next seed"
            best = tied[0]
        record["chosen"] = best
        if not any(t["rates"] == record["rates"] for t in res.ties):
            res.ties.append(record)
        else:
            record.pop("runs", None)
        return best

    def labels(self, settings: dict) -> dict:
        """The task's validation and test labels (and answer choices) for the gate and the constant predictor."""
        from ..config import build_config
        from ..runs import task_data, tokenizer_of

        key = json.dumps({k: v for k, v in settings.items() if k in ("task", "seed", "val_size", "max_train_samples",
                                                                      "max_eval_samples", "model", "data_dir",
                                                                      "train_file")},
                         sort_keys=True, default=str)
        if key not in self.labels_cache:
            cfg = build_config({**settings, "output_dir": "unused"})
            data = task_data(cfg, tokenizer_of(cfg), cfg.max_train_samples, cfg.max_eval_samples)
            if data.causal_lm and not data.scored_by_generation:  # a loss: no labels to predict
                val, test = [], []
            elif data.generation_records:
                recs = data.generation_records
                val = [r["answer"] for r in recs.get("validation", recs.get("test", []))]
                test = [r["answer"] for r in recs.get("test", [])]
            else:
                val = list(next(iter(data.evals.values()))["labels"])
                test = list(next(iter(data.tests.values()))["labels"]) if data.tests else []
            self.labels_cache[key] = {"validation": val, "test": test, "choices": data.answer_choices}
        return self.labels_cache[key]


def adapter_parameters(settings: dict) -> int:
    """Trainable parameters of the adapter ``settings`` describe (its deltas, not the task head): the method's
    count on the targets found in the model built from its config on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ..config import build_config
    from ..deltas import parameter_count
    from ..models import resolve
    from ..task import is_causal_lm
    from ..targets import find_targets

    cfg = build_config({**settings, "output_dir": "unused"})
    config = AutoConfig.from_pretrained(resolve(cfg.model), trust_remote_code=cfg.trust_remote_code)
    causal = is_causal_lm(architectures=config.architectures)
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    return parameter_count(cfg.method, cfg, find_targets(model, cfg.targets, cfg.layers, cfg.target_modules))


def run_settings(suite: dict, claim: Claim, task: str, arm: str, seed: int, data_dir: str | None) -> dict:
    family = task.split("/")[0]
    arm_settings = {k: v for k, v in (claim.arms[arm] or {}).items() if k not in ARM_KEYS}
    settings = {**(suite.get("base") or {}), **((suite.get("families") or {}).get(family) or {}),
                **claim.base, **arm_settings}
    for key, value in (suite.get("overrides") or {}).items():  # the command line's key=value, over everything;
        scope, _, name = key.rpartition(".")                    # glue.model=… applies to one family only
        if scope in ("", family):
            settings[name] = value
    settings.update(task_settings(task, data_dir), seed=seed)
    if data_dir:
        settings["data_dir"] = os.path.abspath(data_dir)
    return settings
