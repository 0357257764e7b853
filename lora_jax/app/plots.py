"""PNG plots of runs (matplotlib's Agg canvas directly: no pyplot, no global backend change)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["loss_curves", "lines"]


def _figure(size=(6.4, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) < window:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    head = c[1:window] / np.arange(1, window)  # growing window at the start
    return np.concatenate([head, (c[window:] - c[:-window]) / window])


def loss_curves(path: str, curves: Mapping[str, Sequence[float]], *, title: str = "", smooth: int = 10) -> None:
    """Per-step training losses (raw, faint) and their running mean over ``smooth`` steps.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "loss.png")
    >>> loss_curves(path, {"LoRA": [3.0, 2.5, 2.2, 2.0]}, title="demo")
    >>> with open(path, "rb") as f:
    ...     f.read(4)
    b'\\x89PNG'
    """
    fig = _figure()
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(curves.items()):
        steps = np.arange(1, len(values) + 1)
        color = f"C{i}"
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(values, smooth), color=color, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def lines(path: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
          title: str = "", logx: bool = False, logy: bool = False, markers: bool = True,
          styles: Mapping[str, dict] | None = None) -> None:
    """One line per ``name -> (xs, ys)``; ``styles[name]`` adds matplotlib line keywords.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "rank.png")
    >>> lines(path, {"lora": ([4, 8], [2.0, 1.9])}, xlabel="rank", ylabel="loss", logx=True)
    >>> os.path.getsize(path) > 1000
    True
    """
    fig = _figure()
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if markers else None, markersize=4, label=name, **(styles or {}).get(name, {}))
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small" if len(series) > 6 else "small")
    fig.tight_layout()
    fig.savefig(path)
