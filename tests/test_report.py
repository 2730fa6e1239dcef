"""tune/report.py: the results page, built from a generated experiment (fast) and checked in headless Chromium.

REPORT_EXPERIMENT_URI=<storage root>/<experiment> points the browser test at a real search's results instead.
"""
from __future__ import annotations

import json
from html.parser import HTMLParser
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tune.record.experiment import FORMAT, Record, RecordError
from tune.record.experiment import best_row
from tune.pages.serve import build_report, write_report
from tune.storage import open_storage
from tune.record.results import Results

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa", "auc", "ece", "dcg_accuracy", "mean_entropy")
SPACE = {"timesteps": ("diffusion.timesteps", "choice", [100, 250, 500, 1000]),
         "schedule": ("diffusion.schedule", "choice", ["linear", "cosine"]),
         "mmd_weight": ("train.mmd_weight", "uniform", [0.0, 1.0]),
         "roi_count": ("model.dcg.roi_count", "choice", [2, 4, 6]),
         "sample_steps": ("diffusion.sample_steps", "choice", [5, 10, 20])}
KEYS = [key for key, _, _ in SPACE.values()]
EPOCHS, EPOCH_S = 4, 30.0
SECRET = "report-test-secret-marker-7c1f"


# ---------------------------------------------------------------- a fake search's outputs, written through the record
def fake_trial(ds: str, i: int, n: int, rng, error: bool) -> tuple[dict, list[dict]]:
    """(summary row, history rows); every third trial is stopped by ASHA after 2 epochs."""
    tid = {3: "4e000003", 4: "10000004"}.get(i, f"{ds[:3]}_{i:05d}")  # hex ids like Ray's: text, not numbers
    row = {"dataset": ds, "trial_id": tid,
           **{k: values[i % len(values)] if kind == "choice" else float(rng.uniform(*values))
              for k, kind, values in SPACE.values()}}
    if error:
        return {**row, "status": "ERROR", "epochs_run": 0, "stopped_early": False}, []
    epochs = EPOCHS if i % 3 else 2
    curve = {m: np.clip(0.4 + 0.1 * i / n + 0.08 * np.arange(1, epochs + 1) + rng.normal(0, .02, epochs), 0, 1)
             for m in METRICS}
    history = [{"dataset": ds, "trial_id": row["trial_id"], "epoch": e + 1, "time_total_s": EPOCH_S * (e + 1),
                "train_loss": 1 / (e + 1), "train_mse": .5 / (e + 1), "train_mmd": .1, "train_dcg_ce": .3,
                "train_samples_per_s": 200.0, "train_epoch_time_s": 25.0,
                **{f"val_{m}": float(v[e]) for m, v in curve.items()}} for e in range(epochs)]
    b = int(np.argmax(curve["macro_f1"]))
    hours = EPOCH_S * epochs / 3600
    return {**row, **{f"val_{m}": float(v[b]) for m, v in curve.items()}, "best_epoch": b + 1, "epochs_run": epochs,
            "checkpoint_path": f"/runs/{ds}/checkpoints/{row['trial_id']}", "wall_time_s": EPOCH_S * epochs,
            "cpu_hours": hours, "gpu_hours": hours, "stopped_early": epochs < EPOCHS,
            "status": "STOPPED_EARLY" if epochs < EPOCHS else "COMPLETED"}, history


def fake_best(root: Path, ds: str, top: pd.Series) -> dict:
    """The best.json entry of the dataset's top trial."""
    test = {m: float(top[f"val_{m}"]) - 0.02 for m in METRICS}
    uris = {"checkpoint_uri": top["checkpoint_path"], "bundle_uri": f"{root}/best/{ds}"}
    entry = {"trial_id": top["trial_id"], "params": {k: top[k] for k in KEYS},
             "val": {m: top[f"val_{m}"] for m in METRICS}, "class_names": ["benign", "malignant", "other"],
             "test": {**test, "per_class_recall": [0.8, 0.7, 0.8],
                      "confusion_matrix": [[8, 1, 1], [2, 7, 1], [0, 2, 8]]}, **uris}
    return entry


def make_optuna_study(path: Path, name: str, trials: pd.DataFrame) -> None:
    """A real study as Ray's OptunaSearch leaves it: one param per config key, the metric as the value."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}", direction="maximize")
    dists = {k: FloatDistribution(*values) if kind == "uniform" else CategoricalDistribution(values)
             for k, kind, values in SPACE.values()}
    for _, t in trials.iterrows():
        params = {k: t[k].item() if hasattr(t[k], "item") else t[k] for k in dists}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(t["val_macro_f1"])))


def fake_explanations(record: Record, ds: str, n: int = 4, k: int = 2) -> None:
    """What the search leaves for the "where it looks" panel: n test images of 48 px, k crops of 16 px each."""
    import io

    from PIL import Image

    items, images = [], []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(np.full((192, 192, 3), 40 * i, np.uint8)).save(buffer, format="PNG")
        samples = [[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]
        items.append({"size": [48, 48], "boxes": [[8 * j, 8 * j, 8 * j + 16, 8 * j + 16] for j in range(k)],
                      "probs": [0.6, 0.267, 0.133], "sample_probs": samples, "predicted": 0, "label": i % 3,
                      "cam": [[0.0, 1.0], [0.5, 0.2]]})
        images.append(buffer.getvalue())
    record.write_explanations(ds, items, images)


def make_experiment(root: Path, name: str = "exp1", datasets=("synthetic", "isic"), trials: int = 6,
                    optuna_for=("synthetic",), best_for=("synthetic", "isic"), all_error=()) -> int:
    """A fake search under root/name (the last dataset's last trial errored); returns the number of trials."""
    record, rng = Record(open_storage(str(root)), name), np.random.default_rng(0)
    summary, history, best_json = [], [], {}
    for ds in datasets:
        rows = []
        for i in range(trials):
            failed = ds in all_error or (ds == datasets[-1] and i == trials - 1)
            row, hist = fake_trial(ds, i, trials, rng, error=failed)
            rows.append(row)
            history += hist
        frame = pd.DataFrame(rows)
        summary.append(frame)
        ok = frame[frame["status"] != "ERROR"]
        if ds in optuna_for and len(ok):
            make_optuna_study(root / name / "optuna" / f"{ds}.db", f"{name}-{ds}", ok)
        if ds in best_for and len(ok):
            best_json[ds] = fake_best(root, ds, ok.loc[ok["val_macro_f1"].idxmax()])
            fake_explanations(record, ds)
    record.write_table("summary", pd.concat(summary, ignore_index=True))
    record.write_table("history", pd.DataFrame(history))
    record.write_best(best_json)
    search = {"metric": "val_macro_f1", "mode": "max", "num_samples": trials, "scheduler": "asha", "sampler": "tpe",
              "epochs_per_trial": EPOCHS,
              "space": {n: {"key": k, "kind": kind, "values": v} for n, (k, kind, v) in SPACE.items()}}
    record.write_search({ds: search for ds in datasets}, started=1.7e9, wall_time_s=5432.1)
    return sum(len(s) for s in summary)


def table_rows(page: str) -> int:
    table = re.search(r"<table class=sortable id=trial-table>.*?</table>", page, re.S).group(0)
    return table.count("<tr") - 1  # less the header row


@pytest.fixture
def experiment(tmp_path) -> tuple[Path, str, int]:
    return tmp_path, "exp1", make_experiment(tmp_path, "exp1")


# ---------------------------------------------------------------- the page's content
def test_report_is_self_contained_and_complete(experiment, monkeypatch):
    root, name, n = experiment
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://keyid:endpoint-pass-9d2e@127.0.0.1:1")
    uri = write_report(Record(open_storage(str(root)), name))
    assert uri == str(root / name / "report.html")
    page = Path(uri).read_text()
    assert page.count("plotly.js v") == 1 and page.count('<script type="text/javascript">/**') == 1  # inline, once
    assert not re.search(r"<script[^>]+src=\"https?://", page)
    assert table_rows(page) == n == 12
    assert 'id="ds-synthetic"' in page and 'id="ds-isic"' in page
    assert SECRET not in page and "endpoint-pass-9d2e" not in page
    assert "Test confusion matrix" in page and "malignant" in page
    assert "ASHA stopped 2 of 6 trials" in page  # trials 0 and 3 of each dataset, each 2 epochs × 30 s short:
    assert "0.0333 trial-hours" in page and "16.7% of what the search would have used" in page  # 120 / (600 + 120)
    assert page.count('class="plotly-graph-div"') == 2 * 7 - 1  # 7 plots a dataset; isic has no Optuna study
    assert "No Optuna study stored at exp1/optuna/isic.db" in page
    assert "Parameter importances" in page and "6 completed trials" in page
    # where the best model looks: a figure per image shown, its crops as boxes, its spread over the chains
    panel = re.search(r'<section id="where-it-looks">.*?</section>', page, re.S).group(0)
    assert panel.count("<figure") == 2 * 4 and panel.count("<rect class=roi") == 2 * 4 * 2
    assert "p = 0.600 ± 0.100 over 3 samples" in panel and panel.count("wrong</b>") == 2 * 2


def test_where_it_looks_keeps_tampered_boxes_inside_their_image(experiment):
    root, name, _ = experiment
    index = root / name / "explain" / "synthetic" / "index.json"
    items = json.loads(index.read_text())
    items[0].update(boxes=[[-50, 10, 900, 30]], predicted=99, image="../../best.json")
    items[1].update(label="<b>")  # not a class index: that figure is left out, the page still comes
    index.write_text(json.dumps(items))
    page = build_report(Record.at(str(root / name)))
    panel = re.search(r'<section id="where-it-looks">.*?</section>', page, re.S).group(0)
    assert '<rect class=roi x="0" y="10" width="48" height="20">' in panel  # clamped to the 48 px image
    assert panel.count("<figure") == 2 * 4 - 1
    assert "&lt;b&gt;" not in panel and "trial_id" not in panel  # nothing of best.json came in as an image


def test_secret_in_the_data_is_redacted(experiment, monkeypatch):
    root, name, _ = experiment
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    best = json.loads((root / name / "best.json").read_text())
    best["synthetic"]["bundle_uri"] = f"s3://bucket/p?token={SECRET}"
    best["synthetic"]["checkpoint_uri"] = "http://user:hunter2pass@host/x"
    (root / name / "best.json").write_text(json.dumps(best))
    page = build_report(Record.at(str(root / name)))
    assert SECRET not in page and "hunter2pass" not in page and "token=***" in page


def test_values_from_a_tampered_record_cannot_inject_markup(experiment):
    """Class names, metric values, trial ids and statuses are data: escaped in HTML, \\u-escaped in plot JSON."""
    root, name, _ = experiment
    evil = '"><img src=x onerror=alert(1)>'
    best = json.loads((root / name / "best.json").read_text())
    best["synthetic"]["class_names"] = [evil] * 3
    best["synthetic"]["test"]["accuracy"] = evil
    best["synthetic"]["val"]["macro_f1"] = evil
    (root / name / "best.json").write_text(json.dumps(best))
    record = Record.at(str(root / name))
    summary = record.read_table("summary")
    summary.loc[0, "trial_id"], summary.loc[1, "status"] = evil, "x onmouseover=alert(3)"
    record.write_table("summary", summary)
    page = build_report(record)
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page  # shown as the text it is

    class Tags(HTMLParser):
        attributes: set[str] = set()

        def handle_starttag(self, tag, attrs):
            self.attributes |= {name for name, _ in attrs}

    parser = Tags()
    parser.feed(page)
    assert {"class", "data-v", "id"} <= parser.attributes and not [a for a in parser.attributes if a.startswith("on")]


def test_missing_pieces_are_said_not_fatal(tmp_path):
    n = make_experiment(tmp_path, "e2", datasets=("synthetic", "broken"), optuna_for=(), best_for=("synthetic",),
                        all_error=("broken",))
    page = build_report(Record.at(str(tmp_path / "e2")))
    assert table_rows(page) == n
    assert "No best trial for broken" in page and "Every trial of this dataset failed" in page
    assert "No Optuna study stored" in page and "No per-epoch history" in page
    record = Record(open_storage(str(tmp_path)), "e3")  # an all-error search: no history, no best trial
    record.write_table("summary", pd.DataFrame([{"dataset": "synthetic", "trial_id": "t1", "diffusion.timesteps": 100,
                                                "status": "ERROR", "epochs_run": 0, "stopped_early": False,
                                                "wall_time_s": None, "cpu_hours": 0.0, "gpu_hours": 0.0}]))
    record.write_search({"synthetic": json.loads((tmp_path / "e2" / "search.json").read_text())["datasets"]["broken"]},
                        started=1.7e9, wall_time_s=1.0)
    page = build_report(record)
    assert table_rows(page) == 1 and "No best trial for synthetic" in page
    with pytest.raises(RecordError, match="no search results"):
        build_report(Record(open_storage(str(tmp_path)), "nothing-here"))


def test_record_round_trip_and_format(tmp_path):
    """What the search writes is what the readers get: per-dataset descriptions, the best table derived from
    best.json (so they agree), a format the reader checks, and format-0 records still readable."""
    make_experiment(tmp_path, "e6", datasets=("synthetic", "isic"))
    record = Record.at(str(tmp_path / "e6"))
    res = Results.read(record)
    meta = json.loads((tmp_path / "e6" / "search.json").read_text())
    assert meta["format"] == FORMAT and list(meta["datasets"]) == ["synthetic", "isic"] == res.datasets
    assert res.metric("isic") == "val_macro_f1" and not res.minimize("isic") and len(res.params("isic")) == len(SPACE)
    best_table = record.read_table("best")
    assert best_table.to_dict("records") == [best_row(d, e) for d, e in record.read_best().items()]
    assert best_table["trial_id"].tolist() == [res.ranked(d).iloc[0]["trial_id"] for d in res.datasets]
    old = {"experiment": "e6", "datasets": ["synthetic", "isic"], **meta["datasets"]["isic"], "mode": "min"}
    (tmp_path / "e6" / "search.json").write_text(json.dumps(old))  # format 0: one description for every dataset
    res = Results.read(record)
    assert res.datasets == ["synthetic", "isic"] and res.minimize("synthetic") and res.minimize("isic")
    (tmp_path / "e6" / "search.json").write_text(json.dumps({**meta, "format": FORMAT + 1}))
    with pytest.raises(RecordError, match=f"format {FORMAT + 1}"):
        Results.read(record)


def test_sample_steps_not_searched_says_so(tmp_path):
    make_experiment(tmp_path, "e4", datasets=("synthetic",))
    meta = json.loads((tmp_path / "e4" / "search.json").read_text())
    del meta["datasets"]["synthetic"]["space"]["sample_steps"]
    (tmp_path / "e4" / "search.json").write_text(json.dumps(meta))
    assert "diffusion.sample_steps was not searched" in build_report(Record.at(str(tmp_path / "e4")))


def test_record_at_uri(tmp_path):
    def where(uri):
        record = Record.at(uri)
        return record.storage.uri, record.experiment
    assert where("s3://bucket/prefix/exp/") == ("s3://bucket/prefix", "exp")
    assert where("s3://bucket/exp") == ("s3://bucket", "exp")
    (tmp_path / "e").mkdir()
    assert where(str(tmp_path / "e")) == (str(tmp_path), "e")
    with pytest.raises(RecordError, match="no experiment directory"):
        Record.at(str(tmp_path / "missing"))
    with pytest.raises(RecordError, match="expected s3://bucket"):
        Record.at("s3://bucket")


# ---------------------------------------------------------------- command line and storage
@pytest.mark.slow  # a command line in a fresh process: seconds of imports (make test-fast skips it)
def test_cli_serve(experiment):
    """`--serve` on a free port: the URL is printed, the page is served, Ctrl-C stops it — also when the process
    was started with SIGINT ignored, as every job a non-interactive shell puts in the background is (`make test &`,
    CI runners): Python then raises no KeyboardInterrupt, and the server used to ignore Ctrl-C (issue 23's flaky
    test: it failed whenever the suite itself ran in the background)."""
    root, name, _ = experiment
    out = root / "copy.html"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tune" / "report.py"), str(root / name), "--serve",
                             "--port", "0", "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        url, deadline = None, time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"report.py exited {proc.returncode} before serving")
            m = re.search(r"serving (http://127\.0\.0\.1:\d+/)", line)
            url = m.group(1) if m else None
        assert url, "no 'serving http://127.0.0.1:PORT/' line"
        with urllib.request.urlopen(url, timeout=30) as r:
            body = r.read().decode()
        text = out.read_text()
        assert r.status == 200 and "plotly.js v" in body
        # the file as written, with the script that reloads it when it changes, which /version tells
        with urllib.request.urlopen(url + "version", timeout=30) as r:
            version = r.read().decode()
        script = body[body.rindex("<script>(function(){var v="):body.rindex("</body>")]
        assert body.replace(script, "") == text and f'"{version}"' in script
        out.write_text(text.replace("</body>", "<p id=changed>changed</p></body>"))
        deadline = time.time() + 30
        while time.time() < deadline:
            with urllib.request.urlopen(url + "version", timeout=30) as r:
                if r.read().decode() != version:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("/version did not change after the page was rewritten")
        with urllib.request.urlopen(url, timeout=30) as r:
            assert "<p id=changed>" in r.read().decode()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert not (root / name / "report.html").exists()  # --output wrote the page there instead


@pytest.mark.slow  # a command line in a fresh process: seconds of imports (make test-fast skips it)
def test_cli_bad_uri(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tune" / "report.py"), str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "report: error: no experiment directory" in r.stderr


@pytest.mark.integration
def test_report_on_s3(tmp_path, s3_bucket):
    make_experiment(tmp_path / "local", "exp1")
    st = open_storage(f"s3://{s3_bucket}/runs")
    st.upload_dir(tmp_path / "local" / "exp1", "exp1")
    assert write_report(Record(st, "exp1")) == f"s3://{s3_bucket}/runs/exp1/report.html"
    page = st.read_text("exp1/report.html")
    assert table_rows(page) == 12 and "6 completed trials" in page  # the Optuna study came through S3 too
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in page
    r = subprocess.run([sys.executable, str(ROOT / "tune" / "report.py"), f"s3://{s3_bucket}/runs/exp1", "--output",
                        str(tmp_path / "r.html")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert table_rows((tmp_path / "r.html").read_text()) == 12


# ---------------------------------------------------------------- in a real browser
def chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver. The set-up step installs them (`make browser`, which `make test` runs);
    a test never installs system packages, and fails (not skips) with what to run when they are missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("headless Chromium is not installed: run `make browser` (as root: apt-get install chromium "
                    "chromium-driver), or deselect the browser tests with -m 'not integration'", pytrace=False)
    return browser, driver


def the_page(tmp_path: Path) -> tuple[str, int, str]:
    """(page, trial count, metric): a real search's (REPORT_EXPERIMENT_URI) or a generated one."""
    if os.environ.get("REPORT_EXPERIMENT_URI"):
        res = Results.read(Record.at(os.environ["REPORT_EXPERIMENT_URI"]))
        return build_report(res.record), len(res.summary), res.metric(res.datasets[0])
    n = make_experiment(tmp_path / "root", "exp1")
    return build_report(Record.at(str(tmp_path / "root" / "exp1"))), n, "val_macro_f1"


@pytest.mark.integration
def test_page_renders_in_headless_chromium(tmp_path):
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium()
    page, n, metric = the_page(tmp_path)
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    plots = page.count('class="plotly-graph-div"')
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", "--enable-unsafe-swiftshader"):  # software WebGL: parallel coordinates
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)  # an explicit driver: nothing downloaded
    try:
        driver.get(path.as_uri())
        rendered = ("return Array.from(document.querySelectorAll('.plotly-graph-div'))"
                    ".filter(d => d.classList.contains('js-plotly-plot') && d.querySelector('.main-svg')).length")
        WebDriverWait(driver, 120).until(lambda d: d.execute_script(rendered) >= plots)
        assert plots >= 1 and driver.execute_script(rendered) == plots
        assert len(driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg")) >= plots
        if '"type":"parcoords"' in page:
            assert driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot canvas")

        assert len(driver.find_elements(By.CSS_SELECTOR, "#trial-table tbody tr")) == n
        headers = driver.find_elements(By.CSS_SELECTOR, "#trial-table th")
        names = [h.text.strip(" ▲▼") for h in headers]

        def column(i: int) -> list:
            return driver.execute_script("return Array.from(document.querySelectorAll('#trial-table tbody tr'))"
                                         f".map(r => r.cells[{i}].dataset.v).filter(v => v !== '')")
        if metric in names:
            i = names.index(metric)
            headers[i].click()
            values = [float(v) for v in column(i)]
            assert values == sorted(values) and headers[i].get_attribute("data-dir") == "asc"
            headers[i].click()
            assert [float(v) for v in column(i)] == sorted(values, reverse=True)
        headers[names.index("trial_id")].click()
        assert column(names.index("trial_id")) == sorted(column(names.index("trial_id")))

        # where it looks: one figure per image shown, its crops drawn inside the image
        figures = driver.find_elements(By.CSS_SELECTOR, "#where-it-looks figure")
        assert len(figures) == page.count('<figure class="look')
        for figure in figures:
            image = figure.find_element(By.CSS_SELECTOR, "svg.look-img image").rect
            assert image["width"] >= 100 and image["height"] >= 100
            for box in (b.rect for b in figure.find_elements(By.CSS_SELECTOR, "svg.look-img rect.roi")):
                assert image["x"] - 1 <= box["x"] and box["x"] + box["width"] <= image["x"] + image["width"] + 1
                assert image["y"] - 1 <= box["y"] and box["y"] + box["height"] <= image["y"] + image["height"] + 1

        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(tmp_path / "report-top.png"))
        driver.set_window_size(1400, min(driver.execute_script("return document.body.scrollHeight") + 100, 16000))
        time.sleep(1)  # responsive plots re-layout to the new size
        driver.save_screenshot(str(tmp_path / "report-full.png"))
        assert (tmp_path / "report-top.png").stat().st_size > 10_000
    finally:
        driver.quit()
