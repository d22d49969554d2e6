"""The activation observer that ``observe`` inserts and ``calibrate`` harvests.

It lives below the passes so that the two passes share it without importing each other
(passes never import passes).
"""

from __future__ import annotations

import torch

OBSERVER_PREFIX = "qqq_observer_"


class ActObserver(torch.nn.Module):
    """Identity module that records per-input-channel ``max |x|`` and, optionally,
    the Hessian ``H = 2/n · XᵀX`` (fp32) of the activations flowing through it."""

    def __init__(self, in_features: int, hessian: bool = False, device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        # Made on ``device`` (torch's default when None) and moved, before the first
        # batch is added, to that batch's device: the statistics live with the activations.
        self.absmax = torch.zeros(in_features, device=device)
        self.n = 0
        self.hessian = torch.zeros(in_features, in_features, device=device) if hessian else None
        self._finite: torch.Tensor | None = None  # all values so far finite (a device flag: no sync per batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if self.n == 0 and self.absmax.device != flat.device:
            self.absmax = self.absmax.to(flat.device)
            self.hessian = None if self.hessian is None else self.hessian.to(flat.device)
        ok = torch.isfinite(flat).all()
        self._finite = ok if self._finite is None else self._finite & ok
        self.absmax = torch.maximum(self.absmax, flat.abs().amax(dim=0))
        if self.hessian is not None:
            m = flat.shape[0]
            # Running mean of 2 xᵀx, as GPTQ accumulates it.
            self.hessian.mul_(self.n / (self.n + m))
            self.hessian.addmm_(flat.t(), flat, alpha=2.0 / (self.n + m))
        self.n += flat.shape[0]
        return x

    @property
    def nonfinite(self) -> bool:
        """Whether some observed value was NaN or Inf."""
        return self._finite is not None and not bool(self._finite)
