"""Block-sparse delta (SMT, arXiv 2405.15525): ΔW is zero except on a chosen set of b×b blocks.

The trainable state is just the stacked blocks, ``values`` of shape (n_blocks, b, b); ``blocks`` holds
each block's (row block, column block) in the slice's (rows × in) matrix, Linear orientation. Which
blocks to train comes from ``qkvtune.smt`` (gradient scores after a warm-up) or from the user.

Why a custom autograd Function: autograd would save all of ``x`` for a weight gradient. Here the term
x·ΔWᵀ is computed block by block (gather the input columns a block reads, bmm, scatter-add into its
output rows), and backward needs only

    ∂L/∂V_k = G[:, rows(r_k)]ᵀ · X[:, cols(c_k)]      (per selected block, summed over tokens)
    ∂L/∂x  += G[:, rows(r_k)] · V_k                    (scattered back into cols(c_k))

so only the input columns in the union of the blocks' column ranges are saved. Activation memory,
gradient memory and optimizer state all scale with the number of blocks. The frozen base's own matmul
(whose input gradient is G·W₀) is done by the wrapper; together the input gradient is exact.

Ragged edges: when b does not divide the slice's rows or ``in``, the last row/column block is smaller.
Blocks are stored padded to b×b; inputs are zero-filled beyond ``in`` and outputs beyond ``rows`` are
dropped, so padding never affects the output and always gets an exactly-zero gradient (it stays zero
under Adam/AdamW). It does count in ``values.numel()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QkvtuneError
from ..targets import Target
from .base import Delta, adapter_dtype


@dataclass
class _Plan:
    """Index tensors for one device, derived from the ``blocks`` buffer (cached)."""

    rblk: torch.Tensor        # (n,) row block of each block
    cblk: torch.Tensor        # (n,) column block of each block
    col_idx: torch.Tensor     # (u*b,) input columns of the distinct column blocks (clamped when ragged)
    col_pad: torch.Tensor | None  # (u*b,) True where col_idx is past ``in`` (ragged edge), else None
    cpos: torch.Tensor | None     # (n,) position of each block's column block among the distinct ones
    b: int
    n_row_blocks: int
    n_col_blocks: int
    in_features: int


class _BlockSparseMatmul(torch.autograd.Function):
    """x (N, in) -> x·ΔWᵀ padded to (N, n_row_blocks·b); saves only the selected input columns."""

    @staticmethod
    def forward(ctx, x, values, plan: _Plan):
        N, b = x.shape[0], plan.b
        xs = x.index_select(1, plan.col_idx)  # (N, u·b): the only activation kept for backward
        if plan.col_pad is not None:
            xs.masked_fill_(plan.col_pad, 0)
        xs = xs.to(values.dtype).view(N, -1, b)
        xb = xs if plan.cpos is None else xs.index_select(1, plan.cpos)  # (N, n, b)
        yb = torch.bmm(xb.transpose(0, 1), values.transpose(1, 2))    # (n, N, b): X_c · V_kᵀ
        out = yb.new_zeros(N, plan.n_row_blocks, b)
        out.index_add_(1, plan.rblk, yb.transpose(0, 1))             # blocks sharing a row block add up
        ctx.save_for_backward(xs if ctx.needs_input_grad[1] else None, values)  # frozen blocks: keep no x
        ctx.plan, ctx.x_dtype = plan, x.dtype
        return out.view(N, -1)

    @staticmethod
    def backward(ctx, grad_out):
        xs, values = ctx.saved_tensors
        plan, b = ctx.plan, ctx.plan.b
        N = grad_out.shape[0]
        # Under autocast the forward's bmm ran in bf16/fp16, so the incoming gradient has that dtype;
        # the block gradients must come out in the (fp32) dtype of the values.
        grad_out = grad_out.to(values.dtype)
        G = grad_out.reshape(N, plan.n_row_blocks, b).index_select(1, plan.rblk).transpose(0, 1)  # (n, N, b)
        grad_x = grad_values = None
        if ctx.needs_input_grad[1]:
            xb = xs if plan.cpos is None else xs.index_select(1, plan.cpos)
            grad_values = torch.bmm(G.transpose(1, 2), xb.transpose(0, 1))  # (n, b, b)
        if ctx.needs_input_grad[0]:
            gx = torch.bmm(G, values)                                         # (n, N, b): G_r · V_k
            grad_x = gx.new_zeros(N, plan.n_col_blocks, b)
            grad_x.index_add_(1, plan.cblk, gx.transpose(0, 1))
            grad_x = grad_x.view(N, -1)[:, :plan.in_features].to(ctx.x_dtype)
        return grad_x, grad_values, None


class SelectionError(QkvtuneError):
    """A block selection (file or argument) that is malformed or does not fit the model."""


def block_grid(shape: tuple[int, int], block_size: int) -> tuple[int, int]:
    """(row blocks, column blocks) of a (rows × in) matrix; ragged edges count as a block."""
    return -(-shape[0] // block_size), -(-shape[1] // block_size)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_blocks(entries: list, block_size: int, shapes: dict | None = None,
                 where: str = "smt selection") -> dict[tuple[str, str], list[tuple[int, int]]]:
    """The one validator of a block selection: each entry an object with a non-empty ``module`` and ``kind``,
    non-negative integer ``row``/``col``, integer-or-null ``layer``, number-or-null ``score``; no block twice;
    and, given ``shapes`` {(module, kind): (rows, in)}, a slice that exists with the block inside its grid.
    Returns {(module, kind): sorted [(row, col)]}. Raises SelectionError naming ``where`` and the entry."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise SelectionError(f"{where}: block_size {block_size!r} must be a positive integer")
    out: dict[tuple[str, str], list[tuple[int, int]]] = {}
    seen: dict[tuple, int] = {}
    for i, e in enumerate(entries):
        at = f"{where}: entry {i}"
        if not isinstance(e, dict):
            raise SelectionError(f"{at}: expected an object, got {type(e).__name__}")
        for key in ("module", "kind"):
            if not isinstance(e.get(key), str) or not e[key]:
                raise SelectionError(f"{at}: field {key!r} must be a non-empty string")
        for key in ("row", "col"):
            if not _is_int(e.get(key)) or e[key] < 0:
                raise SelectionError(f"{at}: field {key!r} must be a non-negative integer, got {e.get(key)!r}")
        if e.get("layer") is not None and not _is_int(e["layer"]):
            raise SelectionError(f"{at}: field 'layer' must be an integer or null, got {e['layer']!r}")
        sc = e.get("score")
        if sc is not None and (isinstance(sc, bool) or not isinstance(sc, (int, float))):
            raise SelectionError(f"{at}: field 'score' must be a number or null, got {sc!r}")
        key, r, c = (e["module"], e["kind"]), e["row"], e["col"]
        if shapes is not None:
            if key not in shapes:
                raise SelectionError(f"{at}: the model has no slice {key[0]}[{key[1]}]")
            nr, nc = block_grid(shapes[key], block_size)
            if not (r < nr and c < nc):
                R, C = shapes[key]
                raise SelectionError(f"{at}: block ({r}, {c}) is outside the {nr}×{nc} grid of {block_size}×{block_size} "
                                     f"blocks of {key[0]}[{key[1]}] ({R}×{C})")
        if (*key, r, c) in seen:
            raise SelectionError(f"{at}: same block as entry {seen[(*key, r, c)]} (block ({r}, {c}) selected twice)")
        seen[(*key, r, c)] = i
        out.setdefault(key, []).append((r, c))
    return {k: sorted(v) for k, v in out.items()}


class BlockSparse(Delta):
    method = "smt"
    rate_family = "smt"
    rate_grid = (1e-4, 3e-4, 1e-3)  # the rates worth trying (the claims suite's lr_grid for this family)
    hparam_keys = ("block_size", "blocks")
    config_keys = ("block_size",)
    needs_selection = True  # the blocks come from smt.py's warm-up (or a fixed selection file)

    def __init__(self, target: Target, base_weight: torch.Tensor, block_size: int, blocks: list[dict]):
        super().__init__(target)
        b = self.block_size = block_size
        mine = [e for e in blocks if isinstance(e, dict) and e.get("module") == target.module and e.get("kind") == target.kind]
        rc = check_blocks(mine, b, {(target.module, target.kind): target.shape}, f"smt: {target.name}")
        if not rc:
            raise SelectionError(f"smt: {target.name}: no blocks selected for this slice")
        rc = rc[(target.module, target.kind)]
        device = base_weight.device
        rows, fin = target.shape
        # Integer buffers are saved with the adapter and checked on load against the ones rebuilt
        # from the hyperparameters: indices and (rows, in, b) shapes.
        self.register_buffer("blocks", torch.tensor(rc, dtype=torch.long, device=device).view(-1, 2))
        self.register_buffer("shape", torch.tensor([rows, fin, b], dtype=torch.long, device=device))
        self.values = nn.Parameter(torch.zeros(len(rc), b, b, dtype=adapter_dtype(base_weight), device=device))
        self._entries = mine
        self._plans: dict[torch.device, _Plan] = {}

    @property
    def n_row_blocks(self) -> int:
        return block_grid(self.target.shape, self.block_size)[0]

    @property
    def n_col_blocks(self) -> int:
        return block_grid(self.target.shape, self.block_size)[1]

    def _plan(self, device) -> _Plan:
        plan = self._plans.get(device)
        if plan is None:
            b, fin = self.block_size, self.target.in_features
            rblk, cblk = self.blocks[:, 0].to(device), self.blocks[:, 1].to(device)
            ucols, cpos = torch.unique(cblk, sorted=True, return_inverse=True)
            col_idx = (ucols[:, None] * b + torch.arange(b, device=device)).reshape(-1)
            col_pad = col_idx >= fin
            identity = len(ucols) == len(cblk) and bool((cpos == torch.arange(len(cblk), device=device)).all())
            plan = self._plans[device] = _Plan(
                rblk, cblk, col_idx.clamp(max=fin - 1), col_pad if bool(col_pad.any()) else None,
                None if identity else cpos, b, self.n_row_blocks, self.n_col_blocks, fin)
        return plan

    def forward(self, x, base_out=None, base_weight=None):
        lead, fin = x.shape[:-1], x.shape[-1]
        out = _BlockSparseMatmul.apply(x.reshape(-1, fin), self.values, self._plan(x.device))
        out = out.view(*lead, -1)
        rows = self.target.shape[0]
        return out if out.shape[-1] == rows else out[..., :rows]  # drop the ragged edge's padding

    def delta_weight(self, base_weight=None):
        """Dense ΔW (rows × in), for merging and analysis only; training never builds it."""
        b = self.block_size
        grid = self.values.new_zeros(self.n_row_blocks, self.n_col_blocks, b, b)
        grid = grid.index_put((self.blocks[:, 0], self.blocks[:, 1]), self.values)
        dense = grid.permute(0, 2, 1, 3).reshape(self.n_row_blocks * b, self.n_col_blocks * b)
        rows, fin = self.target.shape
        return dense[:rows, :fin]

    def param_roles(self):
        yield "blocks", self.values, True

    def hyperparameters(self):
        return {"block_size": self.block_size, "blocks": list(self._entries)}

    def _apply(self, fn, *args, **kwargs):  # .to(device) etc.: index plans are rebuilt lazily
        self._plans = {}
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()} blocks={len(self.blocks)} of {self.n_row_blocks}×{self.n_col_blocks}, b={self.block_size}"
