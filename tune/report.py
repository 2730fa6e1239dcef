"""`python tune/report.py EXPERIMENT_URI [--serve] [--port N] [--output FILE]`: the results page of a search.

    python tune/report.py runs/diffmic-search                    # writes runs/diffmic-search/report.html
    python tune/report.py s3://bucket/prefix/diffmic-search --serve --port 0

EXPERIMENT_URI is `<storage root>/<experiment>`, where tune/search.py left its record (tune/record.py); tune/search.py
also writes the page itself at the end of a search. Reading is tune/record.py's, the page is tune/render.py's; this
module writes it and serves it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python tune/report.py` from any working copy

from diffmic.cli import one_line_errors  # noqa: E402
from tune.record import Record  # noqa: E402

DEFAULT_PORT = 8266  # the Ray dashboard's 8265 + 1


def build_report(record: Record) -> str:
    from tune.render import render
    return render(record.load())


def write_report(record: Record) -> str:
    """Write <experiment>/report.html into the record; returns its URI."""
    return record.write_report(build_report(record))


def serve(page: str, port: int) -> None:
    """Serve the page on 127.0.0.1 until Ctrl-C (port 0: a free one)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    data = page.encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            ok = self.path.split("?")[0] in ("/", "/report.html")
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(data)

        def log_message(self, *args):  # quiet: a line per request would bury the URL
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"serving http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


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
        page = build_report(record)
        if args.output:
            Path(args.output).write_text(page, encoding="utf-8")
            print(f"report: {Path(args.output).resolve()}", flush=True)
        else:
            print(f"report: {record.write_report(page)}", flush=True)
    if args.serve:
        serve(page, args.port)


if __name__ == "__main__":
    main()
