"""``lr: auto`` — the peak learning rate η_Q chosen before the run, from how the loss answers the optimizer's own
first step on this model, method, targets and data.

Why a line search along the real step (as GeN and Hi-DLR set rates): the optimizer's step at η_Q = 1 already holds
every scale the rate has to undo — Adam's first step is sign(g) per parameter, so LoRA's α/r and √r (rsLoRA's
α/√r), DoRA's magnitude, a dense ΔW's or SMT's blocks' size, λ's η_V, the MLP's ratio and a head that follows lr
are all in the direction ``d``. The loss of the step's own examples at θ + η·d over a ladder of η gives the greedy
step η*, the one step that lowers that loss most. The first candidate rate is (1 − β₁)·η*: Adam averages its
steps with β₁ = 0.9, so in a direction the gradients agree on it keeps stepping for about 1/(1 − β₁) = 10 steps — at
that rate those steps together cover the greedy step, no more (plain SGD: η* itself, the only candidate).

Then short real runs (``short_runs``, v2): the greedy step sets the scale, but where the best rate sits below it
moved from 0.05 to 1 × η* across ``bench lr``'s matrix — with the seed's fresh head (SST-2 seed 1 starts further off
and needs the higher rate, while its one-step curve is shallower and pointed lower) and with the method (dense ΔW,
SMT: a half-decade above (1 − β₁)·η*). So the candidates (1 − β₁)·η* × 1, √10, 10 (never above η*) are each trained
from the run's start for a fifth of its steps, its warm-up then its peak, and read by the loss on training examples
those steps did not see, climbing while each beats the ones below. Measured before it was adopted (12-step runs,
11 settings × seeds of bench lr, against each seed's own best grid rate): 9 of 11 on the seed's best or within a
point of it, where the first candidate alone was on 6; the two misses: SST-2 LoRA r 8 seed 1 (10⁻² for 3·10⁻³,
2.3 points) and SmolLM2 SFT (20 steps, 16 held-out examples: the 12-step losses of 5.6·10⁻⁴ and 1.8·10⁻³ differed
by 0.3 % and did not tell them apart). Tried and dropped: scaling the margin by how much the batches' gradients
agree (Adam's μ/√(μ² + σ²) against the sign step): 0.55–0.63 on every setting from 4 batches, the noise floor of the
estimate, not a property of the setting.

Measured before it was adopted (MiniLM on SST-2 against the claims suite's grid, the head at 3·10⁻³): 6 of 8
settings (LoRA r 1/8/64 on q,v, all-linear, the MLP, λ = 4, dense, dense λ = 8) on their grid's best rate, the other
two a half-decade off. Searching again after a few real steps (the smaller η* of the two) was tried and dropped: η*
then measures the distance left to the minimum along the step, which shrinks as the run learns, and every rate came
out a half-decade or more below the grid's best. ``qkvtune bench lr`` (benchmarks/LR.md) judges it on a matrix of
methods, ranks, tasks and a language model against fixed rules and Smith's range test.

Cost: one gradient and about a dozen forward passes over a few of the run's training examples (``probe_examples``),
then two or three fifths of a run's steps; in the run's config.yaml (``lr_auto``: the curve, η*, the margin, the
short runs' rates and held-out losses) and one log line. The trainable weights are put back after each and the
optimizer is the run's own: the run is the run at that rate.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace

import torch

from .config import ConfigError, TrainConfig

VERSION = 2  # the rule's version (1: (1 − β₁)·η* alone): bench lr keeps each version's runs apart
CLIMB = (1.0, math.sqrt(10), 10.0)  # the short runs' rates: (1 − β₁)·η* × these, at most η* itself ...
SHORT = 0.2            # ... each trained for this fraction of the run's steps (at least MIN_SHORT)
MIN_SHORT = 2
LADDER = (-6.0, 1.0)   # the line search's η_Q: decades from 10⁻⁶ to 10¹, stopping once the loss has turned up ...
RISE = 0.05            # ... this much (relative) above the loss without a step; then half and quarter decades
MAX_EXAMPLES = 64      # examples whose mean gradient sets the direction and whose loss the search reads


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _batches(examples: list, collator, size: int, device) -> list[dict]:
    out = []
    for s in range(0, len(examples), size):
        batch = collator(examples[s:s + size])
        out.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return out


def _objective(trainer, model, batches: list[dict], centered: bool = False) -> torch.Tensor:
    """The mean loss over the batches. ``centered``: a regressor's squared error with the mean offset of outputs
    against labels taken out — a fresh head predicts ~0 against labels averaging, say, 2.7, and fitting that
    offset (one bias) would otherwise set both the step's direction and its size for every weight."""
    if not centered:
        return sum(trainer.compute_loss(model, b) for b in batches) / len(batches)
    err = torch.cat([model(**b).logits.reshape(-1).float() - b["labels"].reshape(-1).float() for b in batches])
    return ((err - err.mean()) ** 2).mean()


def _loss(trainer, model, batches: list[dict], centered: bool = False) -> float:
    """The objective in eval mode (no dropout: the same examples read at every η must differ only by η)."""
    model.eval()
    with torch.no_grad():
        return float(_objective(trainer, model, batches, centered))


def _gradient(trainer, model, batches: list[dict], centered: bool = False) -> None:
    model.train()
    for p in _trainable(model):
        p.grad = None
    _objective(trainer, model, batches, centered).backward()


def _direction(optimizer, params: list, scale_groups: list[float]) -> list[torch.Tensor]:
    """The step the optimizer would take now with each group's rate set to ``scale_groups`` (η_Q = 1), read by
    taking it and undoing it (weights and the optimizer's state as they were): linear in the rate for Adam, AdamW
    and SGD, so θ + η·d is the step at η_Q = η."""
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(optimizer.state_dict())  # step() updates the state's tensors in place
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g, s in zip(optimizer.param_groups, scale_groups):
        g["lr"] = s
    optimizer.step()
    d = [p.detach() - b for p, b in zip(params, before)]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    optimizer.load_state_dict(state)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    return d


def _probe_trainer(cfg: TrainConfig, run, lr: float):
    """A trainer for the probe's own steps on the run's model, at η_Q = ``lr``: the run's optimizer groups and
    loss, no warm-up, schedule or evaluation of its own."""
    from . import chunked_loss
    from .trainer import QkvTrainer, training_arguments

    probe = replace(cfg, lr=lr, warmup_ratio=0.0, max_steps=None, epochs=1.0, eval_strategy="no", report_to="none")
    args = training_arguments(probe, run.task, "loss", False, has_eval=False)
    return QkvTrainer(model=run.model, args=args, data_collator=run.task.collator, rates=probe,
                      lm_loss=chunked_loss.for_run(run.model, cfg.chunked_loss, run.task))


def _put_back(model, params: list, initial: list) -> None:
    """The trainable weights as they were before the probe, no gradients, training mode."""
    with torch.no_grad():
        for p, x in zip(params, initial):
            p.copy_(x)
    model.zero_grad(set_to_none=True)
    model.train()


def _set(params: list, base: list, d: list, eta: float) -> None:
    with torch.no_grad():
        for p, b, x in zip(params, base, d):
            p.copy_(b + eta * x)


def line_search(trainer, model, params: list, d: list, batches: list[dict], centered: bool = False) -> dict:
    """η* = the η of the lowest loss on ``batches`` at θ + η·d: up a ladder of decades until the loss is clearly
    above the loss without a step (or not finite), then the best's half- and quarter-decade neighbours."""
    base = [p.detach().clone() for p in params]

    def at(eta: float) -> float:
        _set(params, base, d, eta)
        return _loss(trainer, model, batches, centered)

    start = at(0.0)
    curve = []
    k = LADDER[0]
    while k <= LADDER[1] + 1e-9:
        curve.append((10 ** k, at(10 ** k)))
        if not math.isfinite(curve[-1][1]) or curve[-1][1] > start + RISE * abs(start):
            break
        k += 1.0
    for step in (0.5, 0.25):
        finite = [c for c in curve if math.isfinite(c[1])]
        if not finite or min(v for _, v in finite) >= start:
            break
        best = min(finite, key=lambda c: c[1])[0]
        curve += [(e, at(e)) for e in (best * 10 ** -step, best * 10 ** step)]
    _set(params, base, d, 0.0)
    finite = [c for c in curve if math.isfinite(c[1])]
    if not finite or min(v for _, v in finite) >= start:
        return {"eta": None, "start": start, "curve": sorted(curve)}  # no step size lowers the loss
    eta, low = min(finite, key=lambda c: c[1])
    return {"eta": eta, "start": start, "low": low, "curve": sorted(curve)}


def climb(rates: list[float], loss_at) -> tuple[float, list[tuple[float, float]]]:
    """Up ``rates`` (ascending) while each one's loss (``loss_at(rate)``) is below every lower one's: the lowest
    loss found, and every (rate, loss) tried. A rate past the best is read once, never the ones above it."""
    tried: list[tuple[float, float]] = []
    for rate in rates:
        loss = loss_at(rate)
        tried.append((rate, loss))
        if not math.isfinite(loss) or (len(tried) > 1 and loss >= min(v for _, v in tried[:-1])):
            break
    finite = [t for t in tried if math.isfinite(t[1])]
    return (min(finite, key=lambda t: t[1])[0] if finite else rates[0]), tried


def short_runs(cfg: TrainConfig, run, rates: list[float], total: int, centered: bool) -> dict:
    """Each of ``rates`` (ascending, via ``climb``) trained for ``SHORT`` of the run's ``total`` steps from the
    run's own start (its warm-up, then the peak rate), judged by the loss on training examples those steps did not
    see; the weights are put back after each (why short runs at all: the module docstring)."""
    from .trainer import NonFiniteError

    model, task = run.model, run.task
    steps = max(MIN_SHORT, min(total, round(SHORT * total)))
    warm = max(1, math.ceil(cfg.warmup_ratio * total))
    step_batch = cfg.batch_size * cfg.grad_accum
    held = min(MAX_EXAMPLES, max(4 * cfg.batch_size, step_batch))
    examples = run.examples("train", steps * step_batch + held)
    held_ex, train_ex = examples[-held:], examples[:-held] or examples  # a tiny set: read on what it trained on
    params = _trainable(model)
    initial = [p.detach().clone() for p in params]

    def loss_at(rate: float) -> float:
        trainer = _probe_trainer(cfg, run, rate)
        optimizer = trainer.create_optimizer()
        device = trainer.args.device
        peaks = [g["lr"] for g in optimizer.param_groups]
        try:
            for t in range(steps):
                for g, peak in zip(optimizer.param_groups, peaks):
                    g["lr"] = peak * min(1.0, (t + 1) / warm)
                model.train()
                chunk = [train_ex[(t * step_batch + i) % len(train_ex)] for i in range(step_batch)]
                for micro in _batches(chunk, task.collator, cfg.batch_size, device):
                    loss = trainer.compute_loss(model, micro) / cfg.grad_accum  # the run's own loss
                    if not torch.isfinite(loss):
                        return math.inf
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return _loss(trainer, model, _batches(held_ex, task.collator, cfg.batch_size, device), centered)
        except NonFiniteError:
            return math.inf
        finally:
            _put_back(model, params, initial)

    t0 = time.perf_counter()
    chosen, tried = climb(rates, loss_at)
    return {"rate": chosen, "steps": steps, "held_out": len(held_ex), "seconds": round(time.perf_counter() - t0, 2),
            "tried": [[float(f"{r:.4g}"), round(v, 5) if math.isfinite(v) else None] for r, v in tried]}


def scaling_groups(model, cfg: TrainConfig) -> list[tuple[float, bool]]:
    """Each optimizer group's (rate at η_Q = 1, whether it moves with η_Q): its ratio to η_Q (λ for V, lr_mlp_ratio, LoRA+'s, the head's when
    it follows lr), or its own absolute rate where the config gives one (lr_head, lr_q …: those do not move with
    η_Q) — told apart by building the groups at η_Q = 1 and 2."""
    from .optim import param_groups

    one, two = param_groups(model, replace(cfg, lr=1.0)), param_groups(model, replace(cfg, lr=2.0))
    return [(a["lr"], math.isclose(b["lr"], 2 * a["lr"])) for a, b in zip(one, two)]


def choose_rate(cfg: TrainConfig, run, log=print) -> tuple[float, dict]:
    """The peak η_Q for ``cfg`` (whose ``lr`` is "auto") on ``run`` (``runs.build``: the model with its fresh
    adapter and head, the task's data). Returns (η_Q, the record for config.yaml). The model's trainable weights
    are left as they were."""
    from .optim import update_rule

    t0 = time.perf_counter()
    model, task = run.model, run.task
    if task.preference or task.rewarded:
        raise ConfigError(f"lr: auto reads the task's own loss; objective {cfg.objective} has none of its kind: "
                          "give lr a number")
    margin = 1.0 - update_rule(cfg)[1]  # Adam: 1 − β₁ (module docstring); plain SGD: the greedy step
    trainer = _probe_trainer(cfg, run, 1.0)
    optimizer = trainer.create_optimizer()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    groups = scaling_groups(model, cfg)
    scale = [s if moves else 0.0 for s, moves in groups]      # the part of the step that η_Q sets ...
    fixed = [0.0 if moves else s for s, moves in groups]      # ... and the groups at their own rates
    device = trainer.args.device
    step_batch = cfg.batch_size * cfg.grad_accum
    available = len(task.train)
    total = cfg.max_steps or max(1, int(available // step_batch * cfg.epochs))
    n = probe_examples(cfg, total, available)
    first = _batches(run.examples("train", n), task.collator, cfg.batch_size, device)  # only the n it reads
    centered = bool(run.info.regression)
    initial = [p.detach().clone() for p in params]
    try:
        _gradient(trainer, model, first, centered)
        d = _direction(optimizer, params, scale)
        d_fixed = _direction(optimizer, params, fixed) if any(fixed) else None
        with torch.no_grad():  # the groups at their own rates take their step throughout the search
            for p, x in zip(params, d_fixed or ()):
                p.add_(x)
        found = line_search(trainer, model, params, d, first, centered)
        heads = [i for i, g in enumerate(optimizer.param_groups) if g["name"].startswith("head") and scale[i]]
        if heads:  # a fresh head that follows lr: its own fit can dwarf the adapter's; the adapter's alone too
            owned = {id(p) for i in heads for p in optimizer.param_groups[i]["params"]}
            found_delta = line_search(trainer, model, params,
                                      [torch.zeros_like(x) if id(p) in owned else x for p, x in zip(params, d)], first,
                                      centered)
            if found_delta["eta"] is not None and (found["eta"] is None or found_delta["eta"] < found["eta"]):
                found = {**found_delta, "limited_by": "the adapter alone", "with_head": found["eta"]}
    finally:
        _put_back(model, params, initial)
    if found["eta"] is None:
        raise ConfigError("lr: auto found no step size that lowers the loss along the optimizer's first step (the "
                          "model already fits these examples, or the loss is flat in the trained weights); give lr a "
                          "number")
    rates = sorted({float(f"{margin * found['eta'] * c:.3g}") for c in CLIMB if margin * c <= 1 + 1e-9})
    short = short_runs(cfg, run, rates, total, centered) if len(rates) > 1 else None
    lr = short["rate"] if short else rates[0]
    seconds = time.perf_counter() - t0
    record = {"lr": lr, "eta_star": found["eta"], "margin": margin, "examples": n, "loss": found["start"],
              **({"short_runs": short} if short else {}),
              "loss_read": "squared error, mean offset removed" if centered else "the training loss",
              "lowest_loss": found["low"], "seconds": round(seconds, 2),
              **({"limited_by": found["limited_by"], "eta_star_with_head": found["with_head"]}
                 if "limited_by" in found else {}),
              "curve": [[float(f"{e:.4g}"), round(v, 5) if math.isfinite(v) else None] for e, v in found["curve"]]}
    climbed = "" if not short else (
        f"; of {', '.join(f'{r:.3g}' for r, _ in short['tried'])} trained {short['steps']} steps each, the held-out "
        f"loss {', '.join('inf' if v is None else f'{v:.4g}' for _, v in short['tried'])}")
    log(f"lr: auto -> {lr:.3g}: the greedy step {found['eta']:.3g} along the optimizer's first step (loss "
        f"{found['start']:.4g} -> {found['low']:.4g} on {n} training examples) x {margin:g}{climbed} ({seconds:.1f} s)")
    return lr, record


def probe_examples(cfg: TrainConfig, total_steps: int, available: int) -> int:
    """The examples whose gradient and loss the search reads: a gradient and ~12 forward passes over them cost
    about 5 steps per batch of them, kept under a quarter of the run's steps (``total_steps``); at least one
    step's batch (what the optimizer's first step sees), at most ``MAX_EXAMPLES``."""
    step_batch = cfg.batch_size * cfg.grad_accum
    n = int(0.05 * total_steps) * step_batch
    return max(1, min(available, MAX_EXAMPLES, max(step_batch, n)))
