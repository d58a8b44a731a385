r"""Step 3 as a Ray job: the pseudo-label score threshold (Ray Tune).

    ray job submit --working-dir . -- \
        python jobs/threshold.py --config my.yaml threshold.per_class=true

Needs ``OUTPUT_DIR/candidates`` (``jobs/pseudo_label.py``). Writes
``thresholds.json``, ``thresholds.png`` and Tune's results in ``tune/``.
``--smoke-test`` runs the teacher and pseudo-labeling on tiny demo data first.
"""

from __future__ import annotations

import sys

from raydd.jobs import step_main


def main(argv: list[str] | None = None) -> int:
    return step_main(__doc__, "threshold", argv)


if __name__ == "__main__":
    sys.exit(main())
