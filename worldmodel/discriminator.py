"""Adversarial term of the tokenizer: a 2D PatchGAN discriminator on single frames, hinge loss (VQGAN).

Why: a decoder trained on pixel MSE alone predicts the *mean* of what its tokens leave uncertain, which is
a blur in which small high-contrast objects (HGS medkits, Take Cover fireballs) vanish. A patch
discriminator penalises blur directly: it scores every ~70x70-pixel patch (at 64x64 in, 6x6 logits) real
or reconstructed, so sharp, plausible detail is what lowers the generator's loss.

Design (the least invasive fit into the generic :func:`worldmodel.training.fit`, which trains one model
with one optimizer and one backward per step):

- The :class:`~worldmodel.tokenizer.VQVAE` owns an optional :class:`Adversary` submodule (built only when
  ``TokenizerConfig.adv_weight > 0``), so the discriminator's weights, its step counter and -- through the
  one optimizer -- its Adam state are saved and restored with the tokenizer's checkpoint: resume stays
  exact with no change to the checkpoint format.
- One backward updates both players simultaneously, without either one's loss reaching the other's
  weights: the discriminator's hinge loss reads the reconstruction *detached*; the generator's term calls
  the discriminator through :func:`torch.func.functional_call` with *detached* weights, so its gradient
  flows into the decoder only.
- The discriminator's parameters form their own set in the optimizer (``VQVAE.optimizer_param_sets``):
  ``fit`` clips each set's gradient norm separately, so a large discriminator gradient never shrinks the
  autoencoder's step.
- At inference the discriminator is never run (``encode``/``decode`` do not touch it); a bundle trained
  with it carries its weights under ``tokenizer.adversary.*`` (~0.3 M parameters at the defaults),
  loaded and ignored. Old bundles (no ``adv_weight`` in their config) build no adversary and load as before.

Normalisation is GroupNorm, not pix2pix's BatchNorm: real and reconstructed frames go through one
forward, and batch statistics would let the discriminator compare them through the batch (and behave
differently in eval).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.func import functional_call

ADAPTIVE_WEIGHT_MAX = 1e4  # VQGAN's clamp of the adaptive weight


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class PatchDiscriminator(nn.Module):
    """pix2pix / VQGAN ``NLayerDiscriminator``: ``n_layers`` stride-2 4x4 convs, one stride-1 conv, a 1-channel
    4x4 conv. Input float (N, 3, H, W) in about [-0.5, 0.5]; output logits (N, 1, H / 2**n - 2, W / 2**n - 2),
    one per patch (> 0: "real")."""

    def __init__(self, channels: int = 32, n_layers: int = 3) -> None:
        super().__init__()
        if channels < 1 or n_layers < 1:
            raise ValueError(f"channels / n_layers: got {channels}, {n_layers}, expected both >= 1")
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, n_layers + 1):
            c_out = channels * min(2**i, 4)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(c, c_out, 4, stride, 1, bias=False),
                nn.GroupNorm(_groups(c_out), c_out),
                nn.LeakyReLU(0.2),
            ]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.n_layers = n_layers

    def min_resolution(self) -> int:
        """Smallest frame side (pixels) that leaves at least one patch logit."""
        return 3 * 2**self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 1, h, w)
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``: 2 at logits 0, 0 once
    every real patch scores >= 1 and every fake one <= -1."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's ``||d rec_loss / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4)``, clamped to
    [0, 1e4] and detached: the adversarial gradient at the decoder's output layer is scaled to the
    reconstruction's. ``last_layer``: the weight of the decoder's last conv (requires grad)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


class Adversary(nn.Module):
    """The discriminator, its schedule and both hinge losses, owned by the tokenizer (see the module docstring).

    Args:
        weight: weight of the generator's term (``TokenizerConfig.adv_weight``).
        start_step: training step (counted in ``steps``) from which both players train.
        adaptive: scale the generator's term by :func:`adaptive_weight`.
        channels / n_layers: the :class:`PatchDiscriminator`'s size.
    """

    def __init__(
        self, weight: float, start_step: int = 0, adaptive: bool = True, channels: int = 32, n_layers: int = 3
    ) -> None:
        super().__init__()
        if not weight > 0 or start_step < 0:
            raise ValueError(
                f"weight / start_step: got {weight}, {start_step}, expected weight > 0 and start_step >= 0"
            )
        self.weight, self.start_step, self.adaptive = float(weight), int(start_step), bool(adaptive)
        self.net = PatchDiscriminator(channels, n_layers)
        # training steps seen (compute_loss calls in training mode with gradients): in the state_dict, so a
        # resumed run starts the adversarial term at the same step
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def active(self) -> bool:
        """Whether the adversarial terms apply at the current step."""
        return int(self.steps) >= self.start_step

    def logits(self, video: torch.Tensor, detach_weights: bool = False) -> torch.Tensor:
        """Patch logits of every frame of float video (B, 3, T, H, W) -> (B*T, 1, h, w). With ``detach_weights``
        the gradient reaches the input only, never the discriminator."""
        frames = rearrange(video, "b c t h w -> (b t) c h w")
        if not detach_weights:
            return self.net(frames)
        params = {k: v.detach() for k, v in self.net.named_parameters()}
        return functional_call(self.net, params, (frames,))

    def forward(
        self, real: torch.Tensor, fake: torch.Tensor, rec_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The adversarial part of the tokenizer's loss: ``adv_weight * lambda * g_loss + d_loss``.

        Args:
            real: float frames (B, 3, T, H, W) in [-0.5, 0.5].
            fake: the reconstruction of ``real``, same shape (differentiable in the decoder).
            rec_loss: the reconstruction (+ perceptual) loss, for the adaptive weight.
            last_layer: the decoder's last conv weight, for the adaptive weight.

        In training mode with gradients it advances ``steps``; before ``start_step`` it returns a zero that
        touches every discriminator parameter (zero gradients, so DDP sees them all used). In eval mode or
        without gradients it returns 0 and only reports the discriminator's scores.
        """
        training = self.training and torch.is_grad_enabled()
        if not training:
            lr, lf = self.logits(real), self.logits(fake)
            return real.new_zeros(()), {"d_loss": hinge_d_loss(lr, lf).item(), "g_loss": -lf.mean().item()}
        active = self.active
        self.steps += 1
        if not active:
            zero = sum(p.sum() for p in self.net.parameters()) * 0.0
            return zero, {"adv_active": 0.0}
        n = real.shape[0] * real.shape[2]
        logits = self.logits(torch.cat([real, fake.detach()]))  # one forward: GroupNorm is per sample
        d_loss = hinge_d_loss(logits[:n], logits[n:])
        g_loss = -self.logits(fake, detach_weights=True).mean()
        lam = adaptive_weight(rec_loss, g_loss, last_layer) if self.adaptive else g_loss.new_ones(())
        metrics = {
            "adv_active": 1.0,
            "d_loss": d_loss.item(),
            "g_loss": g_loss.item(),
            "adv_lambda": float(lam),
            "d_real": logits[:n].mean().item(),
            "d_fake": logits[n:].mean().item(),
        }
        return self.weight * lam * g_loss + d_loss, metrics
