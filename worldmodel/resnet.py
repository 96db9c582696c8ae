"""The paper's conditioning-frame encoder: a 3D ResNet (v1) with channel LayerNorm over pixel frames.

VideoGPT's BAIR prior (wilson1yan/VideoGPT-Paper ``models/resnet.py``, ``config_cond.py``, ``train_videogpt.py``)
encodes the clip's first pixel frame with ``resnet_v1(depth 34, width_multiplier 1, resnet_dim 576,
output_shape (1, 16, 16), cifar_stem, norm_type='ln', pool=False)`` and lets every transformer layer
cross-attend to its output. Written here from those layer shapes: a 3x3x3 stem (the "CIFAR" stem the paper uses
for inputs under 128 pixels), four groups of basic residual blocks (3, 4, 6, 3 for depth 34) of widths
64/128/256·width and ``out_dim``, each group's first block with a 1x1x1 projection shortcut, and the spatial
downsampling to the output grid spread over groups 2-4 (stride 2 where an axis still has to shrink).
Every conv is bias-free with "same" padding (the paper's ``SamePadConvNd``), each followed by a LayerNorm over
channels. Shapes: B batch, k frames, H×W pixels, C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from worldmodel.tokenizer import ChannelNorm  # the tokenizer's per-position LayerNorm over channels

RESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
"""Blocks per group of the basic-block ResNets the paper code defines (its deeper ones use bottlenecks)."""


class SamePadConv3d(nn.Module):
    """Bias-free 3D conv padded so that each axis shrinks by exactly its stride (the extra pad goes first)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, bias=False)
        pads = [kernel - s for s in stride]  # total pad per axis (t, h, w)
        self.pad = tuple(p for total in reversed(pads) for p in (total // 2 + total % 2, total // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class BasicBlock(nn.Module):
    """conv3-LN-ReLU-conv3-LN + shortcut (a 1x1x1 conv + LN when ``project``), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int, int], project: bool) -> None:
        super().__init__()
        self.proj = (
            nn.Sequential(SamePadConv3d(c_in, c_out, 1, stride), ChannelNorm(c_out)) if project else None
        )
        self.conv1, self.norm1 = SamePadConv3d(c_in, c_out, 3, stride), ChannelNorm(c_out)
        self.conv2, self.norm2 = SamePadConv3d(c_out, c_out, 3, (1, 1, 1)), ChannelNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        return F.relu(y + shortcut)


class ResNet3d(nn.Module):
    """The paper's ``resnet_v1`` (basic blocks, LayerNorm, CIFAR stem, no pooling).

    Args:
        depth: 18 or 34.
        width: the width multiplier (group widths 64/128/256 x width; the paper's BAIR: 1).
        out_dim: channels of the last group (the paper's ``resnet_dim``, 576 for BAIR).
        in_shape: (k, H, W) of the input frames.
        out_shape: (k', h', w') of the output grid; each axis must divide its input axis by a power of two that
            groups 2-4 can realise (at most 8).
    """

    def __init__(
        self,
        depth: int,
        width: int,
        out_dim: int,
        in_shape: tuple[int, int, int],
        out_shape: tuple[int, int, int],
    ) -> None:
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ValueError(f"resnet depth: got {depth}, expected one of {sorted(RESNET_LAYERS)}")
        if width < 1:
            raise ValueError(f"resnet width multiplier: got {width}, expected >= 1")
        halvings = []
        for n_in, n_out in zip(in_shape, out_shape):
            ratio = n_in // n_out if n_out else 0
            if not n_out or n_in % n_out or ratio & (ratio - 1) or ratio > 8:
                raise ValueError(
                    f"resnet output shape {tuple(out_shape)} does not divide the input {tuple(in_shape)} by "
                    "a power of two <= 8 per axis"
                )
            halvings.append(int(math.log2(ratio)))
        c0 = 64 * width
        self.stem = nn.Sequential(SamePadConv3d(3, c0, 3, (1, 1, 1)), ChannelNorm(c0), nn.ReLU())
        groups, c_in = [], c0
        widths = (c0, 128 * width, 256 * width, out_dim)
        for g, (n_blocks, c_out) in enumerate(zip(RESNET_LAYERS[depth], widths)):
            stride = (1, 1, 1)
            if g > 0:  # groups 2-4 halve every axis that still has to shrink
                stride = tuple(2 if h > 0 else 1 for h in halvings)
                halvings = [h - 1 for h in halvings]
            blocks = [BasicBlock(c_in, c_out, stride, project=True)]  # the paper projects every group's start
            blocks += [BasicBlock(c_out, c_out, (1, 1, 1), project=False) for _ in range(n_blocks - 1)]
            groups.append(nn.Sequential(*blocks))
            c_in = c_out
        self.groups = nn.Sequential(*groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, k, H, W) float -> features (B, k', h', w', out_dim)."""
        x = self.groups(self.stem(x))  # (B, out_dim, k', h', w')
        return rearrange(x, "b c t h w -> b t h w c")


class PixelFrameEncoder(nn.Module):
    """Conditioning pixel frames -> cross-attention memory, as the paper's BAIR prior.

    uint8 frames (B, k, H, W, 3) in, scaled to [-0.5, 0.5] (the paper's video range), through
    :class:`ResNet3d`, plus the paper's broadcast position embedding of the output grid (one learned table per
    axis of ``out_dim / 3`` each, concatenated): memory (B, k'*h'*w', out_dim).
    """

    def __init__(
        self,
        depth: int,
        width: int,
        out_dim: int,
        in_shape: tuple[int, int, int],
        out_shape: tuple[int, int, int],
    ) -> None:
        super().__init__()
        if out_dim % 3:
            raise ValueError(
                f"resnet_dim: got {out_dim}, expected a multiple of 3 (one position table per axis)"
            )
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.resnet = ResNet3d(depth, width, out_dim, self.in_shape, self.out_shape)
        self.pos = nn.ParameterList([nn.Parameter(torch.randn(n, out_dim // 3) * 0.01) for n in out_shape])

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames uint8 (B, k, H, W, 3) -> memory (B, k'*h'*w', out_dim)."""
        B = frames.shape[0]
        x = rearrange(frames.float() / 255.0 - 0.5, "b k h w c -> b c k h w")
        feats = self.resnet(x)  # (B, k', h', w', out_dim)
        t, h, w = self.out_shape
        pos = torch.cat(
            [
                self.pos[0][:, None, None].expand(t, h, w, -1),
                self.pos[1][None, :, None].expand(t, h, w, -1),
                self.pos[2][None, None, :].expand(t, h, w, -1),
            ],
            dim=-1,
        )  # (k', h', w', out_dim)
        return rearrange(feats + pos, "b t h w c -> b (t h w) c", b=B)
