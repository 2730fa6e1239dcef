"""`python tune/report.py EXPERIMENT_URI [--serve] [--port N] [--output FILE]`: the results page of a search.

    python tune/report.py runs/diffmic-search                    # writes runs/diffmic-search/report.html
    python tune/report.py s3://bucket/prefix/diffmic-search --serve --port 0

EXPERIMENT_URI is `<storage root>/<experiment>`, where tune/search.py left its record (tune/record/experiment.py); tune/search.py
also writes the page itself, while it runs (tune/pages/live.py) and at the end. Reading is tune/record/experiment.py's, the page is
tune/pages/page.py's; this module writes it and serves it. `--serve` serves the page as it is in storage (written from
the record first only when there is none) and follows it: the browser reloads when a running search rewrites it.
"""

from __future__ import annotations
import argparse
import sys
from pathlib import Path
from diffmic.cli import one_line_errors
from tune.record.experiment import REPORT, Record
from tune.pages.serve import DEFAULT_PORT, Followed, build_report, serve


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="report", description="Write (and optionally serve) the results page of a search.")
    ap.add_argument("experiment_uri", help="<storage root>/<experiment>: a local path or s3://bucket/prefix/experiment")
    ap.add_argument("--output", help="write the page to this local file instead of <experiment>/report.html")
    ap.add_argument("--serve", action="store_true", help="then serve the page on 127.0.0.1 until Ctrl-C")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"for --serve (default {DEFAULT_PORT}; 0: any free)")
    args = ap.parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"report: error: --port {args.port}: expected 0 (any free port) to 65535", file=sys.stderr)
        sys.exit(2)
    with one_line_errors("report"):
        record = Record.at(args.experiment_uri)  # no write probe: a read-only user can still use --output
        if args.output:
            Path(args.output).write_text(build_report(record), encoding="utf-8")
            print(f"report: {Path(args.output).resolve()}", flush=True)
            read = Path(args.output).read_bytes
        else:
            # --serve shows the page as it is (a running search rewrites it); one is written only when there is none
            if not args.serve or not record.storage.exists(record.key(REPORT)):
                print(f"report: {record.write_report(build_report(record))}", flush=True)
            read = record.read_report
        if args.serve:
            page = Followed(read, poll_s=5.0 if record.uri.startswith("s3://") else 2.0)
    if args.serve:
        serve(page, args.port)
