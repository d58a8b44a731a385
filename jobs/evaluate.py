r"""COCO AP of the teacher, the teacher with all views, and the student.

    ray job submit --working-dir . -- \
        python jobs/evaluate.py --config my.yaml

Needs ``OUTPUT_DIR/teacher`` and ``OUTPUT_DIR/student``; prints the AP table and
a one-line summary. ``--smoke-test`` runs all four steps on tiny demo data first.
"""

from __future__ import annotations

import sys

from raydd.jobs import step_main


def main(argv: list[str] | None = None) -> int:
    return step_main(__doc__, "evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
