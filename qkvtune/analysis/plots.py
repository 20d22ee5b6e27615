"""PNG plots (matplotlib, Agg backend) for analyses and benchmarks."""

from __future__ import annotations

import math
import os
import re

import torch


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def plot_spectrum(eigs, decay: float, fit_range, path: str, per_kind: dict | None = None,
                  title: str = "eNTK spectrum") -> None:
    """log-log eigenvalues (largest first) with the fitted power law over ``fit_range``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    e = torch.as_tensor(eigs).double()
    i = torch.arange(1, len(e) + 1, dtype=torch.float64)
    pos = e > 0
    ax.loglog(i[pos].numpy(), e[pos].numpy(), ".-", label="kernel")
    for kind, ek in (per_kind or {}).items():
        ek = torch.as_tensor(ek).double()
        ax.loglog(i[ek > 0].numpy(), ek[ek > 0].numpy(), ".", alpha=0.5, label=f"K_{kind}")
    lo, hi = fit_range
    xs, ys = i[lo - 1:hi], e[lo - 1:hi]
    keep = ys > 0
    if decay == decay and int(keep.sum()) >= 2:
        # the least-squares line of the fit: log λ = c − p·log i, c from the same points
        c = float(ys[keep].log().mean() + decay * xs[keep].log().mean())
        ax.loglog(xs.numpy(), (c - decay * xs.log()).exp().numpy(), "--", label=f"fit i^-{decay:.2f} ({lo}..{hi})")
    ax.set_xlabel("index i")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_heatmap(matrix, path: str, title: str = "", xlabel: str = "", ylabel: str = "",
                 labels: list[str] | None = None, vmin=None, vmax=None, one_based: bool = False) -> None:
    plt = pyplot()
    m = torch.as_tensor(matrix).double().numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    extent = (0.5, m.shape[1] + 0.5, m.shape[0] + 0.5, 0.5) if one_based else None
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto", extent=extent)
    fig.colorbar(im, ax=ax)
    if labels:
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        if m.size <= 100:
            for r in range(m.shape[0]):
                for c in range(m.shape[1]):
                    ax.text(c, r, f"{m[r, c]:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    save_figure(fig, path)


def short_name(name: str) -> str:
    """"bert.encoder.layer.3.attention.self.query[q]" -> "L3 query[q]" for plot labels."""
    m = re.match(r".*?\.(\d+)\..*?([^.]+)$", str(name))
    return f"L{m.group(1)} {m.group(2)}" if m else str(name)


def plot_heatmap_grid(matrices: dict, path: str, title: str = "", xlabel: str = "", ylabel: str = "",
                      max_panels: int = 12) -> None:
    """Several small heatmaps on one figure (one per matrix), shared colour scale [0, 1]."""
    plt = pyplot()
    items = list(matrices.items())[:max_panels]
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1, 3.0 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(items):]:
        ax.axis("off")
    for ax, (name, m) in zip(axes.flat, items):
        m = torch.as_tensor(m).double().numpy()
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                       extent=(0.5, m.shape[1] + 0.5, m.shape[0] + 0.5, 0.5))
        ax.set_title(short_name(name), fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist())
    fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bars(values: dict, path: str, title: str = "", ylabel: str = "", groups: dict | None = None,
              log: bool = False) -> None:
    """Bars per key; with ``groups`` {series: {key: value}} grouped bars per key."""
    plt = pyplot()
    series = groups or {"": values}
    keys = list(next(iter(series.values())))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(keys) * len(series)), 4))
    width = 0.8 / len(series)
    for s, (label, vals) in enumerate(series.items()):
        ax.bar([i + s * width for i in range(len(keys))], [float(vals[k]) for k in keys], width, label=label or None)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(keys))], [short_name(k) for k in keys],
                  rotation=45, ha="right", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if groups:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_lines(series: dict, path: str, title: str = "", xlabel: str = "", ylabel: str = "", log: str = "",
               vlines: dict | None = None) -> None:
    """{label: (xs, ys)} as lines; ``log`` is "", "x", "y" or "xy"; ``vlines`` {label: x} marks positions."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        xs, ys = list(xs), list(ys)
        ax.plot(xs, ys, ".-" if len(xs) < 30 else "-", label=short_name(label))
    for k, (label, x) in enumerate((vlines or {}).items()):
        ax.axvline(x, color=f"C{k + len(series)}", ls="--", label=label)
    if "x" in log:
        ax.set_xscale("log")
    if "y" in log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)
