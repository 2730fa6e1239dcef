"""`python tune/report.py EXPERIMENT_URI [--serve] [--port N] [--output FILE]`: the results page of a search.

    python tune/report.py runs/diffmic-search                    # writes runs/diffmic-search/report.html
    python tune/report.py s3://bucket/prefix/diffmic-search --serve --port 0

EXPERIMENT_URI is `<storage root>/<experiment>`, where tune/search.py left its record (tune/record.py); tune/search.py
also writes the page itself, while it runs (tune/live.py) and at the end. Reading is tune/record.py's, the page is
tune/render.py's; this module writes it and serves it. `--serve` serves the page as it is in storage (written from
the record first only when there is none) and follows it: the browser reloads when a running search rewrites it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python tune/report.py` from any working copy

from diffmic.cli import one_line_errors  # noqa: E402
from tune.record import REPORT, Record  # noqa: E402

DEFAULT_PORT = 8266  # the Ray dashboard's 8265 + 1


def build_report(record: Record) -> str:
    from tune.render import render
    return render(record.load())


def write_report(record: Record) -> str:
    """Write <experiment>/report.html into the record; returns its URI."""
    return record.write_report(build_report(record))


RELOAD_JS = """<script>(function(){var v=%s;setInterval(function(){fetch("version",{cache:"no-store"})
.then(function(r){return r.ok?r.text():v;}).then(function(t){if(t!==v)location.reload();}).catch(function(){});},%d);
})();</script>"""


class Followed:
    """The page as its source holds it now: re-read every `poll_s` (a running search rewrites it)."""

    def __init__(self, read, poll_s: float) -> None:
        import threading

        self.read, self.poll_s = read, poll_s
        self.data, self.version = self._fetch()
        self._stop = threading.Event()
        threading.Thread(target=self._follow, daemon=True, name="report-follow").start()

    def _fetch(self) -> tuple[bytes, str]:
        import hashlib

        data = self.read()
        return data, hashlib.sha256(data).hexdigest()[:16]

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.data, self.version = self._fetch()
            except Exception:  # noqa: BLE001 (a page being replaced, storage briefly away: keep the last one)
                pass

    def page(self) -> bytes:
        """The page with a script that reloads it when the version changes."""
        data, version = self.data, self.version
        script = (RELOAD_JS % (json.dumps(version), int(self.poll_s * 1000))).encode()
        at = data.rfind(b"</body>")
        return data[:at] + script + data[at:] if at >= 0 else data + script

    def stop(self) -> None:
        self._stop.set()


def serve(page: Followed, port: int) -> None:
    """Serve the page on 127.0.0.1 until Ctrl-C (port 0: a free one); `/version` says which page is current."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            path = self.path.split("?")[0]
            if path in ("/", "/report.html"):
                body, kind = page.page(), "text/html; charset=utf-8"
            elif path == "/version":
                body, kind = page.version.encode(), "text/plain"
            else:
                body, kind = b"", "text/plain"
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet: a line per request would bury the URL
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"serving http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        page.stop()
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

if __name__ == "__main__":
    main()
