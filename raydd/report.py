"""``OUTPUT_DIR/report.html``: one self-contained page about a distillation run.

Reads what the steps left in ``OUTPUT_DIR`` (``summary.json``, ``thresholds.json``,
``thresholds.png``, ``config.yaml``, ``candidates/``, ``student/``) and writes the AP
table, the time per step, the threshold plot, labeled vs pseudo-labeled instances per
class, a gallery of pseudo-labeled images and one of the student on test images.
Every picture is an embedded ``data:`` URI and the CSS is inline: the file can be
mailed or archived alone. A missing piece (say, the student has not been trained
yet) leaves a note in its section instead of stopping the report.

Example:
    >>> write_report("demo/output")  # doctest: +SKIP
    PosixPath('demo/output/report.html')
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image, ImageDraw, ImageFont

from raydd import schema
from raydd.checkpoint import METADATA_FILE, read_metadata
from raydd.config import Config, ConfigError, from_dict
from raydd.data.coco import Categories, Record, coco_records, image_paths
from raydd.data.images import load_rgb
from raydd.layout import (
    CANDIDATES_DIR,
    CONFIG_FILE,
    METRICS,
    PLOT_FILE,
    REPORT_FILE,
    STUDENT_DIR,
    SUMMARY_FILE,
    TEACHER_DIR,
    THRESHOLD_FILE,
)
from raydd.pseudo_label import read_candidates
from raydd.steps import gains, models, schedules_note
from raydd.student import pseudo_records
from raydd.threshold import (
    ThresholdResult,
    load_threshold,
    thresholds_by_label,
)

logger = logging.getLogger(__name__)

UNLABELED_IMAGES = 12
TEST_IMAGES = 8
THUMBNAIL = 320  # longer side of gallery pictures, px (small images are enlarged)
DROPPED_SHOWN = 0.5  # below-threshold boxes are drawn down to this share of it
MAX_DROPPED = 8  # ... and at most this many per image
COLORS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip  # matplotlib's tab10


@dataclass(frozen=True)
class RunOutputs:
    """What a run left in its output directory (``None``: not there)."""

    directory: Path
    config: Config | None
    summary: dict[str, Any] | None
    threshold: ThresholdResult | None
    categories: Categories | None

    def thresholds(self) -> dict[int, float] | None:
        """Label -> the threshold the student used (see ``threshold.per_class``);
        from ``summary.json`` when ``thresholds.json`` is missing."""
        if self.threshold is not None:
            per_class = self.config is not None and self.config.threshold.per_class
            return thresholds_by_label(self.threshold, per_class)
        if self.summary is None or self.categories is None:
            return None
        labels = range(1, self.categories.num_classes)
        per_label = self.summary.get("per_class_thresholds") or {}
        t = self.summary.get("threshold")
        used = {label: per_label.get(str(label), t) for label in labels}
        return None if None in used.values() else used


def load_outputs(output_dir: str | Path) -> RunOutputs:
    """Reads the small files of a run (config, summary, thresholds, categories).

    Raises:
        ConfigError: ``output_dir`` is not a directory raydd wrote to.
    """
    out = Path(output_dir)
    markers = (SUMMARY_FILE, CONFIG_FILE, TEACHER_DIR, CANDIDATES_DIR, THRESHOLD_FILE)
    if not out.is_dir():
        raise ConfigError(f"{out} is not a directory")
    if not any((out / m).exists() for m in markers):
        raise ConfigError(
            f"{out} is not a raydd output directory (it has none of "
            f"{', '.join(markers)}): give the output_dir of a run"
        )
    config = _read_config(out)
    summary = _read_json(out / SUMMARY_FILE)
    threshold = load_threshold(out) if (out / THRESHOLD_FILE).exists() else None
    return RunOutputs(out, config, summary, threshold, _categories(out))


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _read_config(out: Path) -> Config | None:
    """``config.yaml`` (written by ``raydd run``), else the config in a checkpoint."""
    raw = None
    if (out / CONFIG_FILE).exists():
        raw = yaml.safe_load((out / CONFIG_FILE).read_text())
    for step in (TEACHER_DIR, STUDENT_DIR):
        if raw is None and (out / step / METADATA_FILE).exists():
            raw = read_metadata(out / step).get("config")
    try:
        return from_dict(raw) if raw else None
    except ConfigError as e:
        raise ConfigError(f"the config saved in {out} does not load: {e}") from e


def _categories(out: Path) -> Categories | None:
    for step in (TEACHER_DIR, STUDENT_DIR):
        if (out / step / METADATA_FILE).exists():
            meta = read_metadata(out / step)["categories"]
            return Categories(tuple(meta["ids"]), tuple(meta["names"]))
    return None


class Missing(Exception):
    """A section cannot be built; its message becomes the note shown instead."""


def write_report(output_dir: str | Path) -> Path:
    """Writes ``OUTPUT_DIR/report.html`` (see the module docstring); returns its path.

    Raises:
        ConfigError: ``output_dir`` is not a raydd output directory.
    """
    run = load_outputs(output_dir)
    path = run.directory / REPORT_FILE
    path.write_text(render(run))
    logger.info("report written to %s", path)
    return path


def render(run: RunOutputs) -> str:
    """The whole HTML page."""
    sections = [
        ("Summary", _summary_section),
        ("Time per step", _times_section),
        ("Threshold", _threshold_section),
        ("Instances per class", _classes_section),
        ("Pseudo-labels on unlabeled images", _unlabeled_section),
        ("Student on test images", _test_section),
    ]
    body = "".join(_section(title, build, run) for title, build in sections)
    title = f"raydd report: {run.directory}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>Data distillation report</h1><p class=meta>{_e(str(run.directory))}"
        f"{_run_facts(run)}</p>{body}</body></html>\n"
    )


def _section(title: str, build: Callable[[RunOutputs], str], run: RunOutputs) -> str:
    try:
        content = build(run)
    except Missing as e:
        content = _note(str(e))
    except Exception as e:  # noqa: BLE001 - one bad section must not cost the others
        logger.exception("report section %r failed", title)
        content = _note(f"this section failed: {type(e).__name__}: {e}")
    return f"<section><h2>{_e(title)}</h2>{content}</section>"


def _run_facts(run: RunOutputs) -> str:
    facts = []
    if run.config is not None:
        views = ", ".join(_view_text(v) for v in run.config.views)
        facts += [f"model {run.config.model.name}", f"views: {views}"]
    if run.summary and "images" in run.summary:
        facts += [
            f"{v} {k.replace('_', ' ')}" for k, v in run.summary["images"].items()
        ]
    return "".join(f"<br>{_e(f)}" for f in facts)


def _view_text(view: Any) -> str:
    parts = [f"scale {view.scale}" if view.scale else "original size"]
    return " + ".join(parts + (["flip"] if view.hflip else []))


def _summary_section(run: RunOutputs) -> str:
    summary = _need(run.summary, f"no {SUMMARY_FILE}: run `raydd run` to get the AP")
    names = models(summary)
    rows = [[name, *(_metric(summary, name, m) for m in METRICS)] for name in names]
    if all(name in summary for name in ("teacher", "student")):
        for name, gain in gains(summary).items():
            rows.append([name.replace("-", "−"), *(f"{gain[m]:+.4f}" for m in METRICS)])
    caption = "COCO box AP on the test split"
    return _table(["model", *METRICS], rows, caption) + _schedules(summary)


def _schedules(summary: dict[str, Any]) -> str:
    """What each model was trained on, and what the student's gain therefore means."""
    note = schedules_note(summary).replace(" x ", " × ").replace(" - ", " − ")
    return f"<p class=meta>{_e(note)}</p>" if note else ""


def _metric(summary: dict[str, Any], model: str, metric: str) -> str:
    value = summary.get(model, {}).get(metric)
    return "–" if value is None else f"{value:.4f}"


def _times_section(run: RunOutputs) -> str:
    seconds = _need(run.summary, f"no {SUMMARY_FILE}").get("seconds")
    seconds = _need(seconds, f"{SUMMARY_FILE} has no step times")
    longest = max(max(seconds.values()), 1e-9)
    rows = [
        f"<tr><td>{_e(step)}</td><td class=num>{s:.1f} s</td><td class=barcell>"
        f'<div class=bar style="width:{100 * s / longest:.1f}%"></div></td></tr>'
        for step, s in seconds.items()
    ]
    total = f"<tr><th>total</th><th class=num>{sum(seconds.values()):.1f} s</th></tr>"
    return f"<table class=times>{''.join(rows)}{total}</table>"


def _threshold_section(run: RunOutputs) -> str:
    result = _need(run.threshold, f"no {THRESHOLD_FILE}: run `raydd tune-threshold`")
    plot = run.directory / PLOT_FILE
    picture = (
        _img(_data_uri(plot.read_bytes(), "png"), "threshold search", "plot")
        if plot.exists()
        else _note(f"no {PLOT_FILE}")
    )
    facts = [
        f"global threshold <b>{result.threshold:.3f}</b> ({result.trials} trials)",
        f"instances per image: labeled {result.labeled_instances_per_image:.3f}, "
        f"pseudo-labeled {result.pseudo_instances_per_image:.3f}",
    ]
    if result.precision is not None:
        facts.append(
            f"validation at the global threshold: precision {result.precision:.3f}, "
            f"recall {result.recall:.3f}, F1 {result.f1:.3f}"
        )
    per_class = run.config is not None and run.config.threshold.per_class
    facts.append(
        "the student used the <b>per-class</b> thresholds (table below)"
        if per_class
        else "the student used the global threshold for every class"
    )
    return picture + "<ul>" + "".join(f"<li>{f}</li>" for f in facts) + "</ul>"


def class_counts(
    labeled: list[Record],
    pseudo: list[Record],
    categories: Categories,
    thresholds: dict[int, float],
) -> pd.DataFrame:
    """Instances per class: labeled set vs the pseudo-labels the student trained on.

    Returns:
        One row per class: ``class``, ``labeled`` (count), ``labeled_per_image``,
        ``threshold``, ``pseudo`` (count), ``pseudo_per_image``.
    """
    counts = {}
    for name, records in (("labeled", labeled), ("pseudo", pseudo)):
        labels = np.concatenate([np.zeros(0, np.int64), *(r.labels for r in records)])
        counts[name] = np.bincount(labels, minlength=categories.num_classes)[1:]
        counts[f"{name}_per_image"] = counts[name] / max(len(records), 1)
    labels = range(1, categories.num_classes)
    frame = pd.DataFrame({"class": list(categories.names), **counts})
    frame.insert(3, "threshold", [thresholds.get(label, np.nan) for label in labels])
    return frame


def _classes_section(run: RunOutputs) -> str:
    config = _need(run.config, "no config.yaml and no checkpoint with a config")
    categories = _need(run.categories, "no teacher checkpoint (its categories)")
    thresholds = _need(run.thresholds(), f"no {THRESHOLD_FILE}")
    candidates = _need(_candidates(run), f"no {CANDIDATES_DIR}/: run pseudo-label")
    labeled = coco_records(config.data.labeled, categories)
    frame = class_counts(
        labeled, pseudo_records(candidates, thresholds), categories, thresholds
    )
    rows = [
        [r["class"], r["labeled"], f"{r['labeled_per_image']:.3f}",
         f"{r['threshold']:.3f}", r["pseudo"], f"{r['pseudo_per_image']:.3f}"]
        for r in frame.to_dict("records")
    ]  # fmt: skip
    header = ["class", "labeled", "per image", "threshold", "pseudo", "per image"]
    chart = _img(_data_uri(_class_chart(frame), "png"), "instances per class", "plot")
    return chart + _table(header, rows, "labeled set vs pseudo-labels kept")


def _class_chart(frame: pd.DataFrame) -> bytes:
    """PNG: instances per image of each class, labeled vs pseudo-labeled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.arange(len(frame))
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(frame) + 1.2), dpi=100)
    ax.barh(y - 0.2, frame["labeled_per_image"], 0.4, label="labeled")
    ax.barh(y + 0.2, frame["pseudo_per_image"], 0.4, label="pseudo-labeled")
    ax.set_yticks(y, frame["class"])
    ax.invert_yaxis()
    ax.set_xlabel("instances per image")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _candidates(run: RunOutputs) -> pd.DataFrame | None:
    directory = run.directory / CANDIDATES_DIR
    if not directory.is_dir() or not any(directory.glob("*.parquet")):
        return None
    return read_candidates(directory)


def _unlabeled_section(run: RunOutputs) -> str:
    categories = _need(run.categories, "no teacher checkpoint (its categories)")
    thresholds = _need(run.thresholds(), f"no {THRESHOLD_FILE}")
    candidates = _need(_candidates(run), f"no {CANDIDATES_DIR}/: run pseudo-label")
    readable = candidates[candidates[schema.ERROR] == ""]
    rows = [
        readable.iloc[i].to_dict() for i in _spread(len(readable), UNLABELED_IMAGES)
    ]
    shown = [(r[schema.PATH], schema.detections_from_row(r), None) for r in rows]
    return _gallery(shown, categories, thresholds, "the teacher's fused candidates")


def _test_section(run: RunOutputs) -> str:
    config = _need(run.config, "no config.yaml and no checkpoint with a config")
    student = run.directory / STUDENT_DIR
    _need(student.is_dir() or None, f"no {STUDENT_DIR}/: run `raydd train-student`")
    categories = _need(run.categories, "no teacher checkpoint (its categories)")
    thresholds = _need(run.thresholds(), f"no {THRESHOLD_FILE}")
    paths = image_paths(config.data.test)
    paths = [paths[i] for i in _spread(len(paths), TEST_IMAGES)]
    truth = {r.path: r for r in coco_records(config.data.test, categories)}
    found = predict_images(student, paths, config)
    shown = [(p, d, truth.get(p)) for p, d in zip(paths, found, strict=True)]
    return _gallery(shown, categories, thresholds, "the student (one view)")


def predict_images(
    checkpoint: Path, paths: list[str], config: Config
) -> list[dict[str, np.ndarray]]:
    """Detections of a few local images, in this process (no Ray): the single view
    the evaluation uses, boxes xyxy in original pixels (see :class:`Predictor`)."""
    from raydd.config import single_view
    from raydd.inference import Predictor

    predictor = Predictor(
        str(checkpoint),
        single_view(config),
        config.ensemble,
        score_floor=config.inference.score_floor,
    )
    return predictor.predict([load_rgb(p) for p in paths])


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (not the best-looking ones)."""
    return sorted(set(np.linspace(0, n - 1, min(n, k)).round().astype(int).tolist()))


def _gallery(
    shown: list[tuple[str, dict[str, np.ndarray], Record | None]],
    categories: Categories,
    thresholds: dict[int, float],
    what: str,
) -> str:
    figures = []
    for path, dets, truth in shown:
        try:
            pixels = load_rgb(path)
        except Exception as e:  # noqa: BLE001 - an unreadable image is skipped
            figures.append(f"<figure>{_note(f'{path}: {type(e).__name__}')}</figure>")
            continue
        picture, kept, dropped = draw(pixels, dets, categories, thresholds, truth)
        caption = f"{Path(path).name}: {kept} kept, {dropped} below threshold"
        figures.append(
            f"<figure>{_img(_jpeg(picture), caption)}"
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    legend = (
        f"<p class=legend>Boxes of {_e(what)}: <b>solid</b> = score ≥ its class "
        f"threshold (kept), <b>dashed</b> = below it (drawn down to "
        f"{DROPPED_SHOWN:.0%} of the threshold, at most {MAX_DROPPED})"
        + (", thin white = ground truth" if any(t for *_, t in shown) else "")
        + ".</p>"
    )
    return legend + f"<div class=gallery>{''.join(figures)}</div>"


def draw(
    pixels: np.ndarray,
    dets: dict[str, np.ndarray],
    categories: Categories,
    thresholds: dict[int, float],
    truth: Record | None = None,
) -> tuple[Image.Image, int, int]:
    """Draws detections on a ``uint8 [H, W, 3]`` image, resized to :data:`THUMBNAIL`.

    Args:
        pixels: the original image (boxes are xyxy pixels of it).
        dets: ``boxes``, ``labels``, ``scores`` (schema columns).
        categories: label -> class name.
        thresholds: label -> score threshold; kept boxes are solid, boxes below it
            (down to :data:`DROPPED_SHOWN` of it) dashed.
        truth: ground truth, drawn thin and white.

    Returns:
        The picture, the number of kept boxes and of below-threshold boxes drawn.
    """
    image = Image.fromarray(pixels)
    scale = THUMBNAIL / max(image.size)
    image = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
        Image.Resampling.BILINEAR,
    )
    canvas = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=11)
    for box in truth.boxes if truth is not None else []:
        canvas.rectangle((box * scale).tolist(), outline=(255, 255, 255), width=1)
    needed = np.array([thresholds.get(int(v), np.inf) for v in dets[schema.LABELS]])
    kept = dets[schema.SCORES] >= needed
    near = ~kept & (dets[schema.SCORES] >= DROPPED_SHOWN * needed)
    dropped = [i for i in np.argsort(-dets[schema.SCORES]) if near[i]][:MAX_DROPPED]
    for i in [*dropped, *np.flatnonzero(kept)]:  # kept ones on top
        label, score = int(dets[schema.LABELS][i]), float(dets[schema.SCORES][i])
        color = COLORS[(label - 1) % len(COLORS)]
        box = (dets[schema.BOXES][i] * scale).tolist()
        if kept[i]:
            canvas.rectangle(box, outline=color, width=2)
        else:
            _dashed_rectangle(canvas, box, color)
        text = f"{categories.names[label - 1]} {score:.2f}"
        corner = (box[0], max(0.0, box[1] - 12))
        canvas.rectangle(canvas.textbbox(corner, text, font=font), fill=color)
        canvas.text(corner, text, fill=(255, 255, 255), font=font)
    return image, int(kept.sum()), len(dropped)


def _dashed_rectangle(
    canvas: ImageDraw.ImageDraw, box: list[float], color: tuple, dash: float = 4.0
) -> None:
    x0, y0, x1, y1 = box
    for a, b in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)),
                 ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):  # fmt: skip
        length = max(abs(b[0] - a[0]), abs(b[1] - a[1]))
        for t in np.arange(0.0, length, 2 * dash) / max(length, 1e-9):
            u = min(1.0, t + dash / max(length, 1e-9))
            start = (a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]))
            end = (a[0] + u * (b[0] - a[0]), a[1] + u * (b[1] - a[1]))
            canvas.line([start, end], fill=color, width=2)


def _need(value: Any, reason: str) -> Any:
    if value is None:
        raise Missing(reason)
    return value


def _jpeg(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return _data_uri(buffer.getvalue(), "jpeg")


def _data_uri(data: bytes, kind: str) -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _img(uri: str, alt: str, css: str = "") -> str:
    return f'<img class="{css}" src="{uri}" alt="{_e(alt)}">'


def _table(header: list[str], rows: list[list[Any]], caption: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(str(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><caption>{_e(caption)}</caption><tr>{head}</tr>{body}</table>"


def _note(text: str) -> str:
    return f"<p class=note>{_e(text)}</p>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666}table{border-collapse:collapse;margin:.5em 0}
caption{text-align:left;color:#666;padding-bottom:.3em}
td,th{border:1px solid #ddd;padding:.25em .7em;text-align:right}
td:first-child,th:first-child{text-align:left}
.times{min-width:60%}.barcell{width:60%}.bar{background:#4c78a8;height:.9em}
.num{white-space:nowrap}.note{background:#fff4d6;border-left:4px solid #e0a800;
padding:.5em 1em}.plot{max-width:100%;display:block;margin:.5em 0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));
gap:12px}figure{margin:0}figure img{width:100%;display:block}
figcaption{font-size:12px;color:#555;overflow-wrap:anywhere}.legend{color:#444}
"""
