r"""Step 1 as a Ray job: the teacher, trained on the labeled set (Ray Train).

    ray job submit --working-dir . -- \
        python jobs/teacher.py --config my.yaml teacher.num_workers=4 \
        teacher.use_gpu=true

Writes ``OUTPUT_DIR/teacher`` (copied to ``storage_uri`` when set; Ray Train's
checkpoints go to ``STORAGE_URI/ray_train``). Re-running resumes from the latest
checkpoint. ``--smoke-test``: tiny demo data written to a temporary directory.
"""

from __future__ import annotations

import sys

from raydd.jobs import step_main


def main(argv: list[str] | None = None) -> int:
    return step_main(__doc__, "teacher", argv)


if __name__ == "__main__":
    sys.exit(main())
