"""Beyond the paper: options that may raise the student, each ablated at equal compute.

For each seed, the paper bench's run (``paper.py --part students``: teacher,
pseudo-labels, threshold, retrained student, same data and schedule: 1,000 steps x 5
images) is resumed from its work folder (``--paper-dir``) where paper.py ran there,
and trained there otherwise, so that this bench runs alone on a fresh checkout; each
option's student is compared with that seed's retrained student and with the control
(the teacher). Only the option differs:

- ``ignore_band``: pseudo-boxes scoring up to 0.2 under the threshold are ignored
  (neither object nor background) instead of being background
  (``student.ignore_band``);
- ``pseudo_augment``: the pseudo-labeled images get a wider range of training
  scales and a colour jitter (``student.pseudo_min_size``,
  ``student.pseudo_color_jitter``), the labeled ones stay as they are;
- ``paper_views``: the teacher labels with the paper's view set, its scales
  400..1200 step 100 relative to an 800-pixel training scale (here 64..192 step 16
  around the demo's 128), without the flips that digits do not allow, instead of
  the demo's 2 views (``views``);
- ``second_round``: the retrained student labels the unlabeled images (same views,
  threshold by the same heuristic) and a new student is retrained from the initial
  weights on its pseudo-labels: the student becomes the teacher.

Writes ``benchmarks/results/beyond.json``; ``benchmarks/report.py`` turns it into a
table and a plot.

    python benchmarks/beyond.py --paper-dir DIR [--seeds 0 1 2] [--iterations 1000]
                                [--options ...] [--smoke] [--results FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the paper bench's helpers

import paper  # noqa: E402

from raydd.config import Config, ViewConfig  # noqa: E402
from raydd.layout import STUDENT_DIR  # noqa: E402
from raydd.pipeline import choose_threshold  # noqa: E402
from raydd.pseudo_label import pseudo_label, read_candidates  # noqa: E402
from raydd.runtime import init_ray  # noqa: E402
from raydd.threshold import thresholds_by_label  # noqa: E402

ROOT = paper.ROOT
IGNORE_BAND = 0.2
PSEUDO_SIZES = (64, 80, 96, 112, 128, 144)  # the labeled images: 96..144
COLOR_JITTER = 0.3
# the paper's scales 400..1200 step 100 for an 800-pixel training scale, at 128
PAPER_SCALES = tuple(round(128 * s / 800) for s in range(400, 1201, 100))


def labeled(config: Config, teacher: Path, name: str) -> dict[str, Any]:
    """Pseudo-labels of ``teacher`` with ``config``'s views, written under
    ``OUTPUT_DIR/name``, and their threshold by the instances-per-image heuristic
    (an existing run's parts are reused, as the pipeline resumes)."""
    cfg = dataclasses.replace(config, output_dir=str(Path(config.output_dir) / name))
    candidates = read_candidates(pseudo_label(cfg, str(teacher)).candidates)
    found = choose_threshold(cfg, candidates)
    used = thresholds_by_label(found, cfg.threshold.per_class)
    return {"candidates": candidates, "used": used, "threshold": found.threshold}


def ignore_band(cfg: Config, seed: dict) -> dict[str, Any]:
    student = paper.under(cfg, "ignore_band", ignore_band=IGNORE_BAND)
    return paper.student_ap(student, seed["candidates"], seed["used"], seed["teacher"])


def pseudo_augment(cfg: Config, seed: dict) -> dict[str, Any]:
    student = paper.under(
        cfg,
        "pseudo_augment",
        pseudo_min_size=PSEUDO_SIZES,
        pseudo_color_jitter=COLOR_JITTER,
    )
    return paper.student_ap(student, seed["candidates"], seed["used"], seed["teacher"])


def paper_views(cfg: Config, seed: dict) -> dict[str, Any]:
    views = tuple(ViewConfig(scale=s) for s in PAPER_SCALES)
    relabeled = labeled(dataclasses.replace(cfg, views=views), seed["teacher"], "views")
    student = paper.under(cfg, "paper_views")
    result = paper.student_ap(
        student, relabeled["candidates"], relabeled["used"], seed["teacher"]
    )
    return {**result, "threshold": relabeled["threshold"], "views": len(views)}


def second_round(cfg: Config, seed: dict) -> dict[str, Any]:
    first = Path(cfg.output_dir) / "retrained" / STUDENT_DIR
    relabeled = labeled(cfg, first, "round2")
    student = paper.under(cfg, "second_round")
    result = paper.student_ap(
        student, relabeled["candidates"], relabeled["used"], seed["teacher"]
    )
    return {**result, "threshold": relabeled["threshold"]}


OPTIONS: dict[str, Callable[[Config, dict], dict[str, Any]]] = {
    "ignore_band": ignore_band,
    "pseudo_augment": pseudo_augment,
    "paper_views": paper_views,
    "second_round": second_round,
}


def paired(rows: list[dict], option: str, baseline: str) -> dict[str, float]:
    """Mean and std over seeds of ``option`` AP - ``baseline`` AP (same seed)."""
    diffs = [r[option]["AP"] - r[baseline]["AP"] for r in rows]
    std = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0
    return {"mean": float(np.mean(diffs)), "std": std, "each": diffs}


# what makes another run's seeds mergeable with this one's (``--seeds``)
SAME_BENCH = ("benchmark", "smoke", "schedule", "images", "settings", "options")


def record(
    args: argparse.Namespace,
    config: Config,
    rows: list[dict],
    options: list[str],
    seconds: float,
) -> dict[str, Any]:
    """The results file: this run's seeds so far and, with ``--seeds``, the other
    seeds of the same bench that ``--results`` holds; each option's paired
    differences over them all."""
    result = {
        "benchmark": "beyond",
        "smoke": args.smoke,
        "date": datetime.date.today().isoformat(),
        "machine": paper.machine(),
        "command": " ".join(["python benchmarks/beyond.py", *sys.argv[1:]]),
        "settings": {
            "ignore_band": IGNORE_BAND,
            "pseudo_min_size": PSEUDO_SIZES,
            "pseudo_color_jitter": COLOR_JITTER,
            "paper_views": PAPER_SCALES,
        },
        "schedule": dataclasses.asdict(config.student),
        "images": dataclasses.asdict(paper.SMOKE_SIZES if args.smoke else paper.SIZES),
        "options": options,
    }
    if args.seeds is not None:
        rows = paper.merge_seeds(result, rows, Path(args.results), SAME_BENCH)
        result["runs"][-1]["seconds"] = round(seconds, 1)
    return result | {
        "seeds": rows,
        "vs_retrained": {o: paired(rows, o, "retrained") for o in options},
        "vs_control": {o: paired(rows, o, "teacher") for o in ["retrained", *options]},
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--paper-dir",
        required=True,
        help="paper.py's --output-dir: what it holds is reused, what it lacks is made",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="default 0 1 2; given, their rows are merged with the other seeds of the "
        "same bench in --results (one seed a make target)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help=f"teacher and student steps: {paper.ITERATIONS} (smoke: "
        f"{paper.SMOKE_ITERATIONS}), as paper.py's",
    )
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, minutes")
    parser.add_argument(
        "--results", default=str(ROOT / "benchmarks/results/beyond.json")
    )
    args = parser.parse_args()
    tic = time.perf_counter()
    work = Path(args.paper_dir)
    seeds = args.seeds if args.seeds is not None else [0] if args.smoke else [0, 1, 2]
    options = args.options or list(OPTIONS)
    sizes = paper.SMOKE_SIZES if args.smoke else paper.SIZES
    paper.write_demo_dataset(work / "data", seed=0, sizes=sizes)  # as paper.py's
    config = paper.build_config(work, args.smoke, args.iterations)
    init_ray()

    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        # the paper bench's seed: teacher, pseudo-labels, threshold, retrained
        # student; resumed where paper.py ran in this folder, else trained here
        paper_row, found = paper.run_seed(config, seed, students=False)
        row = {key: paper_row[key] for key in ("seed", "teacher", "retrained")}
        for option in options:
            row[option] = OPTIONS[option](found["config"], found)
        rows.append(row)
        # written after every seed: a bench cut short keeps the seeds it finished
        result = record(args, config, rows, options, time.perf_counter() - tic)
        results.write_text(json.dumps(result, indent=2))
        paper.log(f"seed {seed} done: {len(rows)} seed(s) in {results}")
    for option, d in result["vs_retrained"].items():
        paper.log(f"{option:>15} - retrained: {d['mean'] * 100:+.2f} AP points")
    paper.log(f"total {result['seconds'] / 60:.1f} min; results: {results}")


if __name__ == "__main__":
    main()
