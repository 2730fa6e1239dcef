"""`python -m diffmic.export EXPERIMENT_URI [--dataset NAME] [--trial ID] [--sampler S --steps N] [--to URI]`

The name users reach for: the same command as `python -m tune.export` (see there). Exporting from a search needs its
experiment record (tune/record.py), which is the orchestration layer's, so this is the one module of the core that
hands over to tune/, and only when run as a command: importing it imports nothing of tune/, Ray or boto3
(tests/test_architecture.py names it as the single exception).
"""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tune/ beside diffmic/ in a working copy
    from tune.export import main as export_main  # the command's work is tune's (the docstring says why)

    export_main(argv)


if __name__ == "__main__":
    main()
