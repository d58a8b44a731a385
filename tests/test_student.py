"""The student's pseudo-labeled set streams from the candidate parts."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from raydd import schema
from raydd.ingest import INDEX, RowStream
from raydd.shards import PART, part_name, write_index, write_part
from raydd.student import pseudo_counts, pseudo_dataset, pseudo_records

THRESHOLDS = {1: 0.5, 2: 0.8}


def _candidates() -> pd.DataFrame:
    """Nine images: scores around the thresholds, one unreadable, one empty."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(9):
        n = 0 if i == 4 else int(rng.integers(1, 5))
        rows.append(
            {
                schema.PATH: f"/crawl/{(i * 7) % 9:02d}.jpg",  # not in path order
                schema.HEIGHT: 60,
                schema.WIDTH: 80,
                schema.ERROR: "OSError: truncated" if i == 6 else "",
                schema.BOXES: [[1.0, 2.0, 30.0, 40.0]] * n,
                schema.LABELS: rng.integers(1, 3, n).tolist(),
                schema.SCORES: rng.uniform(0.3, 1.0, n).astype(np.float32).tolist(),
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture
def parts(tmp_path) -> str:
    frame = _candidates()
    names = []
    for chunk in np.array_split(np.arange(len(frame)), 3):
        table = pa.Table.from_pandas(frame.iloc[chunk], preserve_index=False)
        names.append(part_name("s", frame[schema.PATH].iloc[chunk]))
        write_part(str(tmp_path), names[-1], table, {"images": len(chunk)})
    write_index(str(tmp_path), pd.DataFrame({PART: names, "source": "s", "images": 3}))
    return str(tmp_path)


def test_the_pseudo_set_is_read_on_the_cluster_not_by_the_driver(
    ray_local, parts, monkeypatch
):
    def refuse(*args, **kwargs):
        raise AssertionError("the driver read the candidate parts")

    monkeypatch.setattr("raydd.shards.read_parts", refuse)
    monkeypatch.setattr(pd, "read_parquet", refuse)
    expected = pseudo_records(_candidates(), THRESHOLDS)
    counts = pseudo_counts(parts, THRESHOLDS)
    assert counts == {
        "images": 9,
        "errors": 1,
        "pseudo_labeled": 8,  # the empty image stays in, as background
        "instances": sum(len(r.labels) for r in expected),
    }
    rows = sorted(pseudo_dataset(parts, THRESHOLDS).take_all(), key=lambda r: r[INDEX])
    assert [r[schema.PATH] for r in rows] == sorted(r.path for r in expected)
    by_path = {r.path: r for r in expected}
    for row in rows:
        record = by_path[row[schema.PATH]]
        np.testing.assert_array_equal(row[schema.LABELS], record.labels)
        np.testing.assert_allclose(
            np.asarray(row[schema.BOXES], np.float32).reshape(-1, 4), record.boxes
        )
        assert (row[schema.HEIGHT], row[schema.WIDTH]) == (60, 80)


def test_a_stream_of_the_pseudo_set_numbers_its_rows_by_path(ray_local, parts):
    stream = RowStream(pseudo_dataset(parts, THRESHOLDS).iterator(), batch_size=2)
    rows = stream.take(8)  # one epoch, no Augment: rows as they are, in order
    stream.close()
    assert sorted(r[INDEX] for r in rows) == list(range(8))
    by_index = sorted(rows, key=lambda r: r[INDEX])
    paths = [r[schema.PATH] for r in by_index]
    assert paths == sorted(paths)


def test_an_empty_candidate_set_counts_zero(ray_local):
    empty = _candidates().iloc[[]]  # what a 0% quantity sweep passes
    assert pseudo_counts(empty, THRESHOLDS) == dict.fromkeys(
        ("images", "errors", "pseudo_labeled", "instances"), 0
    )


def test_pseudo_boxes_in_the_ignore_band_come_labeled_ignore(ray_local):
    """Threshold 0.5, band 0.2: 0.9 is an object, 0.35 is ignored, 0.25 dropped;
    label 3 has no threshold, so none of its boxes comes, ignored or not."""
    from raydd.ingest import IGNORE

    frame = pd.DataFrame(
        [
            {
                schema.PATH: "a.jpg",
                schema.HEIGHT: 60,
                schema.WIDTH: 80,
                schema.ERROR: "",
                schema.BOXES: [[0.0, 0.0, 9.0, 9.0 + i] for i in range(5)],
                schema.LABELS: [1, 1, 1, 3, 1],
                schema.SCORES: [0.9, 0.35, 0.25, 0.9, 0.5],
            }
        ]
    )
    (record,) = pseudo_records(frame, {1: 0.5}, ignore_band=0.2)
    assert record.labels.tolist() == [1, IGNORE, 1]
    assert record.boxes[:, 3].tolist() == [9.0, 10.0, 13.0]
    (plain,) = pseudo_records(frame, {1: 0.5})
    assert plain.labels.tolist() == [1, 1]
    counts = pseudo_counts(frame, {1: 0.5})  # ignored boxes are no instances
    assert counts["instances"] == 2
