"""VideoGPT's VQ-VAE: 3D-conv encoder/decoder with axial-attention residual blocks and an EMA codebook.

    frames uint8 (B, T, H, W, 3)
      -> [-0.5, 0.5] float (B, 3, T, H, W)
      -> encoder: strided 3D convs (per-axis strides) [-> 3x3x3 conv] -> residual blocks with axial attention
      -> 1x1 conv to D -> codebook -> tokens int64 (B, T/st, H/sh, W/sw)
      -> decoder: 1x1 [3x3x3] conv -> residual blocks -> transposed 3D convs -> (B, 3, T, H, W)

[...]: ``TokenizerConfig.paper_layers``, the paper code's layer details (also kernel 4 on every resampling axis,
the paper's upsampling order, bias-free residual convs, one shared broadcast position embedding).

With ``causal_time`` every temporal convolution pads from the past only, temporal transposed
convolutions are cropped at the end, and temporal attention is masked: tokens of latent frame t
depend on input frames <= t only (exactly), and the decoded frame t depends on tokens <= t.

Normalisation is a per-position LayerNorm over channels, not VideoGPT's BatchNorm: batch or
group statistics pool over time and would leak future frames into the past, and a per-position
norm behaves identically in training and inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from worldmodel.attention import AxialBlock, BroadcastPosEmbed
from worldmodel.codebook import Codebook
from worldmodel.config import TokenizerConfig
from worldmodel.discriminator import Adversary
from worldmodel.fsq import FSQ
from worldmodel.perceptual import RandomFeatures


class ChannelNorm(nn.Module):
    """LayerNorm over channels at every (t, h, w) position of ``(B, C, T, H, W)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.norm(rearrange(x, "b c t h w -> b t h w c")), "b t h w c -> b c t h w")


class Conv3d(nn.Module):
    """3D convolution with 'same' padding in H, W and, in T, causal or 'same' padding."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: tuple[int, int, int],
        stride: tuple[int, int, int] = (1, 1, 1),
        causal: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        pads = []
        for i, (k, s) in enumerate(zip(kernel, stride)):
            p = k - s
            if i == 0 and causal:
                pads.append((p, 0))
            else:
                pads.append((p // 2 + p % 2, p // 2))
        # F.pad takes the last axis first: (w_lo, w_hi, h_lo, h_hi, t_lo, t_hi)
        self.pad = (*pads[2], *pads[1], *pads[0])
        self.conv = nn.Conv3d(cin, cout, kernel, stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class ConvTranspose3d(nn.Module):
    """Transposed 3D convolution that exactly inverts :class:`Conv3d`'s shape change.

    The output is cropped to ``input * stride``; in T with ``causal`` the crop removes only the end,
    so output frame o depends on inputs ``<= o // stride`` only.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: tuple[int, int, int],
        stride: tuple[int, int, int],
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose3d(cin, cout, kernel, stride)
        self.crops = []
        for i, (k, s) in enumerate(zip(kernel, stride)):
            extra = k - s  # full output length is in*s + (k - s)
            lo = 0 if (i == 0 and causal) else extra // 2
            self.crops.append((lo, extra - lo))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        (t0, t1), (h0, h1), (w0, w1) = self.crops
        return y[:, :, t0 : y.shape[2] - t1, h0 : y.shape[3] - h1, w0 : y.shape[4] - w1]


class AttentionResidualBlock(nn.Module):
    """norm-ReLU-conv3-norm-ReLU-conv1-norm-ReLU-axial attention, added to the input (VideoGPT).

    ``hidden``: width of the inner conv (0 = dim // 2); ``shared_pos``: the paper's position embedding shared by
    all blocks (None: per-block embeddings); ``bias``: biases of the two convs (the paper has none)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        spatial: tuple[int, int],
        max_frames: int,
        causal: bool,
        hidden: int = 0,
        shared_pos: BroadcastPosEmbed | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden = hidden or dim // 2
        self.block = nn.Sequential(
            ChannelNorm(dim),
            nn.ReLU(),
            Conv3d(dim, hidden, (3, 3, 3), causal=causal, bias=bias),
            ChannelNorm(hidden),
            nn.ReLU(),
            Conv3d(hidden, dim, (1, 1, 1), bias=bias),
            ChannelNorm(dim),
            nn.ReLU(),
            AxialBlock(dim, n_heads, spatial, max_frames, causal, shared_pos),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _n_halvings(stride: tuple[int, int, int]) -> list[int]:
    out = []
    for s in stride:
        n = int(round(math.log2(s))) if s >= 1 else -1
        if s < 1 or 2**n != s:
            raise ValueError(
                f"tokenizer stride {stride}: every factor must be a power of two (1, 2, 4, 8, ...)"
            )
        out.append(n)
    return out


def _kernel(stride: tuple[int, ...], halvings: list[int], paper: bool = False) -> tuple[int, int, int]:
    """Kernel of a resampling layer: 4 along halved axes (as VideoGPT), else 3; ``paper``: 4 on every axis
    (the paper code's ``kernel_size=4``).

    When the tokenizer keeps every frame (temporal stride 1) the resampling layers, which run at
    the highest resolutions and dominate the cost, use temporal kernel 1 (3x cheaper); frames
    still mix in time in the residual blocks (3x3x3 convs and temporal attention).
    """
    if paper:
        return (4, 4, 4)
    t = 4 if stride[0] == 2 else (1 if halvings[0] == 0 else 3)
    return (t, 4 if stride[1] == 2 else 3, 4 if stride[2] == 2 else 3)


def _res_stack(cfg: TokenizerConfig, shared_pos: BroadcastPosEmbed | None) -> nn.Sequential:
    """``n_res_layers`` residual blocks, then norm and ReLU (as the paper's ``AttentionResidualStack``)."""
    spatial = (cfg.resolution // cfg.stride[1], cfg.resolution // cfg.stride[2])
    max_t = max(1, cfg.max_frames // cfg.stride[0])
    C, paper = cfg.channels, cfg.paper_layers
    return nn.Sequential(
        *[
            AttentionResidualBlock(
                C, cfg.n_heads, spatial, max_t, cfg.causal_time, cfg.res_channels, shared_pos, bias=not paper
            )
            for _ in range(cfg.n_res_layers)
        ],
        ChannelNorm(C),
        nn.ReLU(),
    )


def _check_shared_pos(cfg: TokenizerConfig, shared_pos: BroadcastPosEmbed | None) -> None:
    if cfg.paper_layers != (shared_pos is not None):
        raise ValueError(
            "tokenizer.paper_layers needs the shared position embedding (built by VQVAE), and only it"
        )


class Encoder(nn.Module):
    """Frames (B, 3, T, H, W) -> pre-quantisation vectors (B, D, T', h, w)."""

    def __init__(self, cfg: TokenizerConfig, shared_pos: BroadcastPosEmbed | None = None) -> None:
        super().__init__()
        _check_shared_pos(cfg, shared_pos)
        halvings = _n_halvings(cfg.stride)
        C, causal = cfg.channels, cfg.causal_time
        layers: list[nn.Module] = []
        cin = 3
        for i in range(max(halvings)):
            stride = tuple(2 if n > i else 1 for n in halvings)
            kernel = _kernel(stride, halvings, cfg.paper_layers)
            layers += [Conv3d(cin, C, kernel, stride, causal=causal), nn.ReLU()]  # type: ignore[arg-type]
            cin = C
        if not layers:
            layers += [Conv3d(3, C, (3, 3, 3), causal=causal), nn.ReLU()]
        self.down = nn.Sequential(*layers)
        # the paper's conv_last: 3x3x3, no activation, between the downsampling stack and the residual blocks
        self.post_down = Conv3d(C, C, (3, 3, 3), causal=causal) if cfg.paper_layers else None
        self.res = _res_stack(cfg, shared_pos)
        self.to_code = Conv3d(C, cfg.embedding_dim, (1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, T, H, W) -> (B, D, T', h, w)
        h = self.down(x)  # (B, C, T', h, w)
        if self.post_down is not None:
            h = self.post_down(h)
        return self.to_code(self.res(h))


class Decoder(nn.Module):
    """Code vectors (B, D, T', h, w) -> frames (B, 3, T, H, W)."""

    def __init__(self, cfg: TokenizerConfig, shared_pos: BroadcastPosEmbed | None = None) -> None:
        super().__init__()
        _check_shared_pos(cfg, shared_pos)
        halvings = _n_halvings(cfg.stride)
        C, causal, paper = cfg.channels, cfg.causal_time, cfg.paper_layers
        # the paper's decoder input conv is 3x3x3 (conv1); ours 1x1x1
        self.from_code = Conv3d(cfg.embedding_dim, C, (3, 3, 3) if paper else (1, 1, 1), causal=causal)
        self.res = _res_stack(cfg, shared_pos)
        layers: list[nn.Module] = []
        n_up = max(halvings)
        for i in range(n_up):
            # the paper's order: every still-halved axis first ((4, 2, 2): (2, 2, 2) then (2, 1, 1))
            if paper:
                stride = tuple(2 if n > i else 1 for n in halvings)
            else:  # mirror of the encoder
                stride = tuple(2 if n > n_up - 1 - i else 1 for n in halvings)
            kernel = _kernel(stride, halvings, paper)
            cout = 3 if i == n_up - 1 else C
            if all(s == 1 for s in stride):
                layers.append(Conv3d(C, cout, kernel, causal=causal))  # type: ignore[arg-type]
            else:
                layers.append(ConvTranspose3d(C, cout, kernel, stride, causal=causal))  # type: ignore[arg-type]
            if i < n_up - 1:
                layers.append(nn.ReLU())
        if not layers:
            layers.append(Conv3d(C, 3, (3, 3, 3), causal=causal))
        self.up = nn.Sequential(*layers)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the conv that outputs pixels (for the adversarial term's adaptive weight)."""
        return self.up[-1].conv.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, D, T', h, w) -> (B, 3, T, H, W)
        return self.up(self.res(self.from_code(z)))


@dataclass
class VQVAEOutput:
    recon: torch.Tensor  # (B, 3, T, H, W) in [-0.5, 0.5] (unclamped)
    codes: torch.Tensor  # (B, T', h, w) int64
    recon_loss: torch.Tensor  # cfg.recon_loss: MSE / data variance, L1 / data std, or their sum
    commitment: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


class VQVAE(nn.Module):
    """The tokenizer. See the module docstring for the data flow; ``cfg`` fixes the geometry."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        _n_halvings(cfg.stride)
        if cfg.resolution % cfg.stride[1] or cfg.resolution % cfg.stride[2]:
            raise ValueError(
                f"resolution {cfg.resolution} is not divisible by the spatial strides {cfg.stride[1:]}"
            )
        self.cfg = cfg
        # paper_layers: one position embedding of the latent grid, shared by encoder and decoder (the paper's)
        self.pos = None
        if cfg.paper_layers:
            T_lat = max(1, cfg.max_frames // cfg.stride[0])
            self.pos = BroadcastPosEmbed(cfg.channels, (T_lat, *self.grid))
        self.encoder = Encoder(cfg, self.pos)
        self.decoder = Decoder(cfg, self.pos)
        self.codebook = (
            FSQ(cfg.fsq_levels)
            if cfg.quantizer == "fsq"
            else Codebook(cfg.codebook_size, cfg.embedding_dim, cfg.beta, cfg.ema_decay)
        )
        self.register_buffer("data_variance", torch.ones(()))
        # Training-only loss modules, built after the autoencoder so that its initial weights do not depend
        # on them; never run by encode/decode (see worldmodel/discriminator.py for the design).
        self.perceptual = RandomFeatures() if cfg.perceptual_weight > 0 else None
        self.adversary = None
        if cfg.adv_weight > 0:
            self.adversary = Adversary(
                cfg.adv_weight, cfg.adv_start_step, cfg.adv_adaptive, cfg.disc_channels, cfg.disc_layers
            )
            if cfg.resolution < self.adversary.net.min_resolution():
                raise ValueError(
                    f"tokenizer.disc_layers={cfg.disc_layers}: the discriminator needs frames of at "
                    f"least {self.adversary.net.min_resolution()} pixels, got {cfg.resolution}; "
                    "use fewer layers"
                )

    # -- shapes and validation ------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """Tokens per frame (h, w)."""
        return self.cfg.resolution // self.cfg.stride[1], self.cfg.resolution // self.cfg.stride[2]

    def _check_frames(self, frames: torch.Tensor) -> None:
        r, st = self.cfg.resolution, self.cfg.stride[0]
        if not isinstance(frames, torch.Tensor) or frames.ndim != 5 or frames.shape[-1] != 3:
            shape = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
            raise ValueError(f"frames: got {shape}, expected a uint8 tensor (B, T, {r}, {r}, 3)")
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames: got dtype {frames.dtype}, expected torch.uint8 (B, T, {r}, {r}, 3)")
        B, T, H, W, _ = frames.shape
        if (H, W) != (r, r):
            raise ValueError(f"frames: got {H}x{W} pixels, expected {r}x{r} (the tokenizer's resolution)")
        if T % st:
            raise ValueError(f"frames: T={T} is not divisible by the temporal stride {st}")

    def _check_codes(self, codes: torch.Tensor) -> None:
        h, w = self.grid
        if not isinstance(codes, torch.Tensor) or codes.ndim != 4 or tuple(codes.shape[2:]) != (h, w):
            shape = tuple(codes.shape) if hasattr(codes, "shape") else type(codes).__name__
            raise ValueError(f"tokens: got {shape}, expected an int64 tensor (B, T', {h}, {w})")
        if codes.dtype not in (torch.int64, torch.int32, torch.int16):
            raise ValueError(f"tokens: got dtype {codes.dtype}, expected an integer tensor")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.codebook_size):
            raise ValueError(
                f"tokens: values must lie in [0, {self.cfg.codebook_size}), "
                f"got [{int(codes.min())}, {int(codes.max())}]"
            )

    @staticmethod
    def to_float(frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-0.5, 0.5]."""
        return rearrange(frames, "b t h w c -> b c t h w").float() / 255.0 - 0.5

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        """float (B, 3, T, H, W) in [-0.5, 0.5] -> uint8 (B, T, H, W, 3)."""
        return rearrange(
            ((x.float() + 0.5).clamp(0, 1) * 255).round().to(torch.uint8), "b c t h w -> b t h w c"
        )

    def set_data_variance(self, v: float) -> None:
        """Variance of the training pixels in [-0.5, 0.5]; the reconstruction loss is divided by it."""
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"data variance must be a positive finite number, got {v}")
        self.data_variance.fill_(v)

    # -- model ----------------------------------------------------------------------------------
    def pixel_loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``cfg.recon_loss`` between float videos (B, 3, T, H, W), normalised by the data's spread: MSE / variance
        (the paper's), L1 / standard deviation, or their sum (``l1+mse``); scalar."""
        recon, x = recon.float(), x.float()
        loss = recon.new_zeros(())
        if self.cfg.recon_loss in ("mse", "l1+mse"):
            loss = loss + F.mse_loss(recon, x) / self.data_variance
        if self.cfg.recon_loss in ("l1", "l1+mse"):
            loss = loss + F.l1_loss(recon, x) / self.data_variance.sqrt()
        if self.cfg.hard_pixel_weight > 0:
            loss = loss + self.cfg.hard_pixel_weight * self.hard_pixel_loss(recon, x)
        return loss

    def hard_pixel_loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Mean squared error (per channel) of each clip's ``cfg.hard_pixel_fraction`` worst pixels, over the data
        variance; float videos (B, 3, T, H, W) -> scalar. See ``TokenizerConfig.hard_pixel_weight``."""
        err = rearrange((recon.float() - x.float()).pow(2).sum(1), "b t h w -> b (t h w)")  # (B, pixels)
        k = max(1, round(self.cfg.hard_pixel_fraction * err.shape[1]))
        return err.topk(k, dim=1).values.mean() / 3 / self.data_variance

    def object_loss(self, recon: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Mean squared error (per channel) over the object pixels ``mask`` (B, T, H, W), nonzero inside object
        boxes, over the data variance; float videos (B, 3, T, H, W) -> scalar (0 when no pixel is marked). See
        ``TokenizerConfig.object_weight``."""
        if mask is None:
            raise ValueError(
                "tokenizer.object_weight > 0 needs batch['object_mask'] (B, T, H, W): a store collected with "
                "object masks (train.py --config.collect-object-masks, or collect.py --object-mask)"
            )
        m = rearrange(mask.to(recon.device).float(), "b t h w -> b 1 t h w")  # (B, 1, T, H, W)
        if m.shape[2:] != recon.shape[2:]:
            raise ValueError(
                f"object_mask: got {tuple(mask.shape)}, expected (B, T, H, W) = {tuple(x.shape[:1] + x.shape[2:])}"
            )
        err = (recon.float() - x.float()).pow(2) * (m > 0)
        return err.sum() / (3 * (m > 0).sum()).clamp(min=1) / self.data_variance

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        """``x``: float (B, 3, T, H, W) in [-0.5, 0.5]."""
        q = self.codebook(self.encoder(x))
        recon = self.decoder(q.z_q)
        return VQVAEOutput(recon, q.codes, self.pixel_loss(recon, x), q.commitment, q.perplexity, q.usage)

    def optimizer_param_sets(self) -> dict[str, list[nn.Parameter]]:
        """Parameter sets that :func:`worldmodel.training.fit` optimises with their own gradient-norm clip:
        the autoencoder, and the discriminator when there is one (its gradient must not shrink the
        autoencoder's step). One set without a discriminator, i.e. fit's default."""
        adv = {id(p) for p in self.adversary.parameters()} if self.adversary is not None else set()
        sets = {"tokenizer": [p for p in self.parameters() if id(p) not in adv]}
        if self.adversary is not None:
            sets["discriminator"] = list(self.adversary.parameters())
        return sets

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on ``batch['frames']`` uint8 (B, T, H, W, 3): pixel loss (``cfg.recon_loss``) + commitment,
        + ``perceptual_weight`` x random-feature L1, + the adversarial terms (generator and discriminator
        hinge, from ``adv_start_step``) when configured."""
        frames = batch["frames"]
        self._check_frames(frames)
        x = self.to_float(frames)
        out = self(x)
        rec = out.recon_loss
        metrics: dict[str, float] = {}
        if self.perceptual is not None:
            perc = self.perceptual(out.recon.float(), x)
            rec = rec + self.cfg.perceptual_weight * perc
            metrics["perceptual"] = perc.item()
        if self.cfg.object_weight > 0:
            obj = self.object_loss(out.recon, x, batch.get("object_mask"))
            rec = rec + self.cfg.object_weight * obj
            metrics["object_loss"] = obj.item()
        loss = rec + out.commitment
        if self.adversary is not None:
            adv, adv_metrics = self.adversary(x, out.recon.float(), rec, self.decoder.last_layer)
            loss = loss + adv
            metrics.update(adv_metrics)
        with torch.no_grad():
            mse = F.mse_loss(out.recon.float().clamp(-0.5, 0.5), x).item()
        psnr = 10 * math.log10(1.0 / max(mse, 1e-10))
        return loss, {
            "recon_loss": out.recon_loss.item(),
            "commitment": out.commitment.item(),
            "perplexity": out.perplexity.item(),
            "codebook_usage": out.usage.item(),
            "psnr": psnr,
            **metrics,
        }

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> tokens int64 (B, T/st, H/sh, W/sw)."""
        self._check_frames(frames)
        z = self.encoder(self.to_float(frames.to(self.data_variance.device)))
        B, D, T, h, w = z.shape
        codes = self.codebook.codes_for(rearrange(z, "b d t h w -> (b t h w) d").float())
        return rearrange(codes, "(b t h w) -> b t h w", b=B, t=T, h=h, w=w)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T', h, w) -> uint8 frames (B, T'*st, H, W, 3)."""
        self._check_codes(tokens)
        return self.to_uint8(self.decoder(self.codebook.lookup(tokens.long().to(self.data_variance.device))))

    def decode_float(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T', h, w) -> float frames (B, 3, T, H, W) in about [-0.5, 0.5] (differentiable in the decoder)."""
        self._check_codes(tokens)
        return self.decoder(self.codebook.lookup(tokens.long()))
