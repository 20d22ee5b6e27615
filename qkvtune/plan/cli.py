"""``qkvtune plan CONFIG``: the command line."""

from __future__ import annotations

import os

from ..config import ConfigError
from .candidates import parse_candidates, parse_numbers
from .planner import plan
from .readout import AUTO_SKETCH_BYTES
from .report import plan_budget_line

# --- CLI ----------------------------------------------------------------------------------------------------

def cmd_plan(args) -> int:
    """Everything is written into a sibling ``OUT.partial`` folder that replaces OUT only once complete: a
    failed plan leaves nothing behind."""
    import shutil

    from ..config import load_command_config
    from ..errors import check_output_dir

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
    print(f"recommended: targets={rec['targets']} lr_ratio={rec['lr_ratio']:g} lr={rec['lr']} "
          f"max_steps={rec['max_steps']} (predicted validation {summary['metric']} {rec['predicted_val_score']:.4g}); "
          f"time scale {summary['time_scale']['scale']:.4g}")
    print(f"plan: {os.path.join(out, 'plan.md')}; train it: qkvtune train {os.path.join(out, 'plan.yaml')}")
    return 0


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
