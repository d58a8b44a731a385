"""Step 3: the pseudo-label score thresholds, searched with Ray Tune.

The paper keeps instances scoring above a threshold chosen so that the mean number of
instances per unlabeled image matches the labeled set's. How many candidates a
threshold keeps depends only on their scores and labels, so one Ray Data pass over the
cached candidates (the Parquet shards of step 2) reduces them to their sufficient
statistics, :class:`Histograms`: per label, a histogram of the scores in
:data:`BINS` uniform bins on ``[0, 1]``, plus the number of readable images. Each
batch makes a small partial histogram (only its non-empty bins) and the driver sums
them while iterating, so the driver holds ``O(labels x bins)`` numbers however many
candidates there are, and 10^9 candidates cost one read of the shards. Each Tune
trial then evaluates its threshold ``t`` from the histograms' suffix sums in
microseconds: it counts the bins whose lower edge is at least ``t``, which is exact
when ``t`` is a multiple of ``1 / BINS`` (every grid point of 4-decimal bounds) and
otherwise counts at the next edge, less than one bin above ``t``. Every trial reports:

- ``instances_per_image`` and ``gap`` (the paper's global objective);
- ``gap_<class>`` per class, against that class's rate in the labeled set, from which
  each class gets its own threshold (the per-class objective, which fixes the bias
  towards frequent classes a single threshold has);
- ``precision``/``recall``/``f1`` of the pseudo-labels when a labeled validation split
  was pseudo-labeled too, so the heuristic's choice can be judged. That split is small
  and keeps every candidate (a :class:`ScoreTable` with ground-truth matches), so
  these are exact.

Tune's results (JSON, CSV and TensorBoard event files) stay under ``OUTPUT_DIR/tune``:
``tensorboard --logdir OUTPUT_DIR/tune``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import ray.data
from ray import tune

from raydd import schema, storage
from raydd.config import ThresholdConfig
from raydd.layout import THRESHOLD_FILE

if TYPE_CHECKING:  # trials import this module: keep torch out of their start-up
    from raydd.data.coco import Record

logger = logging.getLogger(__name__)

BINS = 10_000
"""Score bins on ``[0, 1]``, width 1e-4. A threshold counts as the first bin edge at
or above it: exactly when it has at most 4 decimals (every grid point of the default
search), otherwise under 1e-4 high. The chosen threshold is thus the exact search's to
within one bin, unless the exact best count sits between two scores closer than a bin
(the bins then give the nearest count they resolve). Memory: ``labels x 10,001``
int64s (7 MB for COCO's 91 labels)."""


def bin_edges(bins: int = BINS) -> np.ndarray:
    """The ``bins + 1`` edges ``k / bins`` as float32, the scores' dtype, so that a
    score and a threshold compare with an edge as they compare with each other."""
    return (np.arange(bins + 1) / bins).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Histograms:
    """Per-label score histograms of the candidates of readable images.

    Attributes:
        counts: int64 ``[num_classes, bins + 1]``: ``counts[c, k]`` candidates of
            label ``c`` scoring in ``[k / bins, (k + 1) / bins)``; the last column
            holds the scores of 1 (scores outside ``[0, 1]`` go to the end bins).
        num_images: readable images the candidates come from.
    """

    counts: np.ndarray
    num_images: int

    @property
    def bins(self) -> int:
        return self.counts.shape[1] - 1

    @cached_property
    def _at_least(self) -> np.ndarray:
        """``[num_classes, bins + 2]``: candidates per label in bin ``k`` or above
        (the suffix sums; the last column, past every bin, is 0)."""
        tail = np.cumsum(self.counts[:, ::-1], axis=1)[:, ::-1]
        return np.pad(tail, ((0, 0), (0, 1)))

    def kept(self, threshold: float) -> np.ndarray:
        """int64 ``[num_classes]``: candidates per label in the bins whose lower
        edge is at least ``threshold``, i.e. scoring at least the first edge
        ``>= threshold`` (``threshold`` itself when it is an edge)."""
        first = np.searchsorted(bin_edges(self.bins), np.float32(threshold))
        return self._at_least[:, first]


def _slots(
    scores: np.ndarray, labels: np.ndarray, num_classes: int, bins: int
) -> np.ndarray:
    """Flat index ``label * (bins + 1) + bin`` of each candidate."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}): {np.unique(labels)}")
    where = np.searchsorted(bin_edges(bins), scores.astype(np.float32), side="right")
    return labels.astype(np.int64) * (bins + 1) + np.clip(where - 1, 0, bins)


def histograms(
    scores: np.ndarray,
    labels: np.ndarray,
    num_images: int,
    num_classes: int,
    bins: int = BINS,
) -> Histograms:
    """:class:`Histograms` of in-memory candidates (float32 ``scores`` ``[M]``,
    int64 ``labels`` ``[M]`` in ``[0, num_classes)``)."""
    slots = _slots(np.asarray(scores), np.asarray(labels), num_classes, bins)
    counts = np.bincount(slots, minlength=num_classes * (bins + 1))
    return Histograms(counts.reshape(num_classes, bins + 1), num_images)


def _flat(column: np.ndarray, dtype: type) -> np.ndarray:
    """The per-image arrays of a batch column (object or 2-D) end to end."""
    return np.concatenate([np.zeros(0, dtype), *column]).astype(dtype)


def _partial_histogram(
    batch: dict[str, np.ndarray], num_classes: int, bins: int
) -> dict[str, np.ndarray]:
    """One batch's non-empty histogram slots and their counts; the extra slot
    ``num_classes * (bins + 1)`` counts the batch's readable images."""
    ok = batch[schema.ERROR] == ""
    scores = _flat(batch[schema.SCORES][ok], np.float32)
    labels = _flat(batch[schema.LABELS][ok], np.int64)
    slots = _slots(scores, labels, num_classes, bins)
    slot, count = np.unique(slots, return_counts=True)
    return {
        "slot": np.append(slot, num_classes * (bins + 1)),
        "count": np.append(count, np.count_nonzero(ok)).astype(np.int64),
    }


def score_histograms(
    candidates: ray.data.Dataset | pd.DataFrame, num_classes: int, bins: int = BINS
) -> Histograms:
    """The :class:`Histograms` of the candidates, in one Ray Data pass.

    Reads only the ``error``, ``scores`` and ``labels`` columns; each batch yields
    at most one number per non-empty bin, which the driver adds into one
    ``num_classes x (bins + 1)`` array while iterating: the candidates are never
    collected anywhere.

    Args:
        candidates: one row per image, as written by step 2 (a pandas DataFrame is
            converted with ``ray.data.from_pandas``).
        num_classes: labels are ``0..num_classes-1`` (a label outside fails).
        bins: histogram bins on ``[0, 1]``.
    """
    columns = [schema.ERROR, schema.SCORES, schema.LABELS]
    if isinstance(candidates, pd.DataFrame):
        candidates = ray.data.from_pandas(candidates[columns])
    partials = candidates.select_columns(columns).map_batches(
        _partial_histogram,
        fn_kwargs={"num_classes": num_classes, "bins": bins},
        batch_format="numpy",
    )
    total = np.zeros(num_classes * (bins + 1) + 1, np.int64)
    for batch in partials.iter_batches(batch_size=None, batch_format="numpy"):
        np.add.at(total, batch["slot"], batch["count"])
    return Histograms(total[:-1].reshape(num_classes, bins + 1), int(total[-1]))


@dataclass(frozen=True)
class ScoreTable:
    """Every candidate of a pseudo-labeled *labeled* split, for precision/recall
    (small: the unlabeled set goes through :class:`Histograms` instead).

    Attributes:
        scores: float32 ``[M]``.
        labels: int64 ``[M]`` contiguous labels.
        num_images: readable images the candidates come from.
        is_tp: bool ``[M]``: whether the candidate matches a ground-truth box (see
            :func:`match_ground_truth`).
        num_gt: ground-truth instances of that split.
    """

    scores: np.ndarray
    labels: np.ndarray
    num_images: int
    is_tp: np.ndarray | None = None
    num_gt: int = 0


def match_ground_truth(
    candidates: pd.DataFrame, truth: list[Record], iou: float = 0.5
) -> ScoreTable:
    """A :class:`ScoreTable` whose ``is_tp`` marks candidates matching ground truth.

    Matching is COCO's greedy one: in descending score order, each candidate takes
    the best-overlapping unmatched same-class box with IoU >= ``iou``. Because it goes
    by score, a candidate's match does not depend on lower-scored ones, so one pass
    gives the true positives at *every* threshold.
    """
    by_path = {r.path: r for r in truth}
    ok = candidates[candidates[schema.ERROR] == ""]
    scores, labels, flags = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)], []
    for row in ok.to_dict("records"):
        dets = schema.detections_from_row(row)
        gt = by_path[row[schema.PATH]]
        scores.append(dets[schema.SCORES])
        labels.append(dets[schema.LABELS])
        flags.append(_greedy_match(dets, gt, iou))
    return ScoreTable(
        np.concatenate(scores),
        np.concatenate(labels),
        len(ok),
        np.concatenate([np.zeros(0, bool), *flags]),
        sum(len(by_path[p].labels) for p in ok[schema.PATH]),
    )


def _greedy_match(dets: dict[str, np.ndarray], gt: Record, iou: float) -> np.ndarray:
    import torch
    from torchvision.ops import box_iou

    is_tp = np.zeros(len(dets[schema.SCORES]), bool)
    if len(gt.labels) == 0 or len(is_tp) == 0:
        return is_tp
    overlap = box_iou(torch.from_numpy(dets[schema.BOXES]), torch.from_numpy(gt.boxes))
    overlap = overlap.numpy() * (dets[schema.LABELS][:, None] == gt.labels[None, :])
    taken = np.zeros(len(gt.labels), bool)
    for i in np.argsort(-dets[schema.SCORES], kind="stable"):
        candidates = np.where(taken, -1.0, overlap[i])
        j = int(candidates.argmax())
        if candidates[j] >= iou:
            is_tp[i], taken[j] = True, True
    return is_tp


def class_rates(records: list[Record], num_classes: int) -> np.ndarray:
    """Instances per image of each label ``0..num_classes-1`` (0, background, is 0)."""
    labels = np.concatenate([np.zeros(0, np.int64), *(r.labels for r in records)])
    return np.bincount(labels, minlength=num_classes) / max(len(records), 1)


def evaluate_threshold(
    histograms: Histograms,
    threshold: float,
    targets: np.ndarray,
    validation: ScoreTable | None = None,
) -> dict[str, float]:
    """What keeping candidates with ``score >= threshold`` gives (a trial's metrics).

    Args:
        histograms: the unlabeled candidates', one row per label of ``targets``
            (counted as :meth:`Histograms.kept` does: exactly when ``threshold`` is
            a bin edge).
        threshold: the score threshold.
        targets: labeled instances per image per label (``targets[0]`` unused).
        validation: a pseudo-labeled labeled split, for precision and recall.
    """
    kept = histograms.kept(threshold)
    per_class = kept / max(histograms.num_images, 1)
    mean = float(kept.sum()) / max(histograms.num_images, 1)
    metrics = {
        "threshold": threshold,
        "instances_per_image": mean,
        "gap": abs(mean - float(targets.sum())),
    }
    for label in range(1, len(targets)):
        metrics[f"gap_{label}"] = abs(float(per_class[label]) - float(targets[label]))
    if validation is not None and validation.is_tp is not None:
        metrics.update(_precision_recall(validation, threshold))
    return metrics


def _precision_recall(
    table: ScoreTable, threshold: float | np.ndarray
) -> dict[str, float]:
    """Precision/recall/F1 of the candidates at or above ``threshold`` (one value, or
    one per candidate)."""
    keep = table.scores >= threshold
    tp = float((table.is_tp & keep).sum())
    precision = tp / keep.sum() if keep.any() else 1.0
    recall = tp / table.num_gt if table.num_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _trial(params: dict[str, Any], **data: Any) -> None:
    tune.report(evaluate_threshold(threshold=float(params["threshold"]), **data))


def _search_space(cfg: ThresholdConfig) -> tuple[dict[str, Any], tune.TuneConfig]:
    if cfg.search == "grid":
        grid = np.round(np.linspace(cfg.low, cfg.high, cfg.num_samples), 6).tolist()
        space = {"threshold": tune.grid_search(grid)}
        return space, tune.TuneConfig(
            max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True
        )
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(metric="gap", mode="min", seed=0)
    space = {"threshold": tune.uniform(cfg.low, cfg.high)}
    return space, tune.TuneConfig(
        search_alg=searcher,
        num_samples=cfg.num_samples,
        max_concurrent_trials=cfg.max_concurrent_trials,
        reuse_actors=True,
    )


@dataclass(frozen=True)
class ThresholdResult:
    """The chosen thresholds and what they give.

    ``per_class`` maps each label (as a string, for JSON) to its own threshold;
    ``precision``/``recall``/``f1`` are those of the global threshold on the
    validation split, ``per_class_quality`` those of the per-class thresholds (both
    absent without one).
    """

    threshold: float
    labeled_instances_per_image: float
    pseudo_instances_per_image: float
    trials: int
    per_class: dict[str, float] = field(default_factory=dict)
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    per_class_quality: dict[str, float] | None = None


def _best(frame: pd.DataFrame, gap: str) -> pd.Series:
    """The trial with the smallest gap; ties (counts are step functions of ``t``) go
    to the lowest threshold, which keeps the most pseudo-labels."""
    return frame.sort_values([gap, "threshold"]).iloc[0]


def run_search(
    histograms: Histograms,
    targets: np.ndarray,
    cfg: ThresholdConfig,
    storage_path: str | Path,
    validation: ScoreTable | None = None,
) -> pd.DataFrame:
    """Runs the Tune experiment ``threshold``; returns one row per trial."""
    space, tune_config = _search_space(cfg)
    trainable = tune.with_parameters(
        _trial, histograms=histograms, targets=targets, validation=validation
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 0.5}),
        param_space=space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name="threshold", storage_path=storage.absolute(storage_path), verbose=0
        ),
    )
    return tuner.fit().get_dataframe()


def search_threshold(
    candidates: ray.data.Dataset | pd.DataFrame | Histograms,
    targets: np.ndarray,
    cfg: ThresholdConfig,
    storage_path: str | Path,
    validation: ScoreTable | None = None,
) -> tuple[ThresholdResult, pd.DataFrame]:
    """Finds the global and per-class thresholds with Ray Tune.

    Args:
        candidates: the unlabeled set's candidates (one row per image, as step 2
            writes them; a pandas DataFrame is converted) or their
            :func:`score_histograms` already.
        targets: labeled instances per image per label, as from :func:`class_rates`.
        cfg: search settings.
        storage_path: Tune's storage.
        validation: optional pseudo-labeled labeled split (see
            :func:`match_ground_truth`) for precision/recall.

    Returns:
        The result and Tune's table of trials (sorted by threshold).
    """
    if not isinstance(candidates, Histograms):
        candidates = score_histograms(candidates, len(targets))
    frame = run_search(candidates, targets, cfg, storage_path, validation)
    frame = frame.sort_values("threshold", ignore_index=True)
    best = _best(frame, "gap")
    per_class = {
        str(label): float(_best(frame, f"gap_{label}")["threshold"])
        for label in range(1, len(targets))
    }
    quality = {k: float(best[k]) for k in ("precision", "recall", "f1") if k in best}
    if validation is not None and validation.is_tp is not None:
        needed = {int(label): t for label, t in per_class.items()}
        per_candidate = np.array(
            [needed.get(int(c), np.inf) for c in validation.labels], np.float32
        )
        quality["per_class_quality"] = _precision_recall(validation, per_candidate)
    result = ThresholdResult(
        threshold=float(best["threshold"]),
        labeled_instances_per_image=float(targets.sum()),
        pseudo_instances_per_image=float(best["instances_per_image"]),
        trials=len(frame),
        per_class=per_class,
        **quality,
    )
    return result, frame


def thresholds_by_label(result: ThresholdResult, per_class: bool) -> dict[int, float]:
    """Label -> threshold the student uses (every label the global one if not
    ``per_class``)."""
    return {
        int(label): (t if per_class else result.threshold)
        for label, t in result.per_class.items()
    }


def above_thresholds(
    dets: dict[str, np.ndarray], thresholds: dict[int, float]
) -> np.ndarray:
    """Mask of the detections scoring at least their label's threshold (labels
    missing from ``thresholds`` are dropped)."""
    needed = [thresholds.get(int(label), np.inf) for label in dets[schema.LABELS]]
    return dets[schema.SCORES] >= np.asarray(needed, np.float32).reshape(-1)


def in_band(
    dets: dict[str, np.ndarray], thresholds: dict[int, float], band: float
) -> np.ndarray:
    """Mask of the detections scoring under their label's threshold by at most
    ``band`` (none when ``band`` is 0; labels missing from ``thresholds`` never)."""
    needed = [thresholds.get(int(label), np.inf) for label in dets[schema.LABELS]]
    low = np.asarray(needed, np.float32).reshape(-1) - band
    band_mask = dets[schema.SCORES] >= low if band > 0 else np.zeros_like(low, bool)
    return band_mask & ~above_thresholds(dets, thresholds)


def save_threshold(result: ThresholdResult, output_dir: str | Path) -> Path:
    path = Path(output_dir) / THRESHOLD_FILE
    path.write_text(json.dumps(asdict(result), indent=2))
    return path


def load_threshold(output_dir: str | Path) -> ThresholdResult:
    return ThresholdResult(
        **json.loads((Path(output_dir) / THRESHOLD_FILE).read_text())
    )


def format_thresholds(
    result: ThresholdResult,
    targets: np.ndarray,
    histograms: Histograms,
    names: list[str],
) -> str:
    """A text table: per class, the labeled rate, its threshold and the pseudo rate
    (from the unlabeled candidates' ``histograms``)."""
    lines = [f"{'class':<12}{'labeled/img':>12}{'threshold':>11}{'pseudo/img':>12}"]
    n = max(histograms.num_images, 1)
    for label, name in enumerate(names, start=1):
        t = result.per_class.get(str(label), result.threshold)
        kept = histograms.kept(t)[label] / n
        lines.append(f"{name:<12}{targets[label]:>12.3f}{t:>11.3f}{kept:>12.3f}")
    lines.append(
        f"{'all (global)':<12}{targets.sum():>12.3f}{result.threshold:>11.3f}"
        f"{result.pseudo_instances_per_image:>12.3f}"
    )
    if result.precision is not None:
        lines.append(
            f"validation at the global threshold: precision {result.precision:.3f}, "
            f"recall {result.recall:.3f}, F1 {result.f1:.3f}"
        )
    if result.per_class_quality is not None:
        q = result.per_class_quality
        lines.append(
            f"validation at the per-class thresholds: precision {q['precision']:.3f}, "
            f"recall {q['recall']:.3f}, F1 {q['f1']:.3f}"
        )
    return "\n".join(lines)


def plot_thresholds(
    frame: pd.DataFrame, result: ThresholdResult, path: str | Path
) -> Path:
    """PNG of instances per image (and precision/recall) against the threshold, with
    the labeled target and the chosen threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = frame.sort_values("threshold")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(
        frame["threshold"],
        frame["instances_per_image"],
        "o-",
        ms=3,
        label="pseudo-labels per unlabeled image",
    )
    ax.axhline(
        result.labeled_instances_per_image,
        color="gray",
        ls="--",
        label="instances per labeled image",
    )
    ax.plot(
        [result.threshold],
        [result.pseudo_instances_per_image],
        "r*",
        ms=16,
        label=f"chosen t = {result.threshold:.3f}",
    )
    ax.set_xlabel("score threshold t")
    ax.set_ylabel("instances per image")
    # near t = 0 every candidate counts; show the range around the target
    ax.set_ylim(0, max(3 * result.labeled_instances_per_image, 1.0))
    handles, labels = ax.get_legend_handles_labels()
    if "precision" in frame:
        right = ax.twinx()
        for metric, style in (("precision", "g-"), ("recall", "m-")):
            (line,) = right.plot(frame["threshold"], frame[metric], style, label=metric)
            handles.append(line)
            labels.append(f"{metric} (validation)")
        right.set_ylim(0, 1.02)
        right.set_ylabel("precision / recall")
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title("Pseudo-label threshold (Ray Tune trials)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
