"""Train one planned run of a study in a process of its own: `python -m ssmscale.study.worker STUDY_DIR RUN_ID`.

Lightning's ddp strategy starts each extra rank by running this process's command line again, so a run
on several devices cannot start inside a ladder (its rank 1 would run the whole ladder): the ladder's
executors start such a run through this command instead (runner.run_one).
"""

from __future__ import annotations

import sys

from ..errors import UserError


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m ssmscale.study.worker STUDY_DIR RUN_ID", file=sys.stderr)
        return 2
    from .runner import train_planned_run
    try:
        result = train_planned_run(*args)
    except UserError as exc:
        print(f"ssmscale.study.worker: error: {exc}", file=sys.stderr)
        return 2
    return 0 if result.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
