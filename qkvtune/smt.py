"""Sparse Matrix Tuning (SMT, arXiv 2405.15525): pick the b×b blocks of q/k/v (MLP gate/up/down optional) to train.

1. ``warmup_gradients``: sum ∂L/∂W over a few batches for each eligible slice. Only those weights get
   ``requires_grad``; each gradient is folded into an fp32 sum as soon as it is accumulated and then
   freed, and there is no optimizer, so the warm-up costs about what a LoRA step does, not full
   fine-tuning's memory. (The paper's warm-up *is* full fine-tuning; ``update_lr`` keeps the option of
   SGD steps on the eligible slices.)
2. ``score_blocks`` / ``select_blocks``: score every block, keep the global top-N (or equal quotas per
   matrix). N comes from a fraction of the model's parameters or is given as a count.
3. The selection is a JSON list of ``{"module", "kind", "layer", "row", "col", "score"}`` (row/col are
   block indices in the slice's rows × in matrix, Linear orientation). It is what
   ``attach.add_adapter(model, targets_of(model, sel), "smt", block_size=b, blocks=sel)`` takes, and what
   ``save_selection``/``load_selection`` write and read, so a user can fix it by hand.
4. ``allocation_report``: how the blocks fell across kinds and layers (JSON + PNG).

``prepare_smt`` runs 1–4 before adapters are attached; training then uses ``deltas.BlockSparse``.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict

import torch
from torch import nn

from .deltas.blocksparse import SelectionError, block_grid, check_blocks
from .targets import MATRIX_KINDS, Target, all_projections, find_targets, layer_index, mlp_projections, write_slice

SELECTION_FILE = "smt_selection.json"
REPORT_JSON = "smt_allocation.json"
REPORT_PNG = "smt_allocation.png"
KIND_ORDER = MATRIX_KINDS
# selection files written before the MLP kinds had their own names
_LEGACY_KINDS = {"mlp_gate": "gate", "mlp_up": "up", "mlp_down": "down"}

# Block scores. The names follow the official code's ``calculate_strategy`` (so its commands carry
# over), which reads backwards: ``abs_mean`` is the mean of |g|, ``mean_abs`` the absolute mean.
SCORES = {
    "abs_mean": "mean(|g|) over the block (the paper text's 'average absolute gradient'; default)",
    "mean_abs": "|mean(g)| over the block (the official code's attention default)",
    "l2": "sqrt(sum(g²)) over the block",
}
DEFAULT_SCORE = "abs_mean"


# --- eligible matrices and warm-up ---------------------------------------------------------------

def eligible_targets(model: nn.Module, kinds=("q", "k", "v"), mlp: bool = False, layers=None) -> list[Target]:
    """The slices SMT may put blocks on: ``kinds`` of the recognised projections (per slice for fused ones; "mlp"
    for every MLP kind the model has, as does ``mlp``)."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    return find_targets(model, kinds + ["mlp"] if mlp and "mlp" not in kinds else kinds, layers)


def warmup_gradients(model: nn.Module, batches, targets: list[Target], steps: int,
                     update_lr: float | None = None, progress: bool = True,
                     train: list[nn.Parameter] = ()) -> dict[tuple[str, str], torch.Tensor]:
    """Σ over ``steps`` batches of ∂L/∂W for each target slice: {(module, kind): fp32 (rows × in)}.

    ``batches`` yields model inputs with labels (``model(**batch).loss`` is used). Only the targets'
    weights require grad during the warm-up; each weight's gradient is added to the sums by a
    post-accumulate hook and freed at once, so at most one matrix's gradient exists at a time.
    ``update_lr``: also take SGD steps W ← W − lr·∂L/∂W on the target slices (the paper warms up with
    full fine-tuning); those updates stay in the model — nothing is restored but the grad flags. ``train``: other
    parameters (a new task head) that take the same SGD steps, so the gradients of later batches flow through a
    head that is learning the task rather than a random one.
    Works on plain models and on models with qkvtune wrappers (their deltas stay in the forward pass).
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"smt_warmup_steps: {steps} must be at least 1")
    by_weight: dict[int, tuple[nn.Parameter, list[Target]]] = {}
    for t in targets:
        w = t.projection(model).weight
        by_weight.setdefault(id(w), (w, []))[1].append(t)
    sums = {(t.module, t.kind): torch.zeros(t.shape, dtype=torch.float32, device=t.projection(model).weight.device)
            for t in targets}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    pending: list[tuple[nn.Parameter, list[Target], torch.Tensor]] = []

    def fold(w: nn.Parameter, slices: list[Target]) -> None:
        with torch.no_grad():
            for t in slices:
                sums[(t.module, t.kind)].add_(t.rows_of(w.grad).float())
            if update_lr is not None:  # apply after backward: W may still be needed by other nodes
                pending.append((w, slices, w.grad))
        w.grad = None

    hooks = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w, slices in by_weight.values():
            w.requires_grad_(True)
            hooks.append(w.register_post_accumulate_grad_hook(lambda w, s=slices: fold(w, s)))
        extra = [p for p in train if id(p) not in by_weight]
        if extra and update_lr is None:
            raise ValueError("smt warm-up: training other parameters needs update_lr (smt_warmup_lr)")
        for p in extra:
            p.requires_grad_(True)
        model.train()
        device = next(model.parameters()).device
        it = iter(batches)
        for _ in tqdm(range(steps), desc="smt warm-up", unit="step", disable=not progress):
            try:
                batch = next(it)
            except StopIteration:
                raise ValueError(f"smt warm-up: the data ran out before {steps} steps") from None
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss = model(**batch).loss
            if loss is None:
                raise ValueError("smt warm-up: the model returned no loss (the batches need labels)")
            loss.backward()
            with torch.no_grad():
                for w, slices, g in pending:
                    for t in slices:
                        write_slice(t.projection(model), t.rows, t.weight(model).clone(), -update_lr * t.rows_of(g))
            pending.clear()
            with torch.no_grad():
                for p in extra:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-update_lr)
                        p.grad = None
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return sums


# --- scoring and selection -----------------------------------------------------------------------

def score_blocks(grad: torch.Tensor, block_size: int, score: str = DEFAULT_SCORE) -> torch.Tensor:
    """Score each b×b block of ``grad`` (rows × in) -> (n_row_blocks, n_col_blocks), float64 on the CPU;
    see ``SCORES``. Ragged edge blocks are scored over their real entries (means divide by the real count)."""
    if score not in SCORES:
        raise ValueError(f"smt_score: {score!r} is not one of {sorted(SCORES)}")
    b = block_size
    R, C = grad.shape
    nr, nc = -(-R // b), -(-C // b)
    g = torch.zeros(nr * b, nc * b, dtype=torch.float64)  # CPU: selection indexes CPU tensors
    g[:R, :C] = grad.detach().cpu()
    g = g.view(nr, b, nc, b)
    if score == "l2":
        return g.square().sum((1, 3)).sqrt()
    count = torch.ones(R, C, dtype=torch.float64)
    count = torch.nn.functional.pad(count, (0, nc * b - C, 0, nr * b - R)).view(nr, b, nc, b).sum((1, 3))
    if score == "abs_mean":
        return g.abs().sum((1, 3)) / count
    return g.sum((1, 3)).abs() / count  # mean_abs


def block_budget(block_size: int, budget: float | None = None, n_blocks: int | None = None,
                 total_params: int | None = None) -> int:
    """N = n_blocks, or ⌊budget · total_params / b²⌋ (at least 1)."""
    if (budget is None) == (n_blocks is None):
        raise ValueError("smt: give exactly one of budget (a fraction of the parameters) or n_blocks")
    if n_blocks is not None:
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
            raise ValueError(f"smt: n_blocks {n_blocks!r} must be a positive integer")
        return n_blocks
    if not 0 < budget <= 1:
        raise ValueError(f"smt_budget: {budget!r} must be a fraction in (0, 1] (or an integer block count)")
    if not total_params:
        raise ValueError("smt: a budget fraction needs total_params")
    return max(1, math.floor(budget * total_params / block_size ** 2))


def select_blocks(grads: dict[tuple[str, str], torch.Tensor], block_size: int, budget: float | None = None,
                  n_blocks: int | None = None, total_params: int | None = None, score: str = DEFAULT_SCORE,
                  per_matrix: bool = False) -> list[dict]:
    """Keep the best N blocks of the gradient sums ``{(module, kind): (rows × in)}``.

    Global (default, the paper's ``no_restriction``): top-N over all matrices, so a matrix may get none.
    ``per_matrix``: each matrix takes its top ⌊N/M⌋ (or all it has, if fewer); the blocks left over
    (remainder, small matrices) go to the best remaining blocks globally, so N is always spent.
    N is capped at the number of blocks there are. Ties: earlier matrix (in ``grads`` order), then
    row-major order within it. Returns entries in that same model order.
    """
    if not grads:
        raise SelectionError("smt: no eligible matrices to select blocks from")
    N = block_budget(block_size, budget, n_blocks, total_params)
    keys = list(grads)
    scores = [score_blocks(grads[k], block_size, score) for k in keys]
    sizes = [s.numel() for s in scores]
    flat = torch.cat([s.reshape(-1) for s in scores]).nan_to_num(nan=-math.inf)
    N = min(N, flat.numel())
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    taken = torch.zeros(flat.numel(), dtype=torch.bool)
    if per_matrix:
        quota = N // len(keys)
        for off, n, s in zip(offsets, sizes, scores):
            order = torch.sort(s.reshape(-1), descending=True, stable=True).indices[:min(quota, n)]
            taken[off + order] = True
    rest = N - int(taken.sum())
    if rest > 0:
        # Stable sort: equal scores keep flat (matrix, row, col) order, so ties are deterministic.
        order = torch.sort(flat.masked_fill(taken, -math.inf), descending=True, stable=True).indices
        order = order[~taken[order]][:rest]
        taken[order] = True
    out = []
    for key, off, s in zip(keys, offsets, scores):
        nc = s.shape[1]
        for i in torch.nonzero(taken[off:off + s.numel()]).flatten().tolist():
            module, kind = key
            out.append({"module": module, "kind": kind, "layer": layer_index(module),
                        "row": i // nc, "col": i % nc, "score": float(s.reshape(-1)[i])})
    return out


def targets_of(model: nn.Module, selection: list[dict]) -> list[Target]:
    """The distinct slices that received blocks, in model order (for ``attach.add_adapter``)."""
    wanted = {(e["module"], e["kind"]) for e in selection}
    found = [t for t in all_projections(model) + mlp_projections(model) if (t.module, t.kind) in wanted]
    missing = wanted - {(t.module, t.kind) for t in found}
    if missing:
        module, kind = sorted(missing)[0]
        raise SelectionError(f"smt selection: the model has no slice {module}[{kind}] "
                             f"({len(missing)} selected slice(s) not found)")
    return found


def check_selection(model: nn.Module, selection: list[dict], block_size: int, where: str = "smt selection") -> None:
    """Every entry names a slice of the model and a block inside its grid; no block twice."""
    shapes = {(t.module, t.kind): t.shape for t in all_projections(model) + mlp_projections(model)}
    check_blocks(selection, block_size, shapes, where)


# --- files ---------------------------------------------------------------------------------------

def save_selection(selection: list[dict], path: str, block_size: int | None = None) -> None:
    """Write ``{"format": "qkvtune-smt-selection", "block_size": b, "blocks": [...]}``."""
    from .files import write_json

    write_json(path, {"format": "qkvtune-smt-selection", "block_size": block_size, "blocks": selection})


def load_selection(path: str, block_size: int | None = None) -> list[dict]:
    """Read a selection written by ``save_selection`` (or a bare JSON list of entries) and check each
    entry's fields; ``layer`` is filled in from the module path when absent. Raises SelectionError
    naming the file and the entry."""
    from .files import read_json

    obj = read_json(path, SelectionError, expect=(dict, list))
    if isinstance(obj, dict):
        saved_b = obj.get("block_size")
        if saved_b is not None and block_size is not None and saved_b != block_size:
            raise SelectionError(f"{path}: selection was made with block_size {saved_b}, not {block_size}")
        obj = obj.get("blocks")
    if not isinstance(obj, list) or not obj:
        raise SelectionError(f"{path}: expected a non-empty list of blocks (or an object with 'blocks')")
    check_blocks(obj, block_size or 1, None, path)
    return [{"module": e["module"], "kind": _LEGACY_KINDS.get(e["kind"], e["kind"]),
             "layer": e.get("layer", layer_index(e["module"])),
             "row": e["row"], "col": e["col"], "score": None if e.get("score") is None else float(e["score"])}
            for e in obj]


# --- report --------------------------------------------------------------------------------------

def _kinds(kinds) -> list[str]:
    return sorted(kinds, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k))


def allocation_report(selection: list[dict], out_dir: str, block_size: int | None = None,
                      eligible: list[Target] | None = None) -> dict:
    """Counts of blocks by kind, by layer and by kind × layer; writes ``smt_allocation.json`` and
    ``smt_allocation.png`` (bars by kind, kind × layer heatmap) into ``out_dir``. With the ``eligible``
    targets, kinds and layers that got no block show as zeros and, with ``block_size``, the report
    also gives how many blocks each kind had to offer (GQA k/v have fewer)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .files import write_json

    by_kind = Counter(e["kind"] for e in selection)
    by_layer = Counter(e.get("layer") for e in selection)
    grid = defaultdict(Counter)
    for e in selection:
        grid[e["kind"]][e.get("layer")] += 1
    kinds = _kinds(set(by_kind) | {t.kind for t in eligible or ()})
    seen = set(by_layer) | {t.layer for t in eligible or ()}
    numbered = [la for la in seen if la is not None]
    layers = list(range(min(numbered), max(numbered) + 1)) if numbered else []
    layers += [None] if None in seen else []
    name = lambda layer: "none" if layer is None else str(layer)
    n = len(selection)
    report = {
        "n_blocks": n, "block_size": block_size,
        "parameters": n * block_size ** 2 if block_size else None,
        "by_kind": {k: by_kind[k] for k in kinds},
        "share_by_kind": {k: by_kind[k] / n for k in kinds} if n else {},
        "by_layer": {name(la): by_layer[la] for la in layers},
        "by_kind_layer": {k: {name(la): grid[k][la] for la in layers} for k in kinds},
        "most_blocks": max(kinds, key=lambda k: by_kind[k]) if n else None,
    }
    if eligible and block_size:
        offered = Counter()
        for t in eligible:
            offered[t.kind] += math.prod(block_grid(t.shape, block_size))
        report["eligible_blocks_by_kind"] = {k: offered[k] for k in kinds}
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, REPORT_JSON), report)

    fig = Figure(figsize=(11, 1.6 + 0.5 * max(len(kinds), 3)))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 3]})
    bars = ax1.bar(kinds, [by_kind[k] for k in kinds], color="tab:blue")
    ax1.bar_label(bars)
    ax1.set_title(f"SMT blocks by matrix ({n} blocks{f', b={block_size}' if block_size else ''})", fontsize=10)
    ax1.set_ylabel("blocks")
    heat = [[grid[k][la] for la in layers] for k in kinds]
    im = ax2.imshow(heat if heat and layers else [[0]], aspect="auto", cmap="viridis")
    ax2.set_yticks(range(len(kinds)), kinds)
    ax2.set_xticks(range(len(layers)), [name(la) for la in layers], fontsize=7)
    if heat and len(layers) <= 32:  # write the counts in the cells while they stay legible
        top = max(map(max, heat))
        for i, row in enumerate(heat):
            for j, v in enumerate(row):
                ax2.text(j, i, v, ha="center", va="center", fontsize=7, color="white" if v < 0.6 * top else "black")
    ax2.set_xlabel("layer")
    ax2.set_title("blocks by matrix × layer", fontsize=10)
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, REPORT_PNG), dpi=100)
    return report


# --- driver --------------------------------------------------------------------------------------

def _cycle(loader):
    while True:
        yield from loader


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prepare_smt(model: nn.Module, train_dataset, collator, *, batch_size: int, warmup_steps: int,
                block_size: int = 256, budget: float | int = 0.01, score: str = DEFAULT_SCORE,
                kinds=("q", "k", "v"), mlp: bool = False, per_matrix: bool = False, seed: int = 0,
                selection_path: str | None = None, out_dir: str | None = None, layers=None,
                warmup_lr: float | None = None, progress: bool = True, heads: list[nn.Module] = ()) -> list[dict]:
    """Choose SMT's blocks before adapters are attached; returns the selection.

    ``budget``: a float in (0, 1] is a fraction of the model's parameters; an int ≥ 1 is a block count.
    With ``selection_path`` the user's selection is loaded and checked instead (no warm-up). With
    ``out_dir``, writes ``smt_selection.json`` and the allocation report there. The warm-up draws
    ``warmup_steps`` shuffled batches (seeded) and leaves the global RNG state untouched. ``heads``: modules (a
    new task head) trained by the warm-up's SGD steps too; unlike the slices, they keep what they learned.
    """
    if selection_path:
        selection = load_selection(selection_path, block_size)
        check_selection(model, selection, block_size, where=selection_path)
        targets = targets_of(model, selection)
    else:
        from torch.utils.data import DataLoader

        targets = eligible_targets(model, kinds, mlp, layers)
        loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=True, collate_fn=collator,
                            generator=torch.Generator().manual_seed(seed))
        device = next(model.parameters()).device
        # Dropout during the warm-up must not shift the training run's random stream.
        # With warmup_lr the warm-up fine-tunes the eligible slices as the paper's does, so later batches' gradients
        # are taken along a training trajectory; the weights are put back afterwards, so that the base model and
        # the adapter alone describe the run (export, PEFT, resume).
        saved = {id(w): (w, w.detach().clone()) for t in targets for w in [t.projection(model).weight]} \
            if warmup_lr else {}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            grads = warmup_gradients(model, _cycle(loader), targets, warmup_steps, update_lr=warmup_lr,
                                     progress=progress, train=[p for h in heads for p in h.parameters()])
        with torch.no_grad():
            for w, copy in saved.values():
                w.copy_(copy)
        as_count = isinstance(budget, int) and not isinstance(budget, bool)
        selection = select_blocks(grads, block_size, budget=None if as_count else budget,
                                  n_blocks=budget if as_count else None,
                                  total_params=count_parameters(model), score=score, per_matrix=per_matrix)
        del grads
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        save_selection(selection, os.path.join(out_dir, SELECTION_FILE), block_size)
        allocation_report(selection, out_dir, block_size, eligible=targets)
    return selection
