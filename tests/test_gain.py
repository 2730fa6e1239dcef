"""Issue 21: the diffusion head's gain over its own DCG, the DCG read out alone, the residual head and the plain
control (unit level; the search's controls are in test_search.py::test_a_search_runs_its_controls_and_shows_the_gain)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from diffmic.bundle import load_bundle
from diffmic.config import with_values
from diffmic.data import build_splits, eval_transform, load_image
from diffmic.engine import train
from diffmic.evaluate import measure
from diffmic.metrics import HEAD_METRICS, classification_metrics
from diffmic.models import build_model
from diffmic.predict import predict_paths
from diffmic.session import LocalSession, Session
from helpers import TINY, compose
from tune.selection import pareto
from tune.selection import points as sampler_points
from tune.selection.controls import CONTROL_OVERRIDES, control_columns

SMALL = TINY + ["deterministic=true", "dataset.num_train=48", "dataset.num_test=16"]


def test_dcg_and_gain_figures_from_hand_built_predictions():
    labels = np.array([0, 0, 1, 1])
    head = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8]])   # all right
    dcg = np.array([[0.6, 0.4], [0.4, 0.6], [0.7, 0.3], [0.1, 0.9]])    # two right
    m = classification_metrics(labels, head, dcg)
    assert m["accuracy"] == 1.0 and m["dcg_accuracy"] == 0.5 and m["gain_accuracy"] == 0.5
    assert m["dcg_macro_f1"] == pytest.approx(0.5) and m["gain_macro_f1"] == pytest.approx(0.5)
    assert m["dcg_auc"] == pytest.approx(0.5) and m["gain_auc"] == pytest.approx(0.5)
    for k in HEAD_METRICS:
        assert m[f"gain_{k}"] == pytest.approx(m[k] - m[f"dcg_{k}"])
    assert "dcg_ece" in m and "dcg_cohen_kappa" in m and "dcg_balanced_accuracy" in m


@pytest.mark.parametrize("sampler,steps", [("official", None), ("ddpm", None), ("ddim", 5)])
def test_an_untrained_residual_head_ends_every_chain_on_the_prior(sampler, steps):
    cfg = with_values(compose(TINY), {"model.denoiser.output": "residual"})
    torch.manual_seed(0)
    model = build_model(cfg, 3, 48, initial_weights=False).eval()  # untrained: its last layer starts at zero
    x = torch.randn(4, 3, 48, 48)
    pred = model.predict(x, sampler, steps, num_samples=2, generator=torch.Generator().manual_seed(1))
    prior = model.priors(x).fused
    assert torch.allclose(pred.samples, prior.expand_as(pred.samples), atol=1e-4)


def test_the_residual_loss_is_the_mse_of_y0():
    cfg = with_values(compose(TINY), {"model.denoiser.output": "residual"})
    torch.manual_seed(0)
    model = build_model(cfg, 3, 48, initial_weights=False).eval()
    torch.nn.init.zeros_(model.denoiser.out.weight)
    torch.nn.init.zeros_(model.denoiser.out.bias)
    x, y = torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 0])
    priors = model.priors(x)
    loss = model.loss(x, y, priors, mmd_weight=0.0)  # r = 0: ŷ0 is the prior
    expected = ((torch.nn.functional.one_hot(y, 3).float() - priors.fused) ** 2).mean()
    assert loss["mse"].item() == pytest.approx(expected.item(), rel=1e-5)
    with_ce = model.loss(x, y, priors, mmd_weight=0.0, ce_weight=1.0)
    ce = torch.nn.functional.cross_entropy(-(priors.fused - 1) ** 2, y)
    assert with_ce["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert with_ce["loss"].item() == pytest.approx(expected.item() + ce.item(), rel=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("gain")
    result = train(compose(SMALL), LocalSession(root / "run"))
    return {"root": root, "result": result}


def test_every_result_carries_the_dcg_and_the_gain(trained):
    run = trained["root"] / "run"
    history = pd.read_csv(run / "history.csv")
    test = json.loads((run / "metrics.json").read_text())["test"]
    for k in HEAD_METRICS:
        assert {f"val_dcg_{k}", f"val_gain_{k}"} <= set(history.columns)
        assert test[f"gain_{k}"] == pytest.approx(test[k] - test[f"dcg_{k}"])
    assert test["dcg_temperature"] > 0


def test_the_dcg_point_has_no_denoiser_call_and_the_dcg_figures(trained):
    run = trained["root"] / "run"
    from diffmic.evaluate import load_for_evaluation
    model, cfg, temps = load_for_evaluation(run, [])
    data = build_splits(cfg["dataset"], seed=cfg["seed"] if cfg["dataset"]["split_seed"] is None
                        else cfg["dataset"]["split_seed"])
    chain = measure(model, data.val, cfg, Session(amp=False), 0, temps["temperature"])
    point = {**cfg, "diffusion": {**cfg["diffusion"], **sampler_points.settings({"sampler": "dcg"}, cfg)}}
    alone = measure(model, data.val, point, Session(amp=False), 0, temps["temperature"])
    assert alone["denoiser_calls_per_image"] == 0 and chain["denoiser_calls_per_image"] > 0
    for k in ("accuracy", "macro_f1", "auc", "ece"):
        assert alone[k] == pytest.approx(chain[f"dcg_{k}"]) and alone[f"gain_{k}"] == pytest.approx(0.0, abs=1e-9)
    assert sampler_points.with_controls([{"sampler": "official"}], ["dcg"])[-1] == {"sampler": "dcg"}
    assert sampler_points.with_controls([], ["dcg"]) == []  # search.pareto=[]: nothing is measured


def test_the_control_trains_on_the_searchs_very_splits():
    cfg = compose(SMALL)
    control = with_values(cfg, CONTROL_OVERRIDES)
    assert control["dataset"] == cfg["dataset"]
    a, b = build_splits(cfg["dataset"], seed=0), build_splits(control["dataset"], seed=0)
    for split in ("train", "val", "test"):
        assert list(getattr(a, split).indices) == list(getattr(b, split).indices)


def test_a_control_is_a_plain_classifier_exported_as_such_and_predicted_by_its_dcg(tmp_path):
    """train.denoiser=false trains the DCG alone (the denoiser keeps its initial weights); the bundle reads out
    the DCG with its own temperature, and diffmic.predict loads it like any other."""
    cfg = with_values(compose(SMALL), CONTROL_OVERRIDES)
    torch.manual_seed(cfg["seed"])
    initial = build_model(cfg, 4, 48).denoiser.state_dict()
    result = train(cfg, LocalSession(tmp_path / "control"))
    bundle = load_bundle(tmp_path / "control" / "model")
    assert bundle.meta["sampler"]["sampler"] == "dcg"
    for k, v in bundle.model.denoiser.state_dict().items():  # untouched by training (the EMA of a constant)
        assert torch.allclose(v.float(), initial[k].float()), k
    assert result.test["accuracy"] == pytest.approx(result.test["dcg_accuracy"])
    assert bundle.temperature_for("dcg") == pytest.approx(result.val["dcg_temperature"])
    from PIL import Image
    path = tmp_path / "one.png"
    Image.fromarray((np.random.default_rng(0).random((48, 48, 3)) * 255).astype("uint8")).save(path)
    rows, failures = predict_paths(bundle, [str(path)], device="cpu")
    pre = bundle.meta["preprocessing"]
    x = eval_transform(pre["image_size"], pre["mean"], pre["std"])(load_image(str(path)))[None]
    with torch.no_grad():
        expected = torch.softmax(bundle.model.priors(x).fused.log() / bundle.temperature_for("dcg"), 1)[0]
    got = [rows[0][f"prob_{c}"] for c in bundle.class_names]
    assert not failures
    assert np.allclose(got, expected.detach().numpy(), atol=1e-4)
    assert control_columns(pd.Series({"val_macro_f1": 0.5, "wall_time_s": 3.0}), {"macro_f1": 0.4}) == {
        **{f"control_val_{m}": (0.5 if m == "macro_f1" else None) for m in HEAD_METRICS},
        **{f"control_test_{m}": (0.4 if m == "macro_f1" else None) for m in HEAD_METRICS},
        "control_wall_time_s": 3.0}


def test_the_choice_includes_the_control_and_names_its_kind():
    points = pd.DataFrame([
        {"dataset": "d", "trial_id": "t1", "model_kind": "diffmic", "sampler": "ddim", "val_macro_f1": 0.7,
         "predict_ms_per_image": 5.0},
        {"dataset": "d", "trial_id": "t1", "model_kind": "dcg", "sampler": "dcg", "val_macro_f1": 0.75,
         "predict_ms_per_image": 1.0},
        {"dataset": "d", "trial_id": "control", "model_kind": "control", "sampler": "dcg", "val_macro_f1": 0.8,
         "predict_ms_per_image": 1.0}])
    assert pareto.choose(points, "d", "val_macro_f1", "max", None)["model_kind"] == "control"
    assert pareto.choose(points, "d", "val_macro_f1", "max", None, trial_id="t1")["model_kind"] == "control"
    assert pareto.choose(points.iloc[:2], "d", "val_macro_f1", "max", None)["model_kind"] == "dcg"
    assert sampler_points.sampling_of(pd.Series({"sampler": "dcg", "sample_steps": np.nan, "num_samples": 1})) == \
        {"sampler": "dcg", "sample_steps": None, "num_samples": 1}


def test_the_asha_rank_check_reads_a_history(tmp_path):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "bench_asha_rank", Path(__file__).resolve().parents[1] / "bench" / "bench_asha_rank.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    history = pd.DataFrame({"trial_id": ["a", "b", "c"] * 2, "epoch": [1, 1, 1, 2, 2, 2],
                            "val_macro_f1": [0.1, 0.2, 0.3, 0.9, 0.5, 0.4]})
    assert bench.ranks(history, "val_macro_f1") == [(1, pytest.approx(-1.0)), (2, pytest.approx(1.0))]


def test_every_test_look_is_in_the_ledger_and_evaluate_defaults_to_val(trained, capsys):
    """Issue 22: a training run's one test evaluation and each `diffmic.evaluate split=test` add a line beside the
    run; the default split is val, which adds none."""
    from diffmic import ledger
    from diffmic.evaluate import main as evaluate_main

    run = trained["root"] / "run"
    looks = pd.read_csv(run / ledger.LEDGER)
    assert list(looks["command"]) == ["diffmic.train"] and looks["images"].iloc[0] == 16
    evaluate_main([f"checkpoint={run}"])
    assert json.loads(capsys.readouterr().out)["split"] == "val"
    assert len(pd.read_csv(run / ledger.LEDGER)) == 1
    evaluate_main([f"checkpoint={run}", "split=test"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["accuracy_lo"] <= shown["accuracy"] <= shown["accuracy_hi"]
    assert list(pd.read_csv(run / ledger.LEDGER)["command"]) == ["diffmic.train", "diffmic.evaluate"]
