"""Experiment tracking (tune/pages/tracking.py), driven as Tune drives it: callbacks with trials and per-epoch results."""
from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from helpers import compose
from tune.pages import tracking
from tune.study.checks import check_tracking
from tune.record.experiment import Record
from tune.study.space import Param, SearchError
from tune.storage import LocalStorage, open_storage

SECRET = "marker-secret-AKIA-do-not-log"
PARAMS = [Param("timesteps", "diffusion.timesteps", "choice", (100, 250)),
          Param("schedule", "diffusion.schedule", "choice", ("linear", "cosine"))]


def _search(root: Path, tracking_cfg: dict, storage=None):
    storage = storage or open_storage(str(root))
    cfg = {"tracking": {"name": "none", "tensorboard": True, "uri": None, **tracking_cfg},
           "search": {"metric": "val_macro_f1"}, "train": {"epochs": 2}}
    return SimpleNamespace(dataset="synthetic", cfg=cfg, params=PARAMS, storage=storage, experiment="exp",
                           record=Record(storage, "exp"))


def _trial(trial_id: str, timesteps: int, schedule: str):
    return SimpleNamespace(trial_id=trial_id, config={"diffusion.timesteps": timesteps, "diffusion.schedule": schedule},
                           status="RUNNING", last_result={})


def _result(trial, epoch: int, f1: float) -> dict:
    result = {"epoch": epoch, "lr": 1e-3, "train_loss": 1.0 / epoch, "val_macro_f1": f1, "val_accuracy": f1 + 0.1,
              "time_this_iter_s": 3.0, "training_iteration": epoch, "done": False, "trial_id": trial.trial_id,
              "config": dict(trial.config)}
    trial.last_result = result
    return result


def _drive(callbacks, trials_epochs: list, end: dict) -> None:
    """Tune's calls for each trial: start, a result per epoch (f1 = epoch / 10), then its end ('complete',
    'error' or None: still running when the experiment ends)."""
    trials = [trial for trial, _ in trials_epochs]
    for trial, epochs in trials_epochs:
        for cb in callbacks:
            cb.on_trial_start(iteration=0, trials=trials, trial=trial)
        for epoch in epochs:
            result = _result(trial, epoch, epoch / 10)
            for cb in callbacks:
                cb.on_trial_result(iteration=epoch, trials=trials, trial=trial, result=result)
        if end.get(trial.trial_id):
            trial.status = "TERMINATED" if end[trial.trial_id] == "complete" else "ERROR"
            for cb in callbacks:
                getattr(cb, f"on_trial_{end[trial.trial_id]}")(iteration=9, trials=trials, trial=trial)
    for cb in callbacks:
        cb.on_experiment_end(trials=trials)


def _scalars(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def _hparams(acc) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData.FromString(
        acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content)
    return {k: v.number_value or v.string_value for k, v in data.session_start_info.hparams.items()}


# ---------------------------------------------------------------------------------------------- config
def test_mlflow_needs_a_uri_without_a_password():
    check_tracking(compose([], "search"))
    cfg = compose(["tracking=mlflow"], "search")
    assert cfg["tracking"] == {"name": "mlflow", "tensorboard": True, "uri": None, "experiment_name": None}
    with pytest.raises(SearchError) as e:
        check_tracking(cfg)
    assert str(e.value) == "tracking.uri=None: expected the MLflow tracking server's URI, e.g. http://127.0.0.1:5000"
    with pytest.raises(SearchError, match=r"tracking.uri=http://me:\*\*\*@host:5000: expected no password"):
        check_tracking(compose(["tracking=mlflow", "tracking.uri=http://me:pw@host:5000"], "search"))
    check_tracking(compose(["tracking=mlflow", "tracking.uri=http://127.0.0.1:5000"], "search"))


# ---------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_event_files_per_trial_parse(tmp_path):
    search = _search(tmp_path, {})
    callbacks = tracking.callbacks(search)
    assert [type(cb) for cb in callbacks] == [tracking.TensorBoardTracker]
    a, b = _trial("a0001", 100, "linear"), _trial("b0002", 250, "cosine")
    _drive(callbacks, [(a, [1, 2]), (b, [1])], {"a0001": "complete"})  # b: open until the experiment ends
    pickle.loads(pickle.dumps(callbacks))  # as Tune pickles them into tuner.pkl, writers left out
    assert "_writers" not in pickle.loads(pickle.dumps(callbacks[0])).__dict__
    tracking.finish(search, pd.DataFrame(), None, None)

    root = tmp_path / "exp" / "tensorboard" / "synthetic"
    acc = _scalars(root / "a0001")
    assert {"train_loss", "val_macro_f1", "val_accuracy", "lr"} <= set(acc.Tags()["scalars"])
    assert "time_this_iter_s" not in acc.Tags()["scalars"]
    assert [(s.step, round(s.value, 3)) for s in acc.Scalars("val_macro_f1")] == [(1, 0.1), (2, 0.2)]
    assert _hparams(acc) == {"timesteps": 100.0, "schedule": "linear"}
    assert [s.step for s in _scalars(root / "b0002").Scalars("train_loss")] == [1]


def test_tensorboard_for_s3_storage_is_staged_on_the_node_and_uploaded(tmp_path, monkeypatch):
    """S3 storage has no local path: files are written under the node's cache and uploaded at the trial's end."""
    class StagedStorage(LocalStorage):  # the local backend behind S3's interface
        is_s3 = True

    monkeypatch.setenv("DIFFMIC_CACHE", str(tmp_path / "cache"))
    storage = StagedStorage(str((tmp_path / "root").resolve()))
    (tmp_path / "root").mkdir()
    search = _search(tmp_path / "root", {}, storage)
    callbacks = tracking.callbacks(search)
    a, b = _trial("a0001", 100, "linear"), _trial("b0002", 250, "cosine")
    _drive(callbacks, [(a, [1, 2])], {"a0001": "complete"})
    uploaded = tmp_path / "root" / "exp" / "tensorboard" / "synthetic" / "a0001"
    assert [s.step for s in _scalars(uploaded).Scalars("val_macro_f1")] == [1, 2]
    staging = callbacks[0].local_dir()
    assert staging.is_relative_to(tmp_path / "cache" / "tensorboard")
    _drive(callbacks, [(b, [1])], {})
    tracking.finish(search, pd.DataFrame(), None, None)
    assert [s.step for s in _scalars(uploaded.parent / "b0002").Scalars("val_macro_f1")] == [1]
    assert not staging.exists()


# ---------------------------------------------------------------------------------------------- MLflow
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on 127.0.0.1 (SQLite, artefacts proxied by the server as remote clients get
    them), stopped by its process group."""
    pytest.importorskip("mlflow")
    port, log = _free_port(), open(tmp_path / "mlflow.log", "wb")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                             "--artifacts-destination", str(tmp_path / "artifacts")],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a busy 2-core machine: the server's start-up was seen to take ~2.5 min
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'mlflow.log').read_text()[-2000:]}")
            time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
        log.close()


@pytest.mark.integration
def test_mlflow_server_gets_a_run_per_trial_under_the_dataset_run(tmp_path, mlflow_server, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    search = _search(tmp_path / "root", {"name": "mlflow", "uri": mlflow_server, "tensorboard": False})
    callbacks = tracking.callbacks(search)
    assert [type(cb) for cb in callbacks] == [tracking.MlflowTracker]
    a, b, c, d = (_trial("a0001", 100, "linear"), _trial("b0002", 250, "cosine"), _trial("c0003", 100, "cosine"),
                  _trial("d0004", 250, "linear"))
    # a re-reports its last epoch (as a restored trial does), c is stopped by ASHA, d is running when the search ends
    _drive(callbacks, [(a, [1, 2, 2]), (b, [1, 2]), (c, [1]), (d, [1])],
           {"a0001": "complete", "b0002": "error", "c0003": "complete"})
    resumed = pickle.loads(pickle.dumps(callbacks))  # a resumed search: Tune's unpickled copies, nothing in memory
    a.status = "RUNNING"
    _drive(resumed, [(a, [2])], {"a0001": "complete"})
    report = search.storage.join(search.record.key("report.html"))
    search.storage.write_text(search.record.key("report.html"), "<html>the report</html>")
    checkpoint = tmp_path / "root" / "exp" / "synthetic" / "a0001" / "checkpoint_000001"
    summary = pd.DataFrame([{"trial_id": "a0001", "checkpoint_path": str(checkpoint), "status": "TERMINATED",
                             "val_macro_f1": 0.2}, {"trial_id": "b0002", "checkpoint_path": None, "status": "ERROR"}])
    best = {"trial_id": "a0001", "checkpoint_uri": str(checkpoint), "bundle_uri": f"s3://bucket/{SECRET}/best",
            "test": {"macro_f1": 0.5, "accuracy": 0.75}}
    tracking.finish(search, summary, best, report)
    assert "tracking:" not in capsys.readouterr().out

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("exp")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("role") == "search")
    trials = {r.data.tags["trial_id"]: r for r in runs if r.data.tags.get("role") == "trial"}
    assert sorted(trials) == ["a0001", "b0002", "c0003", "d0004"] and len(runs) == 5  # a's run was continued
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials.values())
    assert trials["b0002"].data.params == {"timesteps": "250", "schedule": "cosine", "dataset": "synthetic"}
    history = client.get_metric_history(trials["a0001"].info.run_id, "val_macro_f1")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2)]
    assert {"train_loss", "lr", "val_accuracy"} <= set(trials["a0001"].data.metrics)
    assert "time_this_iter_s" not in trials["a0001"].data.metrics
    assert [m.step for m in client.get_metric_history(trials["b0002"].info.run_id, "val_macro_f1")] == [1, 2]
    assert {k: r.info.status for k, r in trials.items()} == {"a0001": "FINISHED", "b0002": "FAILED",
                                                           "c0003": "FINISHED", "d0004": "KILLED"}
    assert trials["c0003"].data.tags.get("stopped_early") == "true" and "stopped_early" not in trials["a0001"].data.tags
    assert trials["a0001"].data.tags["best_checkpoint_uri"] == str(checkpoint)
    assert trials["a0001"].data.tags["best"] == "true"
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial_id"] == "a0001"
    assert parent.data.metrics == {"test_macro_f1": 0.5, "test_accuracy": 0.75}
    assert parent.data.tags["best_bundle_uri"] == "s3://bucket/***/best"
    assert [f.path for f in client.list_artifacts(parent.info.run_id)] == ["report.html"]
    local = client.download_artifacts(parent.info.run_id, "report.html", str(tmp_path))
    assert Path(local).read_text() == "<html>the report</html>"
    logged = [(r.data.params, r.data.tags) for r in runs]
    assert SECRET not in repr(logged)
    assert not any(k in params for params, _ in logged for k in ("train", "search", "tracking", "storage"))


def test_a_tracking_server_that_is_down_costs_a_warning_not_the_search(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    search = _search(tmp_path, {"name": "mlflow", "uri": f"http://127.0.0.1:{_free_port()}"})
    callbacks = tracking.callbacks(search)
    a, b = _trial("a0001", 100, "linear"), _trial("b0002", 250, "cosine")
    _drive(callbacks, [(a, [1, 2]), (b, [1, 2])], {"a0001": "complete", "b0002": "complete"})
    tracking.finish(search, pd.DataFrame([{"trial_id": "a0001", "checkpoint_path": None, "status": "TERMINATED"}]),
                    None, None)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines  # one per trial, one from finish()
    assert all(line.startswith("[search] synthetic: tracking: MLflow") for line in lines)
    assert "trial a0001" in lines[0] and "trial b0002" in lines[1] and SECRET not in "".join(lines)
    acc = _scalars(tmp_path / "exp" / "tensorboard" / "synthetic" / "b0002")  # TensorBoard went on
    assert [s.step for s in acc.Scalars("val_macro_f1")] == [1, 2]


def test_finish_never_raises(tmp_path, capsys):
    search = _search(tmp_path, {})
    search.cfg["tracking"] = None  # a config that cannot be read
    tracking.finish(search, pd.DataFrame(), None, None)
    assert capsys.readouterr().out.startswith("[search] synthetic: tracking: TypeError")
