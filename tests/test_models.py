"""diffmic.models: ROI selection parity, vectorised crops, DCG and denoiser behaviour."""
import copy
import json
from pathlib import Path

import pytest
import torch

from diffmic.models import DCG, Denoiser, build_model, crop_rois, select_rois
from diffmic.models.dcg import cells_to_pixels, top_t_aggregate
from helpers import compose, dcg_knobs

ROI = json.loads((Path(__file__).parent / "data" / "roi.json").read_text())


@pytest.mark.parametrize("case", ROI["cases"], ids=[c["name"] for c in ROI["cases"]])
def test_official_roi_mode_reproduces_official_selection(case):
    cam = torch.tensor(case["saliency_map"], dtype=torch.float64)
    ref = case["float64"]
    cells = select_rois(cam, ROI["K"], window=1, mode="official")
    assert cells.tolist() == ref["selected_cells_row_col"]
    assert (cells[..., 0] * 7 + cells[..., 1]).tolist() == ref["selected_linear_index"]
    pixels = cells_to_pixels(cells, 7, ROI["image_size"][0], ROI["crop_shape"][0])
    assert pixels.tolist() == [[[int(v) for v in rc] for rc in img] for img in ref["pixel_upper_left_row_col"]]
    torch.testing.assert_close(top_t_aggregate(cam, 1.0), torch.tensor(ref["y_global_logits_mean_over_cells"],
                                                                       dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_distinct_mode_fixes_official_flaws():
    """Official picks repeat (ties / few positive cells) and go NaN on constant maps; the default mode does not."""
    by_name = {c["name"]: c for c in ROI["cases"]}
    for name in ("ties_and_few_nonzero", "constant"):
        official = by_name[name]["float64"]["selected_linear_index"]
        assert any(len(set(img)) < ROI["K"] for img in official)  # the flaw is real in the reference
        cam = torch.tensor(by_name[name]["saliency_map"], dtype=torch.float64)
        cells = select_rois(cam, ROI["K"], mode="distinct")
        for img in cells:
            assert len({tuple(rc) for rc in img.tolist()}) == ROI["K"]
    constant = torch.ones(2, 3, 7, 7)
    assert select_rois(constant, 6).tolist()[0] == [[0, c] for c in range(6)]  # ties → row-major order
    # on ordinary maps both modes agree
    cam = torch.tensor(by_name["random_normal"]["saliency_map"], dtype=torch.float64)
    assert torch.equal(select_rois(cam, 6, mode="distinct"), select_rois(cam, 6, mode="official"))


def test_roi_count_bound_is_a_config_error():
    with pytest.raises(ValueError, match="roi_count=50: expected at most 49"):
        select_rois(torch.randn(1, 2, 7, 7), 50)
    with pytest.raises(ValueError, match="roi_count=17: expected at most 16"):
        DCG(3, 64, **dcg_knobs(backbone="resnet18", output_stride=16, roi_count=17, crop_size=16))


def test_windowed_selection_picks_the_hot_region():
    cam = torch.zeros(1, 1, 8, 8)
    cam[0, 0, 5:7, 2:4] = 1.0
    assert select_rois(cam, 1, window=2).tolist() == [[[5, 2]]]


def test_vectorised_crops_equal_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 40, 40, generator=g)
    upper_left = torch.randint(0, 40 - 12 + 1, (3, 5, 2), generator=g)
    crops = crop_rois(images, upper_left, 12)
    assert crops.shape == (3, 5, 3, 12, 12)
    for n in range(3):
        for k in range(5):
            r, c = upper_left[n, k].tolist()
            assert torch.equal(crops[n, k], images[n, :, r:r + 12, c:c + 12])


def test_pixels_stay_inside_the_image():
    cells = torch.tensor([[[6, 6], [0, 3]]])
    assert cells_to_pixels(cells, 7, 224, 64).tolist() == [[[160, 160], [0, 96]]]


def test_dcg_forward_shapes_and_fusion():
    torch.manual_seed(0)
    dcg = DCG(4, 64, **dcg_knobs(backbone="resnet18", output_stride=16, roi_count=3, crop_size=16)).eval()
    assert dcg.grid == 4 and dcg.window == 1
    out = dcg(torch.randn(2, 3, 64, 64))
    assert out.fused.shape == out.global_.shape == out.local.shape == (2, 4)
    assert out.cam.shape == (2, 4, 4, 4) and out.rois.shape == (2, 3, 2)
    torch.testing.assert_close(out.fused, 0.5 * (out.global_ + out.local))
    assert torch.isfinite(out.fused).all()


def test_red_crops_repeat_channel_zero():
    torch.manual_seed(0)
    dcg = DCG(2, 64, **dcg_knobs(backbone="resnet18", output_stride=16, roi_count=2, crop_size=16,
                                 crop_channels="red")).eval()
    seen = []
    dcg.local_net.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    dcg(torch.randn(1, 3, 64, 64))
    crops = seen[0]
    assert torch.equal(crops[:, 0], crops[:, 1]) and torch.equal(crops[:, 0], crops[:, 2])


CFG = compose(["model.dcg.backbone=resnet18", "model.dcg.output_stride=16", "model.dcg.roi_count=4",
               "model.dcg.crop_size=16", "model.dcg.pretrained=false", "model.denoiser.encoder=resnet18",
               "model.denoiser.feature_dim=64", "diffusion.timesteps=50", "diffusion.schedule=linear"])


def test_denoiser_embedding_is_computed_once_per_batch():
    torch.manual_seed(0)
    model = build_model(CFG, num_classes=3, image_size=64)
    calls = []
    model.denoiser.encoder.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        priors = model.priors(x)
    loss = model.loss(x, y, priors, mmd_weight=0.5)
    assert len(calls) == 1 and loss["loss"].ndim == 0 and loss["mmd"] > 0
    model.eval()
    calls.clear()
    pred = model.predict(x, sampler="official", steps=50, num_samples=3)
    assert len(calls) == 1  # 50 steps × 3 samples, one encoder pass
    assert pred.probs.shape == (4, 3) and torch.allclose(pred.probs.sum(1), torch.ones(4))
    assert pred.entropy.shape == (4,) and (pred.sample_std >= 0).all()


def _slow_denoiser(den: Denoiser, emb, y, p, t):
    """ε̂ written out row by row from the paper's equations: each layer's output scaled by its γ row of step t."""
    rows = []
    for i in range(len(y)):
        def layer(cl, bn, u):
            z = (cl.linear.weight @ u + cl.linear.bias) * cl.gamma.weight[t[i]]
            return torch.nn.functional.softplus((z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
                                                * bn.weight + bn.bias)
        h = layer(den.cl1, den.bn1, torch.cat([y[i], p[i]])) * emb[i]
        h = layer(den.cl3, den.bn3, layer(den.cl2, den.bn2, h))
        rows.append(den.out.weight @ h + den.out.bias)
    return torch.stack(rows)


def test_denoiser_matches_a_row_by_row_reference_with_its_time_step():
    torch.manual_seed(0)
    den = Denoiser(5, timesteps=10, encoder="test_resnet", feature_dim=32).eval()
    for norm in (den.bn1, den.bn2, den.bn3):  # non-trivial running statistics
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    emb = den.encode(torch.randn(4, 3, 32, 32))
    assert emb.shape == (4, 32)
    y, p, t = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), 1), torch.tensor([0, 3, 9, 3])
    with torch.no_grad():
        torch.testing.assert_close(den(emb, y, p, t), _slow_denoiser(den, emb, y, p, t), rtol=1e-4, atol=1e-5)
        moved = den(emb, y, p, torch.tensor([1, 3, 9, 3]))  # only row 0's step changed: only row 0 moves
        base = den(emb, y, p, t)
    assert not torch.allclose(moved[0], base[0]) and torch.equal(moved[1:], base[1:])


def test_gated_attention_pool_matches_its_formula():
    from diffmic.models.dcg import GatedAttentionPool
    torch.manual_seed(1)
    pool = GatedAttentionPool(6, hidden=4)
    h = torch.randn(3, 5, 6)
    expected = []
    for bag in h:  # α_k = softmax_k w·[σ(U h_k) ⊙ tanh(V h_k)], z = Σ α_k h_k
        scores = torch.stack([pool.w.weight[0] @ (torch.sigmoid(pool.u.weight @ hk) * torch.tanh(pool.v.weight @ hk))
                              for hk in bag])
        expected.append((torch.softmax(scores, 0)[:, None] * bag).sum(0))
    with torch.no_grad():
        torch.testing.assert_close(pool(h), torch.stack(expected))
        torch.testing.assert_close(pool(h[:, torch.randperm(5)]), pool(h))  # a bag: order does not matter


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="backbone 'resnet_nope'"):
        Denoiser(3, 10, encoder="resnet_nope")


def test_stacked_branches_equal_separate_denoiser_calls():
    """One pass over the three stacked prior branches = three separate calls: outputs, weight gradients and BN
    running statistics (each branch normalised over its own rows, statistics updated in the same order)."""
    torch.manual_seed(0)
    den = Denoiser(3, timesteps=10, encoder="test_resnet", feature_dim=16).train()
    twin = copy.deepcopy(den)
    emb = torch.randn(4, 16)
    y_t, prior = torch.randn(3, 4, 3), torch.softmax(torch.randn(3, 4, 3), 2)
    t = torch.tensor([1, 5, 9, 0])
    separate = torch.stack([den(emb, y_t[i], prior[i], t) for i in range(3)])
    stacked = twin(emb, y_t.flatten(0, 1), prior.flatten(0, 1), t.repeat(3), branches=3).view(3, 4, 3)
    torch.testing.assert_close(stacked, separate)
    (separate * torch.arange(36.).view(3, 4, 3)).sum().backward()
    (stacked * torch.arange(36.).view(3, 4, 3)).sum().backward()
    for (name, a), b in zip(den.named_parameters(), twin.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, msg=name)
    for name, buf in den.named_buffers():
        torch.testing.assert_close(dict(twin.named_buffers())[name], buf, msg=name)
