"""Exponential moving average of the model's weights, used for evaluation (the official code tracks one but
never uses it)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """Shadow copy of every floating-point parameter and buffer. The decay ramps up as min(decay, (1+n)/(10+n)),
    so short runs (a search trial of a few epochs) average over their own steps, not over the random init."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0 <= decay < 1:
            raise ValueError(f"train.ema_decay={decay}: expected a value in [0, 1)")
        self.decay, self.updates = decay, 0
        self.shadow = self._float_state(model)

    @staticmethod
    def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    def reset(self, model: nn.Module) -> None:
        self.shadow, self.updates = self._float_state(model), 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [state[k].detach() for k in keys], 1 - d)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow, strict=False)

    @contextmanager
    def applied(self, model: nn.Module):
        """Evaluate with the averaged weights, then put the trained weights back."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(backup, strict=False)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
