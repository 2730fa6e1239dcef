"""diffmic.engine: one training run end to end on tiny synthetic data — outputs, determinism, resume, bundle."""
import json
import subprocess
import sys

import pytest
import torch

from diffmic.bundle import BundleError, load_bundle
from diffmic.data import build_splits
from diffmic.engine import train
from diffmic.session import LocalSession

from helpers import TINY, compose


def run(tmp_path, name, overrides=(), resume=False):
    cfg = compose(TINY + ["deterministic=true", *overrides])
    return train(cfg, LocalSession(tmp_path / name, resume=resume)), cfg


def test_run_writes_metrics_history_checkpoint_and_bundle(tmp_path):
    result, cfg = run(tmp_path, "a")
    out = tmp_path / "a"
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "kappa", "auc", "dcg_accuracy", "ece"):
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


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    full, _ = run(tmp_path, "full", ["train.epochs=3"])
    run(tmp_path, "part", ["train.epochs=2"])
    resumed, _ = run(tmp_path, "part", ["train.epochs=3"], resume=True)
    assert [r["epoch"] for r in resumed.history] == [r["epoch"] for r in full.history] == [1, 2, 3]
    assert resumed.history[:2] == json.loads(json.dumps(resumed.history[:2]))  # history carried over
    assert abs(resumed.history[-1]["train_loss"] - full.history[-1]["train_loss"]) < 0.5 * full.history[0]["train_loss"]


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
    state = torch.load(tmp_path / "a" / "checkpoint" / "state.pt", weights_only=True)
    from diffmic.models import build_model
    model = build_model(cfg, data.num_classes, cfg["dataset"]["image_size"])
    model.load_state_dict(state["best_weights"] or state["ema"]["shadow"], strict=False)
    model.load_state_dict({**state["model"], **(state["best_weights"] or state["ema"]["shadow"])})
    model.eval()
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


def test_cli_train_and_evaluate(tmp_path):
    out = tmp_path / "cli"
    args = [f"output_dir={out}", *TINY]
    subprocess.run([sys.executable, "-m", "diffmic.train", *args], check=True, capture_output=True, timeout=300)
    assert json.loads((out / "metrics.json").read_text())["test"]["accuracy"] >= 0
    r = subprocess.run([sys.executable, "-m", "diffmic.evaluate", f"checkpoint={out}", "split=val",
                        "diffusion.sample_steps=3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["split"] == "val" and metrics["sample_steps"] == 3 and 0 <= metrics["accuracy"] <= 1


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
