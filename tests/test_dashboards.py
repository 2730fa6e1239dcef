"""What a team watches while a search runs, against the real parts: the live report of a real search in headless
Chromium (running header, then the final page with the "where it looks" panel), the study opened live by a real
optuna-dashboard, a real MLflow server receiving every trial, TensorBoard event files read back with tensorboard's
reader, and the served page reloading itself after a rewrite.

A screenshot of the final page is kept for a person to look at: $DIFFMIC_TEST_ARTIFACTS (default: the system temp
directory)/diffmic-test-artifacts/report-final.png.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from test_report import chromium, make_experiment
from test_search import BIN, ROOT, Proc, SEARCH, _csv, _env, _free_port, ray_tmp, tiny  # noqa: F401 (a fixture)

ARTIFACTS = Path(os.environ.get("DIFFMIC_TEST_ARTIFACTS") or tempfile.gettempdir()) / "diffmic-test-artifacts"


def browser():
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", "--enable-unsafe-swiftshader"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


class Server:
    """A command serving on 127.0.0.1 in its own process group, stopped by PID."""

    def __init__(self, cmd: list[str], log: Path, health: str, env: dict | None = None, timeout: float = 120):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=env)
        try:
            wait_for(lambda: self._up(health), timeout, f"{cmd[0]} at {health}")
        except BaseException:
            self.stop()
            raise

    def _up(self, url: str) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.proc.args[0]} exited {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read().decode())


# ------------------------------------------------------------------------------------------- served, reloading
@pytest.mark.integration
def test_the_served_page_reloads_itself_after_a_rewrite(tmp_path):
    make_experiment(tmp_path, "exp1")
    report = tmp_path / "exp1" / "report.html"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tune" / "report.py"), str(tmp_path / "exp1"), "--serve",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    driver = None
    try:
        line = wait_for(lambda: (proc.stdout.readline() or (proc.poll() is not None and "exited")), 180, "serving")
        while "serving http" not in line:
            assert proc.poll() is None, "report.py exited before serving"
            line = proc.stdout.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+/)", line).group(1)
        assert report.exists()  # there was none: --serve wrote it from the record first
        driver = browser()
        driver.get(url)
        assert driver.find_elements("css selector", "#trial-table")
        report.write_text(report.read_text().replace("</body>", "<p id=rewritten>rewritten</p></body>"))
        wait_for(lambda: driver.find_elements("css selector", "#rewritten"), 60, "the page to reload itself")
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


# ------------------------------------------------------------------------------------------- a real search
@pytest.mark.integration
@pytest.mark.slow
def test_a_running_search_is_watched_live_and_tracked(ray_tmp, tmp_path):
    """One tiny search (3 trials, one at a time) with tracking=mlflow against a real MLflow server: while it runs,
    its report says so in the browser and optuna-dashboard opens its study; at the end the final page has the
    where-it-looks panel, MLflow holds a run per trial and TensorBoard a file per trial."""
    pytest.importorskip("mlflow")
    storage, logs = tmp_path / "results", tmp_path / "logs"
    logs.mkdir()
    port = _free_port()
    mlflow = Server([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                     "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "--default-artifact-root", str(tmp_path / "mlartifacts"), "--workers", "1"],
                    logs / "mlflow.log", f"http://127.0.0.1:{port}/health", timeout=240)
    secret = "dashboards-secret-marker-51b0"
    search = Proc([*SEARCH, "experiment=live", f"storage.uri={storage}", "tracking=mlflow",
                   f"tracking.uri=http://127.0.0.1:{port}",
                   *tiny("search.num_samples=3", "report=true", "report_every_s=1", "train.epochs=2")],
                  logs / "search.log", _env(ray_tmp, AWS_SECRET_ACCESS_KEY=secret))
    report = storage / "live" / "report.html"
    driver = dashboard = None
    try:
        # While it runs: the page says so, in a browser, and the study opens in optuna-dashboard.
        wait_for(lambda: report.exists() and "id=live-status" in report.read_text(), 600, "a live report")
        driver = browser()
        driver.get(report.as_uri())
        status = driver.find_element("css selector", "#live-status").text
        assert re.search(r"synthetic: running: \d of 3 trials finished", status), status
        study = re.search(r"optuna-dashboard (sqlite:///\S+\.db)", report.read_text()).group(1)
        dport = _free_port()
        dashboard = Server([str(BIN / "optuna-dashboard"), study, "--host", "127.0.0.1", "--port", str(dport)],
                           logs / "optuna-dashboard.log", f"http://127.0.0.1:{dport}/api/studies")
        studies = get_json(f"http://127.0.0.1:{dport}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["live-synthetic"]
        assert search.proc.poll() is None, "the search ended before its live pieces were seen"
        run = search.wait(900)
        assert run.rc == 0, run.tail()
        assert "[search] synthetic: running: 1 of 3 trials finished" in run.out  # the progress line
        assert "[search] synthetic: running: 3 of 3 trials finished" in run.out

        # The final page: no running header; where the model looks, drawn in the browser.
        page = report.read_text()
        assert "id=live-status" not in page and 'id="where-it-looks"' in page
        driver.get(report.as_uri())
        figures = driver.find_elements("css selector", "#where-it-looks figure")
        assert len(figures) >= 2
        best = json.loads((storage / "live" / "best.json").read_text())["synthetic"]
        k = int(best["params"]["model.dcg.roi_count"])
        for figure in figures:
            image = figure.find_element("css selector", "svg image").rect
            boxes = [b.rect for b in figure.find_elements("css selector", "svg rect.roi")]
            assert len(boxes) == k and image["width"] > 100
            for b in boxes:  # inside the image (1 px of rounding)
                assert image["x"] - 1 <= b["x"] and b["x"] + b["width"] <= image["x"] + image["width"] + 1
                assert image["y"] - 1 <= b["y"] and b["y"] + b["height"] <= image["y"] + image["height"] + 1
            assert re.search(r"predicted .+ p = [\d.]+ ± [\d.]+ over \d+ samples?", figure.text), figure.text
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.set_window_size(1400, min(driver.execute_script("return document.body.scrollHeight") + 100, 16000))
        time.sleep(1)
        driver.save_screenshot(str(ARTIFACTS / "report-final.png"))
        print(f"screenshot: {ARTIFACTS / 'report-final.png'}")

        # TensorBoard: a file per trial, read back with tensorboard's own reader.
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        summary = _csv(storage / "live" / "summary.csv")
        for trial_id in summary["trial_id"]:
            files = list((storage / "live" / "tensorboard" / "synthetic" / trial_id).glob("events.out.tfevents*"))
            assert len(files) == 1, trial_id
            events = EventAccumulator(str(files[0].parent))
            events.Reload()
            assert "val_macro_f1" in events.Tags()["scalars"]

        # MLflow: a run per trial with the searched parameters and per-epoch metrics; no secret anywhere.
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{port}")
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        trials = [r for r in runs if r.data.tags.get("trial_id")]
        assert sorted(r.data.tags["trial_id"] for r in trials) == sorted(summary["trial_id"])
        for r in trials:
            assert "roi_count" in r.data.params
            history = client.get_metric_history(r.info.run_id, "val_macro_f1")
            assert len(history) == int(summary.loc[summary["trial_id"] == r.data.tags["trial_id"],
                                                   "epochs_run"].iloc[0])
        assert secret not in json.dumps([[r.data.params, r.data.tags] for r in runs])
        assert secret not in page
    finally:
        for d in (driver,):
            if d is not None:
                d.quit()
        for server in (dashboard, mlflow):
            if server is not None:
                server.stop()
        if search.proc.poll() is None:
            search.kill()
