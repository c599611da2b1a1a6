"""The evaluation report: ``metrics.json``, ``report.md`` and its plots.

:func:`evaluate_sets` turns a generated and a reference set of note arrays into per-set metric
summaries and Yang & Lerch set distances; :func:`write_report` writes them with likelihood
numbers (model and n-gram baseline) into a folder. Both work without a model, so the metric side
is testable and usable on any two folders of pieces.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aurl.evaluation import metrics as M
from aurl.evaluation.distances import (
    bandwidth,
    compare_sets,
    inter_set_distances,
    intra_set_distances,
    kde,
    set_features,
    summarize_set,
)
from aurl.evaluation.phrases import (
    LENGTH_BINS,
    PHRASE_METRICS,
    phrase_features,
    phrase_summary,
)
from aurl.fileio import atomic_write_text
from aurl.progress import Progress, silent

PITCH_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B")
# semitones above the tonic, as scale degrees (b = lowered)
DEGREE_NAMES = ("1", "b2", "2", "b3", "3", "4", "#4", "5", "b6", "6", "b7", "7")


def evaluate_sets(
    generated: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    *,
    progress: Progress = silent,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Metric summaries of both sets and the distances between them.

    Returns:
        ``(results, generated_features, reference_features)``; ``results`` has ``generated``
        and ``reference`` (per scalar metric: mean, std, defined count), ``distances`` (per
        metric: Yang & Lerch intra/inter statistics, OA, KL; and ``frechet_distance``), the
        set sizes, and ``phrases`` (:func:`aurl.evaluation.phrases.phrase_summary` of each set:
        cadences per phrase and per beat, share ending on a cadence, phrase lengths).
    """
    gen = set_features(generated, progress=progress)
    ref = set_features(reference, progress=progress)
    results = {
        "pieces": {"generated": len(generated), "reference": len(reference)},
        "generated": summarize_set(gen),
        "reference": summarize_set(ref),
        "distances": compare_sets(gen, ref),
        "phrases": {
            "generated": phrase_summary(*phrase_features(generated)),
            "reference": phrase_summary(*phrase_features(reference)),
        },
    }
    return results, gen, ref


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """``data`` as indented JSON (NaN written as null), atomically."""
    return atomic_write_text(path, json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def plot_pitch_classes(gen: dict, ref: dict, path: Path) -> Path:
    """Mean pitch-class histogram of each set, side by side: by absolute pitch class, and
    relative to each piece's key (which compares pieces written in different keys fairly)."""
    plt = _plt()

    def mean(features: dict, name: str) -> np.ndarray:
        rows = np.asarray(features.get(name, []), dtype=float).reshape(-1, 12)
        rows = rows[~np.isnan(rows).all(axis=1)]
        return rows.mean(axis=0) if len(rows) else np.zeros(12)

    fig, axes = plt.subplots(1, 2, figsize=(12, 3))
    x = np.arange(12)
    panels = (
        ("pitch_class_histogram", PITCH_NAMES, "Pitch classes"),
        ("tonal_pitch_class_histogram", DEGREE_NAMES, "Relative to the key's tonic"),
    )
    for ax, (name, labels, title) in zip(axes, panels):
        ax.bar(x - 0.2, mean(ref, name), width=0.4, label="reference")
        ax.bar(x + 0.2, mean(gen, name), width=0.4, label="generated")
        ax.set_xticks(x, labels)
        ax.set_ylabel("share of notes")
        ax.set_title(f"{title} (mean over pieces)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _panels(plt, names: list[str]) -> tuple[Any, np.ndarray]:
    """A figure with one small panel per name, four across; the axes flattened."""
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows))
    return fig, axes.ravel()


def _save_panels(plt, fig: Any, axes: np.ndarray, names: list[str], path: Path) -> Path:
    """Title each panel, hide the unused ones, add the legend and write the figure."""
    for ax, name in zip(axes, names):
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[len(names) :]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.04, top=0.96, hspace=0.45, wspace=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_metric_distributions(gen: dict, ref: dict, path: Path) -> Path:
    """One panel per scalar metric: the per-piece values of both sets as histograms."""
    plt = _plt()
    names = list(M.SCALAR_METRICS)
    fig, axes = _panels(plt, names)
    for ax, name in zip(axes, names):
        g, r = gen[name][np.isfinite(gen[name])], ref[name][np.isfinite(ref[name])]
        both = np.concatenate([g, r])
        if both.size:
            lo, hi = both.min(), both.max()
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 20)
            ax.hist(r, bins=bins, alpha=0.6, density=True, label="reference")
            ax.hist(g, bins=bins, alpha=0.6, density=True, label="generated")
    return _save_panels(plt, fig, axes, names, path)


def plot_distance_densities(gen: dict, ref: dict, path: Path) -> Path:
    """Yang & Lerch's view: KDEs of intra-set (reference, generated) and inter-set distances."""
    plt = _plt()
    names = list(M.SCALAR_METRICS) + list(M.VECTOR_METRICS)
    fig, axes = _panels(plt, names)
    for ax, name in zip(axes, names):
        curves = {
            "intra reference": intra_set_distances(ref[name]),
            "intra generated": intra_set_distances(gen[name]),
            "inter": inter_set_distances(gen[name], ref[name]),
        }
        present = [v for v in curves.values() if v.size]
        if present:
            hi = max(v.max() for v in present)
            grid = np.linspace(0, hi if hi > 0 else 1, 200)
            for label, d in curves.items():
                if d.size:  # a floor on the bandwidth keeps zero-spread sets from 1e5 spikes
                    ax.plot(grid, kde(d, grid, max(bandwidth(d), grid[-1] / 100)), label=label)
    return _save_panels(plt, fig, axes, names, path)


def plot_piano_roll(notes: np.ndarray, path: Path, title: str = "") -> Path:
    """A piano roll of one note array (beats across, MIDI pitch up)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 2.6))
    if notes.shape[0]:
        spans = np.stack([notes["onset"], notes["duration"]], axis=1)  # (N, 2)
        for pitch in np.unique(notes["pitch"]):
            ax.broken_barh(spans[notes["pitch"] == pitch], (pitch - 0.4, 0.8), color="C0")
        ax.set_ylim(notes["pitch"].min() - 2, notes["pitch"].max() + 2)
        ax.set_xlim(0, float((notes["onset"] + notes["duration"]).max()))
    ax.set_xlabel("beat")
    ax.set_ylabel("pitch")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def read_training_curves(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``(step, loss)`` series per record kind from a run folder's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    curves: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return curves
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash: skip it
            continue
        loss = rec.get("loss")
        if isinstance(loss, (int, float)) and "step" in rec:
            curves.setdefault(str(rec.get("kind", "train")), []).append((int(rec["step"]), loss))
    return curves


def plot_training_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    for kind, points in sorted(curves.items()):
        steps, losses = zip(*sorted(points))
        ax.plot(steps, losses, label=kind)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Training curves")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _markdown(results: dict[str, Any], images: dict[str, str]) -> str:
    lines = ["# Aurl evaluation", ""]
    info = results.get("info", {})
    for k, v in info.items():
        lines.append(f"- {k}: {v}")
    if info:
        lines.append("")
    like = results.get("likelihood", {})
    if like:
        lines += [
            "## Likelihood",
            "",
            "Bits per note = total negative log-likelihood in bits / number of notes (NOTE_ON"
            " tokens); comparable across tokenizations. Loss and perplexity are per token.",
            "",
            "| model | bits/note | loss (nats/token) | perplexity | tokens | notes |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in like.items():
            lines.append(
                f"| {name} | {_f(r.get('bits_per_note'))} | {_f(r.get('loss'))} | "
                f"{_f(r.get('perplexity'), 2)} | {r.get('tokens')} | {r.get('notes')} |"
            )
        lines.append("")
    if "distances" in results:
        gen, ref, dist = results["generated"], results["reference"], results["distances"]
        pieces = results.get("pieces", {})
        lines += [
            "## Musical metrics",
            "",
            f"{pieces.get('generated', '?')} generated vs {pieces.get('reference', '?')} "
            "reference pieces. OA / KL: overlap and Kullback-Leibler divergence between the "
            "reference's intra-set distances and the inter-set distances (Yang & Lerch 2020; OA 1"
            " and KL 0 mean indistinguishable).",
            "",
            "| metric | generated | reference | OA | KL |",
            "|---|---|---|---|---|",
        ]
        for name in M.SCALAR_METRICS:
            g, r, d = gen[name], ref[name], dist[name]
            lines.append(
                f"| {name} | {_f(g['mean'])} ± {_f(g['std'])} | {_f(r['mean'])} ± "
                f"{_f(r['std'])} | {_f(d['overlap_area'])} | {_f(d['kl_divergence'])} |"
            )
        for name in M.VECTOR_METRICS:
            d = dist[name]
            lines.append(
                f"| {name} (vector) | | | {_f(d['overlap_area'])} | {_f(d['kl_divergence'])} |"
            )
        lines += [
            "",
            f"Frechet distance over the standardised scalar metrics: "
            f"{_f(dist.get('frechet_distance'))}",
            "",
        ]
    if "phrases" in results:
        lines += _phrase_markdown(results["phrases"])
    if images:
        lines += ["## Plots", ""]
        for title, rel in images.items():
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    return "\n".join(lines)


def _phrase_markdown(phrases: dict[str, Any]) -> list[str]:
    gen, ref = phrases["generated"], phrases["reference"]
    lines = [
        "## Phrases and cadences",
        "",
        "Phrases of the skyline melody (ending at rests and held notes), cadences at their"
        " arrivals in the local key, as `aurl analyze` reads them. ends_on_cadence: the share"
        " of pieces whose last phrase closes on a cadence.",
        "",
        "| metric | generated | reference | pieces (gen / ref) |",
        "|---|---|---|---|",
    ]
    for name in PHRASE_METRICS:
        g, r = gen[name], ref[name]
        lines.append(
            f"| {name} | {_f(g['mean'])} ± {_f(g['std'])} | {_f(r['mean'])} ± {_f(r['std'])} | "
            f"{g['defined']} / {r['defined']} |"
        )
    lines += [
        "",
        "| phrase length (beats) | generated | reference |",
        "|---|---|---|",
    ]
    edges = [f"{LENGTH_BINS[i]:g}-{LENGTH_BINS[i + 1]:g}" for i in range(len(LENGTH_BINS) - 1)]
    for i, label in enumerate(edges):
        g, r = gen["phrase_length_histogram"][i], ref["phrase_length_histogram"][i]
        lines.append(f"| {label} | {_f(g, 2)} | {_f(r, 2)} |")
    lines += [
        f"| median | {_f(gen['phrase_length_median'], 1)} | {_f(ref['phrase_length_median'], 1)} |",
        "",
    ]
    return lines


def write_report(
    out: str | Path,
    results: dict[str, Any],
    *,
    generated_features: dict[str, np.ndarray] | None = None,
    reference_features: dict[str, np.ndarray] | None = None,
    samples: Sequence[np.ndarray] = (),
    run_dir: str | Path | None = None,
    max_rolls: int = 3,
) -> Path:
    """Write ``metrics.json``, ``report.md`` and ``plots/*.png`` into ``out``.

    Args:
        out: Output folder (created).
        results: What goes into ``metrics.json`` (``likelihood``, ``info`` and the
            :func:`evaluate_sets` results, each optional).
        generated_features, reference_features: :func:`set_features` of both sets, for plots.
        samples: Generated note arrays; piano rolls of the first ``max_rolls``.
        run_dir: A training run folder: its ``metrics.jsonl`` becomes a training-curve plot.

    Returns:
        The path of ``report.md``.
    """
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    if generated_features is not None and reference_features is not None:
        g, r = generated_features, reference_features
        plot_pitch_classes(g, r, plots / "pitch_classes.png")
        images["Pitch classes, generated vs reference"] = "plots/pitch_classes.png"
        plot_metric_distributions(g, r, plots / "metrics.png")
        images["Metric distributions"] = "plots/metrics.png"
        plot_distance_densities(g, r, plots / "distances.png")
        images["Intra- and inter-set distance densities"] = "plots/distances.png"
    for i, notes in enumerate(list(samples)[:max_rolls]):
        plot_piano_roll(notes, plots / f"sample_{i}.png", title=f"generated sample {i}")
        images[f"Generated sample {i}"] = f"plots/sample_{i}.png"
    if run_dir is not None:
        curves = read_training_curves(run_dir)
        if curves:
            plot_training_curves(curves, plots / "training.png")
            images["Training curves"] = "plots/training.png"
    write_json(results, out / "metrics.json")
    return atomic_write_text(out / "report.md", _markdown(results, images))
