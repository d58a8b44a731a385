"""The HTML report: content, self-containment, missing pieces, a real browser render."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from raydd import schema
from raydd.checkpoint import save_detector
from raydd.cli import main
from raydd.config import ConfigError, parse_config, save_config
from raydd.data.coco import Categories, Record, load_coco
from raydd.models import build_model
from raydd.report import class_counts, draw, write_report
from raydd.threshold import ThresholdResult, plot_thresholds, save_threshold

HEADINGS = (
    "Summary",
    "Time per step",
    "Threshold",
    "Instances per class",
    "Pseudo-labels on unlabeled images",
    "Student on test images",
)
THRESHOLD = 0.5
# every readable unlabeled image gets these candidates (label, score); one gets none
CANDIDATES = [(1, 0.9), (1, 0.6), (2, 0.45), (3, 0.1)]


def _candidate_rows(unlabeled: Path) -> list[dict]:
    rows = []
    for i, path in enumerate(sorted(unlabeled.iterdir())):
        height, width = Image.open(path).size[::-1]
        found = CANDIDATES if i else []  # the first image: zero candidates
        boxes = [[10 + 5 * j, 10, 40 + 5 * j, 50] for j in range(len(found))]
        rows.append(
            {
                schema.PATH: str(path),
                schema.HEIGHT: height,
                schema.WIDTH: width,
                schema.ERROR: "",
                schema.BOXES: np.array(boxes, np.float32).reshape(-1, 4),
                schema.LABELS: [label for label, _ in found],
                schema.SCORES: [score for _, score in found],
            }
        )
    missing = {schema.PATH: str(unlabeled / "gone.png"), schema.HEIGHT: 0}
    missing |= {schema.WIDTH: 0, schema.ERROR: "FileNotFoundError: gone.png"}
    missing |= {schema.BOXES: np.zeros((0, 4)), schema.LABELS: [], schema.SCORES: []}
    return [*rows, missing]


def _fake_run(out: Path, demo: Path, weights: str) -> None:
    """Everything ``raydd run`` leaves, without the training: real config, real
    (untrained) checkpoints, real Parquet candidates, thresholds and summary."""
    config = parse_config(tiny_config(demo, out, weights))
    save_config(config, out / "config.yaml")
    categories = Categories.from_coco(load_coco(config.data.labeled.annotations))
    torch.manual_seed(0)
    model = build_model(config.model, categories.num_classes)
    for step in ("teacher", "student"):
        save_detector(out / step, model, config.model, categories, config={})
    (out / "candidates").mkdir()
    table = schema.candidates_table(
        _candidate_rows(demo / "unlabeled"), schema.CANDIDATES_SCHEMA
    )
    pq.write_table(table, out / "candidates" / "part-00000.parquet")
    per_class = {str(label): THRESHOLD for label in range(1, 11)}
    result = ThresholdResult(THRESHOLD, 3.0, 2.0, 3, per_class, 0.8, 0.7, 0.75)
    save_threshold(result, out)
    trials = pd.DataFrame(
        {"threshold": [0.0, 0.5, 1.0], "instances_per_image": [9, 2, 0]}
    )
    plot_thresholds(trials, result, out / "thresholds.png")
    metrics = {"AP": 0.25, "AP50": 0.5, "AP75": 0.2}
    summary = {
        "teacher": metrics,
        "teacher_views": {k: v + 0.05 for k, v in metrics.items()},
        "student": {k: v + 0.1 for k, v in metrics.items()},
        "threshold": THRESHOLD,
        "images": {"labeled": 8, "unlabeled": 11, "pseudo_labeled": 10, "errors": 1},
        "seconds": {"teacher": 20.0, "pseudo_label": 5.5, "student": 30.0},
    }
    (out / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_dir, weights) -> Path:
    out = tmp_path_factory.mktemp("run")
    _fake_run(out, demo_dir, weights)
    return out


@pytest.fixture(scope="module")
def report(run_dir) -> str:
    return write_report(run_dir).read_text()


def _images(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def test_report_has_every_section_and_no_note(report):
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in report
    assert "class=note" not in report
    assert "student − teacher" in report and "+0.1000" in report
    assert "55.5 s" in report  # total time
    assert "global threshold <b>0.500</b>" in report


def test_report_is_self_contained(report):
    assert 'src="http' not in report and "file:" not in report
    assert "<link" not in report and "<script" not in report
    sources = _images(report)
    # threshold plot, class chart, 10 unlabeled images (1 unreadable), 6 test images
    assert len(sources) == 2 + 10 + 6 == report.count("<img ")
    for source in sources:
        kind, data = re.fullmatch(r"data:image/(png|jpeg);base64,(.+)", source).groups()
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
        assert image.format.lower() == kind and min(image.size) > 50


def test_gallery_counts_kept_and_dropped(report):
    # threshold 0.5: scores 0.9, 0.6 kept; 0.45 drawn dashed; 0.1 not drawn
    unlabeled = report.split("<h2>Pseudo-labels")[1].split("<h2>Student")[0]
    assert unlabeled.count(": 2 kept, 1 below threshold</figcaption>") == 9
    assert unlabeled.count(": 0 kept, 0 below threshold</figcaption>") == 1


def test_class_counts_compare_labeled_and_pseudo():
    categories = Categories((7, 8, 9), ("a", "b", "c"))
    labeled = [Record("x", np.zeros((3, 4)), np.array([1, 1, 2]))]
    pseudo = [Record("y", np.zeros((1, 4)), np.array([3]))] * 4
    frame = class_counts(labeled, pseudo, categories, {1: 0.5, 2: 0.25})
    assert frame["class"].tolist() == ["a", "b", "c"]
    assert frame["labeled"].tolist() == [2, 1, 0]
    assert frame["pseudo"].tolist() == [0, 0, 4]
    assert frame["pseudo_per_image"].tolist() == [0.0, 0.0, 1.0]
    assert frame["threshold"].tolist()[:2] == [0.5, 0.25]


def test_draw_marks_kept_boxes_solid_and_dropped_dashed():
    pixels = np.zeros((100, 100, 3), np.uint8)
    dets = {
        schema.BOXES: np.array([[10, 10, 50, 50], [60, 60, 90, 90]], np.float32),
        schema.LABELS: np.array([1, 2]),
        schema.SCORES: np.array([0.9, 0.3], np.float32),
    }
    categories = Categories((1, 2), ("a", "b"))
    picture, kept, dropped = draw(pixels, dets, categories, {1: 0.5, 2: 0.5})
    assert (kept, dropped) == (1, 1) and picture.size == (320, 320)  # 3.2x
    lit = np.asarray(picture).max(axis=2) > 0
    assert lit[80:160, 32].all()  # the kept box's left side: solid
    dashed = lit[200:280, 190:195].any(axis=1)  # the dropped box's left side
    assert 0.3 < dashed.mean() < 0.8


def test_missing_steps_leave_notes(run_dir, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("student", "summary*"))
    page = write_report(out).read_text()
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in page
    assert (
        "no summary.json" in page and "no student/: run `raydd train-student`" in page
    )
    assert len(_images(page)) == 2 + 10  # threshold, classes, unlabeled gallery


def test_not_an_output_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not a raydd output directory"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_cli_report_prints_the_path(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert f"report: {run_dir / 'report.html'}" in capsys.readouterr().out


def test_the_evaluate_step_writes_summary_and_report(run_dir, tmp_path, monkeypatch):
    """A run made step by step ends like ``raydd run``: the evaluate step writes
    summary.json (from the earlier steps' outputs) and report.html."""
    import raydd.pipeline
    from raydd.config import load_config
    from raydd.layout import MODELS
    from raydd.steps import run_step

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / "report.html").unlink(missing_ok=True)
    (out / "steps.json").write_text(json.dumps({"teacher": 20.0}))
    old = json.loads((out / "summary.json").read_text())
    metrics = {name: old[name] for name in MODELS}
    monkeypatch.setattr(raydd.pipeline, "evaluate_all", lambda config: metrics)
    config = load_config(out / "config.yaml", [f"output_dir={out}"])
    assert "student 0.3500 (+0.1000)" in run_step(config, "evaluate")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == old["images"]  # 10 readable + 1 missing image
    assert summary["threshold"] == THRESHOLD
    assert summary["seconds"]["teacher"] == 20.0 and "evaluate" in summary["seconds"]
    assert (out / "report.html").stat().st_size > 10_000


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHECK_IMAGES = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.broken =
    images.filter(i => !i.complete || i.naturalWidth === 0).length;
});
</script></body>"""


def _headless(browser: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    return subprocess.run(
        [browser, *flags, *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(_chromium() is None, reason="no chromium (.ci/run installs it)")
def test_chromium_renders_every_image(run_dir, report, tmp_path):
    browser = _chromium()
    shot = tmp_path / "report.png"
    done = _headless(
        browser,
        f"--screenshot={shot}",
        "--window-size=1280,4000",
        (run_dir / "report.html").as_uri(),
    )
    assert shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), np.float32)
    assert pixels.std() > 20 and (pixels < 250).mean() > 0.05
    probe = tmp_path / "probe.html"
    probe.write_text(report.replace("</body>", CHECK_IMAGES))
    dom = _headless(
        browser, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()
    ).stdout
    counts = re.search(r'data-images="(\d+)" data-broken="(\d+)"', dom)
    assert counts, dom[:500]
    assert int(counts[1]) == len(_images(report)) and int(counts[2]) == 0
