r"""Step 4 as a Ray job: the student on labeled + pseudo-labeled images (Ray Train).

    ray job submit --working-dir . -- \
        python jobs/student.py --config my.yaml student.num_workers=4 \
        student.use_gpu=true

Needs the teacher, the candidates and ``thresholds.json`` (steps 1-3). Writes
``OUTPUT_DIR/student``. ``--smoke-test`` runs steps 1-3 on tiny demo data first.
"""

from __future__ import annotations

import sys

from raydd.jobs import step_main


def main(argv: list[str] | None = None) -> int:
    return step_main(__doc__, "student", argv)


if __name__ == "__main__":
    sys.exit(main())
