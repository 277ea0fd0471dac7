"""loss.png of a run: training loss per step and validation loss, from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.adapters.adalora import rank_grid


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist (is {run_dir} a training output_dir?)")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{lineno}: not a JSON record") from None
    return records


def plot_run(run_dir: str | Path, log=print) -> Path | None:
    """Draw output_dir/loss.png; without matplotlib, say so and draw nothing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no loss.png (pip install matplotlib)")
        return None
    records = read_metrics(Path(run_dir))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", lw=1.2)
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per supervised token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(Path(run_dir).resolve().name)
    fig.tight_layout()
    path = Path(run_dir) / "loss.png"
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_or_warn(run_dir: str | Path, log=print) -> Path | None:
    """`plot_run` at the end of training: a metrics.jsonl it cannot read (a torn line, two runs writing
    into one output_dir) costs the plot only, with a warning naming the line."""
    try:
        return plot_run(run_dir, log=log)
    except ValueError as e:
        log(f"warning: no loss.png: {e}")
        return None


def plot_ranks(ranks: dict[str, int], path: str | Path, title: str = "AdaLoRA final rank", log=print) -> Path | None:
    """A heat map of the rank of each adapted module: layers as rows, module names as columns (AdaLoRA's
    allocation at the end of training); without matplotlib, say so and draw nothing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no rank heat map (pip install matplotlib)")
        return None
    layers, modules, grid = rank_grid(ranks)
    values = [[float("nan") if r is None else r for r in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(modules), 1.2 + 0.3 * len(layers)), dpi=110)
    image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0)
    for i, row in enumerate(grid):
        for j, r in enumerate(row):
            if r is not None:
                ax.text(j, i, str(r), ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), ["-" if layer is None else str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
