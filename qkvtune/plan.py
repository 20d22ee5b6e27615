"""``qkvtune plan``: choose the matrices, λ, the learning rate and the stopping step from the pretrained NTK,
before training — and say when the configured budget will not learn.

1. The eNTK of every linear kind the model has (attention q, k, v, o; MLP gate, up, down), per slice, once, at the
   pretrained weights on n training and m validation points (``runs.pretrained``, ``analysis.ntk``; sketched for
   large n). For a classifier, its fresh head's linear layer is in the kernel too (kind ``head``, at the head's
   rate): the real run trains it. What the model's output is for the kernel (``kernel_examples``):
   * a sequence classifier: the head's margin (two classes) or logits; its loss cross-entropy (``mse`` for a
     regressor, transformers' loss);
   * a causal LM with ``--label-words``: the label words' logits where the answer is predicted;
   * a causal LM trained on its language-model loss (``task: sft``, ``text/…``): points are trained tokens drawn
     from the examples, each read as the margin u = z_y − log Σ_{k≠y} e^{z_k} of the observed token against the
     others, whose cross-entropy is exactly softplus(−u) (``ntk.token_margin``): a loss-gradient kernel on
     per-token margins, and the predicted validation loss is the mean of softplus(−u) over held-out tokens.
2. The method and the optimizer, from first principles. A method's kernel at its initialisation is a factor of
   the weights' (``Delta.kernel_factor``: LoRA's s²·r/(3·in), carried by B). Adam divides each parameter's step by
   its gradient's root mean square, so a block's kernel counts √(c·P/E‖ḡ‖²) times (``kernel_sim.adam_weight``),
   E‖ḡ‖² the minibatch gradient's squared norm read off the kernel itself; its first moment is an exponential
   average, simulated exactly in function space. (SGD: c, no average.)
3. The time scale: one short real run (``--calibration-steps`` of {q, v}, λ = 1, the head as configured, constant
   rate) is matched to the same simulation: s = how much further the real run moved its training outputs than the
   derivation says (s = 1: the derivation is the run). One s serves every candidate and rate.
4. Every candidate (targets × λ; η_V = λ·η_Q, every kind's rate by ``optim.lr_for_kind``) at every learning rate
   of the method's grid (``Delta.rate_grid`` or ``--lrs``) is the linearised model trained on the run's loss by
   the run's schedule (``kernel_sim.train_linearised``), read at every evaluation step. A candidate whose step
   passes the stability edge of its kernel (the top eigenvalue of the loss's curvature-weighted kernel against
   2/η for gradient descent, 2(1+β₁)/((1−β₁)η) for Adam's averaged steps) is predicted to fail: it scores as the
   constant predictor and is never recommended.
5. The budget: when no candidate reaches ``--goal`` (default: clearly beating the constant predictor) within the
   schedule, plan.md says so and the horizon is extended (steps ×2, ×4, … up to ``--max-budget``); where the
   kernel's own learning curve over n says examples are missing, it names how many.
6. ``plan.yaml``: the config with the best candidate's targets, λ, lr and stop (``max_steps``), and the extended
   budget where one was needed; ``plan.json`` every curve; ``plan.md`` the ranking, which of attention only, the
   MLP only and all-linear the kernel expects to win and by how much, with plots.

Selection reads the validation split: give the config ``val_size`` so the task's dev/test file stays unseen.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import torch

from .analysis import AnalysisError
from .config import ConfigError, TrainConfig, build_config, save_config
from .deltas import delta_class, parameter_count
from .optim import lr_for_head, lr_for_kind, update_rule
from .targets import ALL_LINEAR, ATTENTION_KINDS, GROUPS, MATRIX_KINDS, MLP_KINDS, expand_kinds

KIND_SETS = (("v",), ("q", "v"), ("q", "k", "v"), ("q", "k", "v", "o"), ("mlp",), (ALL_LINEAR,))
LAMBDAS = (1.0, 2.0, 4.0, 8.0)
AUTO_SKETCH_BYTES = 6 * 2**30  # above this much stored gradient, sketch (analysis.ntk) ...
AUTO_SKETCH_DIM = 4096         # ... to this many coordinates per slice
BUDGETS = (2, 4, 8, 16, 32)    # the horizon's extensions, up to --max-budget
GROUP_NAMES = ("attention only", "MLP only", "all-linear")
HEAD = "head"


@dataclass(frozen=True)
class Candidate:
    """A setting of the matrices a run tunes: ``targets`` as a config names them (kinds, ``mlp``, ``all-linear``)
    and λ (η_V = λ·η_Q). The learning rate is the third axis of the plan's grid, kept apart."""

    targets: tuple[str, ...]
    lr_ratio: float

    @property
    def name(self) -> str:
        return f"{','.join(self.targets)} λ={self.lr_ratio:g}"

    def kinds(self, have=MATRIX_KINDS) -> list[str]:
        """The matrix kinds it tunes on a model whose kinds are ``have`` (``mlp``, ``all-linear`` expanded)."""
        return expand_kinds(self.targets, have)

    def rates(self, have=MATRIX_KINDS, lr: float = 1.0, lr_mlp_ratio: float = 1.0) -> dict[str, float]:
        """Each tuned kind's rate at η_Q = ``lr``, by the optimizer's own rule (``optim.lr_for_kind``)."""
        unit = TrainConfig(lr=lr, lr_ratio=self.lr_ratio, lr_mlp_ratio=lr_mlp_ratio)
        return {k: lr_for_kind(unit, k) for k in self.kinds(have)}

    def settings(self) -> dict:
        """The config keys that make a run of this candidate (its rate aside)."""
        return {"targets": list(self.targets), "lr_ratio": self.lr_ratio}

    @property
    def group(self) -> str:
        """attention only, MLP only, all-linear (or mixed): the question practitioners ask of the targets."""
        if ALL_LINEAR in self.targets:
            return "all-linear"
        kinds = self.kinds()
        if all(k in ATTENTION_KINDS for k in kinds):
            return "attention only"
        return "MLP only" if all(k in MLP_KINDS for k in kinds) else "mixed"


def tunes_v_with_another(targets) -> bool:
    """λ matters where v is tuned beside another kind (alone, η_V just rescales time; without v it does nothing)."""
    return ALL_LINEAR in targets or ("v" in targets and len(targets) > 1)


def candidates(kind_sets=KIND_SETS, lambdas=LAMBDAS) -> list[Candidate]:
    """targets × λ; λ only where v is tuned with another kind."""
    out = []
    for kinds in kind_sets:
        for lam in lambdas if tunes_v_with_another(kinds) else (1.0,):
            out.append(Candidate(tuple(kinds), float(lam)))
    return out


def parse_candidates(kinds: str | None, lambdas: str | None) -> list[Candidate]:
    """``--kinds "v;q,v;mlp;all-linear"`` and ``--lambdas 1,2,4`` (defaults: ``KIND_SETS``, λ ∈ {1, 2, 4, 8})."""
    sets = KIND_SETS
    if kinds:
        sets = tuple(tuple(k.strip() for k in group.split(",") if k.strip()) for group in kinds.split(";"))
        known = set(MATRIX_KINDS) | set(GROUPS)
        bad = [k for group in sets for k in group if k not in known and k != ALL_LINEAR]
        if bad or not all(sets) or any(ALL_LINEAR in g and len(g) > 1 for g in sets):
            raise ConfigError(f"--kinds: expected groups of {', '.join(MATRIX_KINDS)}, mlp, or all-linear alone, separated "
                              f"by ';', got {kinds!r}")
    try:
        lams = tuple(float(x) for x in lambdas.split(",")) if lambdas else LAMBDAS
    except ValueError:
        raise ConfigError(f"--lambdas: expected comma-separated numbers, got {lambdas!r}") from None
    if any(not lam > 0 for lam in lams):
        raise ConfigError(f"--lambdas: every λ must be > 0, got {lambdas!r}")
    return candidates(sets, lams)


def parse_numbers(text: str | None, what: str) -> list[float] | None:
    if not text:
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise ConfigError(f"{what}: expected positive numbers, got {text!r}")
    return values


# --- what the kernel reads, and how a task is scored ---------------------------------------------------------

@dataclass
class Readout:
    """The points the kernel is computed on and how the model is read there: ``output`` (``margin``, ``logits``
    or a callable), the run's ``loss`` in those outputs (``kernel_sim.loss_terms``), the task's main ``metric``,
    the heads in the kernel, and for the minibatch gradient which example each training point belongs to and how
    many points of an example one loss averages (``per_group``: tokens per example for a language model)."""

    train: list
    val: list
    output: object
    loss: str
    metric: str
    what: str
    heads: list = field(default_factory=list)
    label_ids: list | None = None
    collator: object = None
    groups: torch.Tensor | None = None
    per_group: float = 1.0


def kernel_examples(run, n: int, m: int, label_words: str | None = None, tokens: int = 4, log=print) -> Readout:
    """The kernel's points and readout for the run's task: a classifier's head output (the head in the kernel), a
    causal LM's label words (``label_words``), or a causal LM's own token loss: ``n`` training and ``m``
    validation tokens drawn from ⌈n/tokens⌉ and ⌈m/tokens⌉ examples (``ntk.token_examples``)."""
    from .analysis.ntk import KeepLogits, label_word_examples, token_examples, token_margin
    from .data.families import main_metric

    info, cfg = run.info, run.cfg
    metric = main_metric(cfg.task)
    if info.sequence_classifier:
        if label_words:
            raise ConfigError(f"--label-words: only for causal LM tasks; {cfg.task} has a {info.kind} head")
        train, val = run.examples("train", n), run.examples("eval", m)
        loss = "mse" if info.regression else "binary_ce" if run.kernel_output == "margin" else "ce"
        heads = list(run.heads) if lr_for_head(cfg) else []
        return Readout(train, val, run.kernel_output, loss, metric, f"the classifier's {run.kernel_output}"
                       + (" (its head in the kernel)" if heads else " (its head kept fixed: lr_head 0)"),
                       heads=heads, collator=run.task.collator)
    if not info.causal_lm:
        raise ConfigError(f"task: plan needs a classifier, a regressor or a causal LM, not {info.kind}")
    if label_words:
        if cfg.train_on_inputs:
            raise ConfigError("train_on_inputs: the label-word output needs the prompt/response boundary; set it false")
        ids = run.label_token_ids(label_words)
        if len(set(ids)) < len(ids):
            raise ConfigError(f"--label-words: {label_words!r} start with the same token; use words that differ there")
        (train, dropped), (val, dropped_val) = (label_word_examples(run.examples("train", n), ids),
                                                label_word_examples(run.examples("eval", m), ids))
        if dropped or dropped_val:
            log(f"plan: {dropped} training and {dropped_val} validation examples have no label word in their "
                f"response; left out")
        if len(train) < 2:
            raise ConfigError(f"--label-words: {len(train)} training responses of {cfg.task} contain one of "
                              f"{label_words!r} (as a word after a space)")
        output = "margin" if len(ids) == 2 else "logits"
        return Readout(train, val, output, "binary_ce" if output == "margin" else "ce", "accuracy",
                       f"the label words' {output} ({label_words}) at the end of the prompt", label_ids=ids,
                       collator=run.task.collator)
    if info.scored_by_generation:
        raise ConfigError(f"--label-words: {cfg.task} is scored by generated answers; name the words the kernel "
                          "reads, e.g. --label-words false,true")
    tokens = max(1, int(tokens))
    examples = run.examples("train", math.ceil(n / tokens))
    val_examples = run.examples("eval", math.ceil(m / tokens))
    train, groups = token_examples(examples, n, cfg.seed)
    val, _ = token_examples(val_examples, m, cfg.seed + 1)
    trained = [sum(1 for j, lab in enumerate(ex["labels"]) if j > 0 and lab != -100) for ex in examples]
    return Readout(train, val, token_margin, "token", "loss",
                   f"{len(train)} trained tokens of {len(examples)} examples (their loss: softplus of the token's "
                   f"margin against the vocabulary)", collator=KeepLogits(run.task.collator),
                   groups=torch.tensor(groups), per_group=sum(trained) / len(trained))


def targets_of(labels: torch.Tensor | None, readout: Readout) -> torch.Tensor | None:
    """What the loss is computed against: classes, scores; none for a language model's own tokens."""
    if readout.loss == "token" or labels is None:
        return None
    return labels.double() if labels.is_floating_point() else labels.long()


def metric_of(metric: str, loss: str, outputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The task's main metric of predicted outputs (R, m, C), one value per recorded step (R,): accuracy of the
    margin's sign or the argmax, F1 / MCC of those classes, Pearson of a score; ``loss`` the mean loss."""
    import numpy as np

    from .analysis.kernel_sim import loss_terms
    from .data.metrics import PER_EXAMPLE

    if metric == "loss":
        return loss_terms(loss, outputs, labels)[0].mean(-1)
    if loss == "mse":
        preds = outputs[..., 0]
    else:
        preds = (outputs[..., 0] > 0).long() if outputs.shape[-1] == 1 else outputs.argmax(-1)
    if metric == "accuracy":
        return (preds == labels[None]).double().mean(1)
    fn = PER_EXAMPLE.get(metric)
    if fn is None:
        return (preds == labels[None]).double().mean(1)
    y = np.asarray(labels)
    return torch.tensor([fn(y, np.asarray(p)) for p in preds], dtype=torch.float64)


def better(metric: str):
    """key(score) that sorts best first."""
    from .data.metrics import greater_is_better

    return (lambda v: -v) if greater_is_better(metric) else (lambda v: v)


def default_goal(metric: str, baseline: float) -> float:
    """What counts as learning the task: clearly beating the constant predictor (5 points of accuracy or F1, 0.2
    of a correlation), or for a language model's loss 2 % under the pretrained model's."""
    if metric == "loss":
        return baseline * 0.98
    return baseline + (0.2 if metric in ("pearson", "spearmanr", "matthews_correlation") else 0.05)


def reaches(metric: str, value: float, goal: float) -> bool:
    from .data.metrics import greater_is_better

    return value >= goal if greater_is_better(metric) else value <= goal


# --- kernels ------------------------------------------------------------------------------------------------

def kernels(run, data: list, *, output, label_token_ids=None, heads=None, collator=None, sketch_dim: int | None = None,
            sketch: str = "kron", chunk_size: int = 16, log=print):
    """The eNTK of every slice of the run's targets (and ``heads`` whole) on ``data``, sketched
    (``AUTO_SKETCH_DIM``) when the per-example gradients would pass ``AUTO_SKETCH_BYTES``: what a plan costs, and
    what ``bench plan --cost-ns`` times. Returns the ``NTKResult`` and the sketch dimension used."""
    from .analysis.ntk import empirical_ntk

    stored = len(data) * sum(t.shape[0] * t.shape[1] for t in run.targets) * 4
    if sketch_dim is None and stored > AUTO_SKETCH_BYTES:
        sketch_dim = AUTO_SKETCH_DIM
        log(f"plan: {stored / 2**30:.1f} GiB of per-example gradients: sketched to {sketch_dim} coordinates a slice")
    return empirical_ntk(run.model, data, run.targets, collator=collator or run.task.collator, output=output,
                         label_token_ids=label_token_ids, heads=heads, sketch_dim=sketch_dim, sketch=sketch,
                         chunk_size=chunk_size, seed=run.cfg.seed), sketch_dim


@dataclass
class Kinds:
    """The kinds' kernels one unit of each kind's rate moves the outputs by under the configured method and
    optimizer (``unit``: K × (n+m) × (n+m), in the order of ``names``; a task head is the kind ``head``), and how
    each grows as training moves the method's parameters (``growth``: γ, with ``power`` p: the weight
    1 + γ·(κ·Σ η)ᵖ, κ measured by the calibration run)."""

    names: list[str]
    unit: torch.Tensor
    growth: torch.Tensor
    power: int
    detail: dict

    def index(self, kind: str) -> int:
        return self.names.index(kind)

    def subset(self, idx: torch.Tensor) -> "Kinds":
        return Kinds(self.names, self.unit[:, idx][:, :, idx], self.growth, self.power, self.detail)


def unit_kernels(res, run, readout: Readout, y, n: int) -> Kinds:
    """Per kind (and ``head``): Σ over the kind's slices of w·K_slice, with w = the method's factor c (SGD) or
    √(c·P/E‖ḡ‖²) (Adam, ``kernel_sim.adam_weight``) — a head is dense (c = 1, every entry moving) — and the
    kind's growth (``Delta.kernel_growth``, averaged over its slices)."""
    from .analysis.kernel_sim import adam_weight, loss_terms, minibatch_gradient_norm2

    cfg = run.cfg
    method = delta_class(cfg.method)
    rule, _ = update_rule(cfg)
    outputs = res.per_output.shape[0] if res.per_output is not None else 1
    _, dloss, _ = loss_terms(readout.loss, res.f0[:n], y)
    batch = cfg.batch_size * cfg.grad_accum
    shapes = {t.name: (t.kind, t.rows.size, t.in_features) for t in run.targets}
    per_kind: dict[str, torch.Tensor] = {}
    growth: dict[str, list[float]] = {}
    power = 1
    detail = {}
    for name, k in res.per_target.items():
        k = k / outputs  # the kernel of one output (the outputs' kernels averaged)
        if name in shapes:
            kind, rows, fin = shapes[name]
            factor, moving = method.kernel_factor(cfg, rows, fin)
            gamma, power = method.kernel_growth(cfg, rows, fin, rule)
        else:  # a head's linear layer: trained whole, a kernel that does not grow
            kind, factor, moving, gamma = HEAD, 1.0, int(res.meta["sizes"][name]), 0.0
        g2 = minibatch_gradient_norm2(k, dloss, batch, readout.groups, readout.per_group) if rule == "adam" else 0.0
        w = adam_weight(factor, moving, g2) if rule == "adam" else factor
        detail[name] = {"kind": kind, "factor": factor, "moving": moving, "gradient_norm2": g2, "weight": w,
                        "growth": gamma}
        per_kind[kind] = per_kind.get(kind, 0) + w * k
        growth.setdefault(kind, []).append(gamma)
    names = sorted(per_kind)
    return Kinds(names, torch.stack([per_kind[k] for k in names]),
                 torch.tensor([sum(growth[k]) / len(growth[k]) for k in names], dtype=torch.float64), power, detail)


def kind_rates(kinds: Kinds, cand: "Candidate", cfg: TrainConfig, lr: float) -> torch.Tensor:
    """(K,) each kind's rate at η_Q = ``lr`` for this candidate (``optim.lr_for_kind``; the head at its rate;
    0 for kinds it does not tune)."""
    have = [k for k in kinds.names if k != HEAD]
    rates = cand.rates(have, lr, cfg.lr_mlp_ratio)
    if HEAD in kinds.names:
        rates[HEAD] = lr_for_head(dataclasses.replace(cfg, lr=lr))
    return torch.tensor([rates.get(k, 0.0) for k in kinds.names], dtype=torch.float64)


def step_weights(kinds: Kinds, rates: torch.Tensor, shape: torch.Tensor, scale: float, kappa: float) -> torch.Tensor:
    """(…, K, T) each kind's step in kernel time at every step: s·η_k(t)·(1 + γ_k·(κ·Σ_{τ<t} η_k(τ))ᵖ) for rates
    (…, K) and the schedule's shape (T,) (its rate relative to the peak)."""
    eta = rates[..., :, None] * shape  # (…, K, T)
    before = torch.cumsum(eta, -1) - eta
    return scale * eta * (1 + kinds.growth[:, None] * (kappa * before) ** kinds.power)


# --- calibration -----------------------------------------------------------------------------------------------

REFERENCE = Candidate(("q", "v"), 1.0)  # the calibration run's candidate (and bench plan's reference arm)


def calibration_config(cfg: TrainConfig, out_dir: str, steps: int, n: int) -> TrainConfig:
    """The short real run that sets the time scale: the config's method and optimizer on {q, v} at λ = 1, its head
    trained as configured, a constant rate, no evaluation, the kernel's first n training examples."""
    return build_config({**cfg.to_dict(), "targets": ["q", "v"], "lr_ratio": 1.0, "lr_q": None, "lr_k": None,
                         "lr_v": None, "lr_o": None, "max_steps": steps, "scheduler": "constant",
                         "warmup_ratio": 0.0, "eval_strategy": "no", "patience": None, "early_stopping": "none",
                         "max_train_samples": n, "save_total_limit": 2, "output_dir": out_dir,
                         "overwrite": True, "resume": False, "logging_steps": max(1, steps)})


def measured_growth(run, lr: float, steps: int) -> float:
    """κ: the root mean square the calibration run moved its method's first-moving parameters to (LoRA's B),
    per unit of Σ η (``Delta.moved_rms``); 0 for a method whose kernel does not grow."""
    from .attach import iter_deltas

    values = [d.moved_rms() for _, d in iter_deltas(run.model, run.adapter)]
    values = [v for v in values if v is not None]
    return (sum(values) / len(values)) / (lr * steps) if values else 0.0


def simulate_kinds(kinds: Kinds, n: int, f0, y, loss: str, weights, record, beta: float, record_train=False):
    from .analysis.kernel_sim import train_by_kinds

    return train_by_kinds(kinds.unit, n, f0, y, loss, weights, record, beta=beta, bias_correction=beta > 0,
                          record_train=record_train)


def match_scale(kinds: Kinds, rates: torch.Tensor, n: int, f0: torch.Tensor, y, loss: str, steps: int, beta: float,
                kappa: float, moved: float) -> float:
    """The s at which ``steps`` steps at the constant ``rates`` (K,) move the simulated training outputs by
    ``moved`` (‖f_T − f₀‖), by bisection on log s (the movement grows with s)."""
    sub = kinds.subset(torch.arange(n))
    shape = torch.ones(steps, dtype=torch.float64)

    def movement(s: float) -> float:
        w = step_weights(sub, rates, shape, s, kappa)[None]
        traj = simulate_kinds(sub, n, f0[:n], y, loss, w, [steps], beta, record_train=True)
        return float((traj.train_outputs[0, -1] - f0[:n].double().reshape(n, -1)).norm())

    lo, hi = 1e-8, 1.0
    while movement(hi) < moved and hi < 1e12:
        hi *= 10
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if movement(mid) < moved else (lo, mid)
        if hi / lo < 1 + 1e-4:
            break
    return math.sqrt(lo * hi)


# --- the schedule and the simulation of every candidate ---------------------------------------------------

def horizon(cfg: TrainConfig, tokenizer) -> int:
    """The run's length in optimizer steps: ``max_steps``, else ``epochs`` over its whole training set."""
    from .analysis.stopping import steps_per_epoch
    from .runs import task_data

    if cfg.max_steps:
        return cfg.max_steps
    n_train = len(task_data(cfg, tokenizer, cfg.max_train_samples, 1).train)
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(n_train, cfg.batch_size, cfg.grad_accum)))


def eval_steps_of(cfg: TrainConfig, total: int) -> list[int]:
    """The steps the run evaluates at (``eval_steps`` with eval_strategy steps, else 50 points), and the last."""
    every = max(1, min(cfg.eval_steps or 1, total)) if cfg.eval_strategy == "steps" else max(1, total // 50)
    steps = list(range(every, total + 1, every))
    return steps if steps and steps[-1] == total else steps + [total]


@dataclass
class Setting:
    """Everything the simulation of one plan needs: the kinds' kernels, outputs at the pretrained weights,
    targets, the readout, the calibrated scale s and growth κ, the update's average β, the loss's curvature at
    f₀ on the training points, and the constant predictor's score."""

    kinds: Kinds
    n: int
    f0: torch.Tensor
    y: torch.Tensor | None
    val_labels: torch.Tensor | None
    readout: Readout
    scale: float
    kappa: float
    beta: float
    curvature: torch.Tensor
    baseline: float


EDGE = 2.0  # gradient descent's: where one step overshoots (see simulate_grid)


def simulate_grid(st: Setting, cfg: TrainConfig, pairs: list, total: int, every: list[int]) -> list[dict]:
    """Every (candidate, rate) of ``pairs``: its stability, and its predicted validation score and loss at every
    evaluation step of a ``total``-step schedule (the config's scheduler and warm-up), all trained side by side.

    Stability: the step at the peak rate times the largest eigenvalue of the kernel at initialisation in the
    loss's curvature (η·λ_max of D K D/n) against gradient descent's edge 2. The step is the derived one (s = 1):
    Adam's bias-corrected first steps are not averaged (m̂₁/√v̂₁ = sign g₁, every parameter moving η, as the
    derivation has it), while the calibrated s also absorbs what the kernel gains later (the growth of LoRA's
    A, heavy-tailed gradients). On a quadratic Adam's averaged steps stay stable up to 2(1+β₁)/(1−β₁)
    (``kernel_sim.edge``), but a nonlinear network thrown past its target in its first steps need not come back,
    where the linearised model does; the benchmark (benchmarks/PLAN.md) checks the edge against the runs that
    diverged."""
    from .analysis.kernel_sim import loss_terms, top_eigenvalues
    from .analysis.stopping import step_sizes

    shape = step_sizes(1.0, total, cfg.warmup_ratio, cfg.scheduler)  # the schedule relative to its peak rate
    key = better(st.readout.metric)
    rates = torch.stack([kind_rates(st.kinds, c, cfg, lr) for c, lr in pairs])  # (B, K)
    weights = step_weights(st.kinds, rates, shape, st.scale, st.kappa)             # (B, K, T)
    # the stability edge: the kernel at initialisation and the derived step (s = 1) at the peak rate
    sharp = top_eigenvalues(st.kinds.unit, float(shape.max()) * rates, st.curvature, st.n)
    traj = simulate_kinds(st.kinds, st.n, st.f0, st.y, st.readout.loss, weights, every, st.beta)
    rows = []
    for i, (c, lr) in enumerate(pairs):
        curve = metric_of(st.readout.metric, st.readout.loss, traj.val_outputs[i], st.val_labels)
        val_loss = loss_terms(st.readout.loss, traj.val_outputs[i], st.val_labels)[0].mean(-1)
        finite = bool(traj.finite[i]) and bool(torch.isfinite(curve).all())
        best = min(range(len(every)), key=lambda j: (key(float(curve[j])) if math.isfinite(float(curve[j]))
                                                     else math.inf, j))
        ratio = float(sharp[i]) / EDGE
        row = {"name": c.name, "targets": list(c.targets), "lr_ratio": c.lr_ratio, "lr": lr, "group": c.group,
               "sharpness": float(sharp[i]), "edge_ratio": ratio,
               "unstable": ratio > 1 or not finite, "steps": every, "val_score": curve.tolist(),
               "val_loss": val_loss.tolist(), "train_loss": traj.train_loss[i].tolist(),
               "simulated_best": float(curve[best])}
        if row["unstable"]:  # predicted to fail: the constant predictor, never recommended
            row.update(best_step=every[-1], best_score=st.baseline, loss_at_best=math.nan)
        else:
            row.update(best_step=every[best], best_score=float(curve[best]), loss_at_best=float(val_loss[best]))
        rows.append(row)
    return rows


def rank(rows: list[dict], metric: str) -> list[dict]:
    """Stable candidates first, by predicted score (then loss, then fewer kinds, then the smaller rate)."""
    key = better(metric)
    return sorted(rows, key=lambda r: (r["unstable"], key(r["best_score"]),
                                       r["loss_at_best"] if math.isfinite(r["loss_at_best"]) else math.inf,
                                       len(r["targets"]), r["lr"]))


def row_name(row: dict) -> str:
    return f"{row['name']} lr={row['lr']:g}"


# --- budgets -------------------------------------------------------------------------------------------------

def extend_budget(st: Setting, cfg: TrainConfig, cands: list, rows: list, total: int, goal: float,
                  max_budget: int, log=print) -> dict:
    """When no candidate reaches ``goal`` in ``total`` steps: the horizon ×2, ×4, … up to ``max_budget`` (the
    evaluation interval with it) for each candidate at its best stable rate, first where one does; else, from
    the kernel's own learning curve (the best candidate at the cap on n/4, n/2 and n of its training points), how
    many more examples would. Returns what was found ("steps", "examples" or "none") with the rows at the
    extended horizon."""
    metric = st.readout.metric
    by_name = {c.name: c for c in cands}
    best = {}
    for r in rank(rows, metric):  # each candidate's best stable rate (the first rate if none is stable)
        best.setdefault(r["name"], r)
    pairs = [(by_name[name], r["lr"]) for name, r in best.items() if not r["unstable"]]
    interval = eval_steps_of(cfg, total)[0]
    ext = None
    for factor in [f for f in BUDGETS if f <= max_budget]:
        steps = total * factor
        every = list(range(interval * factor, steps + 1, interval * factor)) or [steps]
        every = every if every[-1] == steps else every + [steps]
        ext = rank(simulate_grid(st, cfg, pairs, steps, every), metric) if pairs else []
        if not ext:
            break
        top = ext[0]
        log(f"plan: ×{factor} ({steps} steps): best {row_name(top)} predicted {top['best_score']:.4g}")
        if not top["unstable"] and reaches(metric, top["best_score"], goal):
            return {"found": "steps", "factor": factor, "max_steps": steps, "eval_steps": interval * factor,
                    "rows": ext}
    out = {"found": "none", "factor": None, "rows": None, "cap": max_budget}
    if not ext:
        return out
    # the kernel's learning curve in n at the cap: is it examples that are missing?
    top = ext[0]
    cand = by_name[top["name"]]
    steps = total * max(f for f in BUDGETS if f <= max_budget)
    curve = []
    for frac in (4, 2, 1):
        k = max(2, st.n // frac)
        idx = torch.cat([torch.arange(k), torch.arange(st.n, len(st.f0))])
        sub = dataclasses.replace(st, kinds=st.kinds.subset(idx), n=k, f0=st.f0[idx],
                                  y=None if st.y is None else st.y[:k], curvature=st.curvature[:k])
        r = simulate_grid(sub, cfg, [(cand, top["lr"])], steps, [steps])[0]
        curve.append((k, r["simulated_best"]))
    out["learning_curve"] = curve
    found = examples_needed(curve, goal, metric)
    if found is not None:
        out["slope"], multiple = found
        if multiple <= max_budget:
            out.update(found="examples", examples_factor=multiple, rows=ext)
    return out


def examples_needed(curve: list[tuple[int, float]], goal: float, metric: str) -> tuple[float, float] | None:
    """How many times the examples reach ``goal``, from a learning curve [(n, score)]: the error (1 − score for
    a score bounded by 1, the loss itself for a loss) fitted as a power law c·n^(−slope) through the curve's
    ends. Returns (slope, multiple of the largest n), or None where the error does not fall with n."""
    err = (lambda v: v) if metric == "loss" else (lambda v: 1.0 - v)
    (n0, e0), (n1, e1), want = (curve[0][0], err(curve[0][1])), (curve[-1][0], err(curve[-1][1])), err(goal)
    if not (e1 > 0 and e0 > e1 and want > 0 and n1 > n0):
        return None
    slope = math.log(e0 / e1) / math.log(n1 / n0)
    return slope, max(1.0, (e1 / want) ** (1 / slope))


# --- the plan --------------------------------------------------------------------------------------------------

def plan(cfg: TrainConfig, out: str, *, n: int = 256, m: int = 128, sketch_dim: int | None = None,
         calibration_steps: int = 20, chunk_size: int = 16, cands: list[Candidate] | None = None,
         lrs: list[float] | None = None, label_words: str | None = None, tokens: int = 4, sketch: str = "kron",
         goal: float | None = None, metric: str | None = None, max_budget: int = 16, save_kernels: bool = False,
         log=print) -> dict:
    """Kernels, calibration, simulation of every candidate at every rate, budget and recommendation; writes
    plan.json, plan.md (+ PNG) and plan.yaml. Returns plan.json's content. ``metric`` scores a classifier's
    candidates by another metric than the task's main one (``goal`` is in it): e.g. accuracy on an F1 task."""
    from .analysis.kernel_sim import loss_terms
    from .analysis.ntk import eigenvalues, fit_decay, label_targets, outputs, rate_from_decay
    from .data.metrics import constant_score
    from .runs import open_run, pretrained
    from .train import train

    method = delta_class(cfg.method)
    if method.needs_selection:  # its slices and blocks come from a warm-up, not from targets
        raise ConfigError(f"method: plan simulates updates on chosen matrices, not {cfg.method!r}'s selected blocks")
    try:
        method.kernel_factor(cfg, 8, 8)
    except NotImplementedError:
        raise ConfigError(f"method: {cfg.method} has no kernel at initialisation to plan with") from None
    cands = cands or candidates()
    lrs = sorted(set(lrs or method.rate_grid or (cfg.lr,)))
    rule, beta = update_rule(cfg)
    t0 = time.perf_counter()
    run = pretrained(cfg, n_train=n, n_eval=m, kinds=[ALL_LINEAR])
    readout = kernel_examples(run, n, m, label_words, tokens, log)
    if metric and metric != readout.metric:
        if readout.metric == "loss" or metric == "loss":
            raise ConfigError(f"metric: a language model's own loss is planned on its loss, not {metric}")
        readout.metric = metric
    if not readout.val:
        raise ConfigError("val_size: plan scores candidates on validation examples; the task has none")
    n, m = len(readout.train), len(readout.val)
    kinds_have = sorted({t.kind for t in run.targets})
    log(f"plan: eNTK of {len(run.targets)} slices ({', '.join(kinds_have)})"
        + (f" and the head ({', '.join(readout.heads)})" if readout.heads else "")
        + f" on {n} training + {m} validation points; {readout.what}")
    res, sketch_dim = kernels(run, readout.train + readout.val, output=readout.output, heads=readout.heads,
                              label_token_ids=readout.label_ids, collator=readout.collator, sketch_dim=sketch_dim,
                              sketch=sketch, chunk_size=chunk_size, log=log)
    n_out = res.f0.shape[1]
    labels = res.labels
    if save_kernels:  # every slice's kernel, f₀ and labels: to simulate again without the model
        from .files import save_tensors

        os.makedirs(out, exist_ok=True)
        save_tensors(os.path.join(out, "plan_kernels.safetensors"),
                      {**{f"kernel.{k}": v for k, v in res.per_target.items()}, "f0": res.f0,
                       **({"labels": labels} if labels is not None else {}),
                       **({"groups": readout.groups} if readout.groups is not None else {})})
    if readout.loss != "token" and labels is None:
        raise AnalysisError("labels: the examples carry no per-example labels")
    if readout.loss in ("binary_ce", "ce", "mse"):
        y = targets_of(labels[:n], readout)
        val_labels = targets_of(labels[n:], readout)
    else:
        y, val_labels = None, None
    if readout.loss == "square":  # not produced above; kept for custom readouts
        y = label_targets(labels[:n], n_out)
    kinds = unit_kernels(res, run, readout, y, n)
    _, _, curvature = loss_terms(readout.loss, res.f0[:n], y)
    if readout.metric == "loss":
        baseline = float(loss_terms(readout.loss, res.f0[n:], None)[0].mean())
    else:
        baseline = constant_score(readout.metric, val_labels.numpy())
    goal = default_goal(readout.metric, baseline) if goal is None else goal
    kernel_seconds = time.perf_counter() - t0

    # the time scale from one short real run: how far it moved the training outputs
    t1 = time.perf_counter()
    calib_dir = os.path.join(out, "calibration")
    ref_cfg = calibration_config(cfg, calib_dir, calibration_steps, n)  # the data the kernel's points came from
    log(f"plan: calibration run, {calibration_steps} steps of {cfg.method} on q, v ({cfg.optim}, lr {cfg.lr:g})")
    train(ref_cfg)
    real = open_run(calib_dir, with_task=False)
    moved = float((outputs(real.model, readout.train, readout.collator, readout.output, readout.label_ids)
                   - res.f0[:n]).norm())
    kappa = measured_growth(real, cfg.lr, calibration_steps)
    del real
    scale = match_scale(kinds, kind_rates(kinds, REFERENCE, cfg, cfg.lr), n, res.f0, y, readout.loss,
                        calibration_steps, beta, kappa, moved)
    calibration_seconds = time.perf_counter() - t1
    log(f"plan: time scale s = {scale:.4g}, growth κ = {kappa:.4g} (the real run moved its training outputs "
        f"{moved:.4g}; s = 1 is the {rule} derivation)")

    # every candidate at every rate, at every evaluation step of the config's schedule
    t2 = time.perf_counter()
    total = horizon(cfg, run.tokenizer)
    every = eval_steps_of(cfg, total)
    st = Setting(kinds, n, res.f0, y, val_labels, readout, scale, kappa, beta, curvature, baseline)
    rows = rank(simulate_grid(st, cfg, [(c, lr) for c in cands for lr in lrs], total, every), readout.metric)
    budget = {"found": "configured", "factor": 1, "max_steps": total}
    if rows[0]["unstable"] or not reaches(readout.metric, rows[0]["best_score"], goal):
        log(f"plan: no candidate is predicted to reach {goal:.4g} ({readout.metric}) within {total} steps; "
            f"extending the horizon")
        budget = extend_budget(st, cfg, cands, rows, total, goal, max_budget, log)
        budget["max_steps_configured"] = total
    # the pick: at the extended horizon where it learns there (or with more examples at the cap), else as configured
    chosen = budget["rows"] if budget.get("found") in ("steps", "examples") else rows
    pick = chosen[0]
    simulate_seconds = time.perf_counter() - t2

    kernel_all = sum(v for k, v in res.per_kind.items() if k != HEAD)
    eigs = eigenvalues(kernel_all[:n, :n])
    p, rng = fit_decay(eigs)
    params = parameter_counts(run, cands, cfg)
    groups = group_summary(rows, readout.metric)
    summary = {
        "model": cfg.model, "task": cfg.task, "method": cfg.method, "optimizer": cfg.optim, "update_rule": rule,
        "beta": beta, "lr": cfg.lr, "lrs": lrs, "n_train": n, "n_val": m, "readout": readout.what,
        "output": readout.output if isinstance(readout.output, str) else "token_margin", "loss": readout.loss,
        "metric": readout.metric, "label_words": label_words, "heads": readout.heads, "horizon": total,
        "baseline": baseline, "goal": goal, "kinds": kinds_have,
        "time_scale": {"scale": scale, "growth": kappa, "calibration_steps": calibration_steps, "moved": moved,
                       "rule": "step t moves the outputs by Σ_k s·η_k(t)·(1 + γ_k·(κ·Σ_{τ<t} η_k)^p)·K_k ℓ'/n "
                               "(Adam: averaged, bias-corrected)", "power": kinds.power, "edge": EDGE},
        "weights": kinds.detail, "candidates": rows, "ranking": [row_name(r) for r in rows],
        "parameters": params, "groups": groups,
        "budget": {k: v for k, v in budget.items() if k != "rows"},
        "extended": [{k: r[k] for k in ("name", "lr", "best_step", "best_score", "unstable")}
                     for r in budget.get("rows") or []],
        "recommended": {"targets": pick["targets"], "lr_ratio": pick["lr_ratio"], "lr": pick["lr"],
                        "max_steps": pick["best_step"], "predicted_val_score": pick["best_score"],
                        "unstable": pick["unstable"], "reaches_goal": reaches(readout.metric, pick["best_score"], goal)
                        and not pick["unstable"]},
        "spectrum": {"eigenvalues": eigs.tolist(), "decay_exponent": p, "decay_range": list(rng),
                     "rate_exponent": rate_from_decay(p),
                     "per_kind": {k: eigenvalues(v[:n, :n]).tolist() for k, v in res.per_kind.items()},
                     "per_kind_trace": {k: float(v[:n, :n].trace()) for k, v in res.per_kind.items()}},
        "seconds": {"kernel": kernel_seconds, "calibration": calibration_seconds, "simulation": simulate_seconds,
                    "total": time.perf_counter() - t0},
        "sketch_dim": sketch_dim, "sketch": sketch if sketch_dim else None,
    }
    if budget.get("found") in ("steps", "examples"):
        summary["recommended"]["budget_factor"] = budget.get("factor") or budget.get("examples_factor")
    write_plan(summary, cfg, out)
    return summary


def parameter_counts(run, cands: list, cfg: TrainConfig) -> dict[str, int]:
    """Trainable parameters of each candidate's targets under the configured method (heads aside)."""
    have = sorted({t.kind for t in run.targets})
    out = {}
    for c in cands:
        kinds = set(c.kinds(have))
        out[c.name] = parameter_count(cfg.method, cfg, [t for t in run.targets if t.kind in kinds])
    return out


def group_summary(rows: list[dict], metric: str) -> dict:
    """The best stable row of each of attention only, MLP only and all-linear."""
    out = {}
    for g in GROUP_NAMES:
        mine = [r for r in rank(rows, metric) if r["group"] == g]
        if mine:
            r = mine[0]
            out[g] = {"best": row_name(r), "score": r["best_score"], "unstable": r["unstable"]}
    return out


def verdict_sentence(summary: dict) -> str:
    """One sentence: which of attention only, the MLP only and all-linear the kernel expects to win, by how much."""
    g = summary["groups"]
    metric = summary["metric"]
    stable = {k: v for k, v in g.items() if not v["unstable"]}
    if not stable:
        return "The kernel expects no group of targets to train stably at these rates."
    key = better(metric)
    order = sorted(stable, key=lambda k: key(stable[k]["score"]))
    win = order[0]
    others = "; ".join(f"{k} {stable[k]['score']:.4g} ({stable[k]['best']}), "
                       f"{abs(stable[win]['score'] - stable[k]['score']):.3g} {'lower' if metric != 'loss' else 'higher'}"
                       for k in order[1:])
    what = "validation loss" if metric == "loss" else f"validation {metric}"
    return (f"On this model and data the kernel expects **{win}** to win: predicted {what} "
            f"{stable[win]['score']:.4g} ({stable[win]['best']})" + (f", against {others}." if others else "."))


def recommended_config(cfg: TrainConfig, summary: dict) -> TrainConfig:
    rec, budget = summary["recommended"], summary["budget"]
    keys = {"targets": rec["targets"], "lr_ratio": rec["lr_ratio"], "lr": rec["lr"], "lr_q": None, "lr_k": None,
            "lr_v": None, "lr_o": None, "max_steps": rec["max_steps"]}
    if budget.get("found") == "steps" and cfg.eval_steps:
        keys["eval_steps"] = budget["eval_steps"]
    if budget.get("found") == "examples" and cfg.max_train_samples:
        keys["max_train_samples"] = int(math.ceil(cfg.max_train_samples * budget["examples_factor"]))
    return build_config({**cfg.to_dict(), **keys})


def write_plan(summary: dict, cfg: TrainConfig, out: str) -> None:
    from .analysis.plots import plot_lines, plot_spectrum
    from .files import write_json

    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "plan.json"), summary)
    save_config(recommended_config(cfg, summary), os.path.join(out, "plan.yaml"))
    metric = summary["metric"]
    best_lr = {}
    for r in summary["candidates"]:  # one line per candidate: its best rate's curve
        if r["name"] not in best_lr:
            best_lr[r["name"]] = r
    plot_lines({f"{r['name']} lr={r['lr']:g}" + (" (unstable)" if r["unstable"] else ""): (r["steps"], r["val_score"])
                for r in best_lr.values()}, os.path.join(out, "plan_curves.png"),
               title=f"predicted validation {metric}, each candidate at its best rate", xlabel="step", ylabel=metric)
    spec = summary["spectrum"]
    plot_spectrum(torch.tensor(spec["eigenvalues"]), spec["decay_exponent"], tuple(spec["decay_range"]),
                  os.path.join(out, "plan_spectra.png"),
                  per_kind={k: torch.tensor(v) for k, v in spec["per_kind"].items()})
    rec, ts, budget = summary["recommended"], summary["time_scale"], summary["budget"]
    lines = [f"# Plan: {summary['model']} on {summary['task']}", ""]
    if budget.get("found") not in (None, "configured"):
        cap = budget.get("cap")
        configured = budget.get("max_steps_configured")
        if budget["found"] == "steps":
            lines += [f"**No candidate is predicted to reach {summary['goal']:.4g} ({metric}) within the configured "
                      f"{configured} steps; at ×{budget['factor']} ({budget['max_steps']} steps) one does.**", ""]
        elif budget["found"] == "examples":
            lines += [f"**No candidate is predicted to reach {summary['goal']:.4g} ({metric}) within {configured} "
                      f"steps, nor by ×{cap} of them; the kernel's learning curve over n (slope "
                      f"{budget['slope']:.2f}) says about ×{budget['examples_factor']:.1f} the training examples "
                      f"would.**", ""]
        else:
            lines += [f"**No candidate is predicted to reach {summary['goal']:.4g} ({metric}) within {configured} "
                      f"steps, nor by ×{cap} of them (steps), nor by more examples within ×{cap}: the kernel foresees "
                      f"no learning at this budget.**", ""]
    lines += [f"Recommended: **targets {rec['targets']}, λ = {rec['lr_ratio']:g}, lr {rec['lr']:g}, max_steps "
              f"{rec['max_steps']}** (predicted validation {metric} {rec['predicted_val_score']:.4g}; "
              + (f"the pretrained model's {summary['baseline']:.4g}" if metric == "loss" else
                 f"the constant predictor's {summary['baseline']:.4g}") + "); `qkvtune train plan.yaml`.", "",
              verdict_sentence(summary), "",
              f"Kernel: {summary['n_train']} training + {summary['n_val']} validation points; {summary['readout']}; "
              f"kinds {', '.join(summary['kinds'])}; loss {summary['loss']}; decay exponent p = "
              f"{summary['spectrum']['decay_exponent']:.3g}.", "",
              f"Optimizer {summary['optimizer']} simulated as {summary['update_rule']}"
              + (f" (β₁ = {summary['beta']:g}; stability edge {2 * (1 + summary['beta']) / (1 - summary['beta']):.0f})"
                 if summary["update_rule"] == "adam" else " (stability edge 2)")
              + f"; time scale s = {ts['scale']:.4g} from {ts['calibration_steps']} real steps at lr "
              f"{summary['lr']:g} (s = 1: the derivation moves the outputs as far as the run did).", "",
              f"| rank | candidate | lr | parameters | best step | predicted validation {metric} | stability "
              f"(η·λ_max / edge) |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(summary["candidates"], 1):
        lines.append(f"| {i} | {r['name']} | {r['lr']:g} | {summary['parameters'].get(r['name'], 0):,} | "
                     f"{r['best_step']} | {r['best_score']:.4g}{' (fails)' if r['unstable'] else ''} | "
                     f"{r['edge_ratio']:.2f}{' **unstable**' if r['unstable'] else ''} |")
    s = summary["seconds"]
    lines += ["", f"Cost: kernel {s['kernel']:.1f} s, calibration {s['calibration']:.1f} s, simulation "
              f"{s['simulation']:.1f} s, total {s['total']:.1f} s.", "",
              "![predicted validation score per candidate](plan_curves.png)", "",
              "![kernel spectra per kind](plan_spectra.png)", ""]
    with open(os.path.join(out, "plan.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


# --- CLI ----------------------------------------------------------------------------------------------------

def cmd_plan(args) -> int:
    """Everything is written into a sibling ``OUT.partial`` folder that replaces OUT only once complete: a
    failed plan leaves nothing behind."""
    import shutil

    from .config import load_command_config
    from .errors import check_output_dir

    for name in ("n", "m", "calibration_steps", "chunk_size", "sketch_dim", "tokens", "max_budget"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    cands = parse_candidates(args.kinds, args.lambdas)
    lrs = parse_numbers(args.lrs, "--lrs")
    cfg = load_command_config(args.config, args.overrides)
    check_output_dir(args.out, "--out")
    out = os.path.abspath(args.out)
    if os.path.isdir(out) and os.listdir(out):
        raise ConfigError(f"--out: {out} is not empty")
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        summary = plan(cfg, partial, n=args.n, m=args.m, sketch_dim=args.sketch_dim,
                       calibration_steps=args.calibration_steps, chunk_size=args.chunk_size, cands=cands, lrs=lrs,
                       label_words=args.label_words, tokens=args.tokens, sketch=args.sketch, goal=args.goal,
                       max_budget=args.max_budget, save_kernels=args.save_kernels)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    rec = summary["recommended"]
    if summary["budget"].get("found") not in (None, "configured"):
        print(plan_budget_line(summary))
    print(f"recommended: targets={rec['targets']} lr_ratio={rec['lr_ratio']:g} lr={rec['lr']:g} "
          f"max_steps={rec['max_steps']} (predicted validation {summary['metric']} {rec['predicted_val_score']:.4g}); "
          f"time scale {summary['time_scale']['scale']:.4g}")
    print(f"plan: {os.path.join(out, 'plan.md')}; train it: qkvtune train {os.path.join(out, 'plan.yaml')}")
    return 0


def plan_budget_line(summary: dict) -> str:
    """The one line that says the configured budget will not learn, and what will."""
    b = summary["budget"]
    head = (f"no candidate is predicted to reach {summary['goal']:.4g} ({summary['metric']}) within "
            f"{b.get('max_steps_configured')} steps")
    if b["found"] == "steps":
        return f"{head}: extended to {b['max_steps']} steps (×{b['factor']})"
    if b["found"] == "examples":
        return f"{head} nor ×{b['cap']}: about ×{b['examples_factor']:.1f} the training examples are needed"
    return f"{head}, nor by ×{b['cap']} steps or examples: none does by the cap"


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="choose targets, λ, lr and max_steps from the pretrained NTK before training")
    p.add_argument("config", nargs="?", help="run config YAML (optional) or the first key=value")
    p.add_argument("overrides", nargs="*", help="key=value as for train")
    p.add_argument("--out", required=True, help="folder for plan.json, plan.md (+ PNG) and plan.yaml")
    p.add_argument("--n", type=int, default=256, help="training points in the kernel (examples; tokens for a "
                   "language model's loss)")
    p.add_argument("--m", type=int, default=128, help="validation points the candidates are scored on")
    p.add_argument("--tokens", type=int, default=4, help="a language model's loss: trained tokens drawn per example")
    p.add_argument("--sketch-dim", type=int, help="keep k sketched gradient coordinates per matrix (large n; "
                   f"automatic above {AUTO_SKETCH_BYTES // 2**30} GiB of gradients)")
    p.add_argument("--sketch", choices=("kron", "srht"), default="kron",
                   help="kron: √k×√k Kronecker sketch, never forms a gradient (default); srht: tighter, slower")
    p.add_argument("--calibration-steps", type=int, default=20, help="real steps that set the time scale")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--label-words", help="a causal LM task: the label words its responses contain, e.g. "
                   "false,true; the kernel reads their logits where the first of them is predicted")
    p.add_argument("--lrs", help="the learning rates (η_Q) to choose from (default: the method's grid, e.g. "
                   "3e-4,1e-3,3e-3 for LoRA)")
    p.add_argument("--goal", type=float, help="the validation score (a loss: the value) that counts as learning "
                   "(default: clearly beating the constant predictor)")
    p.add_argument("--max-budget", type=int, default=16, help="extend a budget that does not learn up to this "
                   "multiple of its steps (or examples)")
    p.add_argument("--save-kernels", action="store_true", help="also write every slice's kernel, f₀ and the labels "
                   "(plan_kernels.safetensors), to simulate again without the model")
    add_candidate_options(p)
    p.set_defaults(func=cmd_plan)


def add_candidate_options(p) -> None:
    p.add_argument("--kinds", help='target sets separated by ";" (default: "v;q,v;q,k,v;q,k,v,o;mlp;all-linear")')
    p.add_argument("--lambdas", help="λ values for sets that tune v with another kind (default: 1,2,4,8)")
