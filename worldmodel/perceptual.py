"""A feature-space reconstruction term from a small *fixed random* conv net (no download, no training).

Why random features: the perceptual losses of IRIS/VQGAN use LPIPS on an ImageNet VGG, which needs
downloaded weights; the I3D we load for FVD is 3D, 224x224 and far too slow to run in a CPU training step.
Random conv features are what we can compute offline: each layer is a bank of local filters (3x3 at 1x,
2x and 4x downsampling), and an L1 difference of their rectified responses weighs errors by local
structure -- a medkit's edges, a fireball's outline -- which the pixel MSE averages away with the flat
floor around it. This is *not* a learned perceptual metric: it re-weights the error, it does not by itself
stop a decoder from predicting a mean (the adversarial term, :mod:`worldmodel.discriminator`, does that).
Its value is to be measured (``benchmarks/bench_tokenizer.py``), not assumed.

The weights are buffers drawn from a private generator (seed fixed here): the same on every machine,
independent of the global RNG (building it does not shift the tokenizer's own initialisation), saved in
the state_dict and never trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

FEATURE_SEED = 20240611
LAYERS = ((3, 16, 1), (16, 32, 2), (32, 64, 2))  # (in, out, stride) of the 3x3 convs


class RandomFeatures(nn.Module):
    """Fixed random 3-layer conv net; :meth:`forward` is the feature L1 between two videos."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(FEATURE_SEED)
        self.strides = [s for _, _, s in LAYERS]
        for i, (cin, cout, _) in enumerate(LAYERS):
            # He-normal scale keeps the response magnitude about constant through the ReLUs
            w = torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (cin * 9)) ** 0.5
            self.register_buffer(
                f"weight{i}", w - w.mean(dim=(1, 2, 3), keepdim=True)
            )  # zero-mean: no DC response

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Rectified responses of every layer for frames (N, 3, H, W) in about [-0.5, 0.5]."""
        out = []
        for i, s in enumerate(self.strides):
            x = F.relu(F.conv2d(x, getattr(self, f"weight{i}").to(x.dtype), stride=s, padding=1))
            out.append(x)
        return out

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over layers of ``mean|f(recon) - f(target)| / mean|f(target)|`` (the target's magnitude
        detached, so each layer counts about equally), per frame of float videos (B, 3, T, H, W). 0 iff the
        features agree; scalar."""
        if recon.shape != target.shape or recon.ndim != 5:
            raise ValueError(
                f"recon / target: got {tuple(recon.shape)} and {tuple(target.shape)}, expected two "
                "float videos of one shape (B, 3, T, H, W)"
            )
        fr = self.features(rearrange(recon, "b c t h w -> (b t) c h w"))
        ft = self.features(rearrange(target, "b c t h w -> (b t) c h w"))
        terms = [(a - b).abs().mean() / (b.detach().abs().mean() + 1e-6) for a, b in zip(fr, ft)]
        return torch.stack(terms).mean()
