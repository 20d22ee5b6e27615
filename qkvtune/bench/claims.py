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

import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..config import ConfigError
from . import scores
from .measures import MEASURES, TRAINING_MEASURES, mean
from .runner import BUDGET_KEYS, Context, open_output
from .suite import Claim, default_suite_dir, discover_tasks, load_suite, parse_tasks, slot_task
from .verdicts import COMPARISONS, UNSURE, UNTESTABLE, Interval, combine, judge, power, seeds_needed, t_interval

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

    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    only = [c.strip() for c in args.claims.split(",")] if args.claims else None
    overrides = dict(parse_override(o) for o in args.overrides)
    report, log = open_output(args.out, args.report, "REPORT.md", "claims.log")  # checked before, made after
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
