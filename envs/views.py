"""What a dream-trained policy sees in the real game: the real frame as the world model would draw it.

A policy trained in the dream only ever saw *decoded* frames: the tokenizer's rendering of the world, with its
blur and its losses (small, distant objects fade; textures smooth out). Scored on raw real frames it meets inputs
it never saw (on Take Cover, colour-key fireball features are 1.5x larger on real frames than on the same frames
through the tokenizer). World Models scored its dream-trained controller the same way: the real frame goes
through the VAE, and the controller reads what the world model makes of it.

:class:`TokenizerView` maps real frames through the bundle's tokenizer (``decode(encode(x))``, each frame a
one-frame clip); :func:`tokenizer_view` wraps a Gymnasium vector env so that its observations are that view.
The ``"latent"`` view goes one step further, to World Models' own input: the observation is the world model's
latent state after the real frame (:class:`envs.latent.LatentObservation`), for controllers with
``features="latent"``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from worldmodel.bundle import WorldModel

VIEWS = ("raw", "tokenized", "latent")
"""Real-game views of a policy: the env's own frames, :class:`TokenizerView`'s, or the world model's latent state
(:class:`envs.latent.LatentObservation`: float32 vectors, not frames)."""


class TokenizerView:
    """uint8 frames (N, H, W, 3) -> uint8 (N, H, W, 3): each frame encoded to tokens and decoded again by ``wm``'s
    tokenizer, as a clip of one frame (the same frame the dream's decoder draws from one frame of tokens)."""

    def __init__(self, wm: WorldModel) -> None:
        st = wm.cfg.tokenizer.stride[0]
        if st != 1:
            raise ValueError(
                f"tokenizer view: the bundle's tokenizer has temporal stride {st}; a one-frame view "
                "needs stride 1 in time"
            )
        self.wm = wm

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        x = np.asarray(frames)
        if x.ndim != 4 or x.dtype != np.uint8 or x.shape[1:] != tuple(self.wm.obs_shape):
            raise ValueError(
                f"frames: got {x.dtype} {x.shape}, expected uint8 (N, {', '.join(map(str, self.wm.obs_shape))})"
            )
        clips = torch.from_numpy(np.ascontiguousarray(x[:, None])).to(self.wm.device)  # (N, 1, H, W, 3)
        return self.wm.tokenizer.decode(self.wm.tokenizer.encode(clips))[:, 0].cpu().numpy()


def tokenizer_view(venv: gym.vector.VectorEnv, wm: WorldModel) -> gym.vector.VectorEnv:
    """``venv`` whose observations (N, H, W, 3) are seen through ``wm``'s tokenizer (:class:`TokenizerView`)."""
    return gym.wrappers.vector.TransformObservation(venv, TokenizerView(wm), venv.observation_space)


def real_view(venv: gym.vector.VectorEnv, wm: WorldModel, view: str) -> gym.vector.VectorEnv:
    """``venv`` as a policy sees it: ``view`` is ``"raw"`` (unchanged), ``"tokenized"`` (:func:`tokenizer_view`)
    or ``"latent"`` (:class:`envs.latent.LatentObservation`)."""
    if view not in VIEWS:
        raise ValueError(f"view: got {view!r}, expected one of {VIEWS}")
    if view == "latent":
        from envs.latent import LatentObservation  # the prior's side: loaded only for this view

        return LatentObservation(venv, wm)
    return venv if view == "raw" else tokenizer_view(venv, wm)
