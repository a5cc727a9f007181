"""A Gaussian mixture's exact denoiser as an x0-prediction network, shared by the distillation tests."""
import torch
from torch import nn


class ExactNet(nn.Module):
    """``net(x, t, labels)`` -> E[x0 | x_t = x(, class)] of ``gmm`` under ``schedule``.

    Labels equal to ``null_class`` (or labels=None) ask for the unconditional denoiser; with
    ``conditional=False`` labels are ignored altogether.
    """

    def __init__(self, gmm, schedule, null_class: int = 0, conditional: bool = True):
        super().__init__()
        self.d, self.null_class, self.conditional = gmm.denoiser(schedule), null_class, conditional

    def forward(self, x, t, labels=None):
        if labels is None or not self.conditional:
            return self.d(x, t, None)
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        out = torch.empty_like(x)
        unc = labels == self.null_class
        if unc.any():
            out[unc] = self.d(x[unc], t[unc], None)
        if (~unc).any():
            out[~unc] = self.d(x[~unc], t[~unc], labels[~unc])
        return out
