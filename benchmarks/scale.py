"""The data plane at scale: driver memory and time for 10^4..10^6 unlabeled inputs.

Small real images (320 JPEG crops, 32-64 px, of the demo canvases) are stored the
two ways a crawl is: WebDataset tars of 1,000 samples (``KEY.jpg`` + ``KEY.json``;
hard links to ten distinct tars, each under its own name, so each is its own
source and part) and a sharded manifest (Parquet files of 10,000 ``uri`` rows, each
naming a pool file drawn at random). For each size and format a *fresh driver
process* starts Ray (2 CPUs) and runs :func:`raydd.pseudo_label.label_sources`; it
reports its own peak RSS (``VmHWM``: the driver alone, not Ray's processes), the
seconds from the call to the first part written and to the end, and the CPU
seconds of the driver and every Ray process under it (work done, whatever else
loads the machine).

The model stage is **FixedBoxes**, in this benchmark only: two fixed boxes per
readable image, so the data plane itself (plan, read, decode, batch, write) is
measured. One row with the real teacher (an untrained Faster R-CNN MobileNetV2-FPN,
2 views, 128 px) gives its images/s and the ratio. Planning a 10^8-row manifest (100
Parquet files of 10^6 distinct URIs): the driver's part (``sources`` + one
``list_parts`` pass: all it does before labeling starts) in a fresh process, then
the cluster's (``plan_source`` over every file; the image rows counted, not kept),
then ``list_parts`` again (a resumed run's start: one row per part).

Targets: driver RSS at 10^6 < 1.2x at 10^4; first part in < 30 s at any size;
the 10^8-row manifest planned by the driver in < 60 s and < 1 GB; data plane
>= 500 images/s per core. Writes ``benchmarks/results/scale.json``.

    python benchmarks/scale.py [--smoke] [--sizes N ...] [--formats tars manifest]
        [--teacher-images N] [--plan-rows N] [--batch-size B] [--work DIR]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import io
import json
import os
import platform
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image

from raydd import schema
from raydd.checkpoint import MODEL_FILE, save_detector
from raydd.config import parse_config
from raydd.data.coco import Categories
from raydd.data.demo import DemoSizes, smoke_config, write_demo_dataset
from raydd.models import build_model, offline_mobilenet_v2_weights
from raydd.pseudo_label import label_sources, labeling_settings, list_parts
from raydd.shards import index_parts, read_parts
from raydd.sources import plan_source, sources

ROOT = Path(__file__).resolve().parents[1]
CPUS = 2
PER_TAR, PER_MANIFEST, PER_PLAN_FILE = 1_000, 10_000, 1_000_000
VIEWS = [{}, {"hflip": True}]  # the real teacher's; FixedBoxes ignores them
FIXED, TEACHER = "FixedBoxes", "teacher"
FORMATS = ("tars", "manifest")
NOT_WRITTEN = (schema.IMAGE, "bytes", "data")  # Predictor's columns left out


class FixedBoxes:
    """Benchmark-only stand-in for :class:`raydd.inference.Predictor` (same
    constructor and batch contract): two fixed boxes, labels and scores per
    readable image, none for an unreadable one; pass-through columns kept."""

    DETECTIONS = {
        schema.BOXES: np.array([[1, 1, 9, 9], [2, 4, 20, 30]], np.float32),
        schema.LABELS: np.array([1, 2], np.int64),
        schema.SCORES: np.array([0.9, 0.4], np.float32),
    }

    def __init__(self, checkpoint: str, views, ensemble, **_: Any) -> None:
        self.schema = schema.candidates_schema()

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        keys = (schema.PATH, schema.HEIGHT, schema.WIDTH, schema.ERROR)
        rows = [
            {k: batch[k][i] for k in keys}
            | (schema.empty_detections() if error else self.DETECTIONS)
            for i, error in enumerate(batch[schema.ERROR])
        ]
        table = schema.candidates_table(rows, self.schema)
        for name, column in batch.items():  # as Predictor: part, index, part_rows
            if name not in table.column_names and name not in NOT_WRITTEN:
                table = table.append_column(name, pa.array(column))
        return table


# ---- [2] in the fresh driver process ----------------------------------------------


def _peak_mb() -> float:
    """This process's peak RSS (``ru_maxrss`` would count the RSS of the parent
    this process was forked from)."""
    status = Path("/proc/self/status").read_text()
    return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)


def _cpu_seconds() -> float:
    """CPU seconds of this process and every live process below it (Ray's)."""
    children: dict[int, list[int]] = {}
    used: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        # utime, stime, cutime, cstime
        used[int(stat.parent.name)] = sum(map(int, fields[11:15]))
    tree, todo = [], [os.getpid()]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return sum(used.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def _label(spec: dict[str, Any], config: Any) -> dict[str, Any]:
    after_init, cpu = _peak_mb(), _cpu_seconds()
    stage = FixedBoxes if spec["model"] == FIXED else None
    found = sources(config.data.unlabeled)
    result = label_sources(
        found, spec["checkpoint"], config, spec["out"], model_stage=stage
    )
    cpu, peak = _cpu_seconds() - cpu, _peak_mb()  # before reading the outputs back
    paths = read_parts(index_parts(spec["out"]), [schema.PATH]).column(0)
    images = result.images
    return {
        "first_part_s": round(result.first_part_seconds or 0.0, 1),
        "seconds": round(result.seconds, 1),
        "images_per_s": round(images / result.seconds, 1),
        "images_per_s_per_core": round(images / result.seconds / CPUS, 1),
        "images_per_cpu_s": round(images / cpu, 1),
        "cpu_s": round(cpu, 1),
        "driver_peak_mb": peak,
        "after_ray_init_mb": after_init,
        "parts": result.written_parts + result.skipped_parts,
        "rows": len(paths),
        "distinct_paths": pc.count_distinct(paths).as_py(),
        "errors": len(result.errors),
    }


def _plan_and_count(batch: dict[str, Any], **plan: Any) -> dict[str, Any]:
    """The cluster side of planning: ``plan_source``'s image rows, counted."""
    return {"rows": [sum(len(b[schema.PATH]) for b in plan_source(batch, **plan))]}


def _plan(spec: dict[str, Any], config: Any) -> dict[str, Any]:
    split = config.data.unlabeled
    plan = dict(  # as label_sources makes it
        settings=labeling_settings(spec["checkpoint"], config),
        directory=spec["out"],
        shard_size=split.shard_size,
        column=split.column,
        root=split.root,
    )
    tic = time.perf_counter()
    found = sources(split)
    list_parts(found, plan)
    record = {"sources": len(found), "driver_s": time.perf_counter() - tic}
    record["driver_peak_mb"], tic = _peak_mb(), time.perf_counter()
    record["rows"] = (
        ray.data.from_items(found, override_num_blocks=len(found))
        .map_batches(_plan_and_count, fn_kwargs=plan, batch_size=1, num_cpus=0.5)
        .sum("rows")
    )
    record["cluster_s"], tic = time.perf_counter() - tic, time.perf_counter()
    record["parts"] = len(list_parts(found, plan))
    record["list_parts_s"] = time.perf_counter() - tic
    record["list_parts_peak_mb"] = _peak_mb()
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in record.items()}


def _child(spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """Runs ``spec`` in a fresh driver process that starts its own Ray; its record
    comes back in a file (Ray forwards its workers' output to the driver's)."""
    spec = {**spec, "record": str(log.with_suffix(".child.json"))}
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    env = {**os.environ, "RAY_ADDRESS": ""}  # never join a running cluster
    tic = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{spec['kind']} failed:\n{log.read_text()[-4000:]}")
    record = json.loads(Path(spec["record"]).read_text())
    return {**record, "process_s": round(time.perf_counter() - tic, 1)}


# ---- [1] inputs -------------------------------------------------------------------


def _pool(canvases: Path, out: Path, count: int = 320) -> list[str]:
    """``count`` JPEG crops (32-64 px squares) of the demo canvases."""
    out.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    images = [Image.open(p).convert("RGB") for p in sorted(canvases.glob("*.png"))]
    for i in range(count):
        image, side = images[i % len(images)], int(rng.integers(32, 65))
        x, y = rng.integers(0, image.width - side, 2)
        image.crop((x, y, x + side, y + side)).save(out / f"{i:04d}.jpg", quality=90)
    return sorted(str(p) for p in out.glob("*.jpg"))


def _distinct_tars(pool: list[str], out: Path, count: int = 10) -> list[Path]:
    """``count`` WebDataset tars of :data:`PER_TAR` samples (``.jpg`` + ``.json``)."""
    out.mkdir(exist_ok=True)
    for t in range(count):
        with tarfile.open(out / f"{t}.tar", "w") as tar:
            for k in range(PER_TAR):
                image = Path(pool[(t * PER_TAR + k) % len(pool)])
                meta = json.dumps({"source": image.name}).encode()
                for suffix, data in ((".jpg", image.read_bytes()), (".json", meta)):
                    info = tarfile.TarInfo(f"{k:06d}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return sorted(out.glob("*.tar"))


def _tars(distinct: list[Path], n: int, out: Path) -> str:
    out.mkdir()
    for i in range(n // PER_TAR):
        os.link(distinct[i % len(distinct)], out / f"shard-{i:06d}.tar")
    return str(out / "*.tar")


def _manifest(uris: Callable, n: int, out: Path, per_file: int = PER_MANIFEST) -> str:
    """Parquet files of ``per_file`` ``uri`` rows: ``uris(start, rows)``."""
    out.mkdir()
    for i, start in enumerate(range(0, n, per_file)):
        column = uris(start, min(per_file, n - start))
        pq.write_table(pa.table({"uri": column}), out / f"part-{i:05d}.parquet")
    return str(out / "*.parquet")


def _crawl_uris(start: int, rows: int) -> pa.Array:
    """Distinct URIs of a crawl (never read: only planned)."""
    ids = pa.array(np.arange(start, start + rows)).cast(pa.string())
    return pc.binary_join_element_wise("s3://crawl/images/", ids, ".jpg", "")


def _checkpoints(work: Path, config: dict[str, Any], teacher: bool) -> dict[str, str]:
    fixed = work / "fixed_boxes"  # FixedBoxes loads nothing; the digest needs a file
    fixed.mkdir(exist_ok=True)
    (fixed / MODEL_FILE).write_bytes(b"FixedBoxes: no weights")
    if not teacher:
        return {FIXED: str(fixed)}
    torch.manual_seed(0)
    model_config = parse_config(config).model
    model = build_model(model_config, num_classes=11)
    categories = Categories(tuple(range(1, 11)), tuple(map(str, range(10))))
    save_detector(work / TEACHER, model, model_config, categories)
    return {FIXED: str(fixed), TEACHER: str(work / TEACHER)}


# ---- [3] the benchmark ------------------------------------------------------------


def _measure(args: argparse.Namespace, work: Path) -> tuple[list[dict], dict | None]:
    sizes = DemoSizes(labeled=1, unlabeled=20, test=1, validation=1)
    demo = write_demo_dataset(work / "demo", sizes=sizes)
    pool = _pool(demo / "unlabeled", work / "pool")
    distinct = _distinct_tars(pool, work / "distinct")
    base = smoke_config(demo, work / "out", offline_mobilenet_v2_weights())
    base.update(views=VIEWS, inference={"batch_size": args.batch_size})
    checkpoints = _checkpoints(work, base, args.teacher_images > 0)

    def run(name: str, kind: str, model: str, inputs: Callable[[Path], str]) -> dict:
        """The record of one fresh driver, kept in ``work`` (a rerun skips it)."""
        if not (record := work / f"{name}.json").exists():
            for folder in (work / name, work / f"{name}-out"):
                shutil.rmtree(folder, ignore_errors=True)
            unlabeled = {"images": inputs(work / name), "shard_size": PER_TAR}
            config = {**base, "data": {**base["data"], "unlabeled": unlabeled}}
            spec = dict(kind=kind, model=model, checkpoint=checkpoints[model])
            spec |= dict(config=config, out=str(work / f"{name}-out"))
            record.write_text(json.dumps(_child(spec, work / f"{name}.log")))
        print(name, record.read_text(), flush=True)
        return json.loads(record.read_text())

    def draws(start: int, rows: int) -> np.ndarray:  # every part a distinct list
        return np.random.default_rng(start).choice(pool, rows)

    jobs = [(n, f, FIXED) for n in args.sizes for f in args.formats]
    jobs += [(args.teacher_images, "tars", TEACHER)] * (args.teacher_images > 0)
    runs = []
    for n, kind, model in jobs:
        if kind == "tars":
            inputs = functools.partial(_tars, distinct, n)
        else:
            inputs = functools.partial(_manifest, draws, n)
        record = run(f"{model}-{kind}-{n}", "label", model, inputs)
        runs.append({"format": kind, "images": n, "model": model, **record})
    if not args.plan_rows:
        return runs, None
    crawl = functools.partial(
        _manifest, _crawl_uris, args.plan_rows, per_file=PER_PLAN_FILE
    )
    planned = run(f"plan-{args.plan_rows}", "plan", FIXED, crawl)
    shutil.rmtree(work / f"plan-{args.plan_rows}", ignore_errors=True)  # GBs of URIs
    return runs, {"rows_in": args.plan_rows, **planned}


def _targets(runs: list[dict], planned: dict | None) -> dict[str, bool]:
    """Each target (named with what was measured) -> met."""
    targets = {}
    for kind in dict.fromkeys(r["format"] for r in runs if r["model"] == FIXED):
        mine = [r for r in runs if r["model"] == FIXED and r["format"] == kind]
        small, large = mine[0], mine[-1]  # sizes ascending
        ratio = large["driver_peak_mb"] / small["driver_peak_mb"]
        if large["images"] > small["images"]:
            name = f"{kind}: driver RSS at {large['images']:,} < 1.2x at"
            targets[f"{name} {small['images']:,} ({ratio:.2f}x)"] = ratio < 1.2
        speed = large["images_per_s_per_core"]
        name = f"{kind}: >= 500 images/s per core at {large['images']:,}"
        targets[f"{name} ({speed:.0f})"] = speed >= 500
    slowest = max(r["first_part_s"] for r in runs if r["model"] == FIXED)
    targets[f"first part < 30 s at any size (at most {slowest} s)"] = slowest < 30
    if planned:
        s, mb = planned["driver_s"], planned["driver_peak_mb"]
        name = f"{planned['rows_in']:,}-row manifest planned < 60 s and < 1 GB"
        targets[f"{name} ({s} s, {mb:.0f} MB)"] = s < 60 and mb < 1024
    return targets


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--smoke", action="store_true", help="1,000 and 10,000 tars only (a test)")
    add("--sizes", type=int, nargs="+", help="default 10^4 10^5 10^6")
    add("--formats", nargs="+", help="default tars manifest", choices=FORMATS)
    add("--teacher-images", type=int, help="the real teacher's row (0: none)")
    add("--plan-rows", type=int, help="rows of the manifest to plan (0: none)")
    add("--batch-size", type=int, default=64, help="inference.batch_size")
    add("--work", help="keep inputs and records there: a rerun skips what is done")
    add("--results", default=str(ROOT / "benchmarks/results/scale.json"))
    add("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    smoke = {"sizes": [1_000, 10_000], "formats": ["tars"]}
    smoke |= {"teacher_images": 0, "plan_rows": 0}
    full = {"sizes": [10**4, 10**5, 10**6], "formats": list(FORMATS)}
    full |= {"teacher_images": 10**4, "plan_rows": 10**8}
    for key, value in (smoke if args.smoke else full).items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.sizes = sorted(args.sizes)
    if any(n % PER_TAR for n in [*args.sizes, args.teacher_images]):
        parser.error(f"sizes are multiples of {PER_TAR} (images per tar)")
    return args


def main() -> None:
    args = _arguments()
    if args.child:  # [2]: a fresh driver
        spec = json.loads(args.child)
        ray.init(num_cpus=CPUS, include_dashboard=False)
        config = parse_config(spec["config"])
        record = (_label if spec["kind"] == "label" else _plan)(spec, config)
        Path(spec["record"]).write_text(json.dumps(record))
        return
    if args.work is not None:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        runs, planned = _measure(args, Path(args.work))
    else:
        with tempfile.TemporaryDirectory() as work:
            runs, planned = _measure(args, Path(work))
    teacher = [r for r in runs if r["model"] == TEACHER]
    fixed = [r for r in runs if r["model"] == FIXED and r["format"] == "tars"]
    fixed = [r for r in fixed if teacher and r["images"] == teacher[0]["images"]]
    record = {
        "benchmark": "scale",
        "smoke": args.smoke,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "command": " ".join(["python benchmarks/scale.py", *sys.argv[1:]]),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "ray_cpus": CPUS,
        "batch_size": args.batch_size,
        "runs": runs,
        "teacher_over_fixed_boxes": round(
            teacher[0]["images_per_s"] / fixed[0]["images_per_s"], 4
        )
        if fixed
        else None,
        "plan": planned,
        "targets": _targets(runs, planned),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(record, indent=2))
    _print(record)
    print(f"results: {args.results}")


def _print(record: dict) -> None:
    """The tables of RESULTS.md (one renderer: ``report.py``'s)."""
    report = runpy.run_path(str(Path(__file__).with_name("report.py")))
    print("\n".join(report["_scale"](record)))


if __name__ == "__main__":
    main()
