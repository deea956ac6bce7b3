"""`warmstart evaluate --out DIR`: what an evaluation leaves on disk besides the one-line summary.

    metrics.json    count, top1, top5, loss, skipped, checkpoint and data paths
    per_class.csv   one row per class: count, correct, accuracy, the class it is most often mistaken for
    confusion.png   up to GRID_MAX classes the full annotated matrix; beyond that a grid is unreadable (1,000 x
                    1,000 cells), so the most frequent (true -> predicted) mistakes and the worst classes as bars

Everything here works from the (true x predicted) count matrix that engine.loop.evaluate returns, so the numbers are
the ones the training loop reports. Also `shown`, the one way a name or a file name is put on a line of output.
"""

import csv
import io
import json
from pathlib import Path

import torch

from warmstart import fileio

GRID_MAX = 30    # beyond this many classes the annotated grid's labels and numbers no longer fit
TOP_PAIRS = 25   # confused pairs shown when there are too many classes for a grid

# characters that break a line (newline, U+2028), drive a terminal (ESC), reorder what follows (bidi overrides) or
# cannot be encoded (a lone surrogate: a byte of a non-UTF-8 file name, as Python decodes it)
def short(name: str, width: int = 32) -> str:
    """A plot label: ImageNet names list synonyms ('tench, Tinca tinca'), the first one is enough."""
    name = name.split(",")[0].strip()
    return name if len(name) <= width else name[:width - 1] + "…"


def per_class(confusion: torch.Tensor, classes: list[str], human: list[str] | None) -> list[dict]:
    """One dict per class, in class order; accuracy is None for a class with no images."""
    confusion = confusion.long()
    off = confusion.clone()
    off.fill_diagonal_(0)  # a class is never "confused with" itself
    rows = []
    for i, c in enumerate(classes):
        count, correct = int(confusion[i].sum()), int(confusion[i, i])
        j = int(off[i].argmax())
        worst = int(off[i, j])
        rows.append({"class": c, "name": human[i] if human else "", "count": count, "correct": correct,
                     "accuracy": round(100 * correct / count, 2) if count else None,
                     "most_confused_with": classes[j] if worst else "",
                     "most_confused_name": (human[j] if human else "") if worst else "", "confused_count": worst})
    return rows


def write_per_class_csv(path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, "accuracy": "" if r["accuracy"] is None else f"{r['accuracy']:.2f}"} for r in rows)
    fileio.write_text(path, buf.getvalue(), durable=False)


def plot_confusion(path, confusion: torch.Tensor, names: list[str], title: str = "") -> None:
    """names: display names in class order (human names when known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = confusion.long()
    fig = _grid(plt, confusion, names) if len(names) <= GRID_MAX else _bars(plt, confusion, names)
    fig.suptitle(title)
    fig.tight_layout()
    # the temp name has no .png suffix, so say the format
    fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), durable=False)
    plt.close(fig)


def _grid(plt, confusion, names):
    n = len(names)
    side = max(5.0, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    counts = confusion.numpy()
    # colour by the share of each true class, so small and large classes read the same; the numbers are counts
    share = counts / counts.sum(1, keepdims=True).clip(min=1)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    labels = [short(s, 20) for s in names]
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    return fig


def _bars(plt, confusion, names):
    counts = confusion.numpy()
    per_true = counts.sum(1)
    off = counts.copy()
    off[range(len(names)), range(len(names))] = 0
    flat = off.ravel().argsort()[::-1][:TOP_PAIRS]
    pairs = [(int(k) // len(names), int(k) % len(names)) for k in flat if off.ravel()[k] > 0]
    seen = per_true.nonzero()[0]
    acc = counts.diagonal()[seen] / per_true[seen]
    worst = seen[acc.argsort()[:TOP_PAIRS]]

    fig, (left, right) = plt.subplots(1, 2, figsize=(18, 0.32 * TOP_PAIRS + 2.5))
    if pairs:
        values = [off[i, j] for i, j in pairs][::-1]  # barh draws bottom-up: largest on top
        left.barh(range(len(pairs)), values, color="tab:red")
        left.set_yticks(range(len(pairs)), [f"{short(names[i], 26)} → {short(names[j], 26)}"
                                            for i, j in pairs][::-1], fontsize=8)
        for y, (v, (i, _)) in enumerate(zip(values, pairs[::-1])):
            left.text(v, y, f" {v} ({100 * v / per_true[i]:.0f}%)", va="center", fontsize=7)
    else:
        left.text(0.5, 0.5, "no mistakes", ha="center", va="center", transform=left.transAxes)
    left.set_title(f"most frequent mistakes: true → predicted (of {len(names)} classes)")
    left.set_xlabel("images")
    accs = [100 * counts[i, i] / per_true[i] for i in worst][::-1]
    right.barh(range(len(worst)), accs, color="tab:blue")
    right.set_yticks(range(len(worst)), [short(names[i], 36) for i in worst][::-1], fontsize=8)
    for y, (a, i) in enumerate(zip(accs, worst[::-1])):
        right.text(a, y, f" {a:.0f}% of {per_true[i]}", va="center", fontsize=7)
    right.set_xlim(0, 110)
    right.set_title("lowest per-class top-1")
    right.set_xlabel("top-1 (%)")
    return fig


def write_report(out_dir, metrics: dict, confusion: torch.Tensor, classes: list[str], human: list[str] | None) -> None:
    """metrics.json, per_class.csv and confusion.png in out_dir (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_per_class_csv(out / "per_class.csv", per_class(confusion, classes, human))
    plot_confusion(out / "confusion.png", confusion, human or classes,
                   title=f"{Path(str(metrics.get('checkpoint', ''))).name}: top-1 {metrics['top1']:.2f}% "
                         f"on {metrics['count']} images")
