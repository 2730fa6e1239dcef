"""`python -m diffmic.export EXPERIMENT_URI [--dataset NAME] [--trial ID] [--sampler S --steps N] [--to URI]`

Exports the model a search chose for each dataset, or any trial and point of its Pareto front, as a bundle. The
experiment record it reads (summary, pareto.csv, best.json, storage) is written by the package that runs searches,
so the core hands the command to that package's `export` plugin (diffmic/remote.py), as it hands it s3:// reads and
Ray Train runs; with this project installed that is `python -m tune.export`, which documents the options.
"""
from __future__ import annotations

import sys

from diffmic.remote import plugin


def main(argv: list[str] | None = None) -> int | None:
    from diffmic.cli import one_line_errors

    with one_line_errors("diffmic.export"):
        command = plugin("export", "python -m diffmic.export (exporting from a search's experiment record)")
    return command(argv)


if __name__ == "__main__":
    sys.exit(main())
