"""``qkvtune bench claims`` — one experiment per claim of the four papers, several seeds, a verdict by a
stated rule (``verdicts.py``) and a Markdown report with plots (``report.py``).

The suite is a folder of YAML files (default ``configs/claims/``): ``suite.yaml`` holds the seeds, the
settings shared by every run and one profile per task family (``glue``: a sequence classifier such as MiniLM;
``commonsense``: a causal LM such as SmolLM2); each ``c*.yaml`` is one claim::

    id: C1
    title: tuning {q,v} matches or beats tuning {q,k,v} at equal rank
    source: arXiv 2410.02247
    paper: the paper's own numbers, quoted in the report
    tasks: [glue.0, glue.3, commonsense.1]     # task slots: the i-th task of a family (wrapping around)
    base: {method: lora, rank: 8}              # TrainConfig keys for every arm of this claim
    arms: {qv: {targets: [q, v]}, qkv: {targets: [q, k, v]}}
    measures: [...]                            # named analyses that turn runs into quantities
    checks: [{rule: non_inferior, a: score:qv, b: score:qkv, margin: 0.01}]

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
import sys
import time
from dataclasses import dataclass, field

import torch
import yaml

from ..checkpoints import log_history
from ..config import ConfigError
from ..errors import check_output_dir, check_output_file
from .scores import score_key, score_of

FAMILIES = ("glue", "commonsense")
GLUE_TASKS = ("sst2", "mrpc", "cola", "stsb", "qnli", "rte", "mnli", "qqp", "wnli")
CLAIM_KEYS = {"id", "title", "source", "paper", "tasks", "base", "arms", "measures", "checks", "derived", "notes"}
SUITE_KEYS = {"seeds", "base", "profiles", "prefer"}


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
    path: str = ""


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


def load_suite(folder: str) -> tuple[dict, list[Claim]]:
    """suite.yaml and every c*.yaml of ``folder``, checked: unknown keys, arms, slots, check operands."""
    path = os.path.join(folder, "suite.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"--suite: {path} not found")
    suite = _read_yaml(path)
    for key in suite:
        if key not in SUITE_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (expected {sorted(SUITE_KEYS)})")
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
    score: float
    history: list[dict]
    seconds: float


def run_settings(suite: dict, claim: Claim, task: str, arm: str, seed: int, data_dir: str | None) -> dict:
    family = task.split("/")[0]
    arm_settings = {k: v for k, v in (claim.arms[arm] or {}).items() if k != "only_tasks"}
    settings = {**(suite.get("base") or {}), **((suite.get("profiles") or {}).get(family) or {}),
                **claim.base, **arm_settings}
    for key, value in (suite.get("overrides") or {}).items():  # the command line's key=value, over everything;
        scope, _, name = key.rpartition(".")                    # glue.model=… applies to one family only
        if scope in ("", family):
            settings[name] = value
    settings.update(task=task, seed=seed)
    if data_dir:
        settings["data_dir"] = os.path.abspath(data_dir)
    return settings


def run_dir(out: str, settings: dict, label: str) -> str:
    key = hashlib.sha256(json.dumps({k: v for k, v in settings.items() if k != "data_dir"}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:10]
    return os.path.join(out, "runs", f"{label}-{key}")


def ensure_run(settings: dict, out_dir: str, arm: str, log) -> Run:
    """Train the run unless ``out_dir`` already holds its finished result (then just read it)."""
    from ..config import build_config
    from ..train import train

    done = os.path.join(out_dir, "claims_run.json")
    if os.path.exists(done):
        with open(done) as f:
            rec = json.load(f)
        if rec.get("settings") == json.loads(json.dumps(settings, default=str)):
            return Run(**{k: rec[k] for k in ("task", "arm", "seed", "metrics", "score", "history", "seconds")},
                       dir=out_dir)
    cfg = build_config({**settings, "output_dir": out_dir, "overwrite": True})
    log(f"train {settings['task']} {arm} seed={settings['seed']} -> {out_dir}")
    t0 = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - t0
    history = log_history(out_dir)
    score = score_of(metrics, settings["task"])
    score = math.nan if score is None else float(score)
    rec = {"settings": settings, "task": settings["task"], "arm": arm, "seed": settings["seed"], "metrics": metrics,
           "score": score, "history": history, "seconds": seconds}
    from ..io import write_json

    write_json(done, json.loads(json.dumps(rec, default=str)))
    return Run(task=settings["task"], arm=arm, seed=settings["seed"], dir=out_dir, metrics=metrics, score=score,
               history=history, seconds=seconds)


# --- measures: runs of one seed -> named quantities ---------------------------------------------------------

def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def steps_to_target(runs: dict, arms: list[str], reference: str, fraction: float = 0.97) -> dict:
    """First evaluated step at which each arm reaches ``fraction`` × the reference arm's best dev score (per task,
    same seed); an arm that never does counts as one evaluation interval past its last step."""
    out = {}
    for arm in arms:
        steps = []
        for task, by_arm in runs.items():
            ref = [v for h in by_arm[reference].history if (v := score_of(h, task)) is not None]
            curve = [(h["step"], v) for h in by_arm[arm].history if (v := score_of(h, task)) is not None]
            if not ref or not curve:
                continue
            target = fraction * max(ref)
            hit = next((s for s, v in curve if v >= target), None)
            interval = curve[1][0] - curve[0][0] if len(curve) > 1 else curve[0][0]
            steps.append(hit if hit is not None else curve[-1][0] + interval)
        out[f"steps:{arm}"] = _mean(steps)
    return out


def subspace(runs: dict, a: str, b: str, side: str = "A") -> dict:
    """LoRA §7.2 between the adapters of arms a (rank r_a) and b (rank r_b), averaged over matrices and tasks:
    φ(1, 1); ψ_top and ψ_bottom, the share of a's top and bottom singular direction inside b's whole subspace;
    ``random`` = r_b/d, what ψ is for a random direction."""
    from ..runs import open_runs
    from ..analysis.subspace import adapter_factors, direction_shares, subspace_similarity

    vals = {"phi_top1": [], "psi_top": [], "psi_bottom": [], "random": []}
    for task, by_arm in runs.items():
        ra, rb = open_runs([by_arm[a].dir, by_arm[b].dir])
        fa, fb = adapter_factors(ra.model, ra.adapter, side), adapter_factors(ra.model, rb.adapter, side)
        for key in fa:
            share = direction_shares(fa[key], fb[key], side)  # ‖U_bᵀ u_k‖² for each direction k of a
            r_b = min(fb[key].shape) if side == "A" else fb[key].shape[1]
            vals["phi_top1"].append(float(subspace_similarity(fa[key], fb[key], side)[0, 0]))
            vals["psi_top"].append(float(share[0]))
            vals["psi_bottom"].append(float(share[-1]))
            vals["random"].append(r_b / fa[key].shape[1 if side == "A" else 0])
    out = {k: _mean(v) for k, v in vals.items()}
    out["psi_bottom_over_random"] = out["psi_bottom"] / out["random"]
    return out


def amplification(runs: dict, arms: list[str]) -> dict:
    """LoRA §7.3 for each arm's adapter, median over matrices: factor ‖ΔW‖/‖UᵀWV‖, and ‖UᵀWV‖ along ΔW's
    directions relative to random directions (> 1: W has them) and to W's own top directions (< 1: W does
    not emphasize them)."""
    from ..runs import open_runs
    import statistics

    from ..analysis.subspace import amplification as amp, delta_weights

    out = {}
    for arm in arms:
        factors, over_random, over_w = [], [], []
        for task, by_arm in runs.items():
            (run,) = open_runs([by_arm[arm].dir])
            for key, (dw, w) in delta_weights(run.model, run.adapter).items():
                row = amp(dw, w)
                factors.append(row["factor"])
                over_random.append(row["proj_delta_dirs"] / row["proj_random"])
                over_w.append(row["proj_delta_dirs"] / row["proj_w_dirs"])
        out[f"factor:{arm}"] = statistics.median(factors)
        out[f"dirs_over_random:{arm}"] = statistics.median(over_random)
        out[f"dirs_over_w:{arm}"] = statistics.median(over_w)
    return out


def allocation(runs: dict, arm: str) -> dict:
    """Share of SMT's selected blocks per matrix kind (from smt_allocation.json) and V's lead over the next kind."""
    shares = {"q": [], "k": [], "v": []}
    for task, by_arm in runs.items():
        with open(os.path.join(by_arm[arm].dir, "smt_allocation.json")) as f:
            rep = json.load(f)
        per_kind = rep["by_kind"]
        total = sum(per_kind.values()) or 1
        for k in shares:
            shares[k].append(per_kind.get(k, 0) / total)
    out = {f"share_{k}:{arm}": _mean(v) for k, v in shares.items()}
    out[f"v_lead:{arm}"] = out[f"share_v:{arm}"] - max(out[f"share_q:{arm}"], out[f"share_k:{arm}"])
    return out


def pretrained_kernel(settings: dict, n: int):
    """The empirical NTK of a run's slices at the pretrained weights on its first ``n`` training examples."""
    from ..runs import pretrained
    from ..analysis.ntk import empirical_ntk
    from ..config import build_config

    run = pretrained(build_config({**settings, "output_dir": "unused"}), n_train=n, n_eval=1)
    return empirical_ntk(run.model, run.examples("train", n), run.targets, collator=run.task.collator,
                         output=run.kernel_output)


def sample_slope(runs: dict, arms: dict, kernel_n: int = 256) -> dict:
    """Slope of log(1 − score) on log n over the arms (arm -> n), against the excess-risk exponent −p/(p+1)
    that the decay λ_i ~ i^(−p) of the empirical NTK at the pretrained weights predicts."""
    from ..analysis.ntk import rate_from_decay
    from ..analysis.samples import fit_slope

    slopes, rates = [], []
    for task, by_arm in runs.items():
        ns = [int(n) for n in arms.values()]
        errors = [1.0 - by_arm[arm].score for arm in arms]
        slopes.append(fit_slope(ns, errors))
        with open(os.path.join(by_arm[next(iter(arms))].dir, "claims_run.json")) as f:
            settings = json.load(f)["settings"]
        res = pretrained_kernel(settings, kernel_n)
        rates.append(-rate_from_decay(res.decay_exponent))
    out = {"error_slope": _mean(slopes), "kernel_rate": _mean(rates)}
    out["slope_minus_rate"] = out["error_slope"] - out["kernel_rate"]
    return out


def task_vectors(runs: dict, arm: str, coef: float = 1.0) -> dict:
    """Task arithmetic on two tasks' adapters (same seed, same base): the share of each task's gain over the
    base (task head alone, ΔW = 0) that survives θ₀ + τ₁ + τ₂ (addition) and θ₀ + τ₂ − τ₁ (negation of task 1:
    the target, whose gain should vanish, and task 2, the control, whose gain should stay)."""
    from ..runs import open_runs
    from ..analysis.task_vectors import TaskVector, apply, restore
    from ..attach import heads_only, set_adapter

    tasks = list(runs)
    if len(tasks) < 2:
        return {}
    dirs = [runs[t][arm].dir for t in tasks[:2]]
    with open(os.path.join(dirs[0], "claims_run.json")) as f:
        n_eval = json.load(f)["settings"].get("max_eval_samples")
    opened = open_runs(dirs, n_eval=n_eval)
    model = opened[0].model
    vecs = [TaskVector.from_model(model, r.adapter) for r in opened]

    def score(i):
        return task_metric(model, opened[i], tasks[i])

    base, tuned = [], []
    for i in range(2):
        with heads_only(model, opened[i].adapter):
            base.append(score(i))
        set_adapter(model, opened[i].adapter)
        tuned.append(score(i))

    def retained(i, coefs):
        for v, c in zip(vecs, coefs):
            if c:
                apply(model, v, c)
        with heads_only(model, opened[i].adapter):
            s = score(i)
        restore(model)
        gain = tuned[i] - base[i]
        return (s - base[i]) / gain if abs(gain) > 1e-9 else math.nan

    return {"add_retained": _mean([retained(0, [coef, coef]), retained(1, [coef, coef])]),
            "neg_target_retained": retained(0, [-coef, coef]), "neg_control_retained": retained(1, [-coef, coef]),
            "base_score": _mean(base), "tuned_score": _mean(tuned)}


def task_metric(model, run, task: str, n: int | None = None) -> float:
    """The task's own dev metric (accuracy, Matthews, Pearson …) of a sequence classifier."""
    from ..evaluation import task_metrics

    return float(task_metrics(model, run.task, run.examples("eval", n))[score_key(task)[len("eval_"):]])


def ntk_stopping(runs: dict, suite: dict, claim: Claim, seed: int, data_dir, out: str, log, arm: str,
                 n: int = 256, lr_scale: float = 1.0, horizon_factor: float = 3.0, max_steps: int = 480,
                 eval_points: int = 16) -> dict:
    """Sun & Raskutti's early-stopping rule against training. The kernel of the arm's matrices at the
    pretrained weights picks a stable SGD step (lr = lr_scale / λ_max(K/n), the kernel's own scale) and
    predicts T̂; the run then trains past T̂ (horizon_factor × T̂) evaluating the dev loss, and the observed
    best step is compared with T̂ as log2(T̂ / best)."""
    from ..analysis.stopping import predict_stopping

    ratios, preds, obs = [], [], []
    for task in runs:
        settings = run_settings(suite, claim, task, arm, seed, data_dir)
        settings.update(max_train_samples=n)
        res = pretrained_kernel(settings, n)
        kernel = res.kernel.double()
        lam_max = float(torch.linalg.eigvalsh(kernel / len(kernel))[-1])
        # HF regression uses mean (f − y)², twice the rule's (1/2n)Σ(f − y)²: one step of lr is a kernel step of 2·lr
        loss_scale = 2.0 if res.labels.is_floating_point() else 1.0
        lr = float(f"{lr_scale / (loss_scale * lam_max):.3g}")  # rounded: a rerun finds the same run folder
        probe = predict_stopping(kernel, residuals=res.label_targets() - res.f0, lr=loss_scale * lr, total_steps=max_steps,
                                 scheduler="constant")
        t_hat = probe.step
        horizon = int(min(max_steps, max(32, math.ceil(horizon_factor * max(t_hat, 1)))))
        settings.update(lr=lr, max_steps=horizon, eval_strategy="steps", eval_steps=max(1, horizon // eval_points),
                        logging_steps=max(1, horizon // eval_points))
        run = ensure_run(settings, run_dir(out, settings, f"{task.replace('/', '-')}-s{seed}"), arm, log)
        curve = [(h["step"], h["eval_loss"]) for h in run.history if "eval_loss" in h]
        best = min(curve, key=lambda p: p[1])[0] if curve else None
        if best is None:
            continue
        preds.append(t_hat)
        obs.append(best)
        ratios.append(abs(math.log2(max(t_hat, 1) / best)))
        runs[task][arm] = run
    return {"abs_log2_pred_over_best": _mean(ratios), "predicted_step": _mean(preds), "observed_best_step": _mean(obs)}


MEASURES = {"steps_to_target": steps_to_target, "subspace": subspace, "amplification": amplification,
            "allocation": allocation, "sample_slope": sample_slope, "task_vectors": task_vectors}
TRAINING_MEASURES = {"ntk_stopping": ntk_stopping}  # these train runs of their own


# --- the driver -----------------------------------------------------------------------------------------------

@dataclass
class ClaimResult:
    claim: Claim
    tasks: list[str]
    seeds: list[int]
    runs: dict  # seed -> task -> arm -> Run
    quantities: dict  # name -> [value per seed]
    checks: list[dict]
    verdict: str
    skipped: str = ""
    seconds: float = 0.0


def _arm_on(claim: Claim, arm: str, task: str, tasks: dict) -> bool:
    """Whether ``arm`` trains on ``task``: every task of the claim unless the arm lists ``only_tasks`` slots."""
    slots = (claim.arms[arm] or {}).get("only_tasks")
    return slots is None or task in [slot_task(tasks, s) for s in slots]


def run_claim(claim: Claim, suite: dict, tasks: dict, seeds: list[int], data_dir, out: str, log) -> ClaimResult:
    from .verdicts import RULES, combine

    t0 = time.perf_counter()
    claim_tasks = []
    for slot in claim.tasks:
        t = slot_task(tasks, slot)
        if t is None:
            return ClaimResult(claim, [], seeds, {}, {}, [], "inconclusive",
                               skipped=f"no {slot.split('.')[0]} task in the data folder")
        if t not in claim_tasks:
            claim_tasks.append(t)
    trained_arms = [a for a in claim.arms if not any(m.get("arm") == a and m["name"] in TRAINING_MEASURES
                                                     for m in claim.measures)]
    runs, quantities = {}, {}
    for seed in seeds:
        runs[seed] = {t: {} for t in claim_tasks}
        for task in claim_tasks:
            for arm in trained_arms:
                settings = run_settings(suite, claim, task, arm, seed, data_dir)
                if not _arm_on(claim, arm, task, tasks):
                    continue
                label = f"{task.replace('/', '-')}-s{seed}"
                runs[seed][task][arm] = ensure_run(settings, run_dir(out, settings, label), arm, log)
        q = {}
        for arm in trained_arms:
            on = [t for t in claim_tasks if arm in runs[seed][t]]
            q[f"score:{arm}"] = _mean([runs[seed][t][arm].score for t in on])
            for t in on:
                q[f"score:{arm}@{t}"] = runs[seed][t][arm].score
        for m in claim.measures:
            params = {k: v for k, v in m.items() if k not in ("name", "only_task")}
            only = slot_task(tasks, m["only_task"]) if m.get("only_task") else None
            seed_runs = {t: r for t, r in runs[seed].items() if only in (None, t)}
            if m["name"] in TRAINING_MEASURES:
                q.update(TRAINING_MEASURES[m["name"]](seed_runs, suite, claim, seed, data_dir, out, log, **params))
            elif m["name"] in MEASURES:
                q.update(MEASURES[m["name"]](seed_runs, **params))
            else:
                raise ConfigError(f"{claim.path}: measures: unknown measure {m['name']!r} (known: "
                                  f"{sorted(MEASURES) + sorted(TRAINING_MEASURES)})")
        for d in claim.derived:
            a, b = d["of"]
            q[d["name"]] = q.get(a, math.nan) - q.get(b, math.nan)
        for k, v in q.items():
            quantities.setdefault(k, []).append(v)
        log(f"{claim.id} seed {seed}: " + ", ".join(f"{k}={v:.4g}" for k, v in q.items() if "@" not in k))
    checks = []
    for c in claim.checks:
        rule = RULES[c["rule"]]
        if c["rule"] in ("non_inferior", "superior"):
            verdict, ci = rule(quantities.get(c["a"], []), quantities.get(c["b"], []), c.get("margin", 0.0))
        elif c["rule"] == "contains":
            target = _mean(quantities.get(c["value"], [])) if isinstance(c["value"], str) else float(c["value"])
            verdict, ci = rule(quantities.get(c["a"], []), target, c.get("margin", 0.0))
        else:
            verdict, ci = rule(quantities.get(c["a"], []), float(c["threshold"]))
        checks.append({**c, "verdict": verdict, "interval": ci})
    return ClaimResult(claim, claim_tasks, seeds, runs, quantities, checks, combine(c["verdict"] for c in checks),
                       seconds=time.perf_counter() - t0)


def run_suite(suite_dir: str, data_dir, out: str, seeds: list[int] | None = None, only: list[str] | None = None,
              tasks_spec: str | None = None, overrides: dict | None = None, log=print) -> list[ClaimResult]:
    suite, claims = load_suite(suite_dir)
    if overrides:  # e.g. model=roberta-base max_train_samples=null for the papers' scale
        suite = {**suite, "overrides": overrides}
    tasks = parse_tasks(tasks_spec) if tasks_spec else discover_tasks(data_dir, suite.get("prefer"))
    seeds = seeds or list(suite.get("seeds") or [0, 1, 2])
    if only:
        unknown = set(only) - {c.id for c in claims}
        if unknown:
            raise ConfigError(f"--claims: unknown claim {sorted(unknown)[0]!r} (have {[c.id for c in claims]})")
        claims = [c for c in claims if c.id in only]
    log(f"tasks: {tasks}; seeds {seeds}")
    return [run_claim(c, suite, tasks, seeds, data_dir, out, log) for c in claims]


# --- CLI ----------------------------------------------------------------------------------------------------

def cmd_claims(args) -> int:
    from ..config import parse_override
    from .report import write_report

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
    results = run_suite(args.suite, args.data_dir, args.out, seeds, only, args.tasks, overrides, log)
    command = "qkvtune " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("qkvtune") else "qkvtune bench claims …"
    write_report(results, report, command=command, seconds=time.time() - t0, speed_dir=args.speed_results)
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
    p.add_argument("--out", default="runs/claims", help="folder for the runs, the log and the report")
    p.add_argument("--report", help="Markdown report path (default: OUT/REPORT.md); plots go beside it")
    p.add_argument("--speed-results", help="folder of speed_*.json from `qkvtune bench speed` to include in the report "
                   "(e.g. benchmarks/results)")
    p.set_defaults(func=cmd_claims)
