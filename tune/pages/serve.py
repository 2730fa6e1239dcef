"""`python tune/report.py EXPERIMENT_URI [--serve] [--port N] [--output FILE]`: the results page of a search.

    python tune/report.py runs/diffmic-search                    # writes runs/diffmic-search/report.html
    python tune/report.py s3://bucket/prefix/diffmic-search --serve --port 0

EXPERIMENT_URI is `<storage root>/<experiment>`, where tune/search.py left its record (tune/record/experiment.py); tune/search.py
also writes the page itself, while it runs (tune/pages/live.py) and at the end. Reading is tune/record/experiment.py's, the page is
tune/pages/page.py's; this module writes it and serves it. `--serve` serves the page as it is in storage (written from
the record first only when there is none) and follows it: the browser reloads when a running search rewrites it.
"""

from __future__ import annotations
import json
from tune.record.experiment import Record
from tune.record.results import Results




DEFAULT_PORT = 8266  # the Ray dashboard's 8265 + 1


def build_report(record: Record) -> str:
    from tune.pages.page import render
    return render(Results.read(record))


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

    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C and a plain kill stop the server, whatever the process inherited: a job that a non-interactive shell
    # puts in the background starts with SIGINT ignored, and Python then raises no KeyboardInterrupt on its own.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"serving http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        page.stop()
        server.server_close()
