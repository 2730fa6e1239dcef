"""diffmic.engine: one training run end to end on tiny synthetic data — outputs, determinism, resume, bundle."""
import json
import subprocess
import sys

import pytest
import torch

from diffmic.bundle import BundleError, load_bundle
from diffmic.checkpoint import CheckpointError, load_eval_model, load_state
from diffmic.data import build_splits
from diffmic.engine import train
from diffmic.session import LocalSession, SessionError

from helpers import TINY, compose


def run(tmp_path, name, overrides=(), resume=False):
    cfg = compose(TINY + ["deterministic=true", *overrides])
    return train(cfg, LocalSession(tmp_path / name, resume=resume)), cfg


def test_run_writes_metrics_history_checkpoint_and_bundle(tmp_path):
    result, cfg = run(tmp_path, "a")
    out = tmp_path / "a"
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa", "auc", "dcg_accuracy", "ece"):
            assert key in metrics[split]
    assert (out / "history.csv").read_text().count("\n") == 2  # header + one epoch
    assert (out / "checkpoint" / "state.pt").is_file()
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)  # loads without unpickling objects
    assert state["epoch"] == 1 and state["class_names"]
    bundle = load_bundle(out / "model")
    assert bundle.class_names == state["class_names"] and bundle.meta["metrics"]["test"]["accuracy"] == result.test["accuracy"]


def test_deterministic_runs_are_identical(tmp_path):
    a, _ = run(tmp_path, "a")
    b, _ = run(tmp_path, "b")
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    assert a.test["accuracy"] == b.test["accuracy"] and a.val["macro_f1"] == b.val["macro_f1"]


class Killed(Exception):
    pass


class KilledAfter(LocalSession):
    """A run that dies right after its checkpoint of epoch `after` is written (as a SIGKILL would leave it)."""

    def __init__(self, output_dir, after: int):
        super().__init__(output_dir)
        self.after = after

    def report(self, metrics, state):
        super().report(metrics, state)
        if metrics["epoch"] == self.after:
            raise Killed


def _untimed(history):
    return [{k: v for k, v in row.items() if not k.endswith(("samples_per_s", "time_s"))} for row in history]


@pytest.mark.slow  # three short trainings (make test-fast skips it)
@pytest.mark.parametrize("mode,augment_on", [("max", "loader"), ("min", "loader"), ("max", "device")])
def test_a_killed_and_resumed_run_ends_bit_for_bit_where_the_uninterrupted_run_ends(tmp_path, mode, augment_on):
    overrides = ["train.epochs=3", "train.select_metric=accuracy", f"train.select_mode={mode}",
                 f"train.augment_on={augment_on}"]  # device: flips and angles drawn per batch on the device
    full, cfg = run(tmp_path, "full", overrides)
    if mode == "min":  # the case that tests the final EMA: the best epoch is one the resumed run never trains
        # (accuracy does not fall over these epochs; a tie goes to the earliest epoch)
        assert full.best_epoch == 1, [row["val_accuracy"] for row in full.history]
    for kill_after in (1, 2):
        part = tmp_path / f"part{kill_after}"
        with pytest.raises(Killed):
            train(cfg, KilledAfter(part, kill_after))
        resumed = train(cfg, LocalSession(part, resume=True))
        assert _untimed(resumed.history) == _untimed(full.history) and len(full.history) == 3
        assert resumed.best_epoch == full.best_epoch and resumed.val == full.val and resumed.test == full.test
        weights = [(run_dir / "model" / "model.safetensors").read_bytes() for run_dir in (tmp_path / "full", part)]
        assert weights[0] == weights[1], f"exported weights differ after a kill at epoch {kill_after}"


def test_selection_follows_the_mode(tmp_path):
    result, _ = run(tmp_path, "ece", ["train.epochs=3", "train.select_metric=ece", "train.select_mode=min"])
    eces = [row["val_ece"] for row in result.history]
    assert result.best_epoch == 1 + eces.index(min(eces)) and result.val["ece"] == min(eces)


def test_a_run_directory_is_never_overwritten_and_resume_needs_a_checkpoint(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text("{}")
    with pytest.raises(SessionError, match=r"already holds a run \(metrics.json\).*resume=true.*nothing was changed"):
        LocalSession(old)
    with pytest.raises(SessionError, match="resume=true: no checkpoint to resume"):
        LocalSession(tmp_path / "new", resume=True)
    with pytest.raises(SessionError, match="no checkpoint to resume"):
        LocalSession(old, resume=True)
    assert not (tmp_path / "new").exists() and (old / "metrics.json").read_text() == "{}"


def test_no_password_reaches_a_checkpoint_config_or_bundle(tmp_path):
    cfg = compose(TINY + ["train.epochs=1"])
    cfg["search"] = {"optuna_storage": "postgresql://diffmic:hunter2-db-pass@db.internal/studies"}
    train(cfg, LocalSession(tmp_path / "run"))
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "state.pt" for p in written) and any(p.name == "config.json" for p in written)
    assert not [p for p in written if b"hunter2-db-pass" in p.read_bytes()]
    assert "postgresql://diffmic:***@db.internal" in (tmp_path / "run" / "config.json").read_text()


def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(tmp_path, capsys):
    run(tmp_path, "cut", ["train.epochs=2"])
    state = tmp_path / "cut" / "checkpoint" / "state.pt"
    assert load_state(tmp_path / "cut" / "checkpoint-previous")["epoch"] == 1
    state.write_bytes(state.read_bytes()[:1000])  # cut short after the run
    result, _ = run(tmp_path, "cut", ["train.epochs=3"], resume=True)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "cannot be loaded" in warnings[0] and "resumed from" in err
    assert "checkpoint-previous at epoch 1" in err and [r["epoch"] for r in result.history] == [1, 2, 3]
    (tmp_path / "cut" / "checkpoint" / "state.pt").write_bytes(b"junk")
    (tmp_path / "cut" / "checkpoint-previous" / "state.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError):  # none loads: stop, never a silent start from scratch
        run(tmp_path, "cut", ["train.epochs=4"], resume=True)


def test_resume_with_nothing_left_still_reports(tmp_path):
    run(tmp_path, "done", ["train.epochs=1"])
    reports = []

    class Recording(LocalSession):
        def report(self, metrics, state):
            reports.append(metrics)
            super().report(metrics, state)

    train(compose(TINY + ["deterministic=true"]), Recording(tmp_path / "done", resume=True))
    assert len(reports) == 1 and reports[0]["epoch"] == 1


def test_bundle_predictions_match_the_in_memory_model_and_tampering_is_refused(tmp_path):
    result, cfg = run(tmp_path, "a")
    bundle = load_bundle(tmp_path / "a" / "model")
    data = build_splits(cfg["dataset"])
    x = torch.stack([data.test[i][0] for i in range(8)])
    model = load_eval_model(load_state(tmp_path / "a" / "checkpoint")).eval()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ours = model.predict(x, "ddim", 5, generator=g1).probs
    theirs = bundle.model.predict(x, "ddim", 5, generator=g2).probs
    torch.testing.assert_close(ours, theirs)
    weights = tmp_path / "a" / "model" / "model.safetensors"
    data_bytes = bytearray(weights.read_bytes())
    data_bytes[200] ^= 0xFF
    weights.write_bytes(bytes(data_bytes))
    with pytest.raises(BundleError, match="model.safetensors does not match its SHA-256"):
        load_bundle(tmp_path / "a" / "model")


@pytest.mark.slow  # a command line in a fresh process: seconds of imports (make test-fast skips it)
def test_cli_train_and_evaluate(tmp_path):
    out = tmp_path / "cli"
    args = [f"output_dir={out}", *TINY]
    subprocess.run([sys.executable, "-m", "diffmic.train", *args], check=True, capture_output=True, timeout=300)
    val = json.loads((out / "metrics.json").read_text())["val"]
    # Evaluating the saved run on val reproduces the validation metrics its best epoch was chosen on.
    r = subprocess.run([sys.executable, "-m", "diffmic.evaluate", f"checkpoint={out}", "split=val"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["split"] == "val" and {k: again[k] for k in val} == val
    r = subprocess.run([sys.executable, "-m", "diffmic.evaluate", f"checkpoint={out}", "split=val",
                        "diffusion.sample_steps=3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout)["sample_steps"] == 3, r.stderr


@pytest.mark.slow  # a command line in a fresh process: seconds of imports (make test-fast skips it)
def test_cli_bad_input_is_one_line_before_training(tmp_path):
    r = subprocess.run([sys.executable, "-m", "diffmic.train", f"output_dir={tmp_path}/x", "dataset=folder",
                        "model.dcg.pretrained=false", f"dataset.root={tmp_path}/missing"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "missing" in lines[0] and lines[0].startswith("diffmic.train: error:")
    r = subprocess.run([sys.executable, "-m", "diffmic.train", "diffusion.sample_steps=5000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "diffusion.sample_steps=5000" in r.stderr


@pytest.mark.slow
def test_short_synthetic_run_learns_and_the_diffusion_head_keeps_up_with_the_dcg(tmp_path):
    """The search's per-trial budget on the built-in data (48 px, ResNet-10t, 4 epochs; about a minute here) beats
    chance (0.25 for 4 classes) clearly; a mis-wired sampler or denoiser would fall towards chance while the DCG,
    trained by its own cross-entropy, stays high."""
    cfg = compose(["+search_preset=synthetic", "deterministic=true"])
    result = train(cfg, LocalSession(tmp_path / "syn"))
    acc, dcg = result.test["accuracy"], result.test["dcg_accuracy"]
    assert acc >= 0.6, (acc, dcg)
    assert acc >= dcg - 0.15, (acc, dcg)
