import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydd.shards import (
    RUN_FILE,
    ShardWriter,
    fingerprint,
    finished_shards,
    make_plan,
    part_name,
    publish_run,
)


def _rows(plan: pa.Table, rows: list[int]) -> pa.Table:
    return plan.take(rows).append_column("value", pa.array([f"v{i}" for i in rows]))


def test_plan_cuts_the_input_into_shards_and_splits_shards_between_jobs():
    uris = [f"/img/{i}.jpg" for i in range(10)]
    plan = make_plan(uris, shard_size=3)
    assert plan.column("shard").to_pylist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    second = make_plan(uris, shard_size=3, num_shards=2, shard_index=1)
    assert second.column("path").to_pylist() == uris[3:6] + uris[9:]


def test_shards_are_written_in_input_order_whatever_order_rows_arrive(tmp_path):
    plan = make_plan([f"/img/{i}.jpg" for i in range(7)], shard_size=3)
    writer = ShardWriter(tmp_path, {0: 3, 1: 3, 2: 1})
    writer.add(_rows(plan, [5, 1]))
    assert not list(tmp_path.glob("part-*"))  # no shard complete yet
    writer.add(_rows(plan, [6, 0, 3]))
    assert [p.name for p in tmp_path.glob("part-*")] == [part_name(2)]
    writer.add(_rows(plan, [2, 4]))
    writer.close()
    first = pq.read_table(tmp_path / part_name(0))
    assert first.column_names == ["path", "value"]  # plan columns dropped
    assert first.column("value").to_pylist() == ["v0", "v1", "v2"]
    assert pq.read_table(tmp_path / part_name(1)).column("value").to_pylist() == [
        "v3",
        "v4",
        "v5",
    ]
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_close_reports_lost_rows(tmp_path):
    plan = make_plan(["a", "b", "c"], shard_size=2)
    writer = ShardWriter(tmp_path, {0: 2, 1: 1})
    writer.add(_rows(plan, [0]))
    with pytest.raises(RuntimeError, match=r"\{0: 1, 1: 0\}"):
        writer.close()


def test_a_rerun_resumes_but_a_different_run_starts_over(tmp_path):
    uris = ["a", "b", "c"]
    run = fingerprint(uris, {"views": [1]})
    assert finished_shards(tmp_path, run) == set()
    (tmp_path / part_name(0)).write_bytes(b"x")
    (tmp_path / part_name(4)).write_bytes(b"x")
    assert finished_shards(tmp_path, run) == {0, 4}
    other = fingerprint(uris, {"views": [2]})
    assert other != run and fingerprint(uris[::-1], {"views": [1]}) != run
    assert finished_shards(tmp_path, other) == set()
    assert not list(tmp_path.glob("part-*"))
    assert json.loads((tmp_path / RUN_FILE).read_text()) == {"run_id": other}


def test_storage_holds_one_run_and_a_new_head_resumes_from_it(tmp_path):
    """The stored copy gets the run file (so a head that fetches it keeps the
    finished shards) and loses a different run's parts."""
    local, stored = tmp_path / "local", tmp_path / "store" / "candidates"
    stored.mkdir(parents=True)
    (stored / part_name(7)).write_bytes(b"an older run's shard")
    (stored / RUN_FILE).write_text(json.dumps({"run_id": "old"}))
    assert finished_shards(local, "new") == set()
    (local / part_name(0)).write_bytes(b"PAR1")
    publish_run(local, f"file://{stored}")
    assert sorted(p.name for p in stored.iterdir()) == [RUN_FILE]
    (stored / part_name(0)).write_bytes(b"PAR1")  # what ShardWriter copies
    publish_run(local, f"file://{stored}")  # the same run: nothing removed
    fresh = tmp_path / "fresh-head"
    fresh.mkdir()
    for path in stored.iterdir():
        (fresh / path.name).write_bytes(path.read_bytes())
    assert finished_shards(fresh, "new") == {0}
