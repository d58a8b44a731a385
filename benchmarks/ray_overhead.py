"""Where Ray Train's missing few percent go: the CPU Ray's own processes use.

``train_throughput.py`` measures Ray Train at ~0.97x a plain torch loop on 2 CPUs,
with the exposed data wait at ~0.5% of the step. This script measures the rest of
the difference: the CPU that Ray's own processes (the Train controller and its helper
actors, Ray Data's coordinator actors, the raylet, GCS, the driver) use while a
Ray Train run goes on. Its training loop only sleeps (and reports every 20 s, as
raydd's loop does), so every CPU second counted is Ray's, not the model's.

For each variant (environment variables set before Ray starts, in a fresh process)
it starts Ray like ``train_throughput.py`` and ``raydd run`` (2 CPUs, the dashboard
included), launches the run, waits ``--warmup`` seconds, then reads every process's
CPU time (Linux ``/proc/PID/stat``) over ``--window`` seconds. Result: the share of
one core per process kind, and in total. Writes
``benchmarks/results/ray_overhead.json``.

    python benchmarks/ray_overhead.py [--smoke] [--window 60] [--warmup 30]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "default": {},
    # Ray Train's spot-preemption poller (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER)
    "no preemption watcher": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
    # every worker's task-event reports to GCS (state API, dashboard timelines)
    "no task events": {"RAY_task_events_report_interval_ms": "0"},
}
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, user + system CPU seconds) of ``pid``."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def _tree(root: int) -> set[int]:
    """``root`` and every process under it (a local Ray: its node processes and
    workers all descend from the driver that started it)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = _stat(int(entry))[0]
            except (OSError, ValueError):
                pass  # gone meanwhile
    mine = {root}
    while True:
        new = {pid for pid, parent in parents.items() if parent in mine} - mine
        if not new:
            return mine
        mine |= new


def _cpu(pids: set[int]) -> dict[int, tuple[str, float]]:
    """pid -> (process title, CPU seconds so far)."""
    out = {}
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            out[pid] = (_kind(argv, pid == os.getpid()), _stat(pid)[1])
        except (OSError, ValueError):
            pass
    return out


def _kind(argv: list[str], driver: bool) -> str:
    """A process's kind from its command line: Ray's worker or dashboard module
    title, else the script (log_monitor.py, ...) or the program (raylet, gcs_server)."""
    if driver:
        return "driver (this process)"
    if argv[0].startswith("ray::"):
        return argv[0].split(".")[0]  # ray::TrainController.run -> ray::TrainController
    if argv[0].startswith("ray-dashboard-"):  # the dashboard's module processes,
        return "dashboard modules"  # titled "ray-dashboard-MetricsHead-0 (python ...)"
    scripts = [Path(a).name for a in argv[1:] if a.endswith(".py")]
    return scripts[0] if scripts else Path(argv[0]).name


def _sleeping_loop(config: dict) -> None:
    import ray.train

    for second in range(config["seconds"]):
        time.sleep(1)
        if second % 20 == 19:
            ray.train.report({"second": second})


def measure(window: float, warmup: float) -> dict:
    """In this process: Ray's CPU per process kind while a Train run sleeps."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=2)  # as `raydd run` and train_throughput.py: dashboard included
    try:
        with tempfile.TemporaryDirectory() as storage:
            trainer = TorchTrainer(
                _sleeping_loop,
                train_loop_config={"seconds": int(warmup + window + 30)},
                scaling_config=ray.train.ScalingConfig(
                    num_workers=1, resources_per_worker={"CPU": 1}
                ),
                run_config=ray.train.RunConfig(storage_path=storage, name="idle"),
            )
            run = threading.Thread(target=trainer.fit, daemon=True)
            run.start()
            time.sleep(warmup)
            before = _cpu(_tree(os.getpid()))
            time.sleep(window)
            after = _cpu(_tree(os.getpid()))
            run.join(timeout=warmup + 120)
    finally:
        ray.shutdown()
    shares: collections.Counter[str] = collections.Counter()
    for pid, (kind, seconds) in after.items():
        if pid in before:
            shares[kind] += (seconds - before[pid][1]) / window
    return {
        "one_core_share": round(sum(shares.values()), 4),
        "processes": {k: round(v, 4) for k, v in shares.most_common()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="5 s window, 1 variant")
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--results", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one variant, its environment set by the parent
        print(json.dumps(measure(args.window, args.warmup)))
        return
    window, warmup = (5.0, 15.0) if args.smoke else (args.window, args.warmup)
    variants = dict(list(VARIANTS.items())[:1]) if args.smoke else VARIANTS
    runs = []
    for name, env in variants.items():
        child = [sys.executable, __file__, "--child"]
        child += ["--window", str(window), "--warmup", str(warmup)]
        done = subprocess.run(
            child,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
            timeout=warmup + window + 300,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append({"variant": name, "env": env, **result})
        print(f"{name}: Ray uses {result['one_core_share']:.1%} of one core")
        for kind, share in result["processes"].items():
            print(f"  {share:6.1%}  {kind}")
    record = {
        "benchmark": "ray_overhead",
        "smoke": args.smoke,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(["python benchmarks/ray_overhead.py", *sys.argv[1:]]),
        "window_s": window,
        "warmup_s": warmup,
        "runs": runs,
    }
    results = Path(
        args.results
        or (
            Path(tempfile.gettempdir()) / "ray_overhead_smoke.json"
            if args.smoke
            else ROOT / "benchmarks/results/ray_overhead.json"
        )
    )
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(record, indent=2))
    print(f"results: {results}")


if __name__ == "__main__":
    main()
