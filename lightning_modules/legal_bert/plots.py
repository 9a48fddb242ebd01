"""Figures for legal_bert: confusion matrix, per-class F1 bars, token attention heat maps."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def confusion_matrix_figure(confusion: torch.Tensor, names: Sequence[str], title: str):
    confusion = confusion.float()
    rows = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.55 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "black")
    ax.set_title(f"confusion matrix (rows normalised), {title}", fontsize=9)
    fig.tight_layout()
    return fig


def class_f1_figure(class_f1: torch.Tensor, names: Sequence[str], title: str):
    values = class_f1.float().tolist()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(names) + 2), 3.5), dpi=100)
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1")
    for i, v in enumerate(values):
        ax.text(i, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def prediction_title(probs: torch.Tensor, names: Sequence[str], multi_label: bool, thresholds: torch.Tensor) -> str:
    if multi_label:
        chosen = [f"{n} {p:.2f}" for n, p, t in zip(names, probs.tolist(), thresholds.tolist(), strict=True) if p >= t]
        return "predicted: " + (", ".join(chosen) if chosen else "no label")
    best = int(probs.argmax())
    return f"predicted: {names[best]} ({float(probs[best]):.2f})"


def attention_figure(attention: torch.Tensor, tokens: Sequence[str], title: str):
    n = len(tokens)
    size = max(4.0, 0.18 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(attention[:n, :n].numpy(), cmap="viridis")
    ax.set_xticks(range(n), tokens, rotation=90, fontsize=6)
    ax.set_yticks(range(n), tokens, fontsize=6)
    ax.set_title(f"last-layer attention (mean over heads)\n{title}", fontsize=8)
    fig.tight_layout()
    return fig
