"""The paper's findings, reproduced on the embedded demo (Radosavovic et al. 2018).

Writes fresh demo data (seed 0: 100 labeled, 600 unlabeled, 300 test images), then
runs raydd's own steps (teacher -> views + ensemble -> threshold -> student ->
evaluate) on the demo config's schedule (1,000 steps x 5 images), split in two parts
that each fit a `make` target of <= 150 minutes on 2 CPUs:

``--part students`` (1), per training seed (3):

1. **student vs control at equal compute**: the teacher, trained to the end of its
   schedule on the labeled images, is the labeled-only control of the student
   retrained from the initial weights on the same schedule (the paper's protocol);
   the student fine-tuned from the teacher for half that schedule is compared with
   the teacher trained the same extra steps on labeled images only (its control):
   COCO AP/AP50/AP75 on the test split, mean ± std and paired differences. The
   teacher's test AP every 250 steps shows how far from converged it is.

``--part sweeps``, on seed 0 (the retrained student is the 100% / heuristic / 0.6
point of each):

2. **unlabeled data quantity**: 0, 25, 50 and 100% of the pseudo-labeled images
   (nested random subsets), same labeled set and schedule;
3. **views**: the teacher with the identity only, + flip, + scales, + both: AP, and
   images/s of the model-holding stage (:class:`raydd.inference.Predictor`);
4. **threshold**: the student at fixed score thresholds vs at the instances-per-image
   heuristic's threshold, with the pseudo-instances per image each leaves;
5. **labeled share** of every minibatch: 0.4 / 0.6 / 0.8.

``--part teachers``: the teachers alone, scored every 250 steps, e.g. on a longer
schedule (``--iterations 2000``): does the 1,000-step teacher leave AP on the table?

At 1,000 steps the student draws 2,000 pseudo-labeled images: each of the 600 is
seen 3.3 times. Writes ``benchmarks/results/paper.json`` (students) or
``paper_sweeps.json``; ``benchmarks/report.py`` turns them into tables and plots.
``--smoke`` runs with tiny sizes (one seed, one point per sweep) in minutes.
``--seed N`` runs one seed and merges its row into the results file's other seeds
of the same bench, so that longer schedules fit one seed a ``make`` target (e.g. the
students at 2,000 steps: ``make bench-paper-2000``).

    python benchmarks/paper.py [--part students|sweeps|teachers|all] [--smoke]
                               [--seeds 3 | --seed N] [--iterations 1000]
                               [--output-dir DIR] [--results FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from raydd.config import Config, ViewConfig, load_config, single_view
from raydd.data.coco import image_paths
from raydd.data.demo import DemoSizes, data_overrides, write_demo_dataset
from raydd.evaluate import METRICS, evaluate_checkpoint
from raydd.inference import Predictor
from raydd.layout import TEACHER_DIR, TENSORBOARD_DIR
from raydd.models import offline_mobilenet_v2_weights
from raydd.pipeline import choose_threshold
from raydd.pseudo_label import pseudo_label, read_candidates
from raydd.runtime import init_ray
from raydd.sources import load_batch
from raydd.student import pseudo_records, train_control, train_student
from raydd.teacher import train_teacher
from raydd.threshold import thresholds_by_label
from raydd.train import read_scalars

ROOT = Path(__file__).resolve().parents[1]

# The demo config's schedule (configs/demo.yaml): teacher and student 1,000 steps of
# 5 images (the student's 3 labeled + 2 pseudo-labeled, the paper's 6:4), so the
# teacher is the student's equal-compute control. Earlier benches ran 320 steps
# (far from converged: on labeled images only 320 steps scored AP 0.161, 1280 steps
# 0.241-0.250 with 30 labeled images) and gave the student -0.2 +/- 0.9 AP.
ITERATIONS = 1000
FINE_TUNE = 0.5  # the fine-tuned student's steps, a fraction of the schedule
EVAL_EVERY = 250  # the teacher's test AP along its schedule (convergence)


def schedule(iterations: int = ITERATIONS, eval_every: int = EVAL_EVERY) -> list[str]:
    """Config overrides: teacher and student both ``iterations`` steps of 5 images;
    the teacher scored on the test split every ``eval_every`` steps."""
    return [
        f"{role}.{key}={value}"
        for role in ("teacher", "student")
        for key, value in (
            ("iterations", iterations),
            ("batch_size", 5),
            ("eval_every", eval_every if role == "teacher" else 0),
            ("checkpoint_every", iterations),
        )
    ]


SMOKE_ITERATIONS = 2
SMOKE_OVERRIDES = ["threshold.num_samples=6"]
# The demo's labeled, test and validation sets; 600 of its unlabeled images, so that
# the student sees each one >= 3 times in 1,000 steps (the demo's 2,000: once).
SIZES = DemoSizes(unlabeled=600)
SMOKE_SIZES = DemoSizes(labeled=8, unlabeled=10, test=6, validation=6)

FRACTIONS = (0.0, 0.25, 0.5)  # of the unlabeled images; 100% is the seed-0 student
THRESHOLDS = (0.2, 0.7)  # fixed thresholds next to the heuristic's
SHARES = (0.4, 0.8)  # labeled share; 0.6 is the seed-0 student
# smoke: the empty pseudo set (0%) trains a student; the threshold and share sweeps
# hold only the seed-0 student (their code paths run, no extra training)
SMOKE_SWEEPS = {"fractions": (0.0,), "thresholds": (), "shares": ()}


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}"


def log(message: str) -> None:
    print(f"[paper {time.strftime('%H:%M:%S')}] {message}", flush=True)


def under(config: Config, name: str, **student: Any) -> Config:
    """``config`` writing under ``OUTPUT_DIR/name``, with student fields replaced."""
    return dataclasses.replace(
        config,
        output_dir=str(Path(config.output_dir) / name),
        student=dataclasses.replace(config.student, **student),
    )


def seeded(config: Config, seed: int) -> Config:
    return dataclasses.replace(
        config,
        output_dir=str(Path(config.output_dir) / f"seed{seed}"),
        teacher=dataclasses.replace(config.teacher, seed=seed),
        student=dataclasses.replace(config.student, seed=seed),
    )


def evaluate(config: Config, checkpoint: Path, views: Sequence[ViewConfig]) -> dict:
    return evaluate_checkpoint(
        str(checkpoint), config.data.test, views, config.ensemble, config.inference
    )


def student_ap(
    config: Config,
    candidates: pd.DataFrame,
    thresholds: dict[int, float],
    teacher: Path,
) -> dict[str, Any]:
    """Trains one student and scores it (one view, like the teacher)."""
    tic = time.perf_counter()
    checkpoint = train_student(config, candidates, thresholds, str(teacher))
    metrics = evaluate(config, checkpoint, single_view(config))
    pseudo = pseudo_records(candidates, thresholds)
    result = {
        **metrics,
        "pseudo_images": len(pseudo),
        "pseudo_instances_per_image": (
            sum(len(r.labels) for r in pseudo) / len(pseudo) if pseudo else 0.0
        ),
        "seconds": round(time.perf_counter() - tic, 1),
    }
    name = Path(config.output_dir).name
    log(f"{name}: AP {metrics['AP']:.4f} ({result['seconds']} s)")
    return result


def view_sets(config: Config) -> dict[str, list[ViewConfig]]:
    """Identity, + flip, + the configured scales, + both (each scale flipped too)."""
    plain = list(single_view(config))
    scales = [v for v in config.views if v.scale != plain[0].scale or v.hflip]
    scaled = plain + [dataclasses.replace(v, hflip=False) for v in scales]
    flipped = [dataclasses.replace(v, hflip=True) for v in scaled]
    return {
        "identity": plain,
        "+ flip": plain + flipped[:1],
        "+ scales": scaled,
        "+ flip + scales": [
            v for pair in zip(scaled, flipped, strict=True) for v in pair
        ],
    }


def views_cost(
    config: Config, checkpoint: Path, views: list[ViewConfig], paths: list[str]
) -> float:
    """Images/s of the model-holding stage with ``views`` on this process's CPUs/GPU
    (after one untimed warm-up batch; decoding not counted)."""
    predictor = Predictor(
        str(checkpoint), views, config.ensemble, num_threads=os.cpu_count() or 1
    )
    size = config.inference.batch_size
    batches = [
        load_batch({"path": np.asarray(paths[i : i + size], dtype=object)})
        for i in range(0, len(paths), size)
    ]
    predictor(batches[0])
    tic = time.perf_counter()
    for batch in batches:
        predictor(batch)
    return len(paths) / (time.perf_counter() - tic)


def mean_std(rows: list[dict], key: str) -> dict[str, dict[str, float]]:
    return {
        m: {
            "mean": float(np.mean([r[key][m] for r in rows])),
            "std": float(np.std([r[key][m] for r in rows], ddof=1))
            if len(rows) > 1
            else 0.0,
        }
        for m in METRICS
    }


def teacher_curve(config: Config) -> list[dict[str, float]]:
    """The teacher's test AP at each in-training evaluation (TensorBoard events)."""
    log_dir = Path(config.output_dir) / TENSORBOARD_DIR / TEACHER_DIR
    points = read_scalars(str(log_dir)).get("test/AP", [])
    return [{"step": step, "AP": value} for step, _, value in points]


def fine_tuning(config: Config, fraction: float = FINE_TUNE) -> dict[str, Any]:
    """Student fields: from the teacher, ``fraction`` of the student's steps."""
    steps = max(1, round(config.student.iterations * fraction))
    return {"init": "teacher", "iterations": steps, "checkpoint_every": steps}


def control_ap(config: Config, teacher: Path) -> dict[str, Any]:
    """Trains the student's schedule on labeled images only and scores it."""
    tic = time.perf_counter()
    checkpoint = train_control(config, str(teacher))
    metrics = evaluate(config, checkpoint, single_view(config))
    seconds = round(time.perf_counter() - tic, 1)
    log(f"{Path(config.output_dir).name}: AP {metrics['AP']:.4f} ({seconds} s)")
    return {**metrics, "seconds": seconds}


ARMS = ("teacher", "teacher_views", "retrained", "fine_tuned", "fine_tuned_control")
SAME_BENCH = ("benchmark", "part", "smoke", "schedule", "images", "views")


def merge_seeds(
    record: dict, rows: list[dict], results: Path, same: Sequence[str] = SAME_BENCH
) -> list[dict]:
    """``rows`` and the other seeds' rows of ``results``, when that file holds the
    same bench (its ``same`` keys: part, schedule, data, views): one seed a ``make``
    target. Notes in ``record`` which runs the seeds come from."""
    earlier = json.loads(results.read_text()) if results.exists() else {}
    written = json.loads(json.dumps(record))  # as the file holds it (tuples: lists)
    if any(earlier.get(key) != written.get(key) for key in same):
        if earlier:
            log(f"{results} holds another bench: its seeds are not merged")
        earlier = {}
    new = {row["seed"] for row in rows}
    kept = [row for row in earlier.get("seeds", []) if row["seed"] not in new]
    runs = [run for run in earlier.get("runs", []) if not set(run["seeds"]) <= new]
    record["runs"] = [*runs, {"seeds": sorted(new), "command": record["command"]}]
    if kept:
        seeds = ", ".join(str(r["seed"]) for r in kept)
        record["note"] = (
            f"seed{'s' * (len(kept) > 1)} {seeds} from earlier runs (`runs`), "
            f"the same command with another --seed"
        )
    return sorted(kept + rows, key=lambda row: row["seed"])


def teacher_row(cfg: Config, seed: int) -> tuple[dict, Path]:
    """Trains (or resumes) the seed's teacher: its test AP at the end and along its
    schedule, and where its checkpoint is."""
    tic = time.perf_counter()
    teacher = train_teacher(cfg)
    row = {
        "seed": seed,
        "teacher": evaluate(cfg, teacher, single_view(cfg)),
        "teacher_curve": teacher_curve(cfg),
        "teacher_seconds": round(time.perf_counter() - tic, 1),
    }
    log(f"seed {seed}: teacher AP {row['teacher']['AP']:.4f}")
    return row, teacher


def run_seed(config: Config, seed: int, students: bool) -> tuple[dict, dict]:
    """One seed's teacher, pseudo-labels and retrained student, and with
    ``students`` the fine-tuned student and its control; returns the seed's row and
    what the sweeps reuse."""
    cfg = seeded(config, seed)
    row, teacher = teacher_row(cfg, seed)
    labeling = pseudo_label(cfg, str(teacher))
    candidates = read_candidates(labeling.candidates)
    threshold = choose_threshold(cfg, candidates)
    used = thresholds_by_label(threshold, cfg.threshold.per_class)
    row |= {
        "teacher_views": evaluate(cfg, teacher, cfg.views),
        "threshold": threshold.threshold,
        "pseudo_label_seconds": round(labeling.seconds, 1),
    }
    log(
        f"seed {seed}: teacher with views AP {row['teacher_views']['AP']:.4f}, "
        f"threshold {threshold.threshold:.3f}"
    )
    row["retrained"] = student_ap(
        under(cfg, "retrained", init="pretrained"), candidates, used, teacher
    )
    if students:
        tuned = fine_tuning(cfg)
        row["fine_tuned"] = student_ap(
            under(cfg, "fine_tuned", **tuned), candidates, used, teacher
        )
        row["fine_tuned_control"] = control_ap(
            under(cfg, "fine_tuned_control", **tuned), teacher
        )
    reuse = {
        "config": cfg,
        "teacher": teacher,
        "candidates": candidates,
        "used": used,
        "threshold": threshold,
    }
    return row, reuse


def quantity(seed0: dict, retrained: dict, fractions: Sequence[float]) -> list[dict]:
    """Experiment 2: nested random subsets of the pseudo-labeled images."""
    cfg, candidates = seed0["config"], seed0["candidates"]
    order = np.random.default_rng(0).permutation(len(candidates))
    points = [{"fraction": 1.0, **retrained}]
    for fraction in fractions:
        subset = candidates.iloc[order[: round(fraction * len(candidates))]]
        result = student_ap(
            under(cfg, f"unlabeled_{fraction:g}"),
            subset,
            seed0["used"],
            seed0["teacher"],
        )
        points.append({"fraction": fraction, **result})
    return sorted(points, key=lambda p: p["fraction"])


def threshold_sweep(
    seed0: dict, retrained: dict, thresholds: Sequence[float]
) -> dict[str, Any]:
    """Experiment 4: the student at fixed thresholds vs the heuristic's."""
    cfg, found = seed0["config"], seed0["threshold"]
    points = [{"threshold": found.threshold, "heuristic": True, **retrained}]
    for t in thresholds:
        used = {label: t for label in seed0["used"]}
        result = student_ap(
            under(cfg, f"threshold_{t:g}"),
            seed0["candidates"],
            used,
            seed0["teacher"],
        )
        points.append({"threshold": t, "heuristic": False, **result})
    return {
        "heuristic": found.threshold,
        "labeled_instances_per_image": found.labeled_instances_per_image,
        "points": sorted(points, key=lambda p: p["threshold"]),
    }


def labeled_share(seed0: dict, retrained: dict, shares: Sequence[float]) -> list:
    """Experiment 5: the labeled share of every minibatch."""
    cfg = seed0["config"]
    points = [{"share": cfg.student.labeled_share, **retrained}]
    for share in shares:
        result = student_ap(
            under(cfg, f"share_{share:g}", labeled_share=share),
            seed0["candidates"],
            seed0["used"],
            seed0["teacher"],
        )
        points.append({"share": share, **result})
    return sorted(points, key=lambda p: p["share"])


def views_ablation(seed0: dict) -> list[dict]:
    """Experiment 3: AP and cost of each set of views (the seed-0 teacher)."""
    cfg, teacher = seed0["config"], seed0["teacher"]
    paths = image_paths(cfg.data.test)[:96]
    rows = []
    for name, views in view_sets(cfg).items():
        metrics = evaluate(cfg, teacher, views)
        speed = views_cost(cfg, teacher, views, paths)
        rows.append(
            {
                "name": name,
                "views": [dataclasses.asdict(v) for v in views],
                **metrics,
                "images_per_s": speed,
            }
        )
        log(f"views {name}: AP {metrics['AP']:.4f}, {speed:.1f} images/s")
    return rows


def build_config(work: Path, smoke: bool, iterations: int | None = None) -> Config:
    """The bench's config: the demo's, on the data in ``work/data``, writing
    under ``work/output``, with the bench schedule (``iterations`` steps)."""
    overrides = [
        *data_overrides(work / "data"),
        f"output_dir={work / 'output'}",
        f"model.backbone_weights={offline_mobilenet_v2_weights()}",
    ]
    iterations = iterations or (SMOKE_ITERATIONS if smoke else ITERATIONS)
    steps = schedule(iterations, 1 if smoke else EVAL_EVERY)
    steps += SMOKE_OVERRIDES if smoke else []
    return load_config(ROOT / "configs/demo.yaml", overrides + steps)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part",
        choices=("students", "sweeps", "teachers", "all"),
        default="students",
        help="students: 3 seeds of control / retrained / fine-tuned (experiment 1);"
        " sweeps: seed 0 and experiments 2-5; teachers: the teachers alone, scored"
        " along their schedule (is --iterations enough to converge?); all: students"
        " and sweeps (smoke tests)",
    )
    parser.add_argument(
        "--no-fine-tune",
        action="store_true",
        help="students part without the fine-tuned student and its control"
        " (about 10 minutes less a seed)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, minutes")
    parser.add_argument(
        "--seeds", type=int, default=None, help="students: 3, teachers: 1, smoke: 1"
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help=f"teacher and student steps: {ITERATIONS} (smoke: {SMOKE_ITERATIONS})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="students or teachers: this seed only, its row merged with the other"
        " seeds of the results file when that holds the same bench (one seed a make"
        " target)",
    )
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--results", default=None, help="default: results/paper*.json")
    args = parser.parse_args()
    if args.seed is not None and args.part not in ("students", "teachers"):
        parser.error("--seed is for --part students or teachers")
    students = args.part in ("students", "all")
    if args.part == "sweeps":
        seeds = 1
    else:
        seeds = args.seeds or (1 if args.smoke or args.part == "teachers" else 3)
    sweeps = (
        SMOKE_SWEEPS
        if args.smoke
        else {"fractions": FRACTIONS, "thresholds": THRESHOLDS, "shares": SHARES}
    )
    name = {"sweeps": "paper_sweeps.json", "teachers": "paper_teachers.json"}.get(
        args.part, "paper.json"
    )
    results = Path(args.results or ROOT / "benchmarks/results" / name)

    tic = time.perf_counter()
    work = Path(args.output_dir or tempfile.mkdtemp(prefix="raydd-paper-"))
    sizes = SMOKE_SIZES if args.smoke else SIZES
    write_demo_dataset(work / "data", seed=0, sizes=sizes)
    config = build_config(work, args.smoke, args.iterations)
    init_ray()

    rows, seed0 = [], None
    for seed in [args.seed] if args.seed is not None else range(seeds):
        if args.part == "teachers":
            rows.append(teacher_row(seeded(config, seed), seed)[0])
            continue
        row, reuse = run_seed(config, seed, students and not args.no_fine_tune)
        rows.append(row)
        seed0 = seed0 or reuse
    record = {
        "benchmark": "paper",
        "part": args.part,
        "smoke": args.smoke,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "command": " ".join(["python benchmarks/paper.py", *sys.argv[1:]]),
        "schedule": {
            "teacher": dataclasses.asdict(config.teacher),
            "student": dataclasses.asdict(config.student),
            "fine_tuned": fine_tuning(config),
        },
        "images": dataclasses.asdict(sizes),
        "views": [dataclasses.asdict(v) for v in config.views],
    }
    if args.seed is not None:
        rows = merge_seeds(record, rows, results)
    arms = [arm for arm in ARMS if all(arm in row for row in rows)]
    record |= {"seeds": rows, "summary": {key: mean_std(rows, key) for key in arms}}
    if args.part in ("sweeps", "all"):
        retrained = rows[0]["retrained"]
        record["quantity"] = quantity(seed0, retrained, sweeps["fractions"])
        record["views_ablation"] = views_ablation(seed0)
        record["threshold"] = threshold_sweep(seed0, retrained, sweeps["thresholds"])
        record["labeled_share"] = labeled_share(seed0, retrained, sweeps["shares"])
    record["seconds"] = round(time.perf_counter() - tic, 1)  # this run's
    if "runs" in record:  # each seed's run; a resumed run counts only its resume
        record["runs"][-1]["seconds"] = record["seconds"]
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(record, indent=2))
    s = record["summary"]
    for key in s:
        log(f"{key:>18}: AP {s[key]['AP']['mean']:.4f} ± {s[key]['AP']['std']:.4f}")
    if "retrained" in s:
        gain = s["retrained"]["AP"]["mean"] - s["teacher"]["AP"]["mean"]
        log(f"student - control (the teacher): {gain:+.4f} AP over {len(rows)} seed(s)")
    log(f"total {record['seconds'] / 60:.1f} min; results: {results}")


if __name__ == "__main__":
    main()
