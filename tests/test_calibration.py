"""diffmic.calibration: class probabilities softmax(ŷ0 / τ) with τ fitted on validation."""
import numpy as np
import torch

from diffmic.calibration import class_probabilities, fit_temperature
from diffmic.engine import evaluate
from diffmic.metrics import classification_metrics
from diffmic.session import Session

from helpers import TINY, compose


def test_a_perfect_one_hot_output_is_perfectly_calibrated():
    labels = np.arange(70) % 7
    chains = np.eye(7)[labels][None]  # S=1: ŷ0 exactly one-hot and always right
    naive = classification_metrics(labels, class_probabilities(chains, 1.0))  # softmax(ŷ0): top p = e/(e+6) = 0.31
    assert naive["ece"] > 0.65
    tau = fit_temperature(chains, labels)
    assert classification_metrics(labels, class_probabilities(chains, tau))["ece"] < 0.01


def test_the_fitted_temperature_minimises_the_validation_nll():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    chains = (np.eye(4)[labels] * 0.6 + rng.normal(0, 0.35, (400, 4)))[None]
    tau = fit_temperature(chains, labels)

    def nll(t):
        return -np.log(class_probabilities(chains, t)[np.arange(400), labels]).mean()
    assert nll(tau) <= min(nll(tau * 0.8), nll(tau * 1.25), nll(1.0))
    assert np.allclose(class_probabilities(chains, tau).sum(1), 1)


class _OneHot(torch.nn.Module):
    """A model whose every chain returns the true label as an exact one-hot ŷ0."""
    num_classes = 4

    def __init__(self, labels_by_pixel):
        super().__init__()
        self.lookup = labels_by_pixel

    def predict(self, x, sampler, steps, eta, num_samples, generator, temperature=1.0):
        from diffmic.models.diffmic import Prediction
        y0 = torch.nn.functional.one_hot(self.lookup(x), 4).float().repeat(num_samples, 1, 1)
        probs = torch.softmax(y0 / temperature, 2)
        return Prediction(probs.mean(0), probs.mean(0), torch.zeros(len(x)), torch.zeros(len(x)), y0)


def test_evaluate_fits_the_temperature_on_validation_and_reuses_it():
    cfg = compose(TINY)
    labels = torch.arange(12) % 4
    data = torch.utils.data.TensorDataset(labels.float().view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone(), labels)
    model = _OneHot(lambda x: x[:, 0, 0, 0].long()).eval()
    val = evaluate(model, data, cfg, Session("cpu"))
    assert val["accuracy"] == 1.0 and val["ece"] < 0.01 and val["temperature"] < 0.1
    test = evaluate(model, data, cfg, Session("cpu"), temperature=val["temperature"])
    assert test["temperature"] == val["temperature"] and test["ece"] == val["ece"]
    assert evaluate(model, data, cfg, Session("cpu"), temperature=1.0)["ece"] > 0.5
