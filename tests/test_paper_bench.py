"""The paper benchmark and the options beyond it (benchmarks/paper.py, beyond.py):
their smoke runs and the sweeps' wiring. A file of its own, so that `make test`'s two
processes (a file each) split the two long benchmark smokes."""

import json
import runpy
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
def test_paper_smoke(ray_local, tmp_path, monkeypatch, capsys):
    """Every experiment of the paper benchmark runs (tiny sizes, one seed), and the
    report renders its tables and non-blank plots."""
    results = tmp_path / "paper.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "paper.py",
            "--part",
            "all",
            "--smoke",
            "--iterations",
            "3",
            "--output-dir",
            str(tmp_path / "work"),
            "--results",
            str(results),
        ],
    )
    runpy.run_path(str(BENCHMARKS / "paper.py"), run_name="__main__")
    record = json.loads(results.read_text())
    assert record["smoke"] is True and len(record["seeds"]) == 1
    assert record["schedule"]["teacher"]["iterations"] == 3
    assert record["schedule"]["student"]["iterations"] == 3
    assert record["schedule"]["fine_tuned"] == {
        "init": "teacher",
        "iterations": 2,  # half the schedule, rounded
        "checkpoint_every": 2,
    }
    seed = record["seeds"][0]
    arms = ("teacher", "teacher_views", "retrained", "fine_tuned")
    for key in (*arms, "fine_tuned_control"):
        assert set(record["summary"][key]) == {"AP", "AP50", "AP75"}
        assert 0.0 <= seed[key]["AP"] <= 1.0
    # the teacher scored along its schedule; the last point is the exported teacher
    assert [p["step"] for p in seed["teacher_curve"]] == [1, 2, 3]
    last = seed["teacher_curve"][-1]["AP"]
    assert last == pytest.approx(seed["teacher"]["AP"], abs=1e-6)
    # 0% of the unlabeled images: labeled only; 100%: every readable one
    assert [p["fraction"] for p in record["quantity"]] == [0.0, 1.0]
    assert [p["pseudo_images"] for p in record["quantity"]] == [0, 10]
    assert [v["name"] for v in record["views_ablation"]] == [
        "identity",
        "+ flip",
        "+ scales",
        "+ flip + scales",
    ]
    assert [len(v["views"]) for v in record["views_ablation"]] == [1, 2, 2, 4]
    assert all(v["images_per_s"] > 0 for v in record["views_ablation"])
    points = record["threshold"]["points"]
    assert [p["heuristic"] for p in points].count(True) == 1
    assert [p["share"] for p in record["labeled_share"]] == [0.6]
    assert "student - control (the teacher)" in capsys.readouterr().out

    module = runpy.run_path(str(BENCHMARKS / "report.py"))
    lines = module["_paper"](record, plots=tmp_path / "plots")
    pictures = [line for line in lines if line.startswith("![")]
    assert len(pictures) == 5
    for name in ("students", "quantity", "views", "threshold", "share"):
        pixels = imread(tmp_path / "plots" / f"paper_{name}.png")
        assert pixels.std() > 0.05, name  # not a blank canvas
    assert any("(heuristic)" in line for line in lines)

    # `paper.py --part students` records hold experiment 1 only
    sweeps = ("quantity", "views_ablation", "threshold", "labeled_share")
    only = {key: value for key, value in record.items() if key not in sweeps}
    lines = module["_paper"](only, plots=tmp_path / "only", prefix="long")
    assert [line for line in lines if line.startswith("![")] == [
        "![long_students.png](only/long_students.png)"
    ]
    assert module["_throughput_rows"](only) == []

    # beyond the paper: options' students on the same run's teacher and data (the
    # paper run resumed, see test_beyond_trains_the_paper_run_it_lacks); one that
    # trains differently and one that labels again (the other two's settings:
    # test_beyond_options_train_with_their_own_settings)
    beyond = tmp_path / "beyond.json"
    argv = ["beyond.py", "--smoke", "--paper-dir", str(tmp_path / "work")]
    argv += ["--iterations", "3", "--results", str(beyond)]
    options = ["ignore_band", "second_round"]
    monkeypatch.setattr(sys, "argv", [*argv, "--options", *options])
    runpy.run_path(str(BENCHMARKS / "beyond.py"), run_name="__main__")
    ablation = json.loads(beyond.read_text())
    assert list(ablation["vs_retrained"]) == options
    (row,) = ablation["seeds"]
    for arm in ("teacher", "retrained"):  # the paper run's, resumed: not retrained
        assert row[arm]["AP"] == seed[arm]["AP"]
    assert row["retrained"]["seconds"] < seed["retrained"]["seconds"]
    for option in options:
        assert row[option]["AP"] - seed["retrained"]["AP"] == pytest.approx(
            ablation["vs_retrained"][option]["mean"]
        )
    assert 0.0 <= row["second_round"]["threshold"] <= 1.0
    lines = module["_beyond"](ablation, plots=tmp_path / "plots")
    assert lines[4].startswith("| control (= the teacher) |")
    assert len([line for line in lines if line.startswith("| ")]) == 3 + len(options)
    assert imread(tmp_path / "plots" / "beyond.png").std() > 0.05


def test_paper_sweeps_train_each_point_with_its_own_setting(
    demo_dir, weights, tmp_path
):
    """The threshold and share sweeps (their smoke trains no extra point): each point
    trains one student with its fixed threshold for every label, or its share,
    under its own folder; points come back sorted, the seed-0 student among them."""
    from types import SimpleNamespace

    from conftest import tiny_config

    from raydd.config import parse_config

    paper = runpy.run_path(str(BENCHMARKS / "paper.py"))
    trained = []

    def student_ap(config, candidates, used, teacher):
        trained.append((Path(config.output_dir).name, used, config.student))
        return {"AP": 0.1}

    paper["threshold_sweep"].__globals__["student_ap"] = student_ap
    config = parse_config(tiny_config(demo_dir, tmp_path, weights), [], False)
    found = SimpleNamespace(threshold=0.45, labeled_instances_per_image=4.0)
    seed0 = dict(config=config, threshold=found, used={1: 0.45, 2: 0.5})
    seed0 |= dict(candidates="candidates", teacher="teacher")
    sweep = paper["threshold_sweep"](seed0, {"AP": 0.2}, (0.7, 0.2))
    assert [(p["threshold"], p["heuristic"]) for p in sweep["points"]] == [
        (0.2, False),
        (0.45, True),
        (0.7, False),
    ]
    assert [(name, used) for name, used, _ in trained] == [
        ("threshold_0.7", {1: 0.7, 2: 0.7}),
        ("threshold_0.2", {1: 0.2, 2: 0.2}),
    ]
    trained.clear()
    shares = paper["labeled_share"](seed0, {"AP": 0.2}, (0.8, 0.4))
    assert [p["share"] for p in shares] == [0.4, config.student.labeled_share, 0.8]
    assert [(name, s.labeled_share) for name, _, s in trained] == [
        ("share_0.8", 0.8),
        ("share_0.4", 0.4),
    ]


def test_beyond_options_train_with_their_own_settings(
    demo_dir, weights, tmp_path, monkeypatch
):
    """The pseudo-labeled images' augmentation trains one student with its scales
    and jitter; the paper's views label again with 9 scales under their own folder
    and train a plain student on those labels."""
    from conftest import tiny_config

    from raydd.config import parse_config

    beyond = runpy.run_path(str(BENCHMARKS / "beyond.py"))
    names = beyond["main"].__globals__
    trained, labeled = [], []

    def student_ap(config, candidates, used, teacher):
        trained.append((Path(config.output_dir).name, config.student, candidates))
        return {"AP": 0.1}

    def relabel(config, teacher, name):
        labeled.append((name, [v.scale for v in config.views], teacher))
        return {"candidates": "relabeled", "used": {1: 0.6}, "threshold": 0.6}

    monkeypatch.setattr(names["paper"], "student_ap", student_ap)
    names["labeled"] = relabel
    config = parse_config(tiny_config(demo_dir, tmp_path, weights), [], False)
    seed = {"candidates": "paper's", "used": {1: 0.5}, "teacher": "teacher"}
    names["pseudo_augment"](config, seed)
    result = names["paper_views"](config, seed)
    (augmented, student, candidates), (plain, default, relabeled) = trained
    assert (augmented, candidates) == ("pseudo_augment", "paper's")
    assert student.pseudo_min_size == (64, 80, 96, 112, 128, 144)
    assert student.pseudo_color_jitter == 0.3
    assert (plain, relabeled) == ("paper_views", "relabeled")
    assert default == config.student  # only the labels differ
    scales = [64, 80, 96, 112, 128, 144, 160, 176, 192]  # 400..1200 at 800 -> 128
    assert labeled == [("views", scales, "teacher")]
    assert (result["views"], result["threshold"]) == (9, 0.6)


def test_beyond_trains_the_paper_run_it_lacks(ray_local, tmp_path, monkeypatch):
    """beyond.py runs alone (a fresh checkout keeps no work folder): every seed's
    paper run (teacher, pseudo-labels, threshold, retrained student) comes from
    paper.py's own step, which resumes what the folder holds and trains the rest;
    each option trains on that seed's labels, and is compared with its student."""
    beyond = runpy.run_path(str(BENCHMARKS / "beyond.py"))
    names = beyond["main"].__globals__
    calls = []

    def run_seed(config, seed, students):
        calls.append((seed, students, Path(config.output_dir).name))
        row = {"seed": seed, "teacher": {"AP": 0.2}, "retrained": {"AP": 0.25}}
        return row | {"teacher_views": {"AP": 0.3}}, {"config": config, "seed": seed}

    def ignore_band(config, found):
        assert found["config"] is config
        return {"AP": 0.25 + 0.01 * found["seed"]}

    monkeypatch.setattr(names["paper"], "run_seed", run_seed)
    monkeypatch.setitem(names["OPTIONS"], "ignore_band", ignore_band)
    results = tmp_path / "beyond.json"

    def run(*seeds: str, option: str = "ignore_band") -> dict:
        argv = ["beyond.py", "--smoke", "--paper-dir", str(tmp_path / "fresh")]
        argv += ["--seeds", *seeds, "--options", option, "--results"]
        monkeypatch.setattr(sys, "argv", [*argv, str(results)])
        names["main"]()
        return json.loads(results.read_text())

    record = run("0", "2")
    assert calls == [(0, False, "output"), (2, False, "output")]
    assert [sorted(row) for row in record["seeds"]] == 2 * [
        ["ignore_band", "retrained", "seed", "teacher"]
    ]
    gains = record["vs_retrained"]["ignore_band"]["each"]
    assert gains == pytest.approx([0.0, 0.02])
    assert (tmp_path / "fresh" / "data" / "labeled.json").exists()
    # one seed a run (a make target each): its row joins the same bench's seeds
    record = run("1")
    assert [row["seed"] for row in record["seeds"]] == [0, 1, 2]
    assert record["vs_retrained"]["ignore_band"]["each"] == pytest.approx(
        [0.0, 0.01, 0.02]
    )
    assert [r["seeds"] for r in record["runs"]] == [[0, 2], [1]]
    # another option is another bench: its seeds are not mixed with these
    monkeypatch.setitem(names["OPTIONS"], "pseudo_augment", ignore_band)
    record = run("1", option="pseudo_augment")
    assert [row["seed"] for row in record["seeds"]] == [1]


def test_the_teachers_part_trains_and_scores_the_teachers_alone(
    ray_local, tmp_path, monkeypatch
):
    """``--part teachers`` (is a schedule long enough?): one teacher per seed on
    the given schedule, scored along it; no labeling, no student. The report shows
    the curves and no student schedule."""
    paper = runpy.run_path(str(BENCHMARKS / "paper.py"))
    names = paper["main"].__globals__
    trained = []

    def train_teacher(config):
        trained.append((Path(config.output_dir).name, config.teacher.iterations))
        return tmp_path / "teacher"

    def no_student(*args, **kwargs):
        raise AssertionError("the teachers part labels and trains nothing else")

    names["train_teacher"] = train_teacher
    names["evaluate"] = lambda *args: {"AP": 0.3, "AP50": 0.5, "AP75": 0.25}
    names["teacher_curve"] = lambda config: [
        {"step": 2, "AP": 0.1},
        {"step": 4, "AP": 0.3},
    ]
    for name in ("pseudo_label", "train_student", "train_control"):
        names[name] = no_student
    results = tmp_path / "teachers.json"
    argv = ["paper.py", "--part", "teachers", "--smoke", "--seeds", "2"]
    argv += ["--iterations", "4", "--output-dir", str(tmp_path / "work")]
    monkeypatch.setattr(sys, "argv", [*argv, "--results", str(results)])
    paper["main"]()

    record = json.loads(results.read_text())
    assert trained == [("seed0", 4), ("seed1", 4)]
    assert list(record["summary"]) == ["teacher"]
    assert [set(s) for s in record["seeds"]] == [
        {"seed", "teacher", "teacher_curve", "teacher_seconds"}
    ] * 2
    report = runpy.run_path(str(BENCHMARKS / "report.py"))
    assert report["_paper_title"](record).endswith("teachers alone, 4-step schedules")
    lines = report["_paper"](record, plots=tmp_path / "plots", prefix="teachers")
    assert "student:" not in lines[0] and "### Teachers alone" in lines
    assert "| seed | step 2 | step 4 |" in lines
    assert "| 1 | 0.1000 | 0.3000 |" in lines
    assert imread(tmp_path / "plots" / "teachers_teachers.png").std() > 0.05
    # against the students record's teacher of the same seed (seed 1 has none)
    students = {"schedule": {"teacher": {"iterations": 2}}, "seeds": []}
    students["seeds"] = [{"seed": 0, "teacher": {"AP": 0.28}}]
    (line,) = report["_longer_schedule"](students, record)
    assert "0.2800 on 2 steps" in line and "0.3000 on 4 steps" in line
    assert "**+2.0 AP points**" in line and "is **not converged**" in line
    students["seeds"][0]["teacher"]["AP"] = 0.298
    (line,) = report["_longer_schedule"](students, record)
    assert "converged to within 0.5 AP" in line
    students["seeds"][0]["teacher"]["AP"] = 0.31
    (line,) = report["_longer_schedule"](students, record)
    assert "**-1.0 AP points**" in line and "4-step schedule scores lower" in line


def test_one_seed_a_run_merges_into_the_same_benchs_results(
    ray_local, tmp_path, monkeypatch
):
    """``--seed N`` (one seed a make target): the seed's row joins the other seeds
    of the results file when that holds the same bench, replaces an earlier row of
    the same seed, and a bench on another schedule starts the file afresh."""
    paper = runpy.run_path(str(BENCHMARKS / "paper.py"))
    names = paper["main"].__globals__
    ap = {"seed0": 0.3, "seed1": 0.2}
    names["train_teacher"] = lambda config: Path(config.output_dir)
    names["evaluate"] = lambda config, teacher, views: {
        "AP": ap[teacher.name],
        "AP50": 0.5,
        "AP75": 0.25,
    }
    names["teacher_curve"] = lambda config: []
    results = tmp_path / "teachers.json"

    def run(seed: int, iterations: int = 4) -> dict:
        argv = ["paper.py", "--part", "teachers", "--smoke", "--seed", str(seed)]
        argv += ["--iterations", str(iterations), "--results", str(results)]
        monkeypatch.setattr(sys, "argv", [*argv, "--output-dir", str(tmp_path / "w")])
        paper["main"]()
        return json.loads(results.read_text())

    assert [s["seed"] for s in run(1)["seeds"]] == [1]
    record = run(0)
    assert [s["seed"] for s in record["seeds"]] == [0, 1]
    assert record["summary"]["teacher"]["AP"]["mean"] == pytest.approx(0.25)
    assert [r["seeds"] for r in record["runs"]] == [[1], [0]]
    assert "seed 1 from earlier runs" in record["note"]
    ap["seed1"] = 0.4  # seed 1 again: its row is replaced, not doubled
    record = run(1)
    assert [s["teacher"]["AP"] for s in record["seeds"]] == [0.3, 0.4]
    assert [r["seeds"] for r in record["runs"]] == [[0], [1]]  # the rows' runs
    report = runpy.run_path(str(BENCHMARKS / "report.py"))
    minutes = report["_run_minutes"](record)
    assert minutes.startswith("One run a seed: seed 0 0 min, seed 1 0 min (")
    record = run(1, iterations=6)  # another schedule: not the same bench
    assert [s["seed"] for s in record["seeds"]] == [1] and "note" not in record

    assert report["_verdict"](0.03, 2) == "**not yet decided** (2 of 3 seeds run)."
    assert report["_verdict"](0.03, 3) == "**met**."
    assert report["_verdict"](0.01, 3) == "**missed**."


def test_the_report_says_whether_the_papers_direction_reproduces(tmp_path):
    """More unlabeled data and more views: the sweeps' sections say plainly whether
    the paper's direction holds, in part, or not."""
    report = runpy.run_path(str(BENCHMARKS / "report.py"))

    def quantity(aps: list[float]) -> str:
        points = [
            {"fraction": f, "pseudo_images": 0, "AP": a, "AP50": 0.5, "AP75": 0.3}
            for f, a in zip((0.0, 0.25, 0.5, 1.0), aps, strict=True)
        ]
        record = {"seeds": [{"teacher": {"AP": 0.3}}], "quantity": points}
        (line,) = [
            x for x in report["_paper_quantity"](record, tmp_path, "q") if "paper:" in x
        ]
        return line

    assert "**+2.0 AP points**" in quantity([0.30, 0.31, 0.315, 0.32])
    assert "direction reproduces (" in quantity([0.30, 0.31, 0.315, 0.32])
    assert "reproduces in part" in quantity([0.30, 0.31, 0.305, 0.32])
    assert "does not reproduce" in quantity([0.30, 0.31, 0.305, 0.29])

    def views(aps: list[float]) -> str:
        rows = [
            {"name": n, "views": [{}] * k, "AP": a, "AP50": 0.5, "AP75": 0.3}
            | {"images_per_s": 20 / k}
            for n, k, a in zip(("identity", "+ flip"), (1, 2), aps, strict=True)
        ]
        record = {"views_ablation": rows}
        (line,) = [
            x for x in report["_paper_views"](record, tmp_path, "v") if "paper:" in x
        ]
        return line

    assert views([0.30, 0.32]).endswith(
        "**+2.0 AP points** over the identity at 2.0x its cost."
    )
    assert views([0.30, 0.29]).endswith(
        "the paper's direction does not reproduce here."
    )


def test_the_report_says_whether_retraining_beats_fine_tuning():
    """Each student's gain over its own equal-compute control, paired per seed: the
    line says whether the paper's retrain-over-fine-tune finding holds."""
    report = runpy.run_path(str(BENCHMARKS / "report.py"))

    def line(retrained: list[float], fine_tuned: list[float]) -> list[str]:
        diffs = {
            ("retrained", "teacher"): retrained,
            ("fine_tuned", "fine_tuned_control"): fine_tuned,
        }
        return report["_retrain_or_fine_tune"](diffs)

    (every,) = line([0.01, 0.0, 0.02], [-0.01, -0.02, 0.01])
    assert "**+1.7 ± 0.6** (+2.0, +2.0, +1.0)" in every
    assert every.endswith("retraining beats fine-tuning reproduces on every seed.")
    (some,) = line([0.03, 0.0, 0.0], [0.0, 0.0, 0.01])
    assert some.endswith("reproduces on average, not on every seed.")
    (none,) = line([0.0, 0.0, 0.0], [0.01, 0.0, 0.0])
    assert none.endswith("does not reproduce.")
    # a record without the fine-tuned arms (`--no-fine-tune`)
    assert report["_retrain_or_fine_tune"]({("retrained", "teacher"): [0.01]}) == []


def test_the_report_puts_every_option_in_one_table(tmp_path):
    """Options benched one a record: one row each, against its own record's
    retrained student and control, and whether any reaches the +2 AP target."""
    report = runpy.run_path(str(BENCHMARKS / "report.py"))
    settings = {"ignore_band": 0.2, "pseudo_min_size": [64], "pseudo_color_jitter": 0.3}

    def record(option: str, gain: float, retrained: float) -> dict:
        def d(x: float) -> dict:
            return {"mean": x, "std": 0.0, "each": [x, x, x]}

        return {
            "settings": settings,
            "schedule": {"iterations": 1000, "batch_size": 5},
            "seeds": [{"seed": s} for s in range(3)],
            "vs_retrained": {option: d(gain - retrained)},
            "vs_control": {"retrained": d(retrained), option: d(gain)},
        }

    records = [record("ignore_band", 0.005, 0.0), record("pseudo_augment", 0.0, 0.01)]
    lines = report["_beyond_summary"](records, plots=tmp_path)
    assert (
        "| ignore band (boxes up to 0.2 under the threshold) | 1000 x 5 | 3 "
        "| +0.5 ± 0.0 | +0.5 ± 0.0 | +0.0 ± 0.0 |"
    ) in lines
    assert any(x.endswith("| -1.0 ± 0.0 | +0.0 ± 0.0 | +1.0 ± 0.0 |") for x in lines)
    assert "Highest over the control: ignore_band, **+0.5 AP**" in "\n".join(lines)
    assert "**missed** by every option." in "\n".join(lines)
    assert imread(tmp_path / "beyond_all.png").shape[2] in (3, 4)
    met = report["_beyond_summary"]([record("ignore_band", 0.021, 0.0)], tmp_path)
    assert met[-3].endswith("**+2.1 AP**: the target is **met**.")
