"""``qkvtune bench claims`` — one experiment per claim of the four papers (and C10, attention against the MLP),
several seeds, a verdict by a stated rule (``verdicts.py``) and a Markdown report with plots (``report.py``).

The suite is a folder of YAML files (default ``configs/claims/``): ``suite.yaml`` holds the seeds, the
settings shared by every run, the settings of each task family (``glue``: a sequence classifier such as
MiniLM; ``commonsense``: a causal LM such as SmolLM2 scored by its generated answers; ``sft``: a causal LM on
chat records, judged by its validation/test loss), each family's reference arm, the learning-rate grid of each
method family with its bounds, the testability gate and named profiles (``--profile quick``); each ``c*.yaml``
is one claim::

    id: C1
    title: tuning {q,v} matches or beats tuning {q,k,v} at equal rank
    source: arXiv 2410.02247
    quotes: [{source: papers.md, row: "LoRA (QV) r=8 λ=8", cells: {avg [derived]: "85.06"}}]  # checked by a test
    tasks: [glue.0, glue.regression.0, sft.0]  # task slots: the i-th task of a family (or of a kind)
    base: {method: lora, rank: 8}              # TrainConfig keys for every arm of this claim
    arms: {qv: {targets: [q, v]}, qkv: {targets: [q, k, v]}, qv_p: {targets: [q, v], params_from: qkv}}
    reference: qv                              # the arm the gate reads (default: the first)
    measures: [...]                            # named analyses (measures.py) that turn runs into quantities
    checks: [{part: "QV ≥ QKV", rule: at_least, a: score:qv, b: score:qkv, margin: 0.02}]

Arm keys of the suite's own: ``lr_from`` (another arm's rate: controls, ranks at one shared rate),
``steps_from`` (train exactly as many steps as another arm did, seed by seed), ``params_from`` (the rank at
which this arm has as many trainable parameters as another), ``only_tasks``, ``lr_search: false``.

Three splits: every run holds out ``val_size`` training rows (seeded) as its validation split; evaluation during
training, the best checkpoint, early stopping (``patience``) and the learning-rate search read only that; the
task's dev/test file is the test split, scored once at the end (``test_predictions.json``) and never selected on.
Rates, budgets and the head's rate: ``runner.py``. Every run is also scored with ΔW removed (``measures.
without_delta``): an arm that does not beat its own head-only score is "adapter not learned" and the parts that
compare its score are not testable. Statistics: ``stats.py``; rules: ``verdicts.py``.

Task slots make the suite run unchanged on any data folder: the GLUE tasks under ``<data_dir>/glue``, the
LLM-Adapters tasks under ``<data_dir>/commonsense`` and the sft record files under ``<data_dir>/text`` are found
and ordered (the suite's preferred order first), or named with ``--tasks``. Every run is an ordinary
``qkvtune train`` run in ``<out>/runs/``, named by a hash of its config, so runs shared by claims are trained once
and an interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..config import ConfigError
from ..data.families import main_metric
from ..data.metrics import constant_score
from . import scores
from .measures import CROSS_SEED, MEASURES, TRAINING_MEASURES, mean, without_delta
from .runner import BUDGET_KEYS, OutOfTime, Runner, open_output
from .suite import Claim, default_suite_dir, discover_tasks, load_suite, parse_tasks, slot_task
from .verdicts import (COMPARISONS, NOT_RUN, UNSURE, UNTESTABLE, Interval, combine, judge, power, seeds_needed,
                       t_interval)

# --- the driver -----------------------------------------------------------------------------------------------

ADAPTER_NOT_LEARNED, LEARNED, GAIN_UNRESOLVED = "adapter not learned", "learned", "gain unresolved"
OUT_OF_TIME = "not testable within the bound"


@dataclass
class ClaimResult:
    claim: Claim
    tasks: list[str]  # the claim's tasks, testable or not
    seeds: list[int]
    runs: dict  # seed -> task -> arm -> SuiteRun (testable tasks)
    quantities: dict  # name -> [value per seed]
    checks: list[dict]
    verdict: str
    arms: dict = field(default_factory=dict)  # task -> arm -> ArmResult
    gates: dict = field(default_factory=dict)  # task -> (passed, why)
    budgets: dict = field(default_factory=dict)  # task -> {"factor", max_train_samples, max_steps, eval_steps}
    constants: dict = field(default_factory=dict)  # task -> best constant predictor's test score
    not_learned: dict = field(default_factory=dict)  # task -> [arms within the margin of the constant predictor]
    head_only: dict = field(default_factory=dict)  # task -> arm -> {"score", "interval", "learned"} (ΔW removed)
    rising: dict = field(default_factory=dict)  # task -> arm -> seeds whose curve still rose at the step cap
    head_lr: dict = field(default_factory=dict)  # task -> the task head's rate
    skipped: str = ""
    seconds: float = 0.0

    @property
    def testable(self) -> list[str]:
        return [t for t in self.tasks if self.gates.get(t, (False,))[0]]

    def adapter_not_learned(self, arm: str) -> list[str]:
        """The testable tasks on which ``arm``'s adapter did not beat its own head-only score."""
        return [t for t in self.testable if not (self.head_only.get(t, {}).get(arm) or {}).get("learned", True)]


def _arm_on(claim: Claim, arm: str, task: str, tasks: dict, all_tasks: dict | None = None) -> bool:
    """Whether ``arm`` trains on ``task``: every task of the claim unless the arm lists ``only_tasks`` slots."""
    slots = (claim.arms[arm] or {}).get("only_tasks")
    return slots is None or task in [slot_task(tasks, s, all_tasks) for s in slots]


def _rows(runs: list, task: str, head_only: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, (seeds, examples) rows) of the runs' test predictions (or of their head-only scoring)."""
    preds = [without_delta(r)["predictions"] if head_only else r.predictions() for r in runs]
    if any(p is None for p in preds):
        return None
    rows = [scores.encode(p["labels"], p["predictions"], task) for p in preds]
    return rows[0][0], np.stack([r[1] for r in rows])


def difference_parts(pairs: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], reps: int = 2000):
    """The t interval's parts (``stats.Parts``) of "a better than b" pooled over tasks: per task (task, labels,
    a rows, b rows) over the same seeds and test examples; per seed the mean over tasks of direction·(a − b), and
    the test-set part from resampling each task's examples."""
    from .stats import parts, per_seed_differences, example_replicates

    ds, reps_all = [], []
    for i, (task, y, a, b) in enumerate(pairs):
        fn, sign = scores.per_example(task), scores.direction(task)
        ds.append(sign * per_seed_differences(a, b, metric=fn, labels=y))
        reps_all.append(sign * example_replicates(a, b, metric=fn, labels=y, reps=reps, seed=i))
    return parts(np.mean(ds, axis=0), np.mean(reps_all, axis=0))


def _interval(p, note: str = "t, seeds + examples") -> Interval:
    low, high = p.bounds()
    return Interval(p.mean, low, high, p.se, p.n, note, p.df)


def score_interval(result: ClaimResult, a: str, b: str, only: str | None = None) -> tuple[Interval, object, str]:
    """The t interval of "a better than b" on the test split (seeds paired, test examples resampled), pooled over
    the testable tasks (or ``only`` that one) where at least one of the two arms learned; (interval, parts, note)."""
    pairs, used = [], []
    for task in [t for t in result.testable if only in (None, t)]:
        runs_a = [result.runs[s][task].get(a) for s in result.seeds]
        runs_b = [result.runs[s][task].get(b) for s in result.seeds]
        if any(r is None for r in runs_a + runs_b) or {a, b} <= set(result.not_learned.get(task, [])):
            continue
        ra, rb = _rows(runs_a, task), _rows(runs_b, task)
        if ra is None or rb is None:
            continue
        pairs.append((task, ra[0], ra[1], rb[1]))
        used.append(task)
    if not pairs:
        return Interval(math.nan, -math.inf, math.inf), None, "neither arm learned on any testable task"
    p = difference_parts(pairs)
    return _interval(p), p, "on " + ", ".join(used)


def head_only_check(result: ClaimResult, task: str, arm: str) -> dict:
    """An arm's gain over its own runs with ΔW removed (the head as trained), read on the validation split — the
    split selection reads; the test split gates nothing. Per seed, direction·(validation score − the same without
    ΔW); ``status``: "learned" if the 90 % t interval lies above 0, "adapter not learned" if it lies at or below
    0 (the parts comparing the arm are not testable), "gain unresolved" otherwise (the parts are read, with that
    note: at 3 seeds the t(2) interval measures the gain's spread more than whether there is one, and failed
    v3's largest gains). ``score``: the test score without ΔW, shown beside the arm's own."""
    runs = [result.runs[s][task][arm] for s in result.seeds]
    sign, gains, tests = scores.direction(task), [], []
    for r in runs:
        off = without_delta(r)
        gains.append(sign * (off.get("val_score_with", r.val_score) - off["val_score"]))
        tests.append(off["score"])
    ci = t_interval(gains)
    ci.how = "t, seeds (validation)"
    status = LEARNED if ci.low > 0 else ADAPTER_NOT_LEARNED if ci.high <= 0 else GAIN_UNRESOLVED
    return {"score": mean(tests), "interval": ci, "learned": status != ADAPTER_NOT_LEARNED, "status": status}


def _per_seed_values(result: ClaimResult, c: dict, xs: list[float]) -> tuple[list[float], str]:
    """``requires`` (a dict or a list of them: {quantity, above}) read per seed: the seeds where a requirement
    fails drop out of the check's values (e.g. a stopping curve whose loss never turned)."""
    reqs = c.get("requires") or []
    reqs = [reqs] if isinstance(reqs, dict) else reqs
    if not reqs:
        return xs, ""
    keep = [True] * len(xs)
    why = []
    for r in reqs:
        vals = result.quantities.get(r["quantity"], [])
        ok = [i < len(vals) and math.isfinite(vals[i]) and vals[i] > float(r["above"]) for i in range(len(xs))]
        keep = [k and o for k, o in zip(keep, ok)]
        why.append(f"{r['quantity']} > {r['above']} in {sum(ok)} of {len(xs)} seeds")
    return [x for x, k in zip(xs, keep) if k], "; ".join(why)


def _lean(rule: str, ci: Interval, threshold) -> str:
    """Where a requirement left fewer than 2 seeds: which side of the threshold the readable ones lie on, said as
    a lean (the numbers decide the wording; one seed decides no verdict)."""
    if rule not in ("above", "below") or threshold is None or ci.n == 0:
        return ""
    side = ci.mean > threshold if rule == "above" else ci.mean < threshold
    return (f"; leans {'holds' if side else 'not held'}: the readable seed's value {ci.mean:.4g} is "
            f"{'on' if side else 'past'} the threshold {threshold:g}")


def evaluate_check(result: ClaimResult, c: dict) -> dict:
    rule, a, b = c["rule"], c["a"], c.get("b")
    margin = float(c.get("margin", 0.0))
    part = c.get("part") or f"{rule}({a}{', ' + str(b) if b is not None else ''})"
    blank = {**c, "part": part, "interval": Interval(math.nan, -math.inf, math.inf), "power": math.nan,
             "seeds_needed": None}
    if not result.testable:
        return {**blank, "verdict": UNTESTABLE, "note": "no testable task"}
    note, p = "", None
    only = c.get("_task")  # a check read on one task (its ``task`` slot), e.g. one model of C10
    if "task" in c and (only is None or only not in result.testable):
        if only is None:  # the slot names no task here: none was found, or the profile did not take it
            found = c.get("_found")
            if found:
                return {**blank, "verdict": NOT_RUN, "note": f"{found} not among this profile's tasks"}
            why = "no such task in the data folder"
        else:
            why = f"{only} not among this claim's tasks here" if only not in result.tasks else f"{only} not testable"
        return {**blank, "verdict": UNTESTABLE, "note": why}
    compared = [x[len("score:"):].split("@")[0] for x in (a, b) if str(x).startswith("score:")]
    if [arm for arm in compared if arm in result.claim.dropped]:
        return {**blank, "verdict": NOT_RUN, "note": "arm not run in this profile: " +
                ", ".join(arm for arm in compared if arm in result.claim.dropped)}
    unlearned = [arm for arm in compared if [t for t in result.adapter_not_learned(arm) if only in (None, t)]]
    if unlearned:
        return {**blank, "verdict": UNTESTABLE,
                "note": "; ".join(f"{ADAPTER_NOT_LEARNED}: {arm} (validation score not above its head-only score)"
                                  for arm in unlearned)}
    heads = [(arm, h) for arm in compared for t in result.testable if only in (None, t)
             if (h := (result.head_only.get(t) or {}).get(arm))]
    caveats = [f"{GAIN_UNRESOLVED} over head-only: {arm}"
               for arm in dict.fromkeys(arm for arm, h in heads if h["status"] == GAIN_UNRESOLVED)]
    alone = {arm: h["score"] for arm, h in heads if math.isfinite(h["score"])}
    if len(alone) == 2 and len(result.testable) == 1:  # what the heads alone score: a gap there is not ΔW's
        caveats.append("head-only test: " + ", ".join(f"{a} {s:.3f}" for a, s in alone.items()))
    if rule in COMPARISONS and str(a).startswith("score:") and str(b).startswith("score:"):
        ci, p, note = score_interval(result, a[len("score:"):], b[len("score:"):], only)
    else:
        xs = result.quantities.get(a, [])
        if isinstance(b, str):
            ys = result.quantities.get(b, [])
            xs = [x - y for x, y in zip(xs, ys)]
        elif b is not None:
            xs = [x - float(b) for x in xs]
        xs, note = _per_seed_values(result, c, xs)
        ci = t_interval(xs)
        if ci.n == 0 and len(result.testable) < len(result.tasks):
            return {**blank, "verdict": UNTESTABLE, "interval": ci,
                    "note": "needs " + ", ".join(t for t in result.tasks if t not in result.testable)}
    verdict = judge(rule, ci, margin, c.get("threshold"))
    if note.startswith("neither"):
        verdict = UNSURE
    if c.get("requires") and ci.n < 2:
        verdict, note = UNSURE, f"not interpretable: {note}" + _lean(rule, ci, c.get("threshold"))
    var_seeds = p.var_seeds if p is not None else (ci.se ** 2 if math.isfinite(ci.se) else math.nan)
    var_examples = p.var_examples if p is not None else 0.0
    pw = power(rule, ci.se, margin, ci.df, half=(ci.high - ci.low) / 2 if ci.n >= 2 else None)
    needed = seeds_needed(rule, var_seeds, var_examples, max(ci.n, 1), margin) if math.isfinite(pw) else None
    note = "; ".join(x for x in (note, *caveats) if x)
    effect = None  # the seeds at which a true difference of the paper's size would be seen (the ``better`` rule)
    if c.get("effect") is not None and rule in COMPARISONS and math.isfinite(pw):
        effect = seeds_needed("better", var_seeds, var_examples, max(ci.n, 1), float(c["effect"]))
    return {**c, "part": part, "verdict": verdict, "interval": ci, "power": pw, "seeds_needed": needed, "note": note,
            "effect_seeds": effect}


def run_claim(claim: Claim, ctx: Runner) -> ClaimResult:
    """The claim's runs, measures and verdict; past the suite's time bound, "not testable within the bound" with
    every rate and budget it tried."""
    ctx.begin_claim()
    try:
        result = _run_claim(claim, ctx)
        ctx.end_claim()
        return result
    except OutOfTime as e:
        tasks = [t for t in (slot_task(ctx.tasks, s, ctx.all_tasks) for s in claim.tasks) if t is not None]
        ctx.log(f"{claim.id}: {OUT_OF_TIME} ({e})")
        return ClaimResult(claim, tasks, ctx.seeds, {}, {}, [], OUT_OF_TIME,
                           skipped=f"{e}; tried: {ctx.tried_text(tasks)}")


def _run_claim(claim: Claim, ctx: Runner) -> ClaimResult:
    t0 = time.perf_counter()
    seeds, tasks = ctx.seeds, ctx.tasks
    claim_tasks, missing = [], []
    for slot in claim.tasks:
        t = slot_task(tasks, slot, ctx.all_tasks)
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
        done = {}
        result.arms[task] = {}
        for arm in order:
            if not _arm_on(claim, arm, task, tasks, ctx.all_tasks):
                continue
            if arm == claim.ref:  # the gate reads the search seed's run: an untestable task costs only the search
                res, result.gates[task] = ctx.reference(claim, task, arm)
                first = ctx.settings(claim, task, arm, seeds[0])
                result.budgets[task] = {"factor": ctx.budget.get(task, 1), **{k: first.get(k) for k in BUDGET_KEYS}}
                if not result.gates[task][0]:
                    result.arms[task][arm] = res
                    break
                escalation = res.search_seconds
            res = ctx.arm(claim, task, arm, {a: r.lr for a, r in done.items()}, done=done)
            if arm == claim.ref:  # the grid's other runs and any budgets that missed the gate
                res.search_seconds = escalation
            done[arm] = res
            result.arms[task][arm] = res
        if task not in result.gates:  # no reference arm on this task: nothing gates it
            result.gates[task] = (True, "no reference arm on this task")
        if task in ctx.head_lr:
            result.head_lr[task] = ctx.head_lr[task]
        if result.gates[task][0]:
            _judge_arms(result, claim, ctx, task)
    quantities = {}
    for i, seed in enumerate(seeds):
        seed_runs = result.runs[seed]
        other = result.runs[seeds[(i + 1) % len(seeds)]] if len(seeds) > 1 else None
        q = {}
        for arm in trained:
            on = [t for t in result.testable if arm in seed_runs.get(t, {})]
            if on:
                q[f"score:{arm}"] = mean([seed_runs[t][arm].score for t in on])
            for t in on:
                q[f"score:{arm}@{t}"] = seed_runs[t][arm].score
        for m in claim.measures if result.testable else []:
            params = {k: v for k, v in m.items() if k not in ("name", "only_task")}
            only = slot_task(tasks, m["only_task"], ctx.all_tasks) if m.get("only_task") else None
            runs = {t: r for t, r in seed_runs.items() if only in (None, t) and t in result.testable}
            if m["name"] in TRAINING_MEASURES:
                if not runs and only in result.testable:
                    runs = {only: {}}
                q.update(TRAINING_MEASURES[m["name"]](ctx, claim, seed, runs, **params))
            else:
                if m["name"] in CROSS_SEED:
                    params["other"] = other
                q.update(MEASURES[m["name"]](runs, **params))
        for d in claim.derived:
            x, y = d["of"]
            q[d["name"]] = q.get(x, math.nan) - q.get(y, math.nan)
        for k, v in q.items():
            quantities.setdefault(k, []).append(v)
        ctx.log(f"{claim.id} seed {seed}: " + ", ".join(f"{k}={v:.4g}" for k, v in q.items() if "@" not in k))
    result.quantities = quantities
    for c in claim.checks:  # a check's ``task`` slot names the one task it reads
        if "task" in c:
            c["_task"] = slot_task(tasks, c["task"], ctx.all_tasks)
            c["_found"] = slot_task(ctx.all_tasks, c["task"], ctx.all_tasks)
    result.checks = [evaluate_check(result, c) for c in claim.checks]
    result.verdict = combine(c["verdict"] for c in result.checks) if result.testable else UNTESTABLE
    result.seconds = time.perf_counter() - t0
    return result


def _judge_arms(result: ClaimResult, claim: Claim, ctx: Runner, task: str) -> None:
    """Per arm on a testable task: the best constant predictor's margin ("not learned"), the head-only baseline
    (for arms whose score a check compares) and the seeds still rising at the step cap."""
    seeds = result.seeds
    for seed in seeds:
        result.runs[seed][task] = {a: r.runs[seed] for a, r in result.arms[task].items()}
    if not result.arms[task]:  # only a training measure's own runs (C7's stopping run) on this task
        return
    ref_settings = ctx.settings(claim, task, next(iter(result.arms[task])), seeds[0])
    labels = ctx.labels(ref_settings)
    const = constant_score(main_metric(task), labels["test"], labels["choices"]) if labels["test"] else math.nan
    result.constants[task] = const
    margin = float(ctx.suite.get("not_learned", 0.02))
    result.not_learned[task] = [a for a, r in result.arms[task].items() if math.isfinite(const) and
                                mean([x.score for x in r.runs.values()]) <= const + margin]
    compared = {str(x)[len("score:"):].split("@")[0] for c in claim.checks for x in (c.get("a"), c.get("b"))
                if str(x).startswith("score:")}
    result.head_only[task] = {a: head_only_check(result, task, a) for a in result.arms[task] if a in compared}
    rise = float(ctx.suite.get("rising", 0.01))
    result.rising[task] = {a: [s for s, run in r.runs.items() if run.rising(rise)]
                           for a, r in result.arms[task].items()}


def keep_arms(claim: Claim, arms: list[str] | None) -> Claim:
    """A profile's ``arms: {claim: [arms]}``: the claim with those arms only (a documented subset where the whole
    claim costs too much); its checks on other arms read "not run in this profile"."""
    if not arms:
        return claim
    unknown = set(arms) - set(claim.arms)
    if unknown:
        raise ConfigError(f"profile arms: {claim.id} has no arm {sorted(unknown)[0]!r} (have {list(claim.arms)})")
    from dataclasses import replace

    return replace(claim, arms={a: s for a, s in claim.arms.items() if a in arms},
                   reference=claim.reference if claim.reference in arms else None,
                   dropped=[a for a in claim.arms if a not in arms])


def run_suite(suite_dir: str, data_dir, out: str, seeds: list[int] | None = None, only: list[str] | None = None,
              tasks_spec: str | None = None, overrides: dict | None = None, log=print,
              profile: str | None = None, max_minutes: float | None = None) -> list[ClaimResult]:
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
        max_minutes = max_minutes if max_minutes is not None else p.get("max_minutes")
        tasks_spec = tasks_spec or p.get("tasks")
        overrides = {**(p.get("overrides") or {}), **(overrides or {})}
        for key in ("gate", "lr_grid", "lr_bounds", "not_learned", "budgets", "rising", "reference"):
            if key in p:
                suite = {**suite, key: p[key]}
        claims = [keep_arms(c, (p.get("arms") or {}).get(c.id)) for c in claims]
    if overrides:  # e.g. model=roberta-base max_train_samples=null for the papers' scale
        suite = {**suite, "overrides": overrides}
    found = discover_tasks(data_dir, suite.get("prefer"))
    tasks = parse_tasks(tasks_spec) if tasks_spec else found
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
    log(f"tasks: {tasks}; seeds {seeds}" + (f"; bound {max_minutes:g} min" if max_minutes is not None else ""))
    ctx = Runner(suite, tasks, seeds, data_dir, out, log, all_tasks=found if not named else tasks,
                 max_minutes=max_minutes)
    return [run_claim(c, ctx) for c in claims]


# --- CLI ----------------------------------------------------------------------------------------------------

def cmd_claims(args) -> int:
    from ..config import parse_override
    from .report import command_line, write_report

    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    only = [c.strip() for c in args.claims.split(",")] if args.claims else None
    overrides = dict(parse_override(o) for o in args.overrides)
    use_device(args.device)
    if args.max_minutes is not None and not args.max_minutes >= 0:
        raise ConfigError(f"--max-minutes: must be >= 0, got {args.max_minutes!r}")
    report, log = open_output(args.out, args.report, "REPORT.md", "claims.log")  # checked before, made after
    t0 = time.time()
    results = run_suite(args.suite, args.data_dir, args.out, seeds, only, args.tasks, overrides, log, args.profile,
                        args.max_minutes)
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


def use_device(device: str) -> None:
    """``--device``: ``cuda`` needs a GPU (refused without one); ``cpu`` hides the GPUs from this process before
    anything touches CUDA; ``auto`` lets Trainer take a GPU when there is one. Runs are the same runs either way
    (same settings, same folders); on a GPU ``dtype: auto`` trains in bf16."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible to torch")
    elif device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def register(sub) -> None:
    p = sub.add_parser("claims", help="reproduce the papers' claims: one experiment per claim, seeds, verdicts, report")
    p.add_argument("overrides", nargs="*", help="key=value for every run, or family.key=value for one family "
                   "(e.g. glue.model=roberta-base commonsense.model=meta-llama/Meta-Llama-3-8B for the papers' scale)")
    p.add_argument("--suite", default=default_suite_dir(), help="folder of suite.yaml + c*.yaml (default: configs/claims)")
    p.add_argument("--data-dir", help="folder laid out like shared/datasets (default: $QKVTUNE_DATA)")
    p.add_argument("--tasks", help="task ids instead of those found in the data folder, e.g. glue/rte,commonsense/piqa")
    p.add_argument("--claims", help="only these claims, e.g. C1,C3")
    p.add_argument("--seeds", help="comma-separated seeds (default: the suite's)")
    p.add_argument("--profile", help="a named profile of suite.yaml: default (the first GLUE task; "
                   "C1, C2, C3, C10; ≤ 60 min on 2 CPU cores), full (C4-C9 too, every task, SmolLM2 included), quick (a smoke version)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where runs train: auto (a GPU if there is one), cpu, cuda (refused without a GPU)")
    p.add_argument("--max-minutes", type=float, help="time bound (default: the profile's max_minutes, else none): no "
                   "run starts that would end past it; what it leaves undecided is reported 'not testable within "
                   "the bound' with every rate and budget tried, and the report is always written")
    p.add_argument("--out", default="runs/claims", help="folder for the runs, the log and the report")
    p.add_argument("--report", help="Markdown report path (default: OUT/REPORT.md); plots go beside it")
    p.add_argument("--preface", help="a Markdown file placed under the report's header (e.g. what changed since the "
                   "previous report)")
    p.add_argument("--speed-results", help="folder of speed_*.json from `qkvtune bench speed` to include in the report "
                   "(e.g. benchmarks/results)")
    p.set_defaults(func=cmd_claims)
