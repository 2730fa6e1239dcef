"""diffmic.explain: where the model looks (the DCG's own CAMs and crops) and the spread of its chains, as data and as
figures; `predict --explain` writes one figure per image; progress never reaches stdout."""
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffmic.bundle import write_bundle
from diffmic.data import SyntheticDataset, eval_transform
from diffmic.data.synthetic import class_names
from diffmic.evaluate import progress_over_images
from diffmic.explain import (choose_examples, display_scale, explain, explain_split, explanations_from,
                             heat_colours, heatmap_png, overlay_png)
from diffmic.models import DCGOutput, Prediction, build_model
from diffmic.cli import Progress
from diffmic.predict import main

from helpers import TINY, compose

SIZE, CLASSES, SAMPLES = 48, 4, 3
SETTINGS = dict(sampler="ddim", steps=3, eta=0.0, num_samples=SAMPLES)


@pytest.fixture(scope="module")
def cfg():
    return compose([*TINY, "model.dcg.pretrained=false", "model.denoiser.pretrained=false"])


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg, CLASSES, SIZE, initial_weights=False).eval()


@pytest.fixture(scope="module")
def batch(cfg):
    """Four images as uint8 pixels and as the normalised model input."""
    pixels = (np.random.default_rng(0).random((4, SIZE, SIZE, 3)) * 255).astype(np.uint8)
    transform = eval_transform(SIZE, cfg["dataset"]["mean"], cfg["dataset"]["std"])
    return pixels, torch.stack([transform(Image.fromarray(p)) for p in pixels])


def test_explanations_are_the_models_own_cams_and_crops(model, cfg, batch):
    pixels, x = batch
    mean, std = cfg["dataset"]["mean"], cfg["dataset"]["std"]
    dcg_passes = []
    handle = model.dcg.register_forward_hook(lambda *_: dcg_passes.append(1))
    try:
        found = explain(model, x, mean, std, **SETTINGS, generator=torch.Generator().manual_seed(3),
                        temperature=1.5, labels=[0, 1, 2, 3])
    finally:
        handle.remove()
    assert len(dcg_passes) == 1  # one predict call: CAM and crops are not recomputed
    pred = model.predict(x, **SETTINGS, generator=torch.Generator().manual_seed(3), temperature=1.5)
    crop, k, grid = model.dcg.crop_size, model.dcg.roi_count, model.dcg.grid
    for i, e in enumerate(found):
        assert np.array_equal(e.image, pixels[i])  # exactly the pixels the DCG saw
        assert e.label == i and e.predicted == int(pred.probs[i].argmax())
        rois = pred.guidance.rois[i].tolist()
        assert len(e.boxes) == k == 2
        assert e.boxes == [(c, r, c + crop, r + crop) for r, c in rois]
        assert all(0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE for x0, y0, x1, y1 in e.boxes)
        assert e.cam.shape == (grid, grid) and e.cam.dtype == np.float32
        assert e.cam.min() == 0 and e.cam.max() == pytest.approx(1)
        raw = pred.guidance.cam[i, e.predicted]
        np.testing.assert_allclose(e.cam, ((raw - raw.min()) / (raw.max() - raw.min())).numpy(), atol=1e-6)
        assert np.shape(e.sample_probs) == (SAMPLES, CLASSES)
        np.testing.assert_allclose(np.mean(e.sample_probs, 0), pred.probs[i].numpy(), atol=1e-6)
        assert e.probs == pred.probs[i].tolist()
        assert np.std(np.asarray(e.sample_probs)[:, e.predicted], ddof=1) == pytest.approx(float(pred.sample_std[i]),
                                                                                          abs=1e-6)
    as_json = json.loads(json.dumps(found[0].to_json()))
    assert "image" not in as_json and as_json["boxes"] == [list(b) for b in found[0].boxes]


def test_a_constant_cam_is_all_zeros(model, cfg, batch):
    _, x = batch
    n = len(x)
    guidance = DCGOutput(fused=torch.zeros(n, CLASSES), global_=torch.zeros(n, CLASSES), local=torch.zeros(n, CLASSES),
                         cam=torch.full((n, CLASSES, 3, 3), 2.5), rois=torch.zeros(n, 2, 2, dtype=torch.long))
    probs = torch.full((n, CLASSES), 1 / CLASSES)
    pred = Prediction(probs, probs, torch.zeros(n), torch.zeros(n), torch.zeros(1, n, CLASSES), guidance)
    e = explanations_from(model, x, pred, cfg["dataset"]["mean"], cfg["dataset"]["std"])[0]
    assert not e.cam.any() and e.sample_probs == [[0.25] * CLASSES]
    with pytest.raises(ValueError, match="guidance"):
        explanations_from(model, x, Prediction(probs, probs, torch.zeros(n), torch.zeros(n), torch.zeros(1, n, 4)),
                          cfg["dataset"]["mean"], cfg["dataset"]["std"])


def test_choose_examples_takes_right_and_wrong_ones_per_class():
    labels = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3]
    predicted = [0, 1, 0, 0, 1, 1, 1, 0, 1, 3]
    # class 0: two right, one wrong; class 1: none wrong, right ones fill; class 2: none right, wrong ones fill
    assert choose_examples(labels, predicted) == [0, 2, 1, 4, 5, 6, 7, 8, 9]
    assert choose_examples(labels, predicted, per_class=1, wrong_per_class=0) == [0, 4, 7, 9]


def test_explain_split_is_deterministic_and_covers_every_class(model, cfg):
    data = SyntheticDataset(range(24), CLASSES, SIZE, seed=0, split_id=2,
                            transform=eval_transform(SIZE, cfg["dataset"]["mean"], cfg["dataset"]["std"]))
    kwargs = dict(**SETTINGS, temperature=1.0, device="cpu", candidates_per_class=3, per_class=1, wrong_per_class=1,
                  seed=5, batch_size=5)
    first = explain_split(model, data, cfg["dataset"]["mean"], cfg["dataset"]["std"], **kwargs)
    again = explain_split(model, data, cfg["dataset"]["mean"], cfg["dataset"]["std"], **kwargs)
    assert [e.to_json() for e in first] == [e.to_json() for e in again]
    labels = [e.label for e in first]
    assert sorted(set(labels)) == list(range(CLASSES)) and labels == sorted(labels)
    assert all(labels.count(c) == 2 for c in range(CLASSES))


def test_heatmap_and_overlay_pngs(model, cfg, batch, tmp_path):
    _, x = batch
    e = explain(model, x[:1], cfg["dataset"]["mean"], cfg["dataset"]["std"], **SETTINGS, labels=[2])[0]
    scale = display_scale(SIZE)
    assert scale == 4 and display_scale(224) == 1
    heat = Image.open(io.BytesIO(heatmap_png(e)))
    assert heat.size == (SIZE * scale, SIZE * scale) and heat.mode == "RGB"
    assert Image.open(io.BytesIO(heatmap_png(e, scale=1))).size == (SIZE, SIZE)
    cold, hot = heat_colours(np.array([0.0, 1.0]))
    assert cold[2] > cold[0] and hot[0] > hot[2]  # blue where the map is low, red where it is high
    data = overlay_png(e, class_names(CLASSES), tmp_path / "fig.png")
    figure = Image.open(io.BytesIO(data))
    assert (tmp_path / "fig.png").read_bytes() == data
    assert figure.width >= SIZE * scale and figure.height > SIZE * scale + 16 * (2 + CLASSES) - 1


@pytest.fixture(scope="module")
def bundle(model, cfg, tmp_path_factory):
    """A real bundle (manifest, hashes, versions) of the untrained tiny model: what predict loads, without training."""
    return write_bundle(tmp_path_factory.mktemp("bundle"), model, cfg, class_names(CLASSES), {})


@pytest.fixture
def images(tmp_path):
    """Two images with the same stem in different folders, one more, and an unreadable one."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "sub/a.png", "b.jpg"]):
        Image.fromarray((np.random.default_rng(i).random((40 + 8 * i, 48, 3)) * 255).astype("uint8")).save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def run_predict(capsys, *args) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_explain_writes_one_figure_per_predicted_image(bundle, images, tmp_path, capsys):
    code, plain, err = run_predict(capsys, bundle, images, "--batch-size", "2", "--samples", "2",
                                  "--keep-temperature")
    assert code == 1 and "broken.png" in err
    out_dir = tmp_path / "figures" / "deeper"
    code, out, err = run_predict(capsys, bundle, images, "--batch-size", "2", "--samples", "2", "--explain", out_dir,
                                 "--keep-temperature")
    assert code == 1 and out == plain and len(out.splitlines()) == 3
    assert sorted(p.name for p in out_dir.iterdir()) == ["a-1.png", "a.png", "b.png"]
    for p in out_dir.iterdir():
        assert Image.open(p).width >= SIZE * display_scale(SIZE)
    (tmp_path / "file").write_text("")
    code, out, err = run_predict(capsys, bundle, images, "--explain", tmp_path / "file")
    assert code == 2 and out == "" and "not a directory" in err


def test_the_progress_bar_stays_off_stdout(bundle, images, capsys, monkeypatch):
    _, plain, _ = run_predict(capsys, bundle, images, "--batch-size", "1")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: more images than a batch get tqdm's bar
    _, out, err = run_predict(capsys, bundle, images, "--batch-size", "1")
    assert out == plain and "4/4" in err and "broken.png" in err


def test_plain_progress_lines_at_most_every_interval(capsys, monkeypatch):
    clock = iter(range(0, 1000, 10))  # each call to the clock: 10 s later
    monkeypatch.setattr("diffmic.cli.time.monotonic", lambda: next(clock))
    with Progress(6, "images", "prog", every=30) as progress:
        for _ in range(6):
            progress.update()
    out, err = capsys.readouterr()
    assert out == "" and [line.split()[1] for line in err.splitlines()] == ["3/6", "6/6"]


def test_evaluate_counts_the_images_the_dcg_sees(model, batch, capsys):
    _, x = batch
    with progress_over_images(model, 8, min_total=4) as progress:
        for half in (x, x):
            model.predict(half, **SETTINGS)
    assert progress.done == 8 and model.dcg._forward_hooks == {} and capsys.readouterr().out == ""
