r"""Step 2 as a Ray job: every view of every unlabeled image, fused (Ray Data).

    ray job submit --working-dir . -- \
        python jobs/pseudo_label.py --config my.yaml data.unlabeled.num_shards=4 \
        data.unlabeled.shard_index=0

Needs ``OUTPUT_DIR/teacher`` (``jobs/teacher.py``; fetched from ``storage_uri``
if only there). Writes ``OUTPUT_DIR/candidates/part-*.parquet``, ``errors.csv`` and
``validation_candidates/``. ``--smoke-test`` trains a tiny teacher first.
"""

from __future__ import annotations

import sys

from raydd.jobs import step_main


def main(argv: list[str] | None = None) -> int:
    return step_main(__doc__, "pseudo_label", argv)


if __name__ == "__main__":
    sys.exit(main())
