"""The user's real path: every dataset preset searched by its documented command with the default space,
dependent values that scale with the searched ones, one root per dataset, the official list files, ImageNet-pretrained
guidance (from the hub or a weights file, else one line), warm-up against the epoch budget.

Fast tests compose the real configs; the integration tests run the documented search command on tiny data generated
in each real layout (tests/layouts.py) through best.csv, the bundles and `diffmic.predict` on raw files.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch

import timm
from safetensors.torch import load_file, save_file

import layouts
from diffmic.config import validate_config
from diffmic.diffusion import NoiseSchedule, sample
from diffmic.engine import learning_rate, warmup_epochs
from diffmic.models import DCG, build_model
from diffmic.choices import CamGeometry, cam_geometry
from diffmic.predict import main as predict_main
from diffmic.weights import WeightsError, check_pretrained
from helpers import compose, dcg_knobs
from test_search import ROOT, _csv, _ok, _search, ray_tmp  # noqa: F401 (ray_tmp is a fixture)
from tune.study.space import SearchError, check_against_config, parse_space

PRESETS = ["synthetic", "isic2018", "aptos2019", "pkl", "isic2018_pkl", "aptos2019_pkl", "folder", "csv"]


# ------------------------------------------------------------------------------ dependent values (no Ray)
@pytest.mark.parametrize("dataset", PRESETS)
def test_every_preset_takes_the_default_space_as_is(dataset):
    """Every combination of the default space gives a valid config, at the preset's size and at a budget's."""
    for extra in ([], ["dataset.image_size=48", "model.dcg.backbone=resnet10t"]):
        cfg = compose([f"dataset={dataset}", *extra], "search")
        validate_config(cfg)
        params = parse_space(cfg["search"]["space"], cfg)
        check_against_config(params, cfg)  # raises naming the first invalid combination
        assert {p.key for p in params} >= {"diffusion.timesteps", "diffusion.schedule", "train.mmd_weight"}


@pytest.mark.parametrize("dataset, start", [("isic2018", 250), ("aptos2019", 60), ("isic2018_pkl", 250),
                                            ("aptos2019_pkl", 60)])
def test_the_official_start_scales_with_every_searched_T(dataset, start):
    cfg = compose([f"dataset={dataset}"], "search")
    assert (cfg["diffusion"]["sampler"], cfg["diffusion"]["sample_steps"]) == ("official", start)
    reference = NoiseSchedule("linear", 1000, beta_steps=1000)
    for T in cfg["search"]["space"]["timesteps"]["choice"]:
        schedule = NoiseSchedule("linear", T, beta_steps=cfg["diffusion"]["beta_steps"])
        calls = []

        def eps_fn(y, prior, t):
            calls.append(int(t[0]))
            return torch.zeros_like(y)

        sample(schedule, eps_fn, torch.zeros(2, 3), "official", start)
        assert len(calls) == round(start * T / 1000) and calls[0] == len(calls) - 1
        # the chain starts as noisy as the paper's 1000-step chain does at its start index
        level = float(schedule.one_minus_alphas_bar_sqrt[calls[0]])
        assert level == pytest.approx(float(reference.one_minus_alphas_bar_sqrt[start - 1]), abs=0.02), T
    assert NoiseSchedule("linear", 1000, beta_steps=1000).official_start(start) == start  # the paper: unchanged


def test_cam_stride_and_crop_follow_the_image_size():
    assert cam_geometry(224) == CamGeometry(stride=32, grid=7, crop_size=32, window=1, positions=49)  # the paper's
    assert (cam_geometry(48).stride, cam_geometry(48).grid, cam_geometry(48).crop_size) == (16, 3, 16)
    assert (cam_geometry(32).stride, cam_geometry(32).grid, cam_geometry(32).crop_size) == (8, 4, 8)
    assert cam_geometry(64, 32, 32).positions == 4  # explicit values are kept
    dcg = DCG(3, 48, **dcg_knobs(backbone="test_resnet", output_stride=None, crop_size=None, roi_count=6))
    assert (dcg.grid, dcg.crop_size, dcg.window) == (3, 16, 1)


def test_a_value_that_can_never_fit_is_one_line():
    cfg = compose(["dataset=isic2018", "dataset.image_size=64", "model.dcg.output_stride=32"], "search")
    with pytest.raises(SearchError) as e:
        check_against_config(parse_space(cfg["search"]["space"], cfg), cfg)
    assert "model.dcg.roi_count=6" in str(e.value) and "at most 4" in str(e.value) and "\n" not in str(e.value)


def test_warm_up_is_a_share_of_the_epoch_budget():
    paper = compose(["dataset=isic2018"])["train"]
    assert paper["epochs"] == 1000 and warmup_epochs(paper) == pytest.approx(40)  # the paper's 40 of 1000
    short = {**paper, "epochs": 8}
    assert warmup_epochs(short) == pytest.approx(0.32)
    assert learning_rate(short, 0.16) == pytest.approx(paper["lr"] / 2)  # half-way up
    assert learning_rate(short, 4.16) == pytest.approx(paper["lr"] / 2)  # half-way down the cosine
    assert warmup_epochs({**short, "warmup_epochs": 2}) == 2  # a number of epochs still wins


def test_cpu_budget_keeps_the_dataset_preset():
    cfg = compose(["dataset=aptos2019", "budget=cpu"])
    validate_config(cfg)
    assert cfg["dataset"]["image_size"] == 64 and cfg["model"]["dcg"]["backbone"] == "resnet18"
    assert cfg["model"]["dcg"]["pretrained"] is False and cfg["train"]["epochs"] == 8
    assert cfg["diffusion"]["sample_steps"] == 60 and cfg["dataset"]["augment"]["vflip"] is True  # APTOS' own


# ------------------------------------------------------------------------------------ pretrained weights
def _weights_file(path, name: str = "resnet10t") -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in timm.create_model(name, num_classes=0).state_dict().items()}
    save_file(state, str(path))
    return state


def test_paper_presets_start_pretrained_and_a_weights_file_initialises_both_dcg_streams(tmp_path):
    for dataset in ("isic2018", "aptos2019", "isic2018_pkl", "aptos2019_pkl"):
        dcg = compose([f"dataset={dataset}"])["model"]["dcg"]
        assert (dcg["backbone"], dcg["pretrained"]) == ("resnet50.tv_in1k", True), dataset
    state = _weights_file(tmp_path / "w.safetensors")
    cfg = compose(["dataset=isic2018", "dataset.image_size=64", "model.dcg.backbone=resnet10t",
                   f"model.dcg.weights={tmp_path / 'w.safetensors'}", "model.denoiser.encoder=test_resnet",
                   "model.denoiser.feature_dim=32"])
    check_pretrained(cfg["model"])  # a file is enough: no hub is asked
    model = build_model(cfg, 7, 64)
    for net in (model.dcg.global_net, model.dcg.local_net):
        loaded = net.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # loading trained weights never needs the initial ones
    gone = {**cfg, "model": {**cfg["model"], "dcg": {**cfg["model"]["dcg"], "weights": str(tmp_path / "gone")}}}
    build_model(gone, 7, 64, initial_weights=False)


@pytest.mark.slow  # a command line in a fresh process: seconds of imports (make test-fast skips it)
def test_no_hub_and_no_weights_file_stops_before_training_with_one_line(tmp_path):
    with pytest.raises(WeightsError) as e:  # conftest sets HF_HUB_OFFLINE=1
        check_pretrained(compose(["dataset=isic2018"])["model"])
    assert "model.dcg.weights=" in str(e.value) and "\n" not in str(e.value)
    root = layouts.isic(tmp_path / "isic", 2, 48, np.random.default_rng(0))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "diffmic.train", "dataset=isic2018", f"dataset.root={root}",
                        "train.epochs=1", f"output_dir={out}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [line for line in r.stderr.splitlines() if line.startswith("diffmic.train:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "model.dcg.weights=PATH" in lines[0] and "model.dcg.pretrained=false" in lines[0]
    assert not out.exists()  # stopped before anything was written


def test_weights_fetch_writes_a_file_the_dcg_loads(tmp_path, monkeypatch):
    """`python -m tune.weights fetch` with the hub stood in for by a local timm model (no hub here)."""
    import diffmic.weights
    from tune.cli.weights import fetch

    reference = timm.create_model("resnet10t", num_classes=0)
    monkeypatch.setattr(diffmic.weights, "hub_model", lambda name, stream="dcg", **kw: reference)
    path = fetch("resnet10t", str(tmp_path / "weights"))
    assert path.endswith("weights/resnet10t.safetensors")
    written = load_file(path)
    assert all(torch.equal(written[k], v) for k, v in reference.state_dict().items())


@pytest.mark.integration
def test_weights_in_s3_are_fetched_once_into_the_node_cache(s3_server, s3_bucket, tmp_path, monkeypatch):
    from diffmic.remote import localize

    state = _weights_file(tmp_path / "w.safetensors")
    s3_server.client().upload_file(str(tmp_path / "w.safetensors"), s3_bucket, "weights/r10t.safetensors")
    monkeypatch.setenv("DIFFMIC_CACHE", str(tmp_path / "cache"))
    cfg = compose(["dataset=isic2018", "dataset.image_size=64", "model.dcg.backbone=resnet10t",
                   f"model.dcg.weights=s3://{s3_bucket}/weights/r10t.safetensors"])
    local = localize(cfg)["model"]["dcg"]["weights"]
    assert local.startswith(str(tmp_path / "cache" / "weights"))
    assert all(torch.equal(load_file(local)[k], v) for k, v in state.items())


# ------------------------------------------------------------------- documented search commands, end to end
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return layouts.write_all(tmp_path_factory.mktemp("layouts"))


# A budget only (size, backbone, epochs, trials): no preset value is tuned by hand.
BUDGET = ["dataset.image_size=48", "model.dcg.backbone=resnet10t", "model.denoiser.encoder=resnet10t",
          "model.denoiser.feature_dim=64", "train.epochs=2", "train.dcg_pretrain_epochs=1", "train.batch_size=16",
          "search.max_concurrent_trials=2", "scaling.max_failures=0", "report=false",
          # The paper presets confirm 3 finalists x 3 seeds; that is tested on synthetic data
          # (test_search.py::test_two_datasets_at_once_pareto_front_and_finalists), not again here. The one sampler
          # point is the preset's own start, so the exported bundle must carry it.
          "search.finalists=0", "search.pareto=[{sampler:official}]",
          # the controls (a DCG point that may win at this budget, a Ray Train run each) are tested in test_search.py
          "search.controls=[]"]


def _predict(bundle: str, images, tmp_path, n: int) -> None:
    out = tmp_path / "pred.csv"
    assert predict_main([bundle, str(images), "--output", str(out)]) == 0
    assert len(_csv(out)) == n


@pytest.mark.integration
@pytest.mark.slow
def test_isic_and_aptos_in_one_search_each_with_its_own_root(data, ray_tmp, tmp_path):
    """The README's two-dataset command: ISIC from a weights file (pretrained, as the paper), APTOS from scratch."""
    weights = tmp_path / "resnet10t.safetensors"
    _weights_file(weights)
    storage = tmp_path / "results"
    run = _search(["datasets=[isic2018,aptos2019]", f"roots.isic2018={data['isic']}",
                   f"roots.aptos2019={data['aptos']}", "experiment=real", f"storage.uri={storage}",
                   "search.num_samples=1", f"model.dcg.weights={weights}", *BUDGET], ray_tmp, "real.log")
    _ok(run)
    best = _csv(storage / "real" / "best.csv").set_index("dataset")
    assert sorted(best.index) == ["aptos2019", "isic2018"] and best["test_accuracy"].notna().all()
    for name, classes, start, images, n in (("isic2018", layouts.ISIC, 250, data["isic"] / "images", 84),
                                             ("aptos2019", None, 60, data["aptos"] / "train_images", 60)):
        with sqlite3.connect(storage / "real" / "optuna" / f"{name}.db") as con:
            assert con.execute("select count(*) from trials").fetchone()[0] == 1
        bundle = best.loc[name, "bundle_uri"]
        config = json.loads((ROOT / bundle / "config.json").read_text())
        assert config["diffusion"]["sampler"] == "official" and config["diffusion"]["sample_steps"] == start
        meta = json.loads((ROOT / bundle / "bundle.json").read_text())
        assert classes is None or meta["class_names"] == classes
        _predict(bundle, images, tmp_path, n)


@pytest.mark.integration
@pytest.mark.slow
def test_official_lists_folder_and_csv_searched_by_their_commands(data, ray_tmp, tmp_path):
    storage = tmp_path / "results"
    names = ["isic2018_pkl", "aptos2019_pkl", "folder", "csv"]
    roots = {"isic2018_pkl": data["isic"], "aptos2019_pkl": data["aptos"], "folder": data["folder"],
             "csv": data["csv"]}
    run = _search([f"datasets=[{','.join(names)}]", *(f"roots.{k}={v}" for k, v in roots.items()),
                   "experiment=lists", f"storage.uri={storage}", "search.num_samples=1",
                   "model.dcg.pretrained=false", *BUDGET], ray_tmp, "lists.log")
    _ok(run)
    best = _csv(storage / "lists" / "best.csv").set_index("dataset")
    assert sorted(best.index) == sorted(names) and best["test_accuracy"].notna().all()
    expected = {"isic2018_pkl": layouts.ISIC, "aptos2019_pkl": ["0 - No DR", "1 - Mild", "2 - Moderate", "3 - Severe",
                                                                 "4 - Proliferative DR"],
                "folder": ["benign", "malignant", "normal"], "csv": ["grade_a", "grade_b", "grade_c"]}
    for name, classes in expected.items():
        meta = json.loads((ROOT / best.loc[name, "bundle_uri"] / "bundle.json").read_text())
        assert meta["class_names"] == classes, name
    assert json.loads((ROOT / best.loc["isic2018_pkl", "bundle_uri"] / "config.json").read_text()
                      )["diffusion"]["sample_steps"] == 250
    _predict(best.loc["folder", "bundle_uri"], data["folder"] / "test", tmp_path, 12)
    _predict(best.loc["csv", "bundle_uri"], data["csv"] / "scans", tmp_path, 36)
