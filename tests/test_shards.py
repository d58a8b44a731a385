import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raydd.shards import (
    INDEX,
    PART,
    PART_ROWS,
    PartWriter,
    index_parts,
    is_mine,
    part_name,
    part_stats,
    settings_digest,
    write_index,
)


def _rows(part: str, indices: list[int], total: int, error: str = "") -> pa.Table:
    return pa.table(
        {
            "path": [f"/img/{part[:8]}-{i}.jpg" for i in indices],
            "error": [error] * len(indices),
            PART: [part] * len(indices),
            INDEX: indices,
            PART_ROWS: [total] * len(indices),
        }
    )


def test_a_part_is_named_by_its_inputs_in_order_and_its_settings():
    one = settings_digest({"views": [1]})
    assert part_name(one, ["a", "b"]) == part_name(one, ["a", "b"])
    assert part_name(one, ["a", "b"]) != part_name(one, ["b", "a"])
    assert part_name(one, ["a", "b"]) != part_name(
        settings_digest({"views": [2]}), ["a", "b"]
    )
    assert part_name(one, ["ab"]) != part_name(one, ["a", "b"])
    names = [part_name(one, [str(i)]) for i in range(200)]
    jobs = [sum(is_mine(n, 3, j) for n in names) for j in range(3)]
    assert sum(jobs) == 200 and min(jobs) > 40  # every part in one job, balanced


def test_parts_are_written_whole_in_input_order_whatever_order_rows_arrive(tmp_path):
    a, b = part_name("s", ["a"]), part_name("s", ["b"])
    writer = PartWriter(str(tmp_path))
    assert len(writer(pa.concat_tables([_rows(a, [2, 0], 3), _rows(b, [1], 0)]))) == 0
    assert not list(tmp_path.iterdir())  # nothing complete: nothing written
    stats = writer(pa.concat_tables([_rows(b, [0], 2, "OSError: x"), _rows(a, [1], 3)]))
    assert sorted(stats.column(PART).to_pylist()) == sorted([a, b])
    first = pq.read_table(tmp_path / a)
    assert first.column_names == ["path", "error"]  # plan columns dropped
    assert first.column("path").to_pylist() == [
        f"/img/{a[:8]}-{i}.jpg" for i in range(3)
    ]
    assert part_stats(str(tmp_path / b))["errors"] == 1
    assert part_stats(str(tmp_path / a))["images"] == 3
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_the_size_may_come_last_and_a_row_seen_twice_is_written_once(tmp_path):
    a = part_name("s", ["a"])
    writer = PartWriter(str(tmp_path))
    assert len(writer(_rows(a, [0, 1], 0))) == 0  # a tar: size unknown until its end
    assert len(writer(_rows(a, [1], 0))) == 0  # a retried task sends a row again
    assert len(writer(_rows(a, [2], 3))) == 1
    assert pq.read_table(tmp_path / a).num_rows == 3


def test_readers_take_the_index_s_parts_only(tmp_path):
    for name in ("part-aa.parquet", "part-bb.parquet", "part-old.parquet"):
        pq.write_table(pa.table({"path": [name]}), tmp_path / name)
    assert len(index_parts(str(tmp_path))) == 3  # no index: every part
    frame = pd.DataFrame({PART: ["part-bb.parquet", "part-aa.parquet"], "images": 1})
    write_index(str(tmp_path), frame.assign(source="s"))
    assert index_parts(str(tmp_path)) == [
        f"{tmp_path}/part-bb.parquet",
        f"{tmp_path}/part-aa.parquet",
    ]
