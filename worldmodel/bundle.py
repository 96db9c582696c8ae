"""A world model = tokenizer + prior + metadata, loaded from one run directory (DESIGN §7).

``WorldModel.from_pretrained(path)`` needs only ``config.json`` and ``model.safetensors``.
``WorldModel.rollout(B)`` returns a :class:`DreamRollout`: a batch of B dream environments that
take frames and actions in pixel space and return generated frames, rewards and terminations.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worldmodel.checkpoint import (
    CONFIG_JSON,
    WEIGHTS,
    BundleError,
    load_weights,
    read_experiment_config,
    read_run_config,
    save_weights,
    write_run_config,
)
from worldmodel.config import ExperimentConfig
from worldmodel.hazard import HazardConfig, HazardUnroll, load_hazard
from worldmodel.prior import Prior
from worldmodel.sampling import Rollout
from worldmodel.store import ActionSpec
from worldmodel.tokenizer import VQVAE


class WorldModel(nn.Module):
    """Tokenizer + prior of one experiment, with the action space and observation shape they model."""

    def __init__(self, cfg: ExperimentConfig, store_meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.store_meta = dict(store_meta or {})
        self.tokenizer = VQVAE(cfg.tokenizer)
        self.prior = Prior(cfg.prior)
        # optional: termination unrolled from a root state (worldmodel/hazard.py; train_hazard.py writes it)
        self.hazard: HazardUnroll | None = None
        self.hazard_cfg: HazardConfig | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> WorldModel:
        """Load a bundle directory (a run directory whose tokenizer and prior are trained).

        Raises ``FileNotFoundError`` for a missing file and :class:`~worldmodel.checkpoint.BundleError`
        (a ``ValueError``) naming the file for an unreadable config or weights, a config field of the wrong
        type, or weights that do not fit the config."""
        d = read_run_config(path)
        wm = cls(read_experiment_config(path), d.get("store"))
        for name, module in (("tokenizer", wm.tokenizer), ("prior", wm.prior)):
            try:
                module.load_state_dict(load_weights(path, name))
            except RuntimeError as e:  # missing/unexpected keys or shapes: weights of another config
                raise BundleError(
                    f"{Path(path) / WEIGHTS}: the {name} weights do not fit the {name} config in "
                    f"{Path(path) / CONFIG_JSON} ({str(e)[:300]})"
                ) from None
        loaded = load_hazard(path, wm.obs_shape[0])
        if loaded is not None:
            wm.hazard, wm.hazard_cfg = loaded
        wm.path = Path(path)
        return wm.to(device).eval()

    def save_pretrained(self, path: str | os.PathLike) -> None:
        write_run_config(path, self.cfg.to_dict(), self.store_meta)
        save_weights(path, "tokenizer", self.tokenizer.state_dict())
        save_weights(path, "prior", self.prior.state_dict())

    # -- metadata -------------------------------------------------------------------------------
    @property
    def action_spec(self) -> ActionSpec:
        if self.cfg.prior.action_kind == "none":  # e.g. a store with actions modelled without them
            return ActionSpec.none()
        if "action_spec" in self.store_meta:
            return ActionSpec.from_dict(self.store_meta["action_spec"])
        p = self.cfg.prior
        if p.action_kind == "discrete":
            return ActionSpec.discrete(p.n_actions)
        if p.action_kind == "continuous":
            return ActionSpec.continuous(p.action_dim)
        return ActionSpec.none()

    @property
    def obs_shape(self) -> tuple[int, int, int]:
        r = self.cfg.tokenizer.resolution
        return (r, r, 3)

    @property
    def fps(self) -> float:
        return float(self.store_meta.get("fps", 0.0)) or 8.75

    @property
    def store_path(self) -> str | None:
        return self.store_meta.get("path")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def rollout(self, batch_size: int, *, bf16: bool = False, decode_context: int = 1) -> DreamRollout:
        return DreamRollout(self, batch_size, bf16=bf16, decode_context=decode_context)


@dataclass
class DreamStep:
    """One step of B dreams. The reward head gives a reward for each outcome of the step
    (``PriorConfig.reward_given_termination``; both are the same with a one-output head): a consumer
    that decides termination picks the matching one (the dream env: ``np.where(terminated_drawn,
    rewards_if_terminated, rewards)``), one that does not uses :attr:`expected_rewards`."""

    frames: np.ndarray  # (B, H, W, 3) uint8
    rewards: np.ndarray  # (B,) float32 reward if the step did not end the episode
    terminated: np.ndarray  # (B,) bool (termination probability > 0.5)
    terminated_prob: np.ndarray  # (B,) float32
    entropy: np.ndarray  # (B,) mean token entropy of the new frame, nats
    tokens: np.ndarray  # (B, h, w) int64
    rewards_if_terminated: np.ndarray  # (B,) float32 reward if the step ended the episode
    latent: np.ndarray | None = None  # (B, C) float32 the prior's latent state after the new frame
    #                                   (worldmodel.sampling "Latent state": World Models' [z_t, h_t])

    @property
    def expected_rewards(self) -> np.ndarray:
        """(B,) float32 ``p * rewards_if_terminated + (1 - p) * rewards``, p = ``terminated_prob``."""
        p = self.terminated_prob
        return (p * self.rewards_if_terminated + (1 - p) * self.rewards).astype(np.float32)


class DreamRollout:
    """B dream environments stepped together (one model call per token for the whole batch).

    Args:
        wm: the world model.
        batch_size: number of environments.
        bf16: the prior in bf16 (``Rollout(bf16=True)``) and the tokenizer's decoder under bf16 autocast (2.4× faster
            for 16 frames here; the decoded uint8 frames differ from fp32's by at most one level, 0.12–0.15 on average,
            on the HGS and Take Cover bundles).
        decode_context: frames of token history the decoder sees when decoding a new frame. The
            tokenizer is causal in time, so more history can only refine the newest frame; on the
            tiny vizdoom_hgs bundle 1, 2, 4 and 8 frames gave the same reconstruction PSNR (28.71 dB
            on held-out clips) while the cost grows linearly, hence the default of 1.
    """

    def __init__(
        self, wm: WorldModel, batch_size: int, *, bf16: bool = False, decode_context: int = 1
    ) -> None:
        self.wm, self.B = wm, batch_size
        self.sampler = Rollout(wm.prior, batch_size, bf16=bf16)
        self.bf16 = bf16
        self.decode_context = max(1, decode_context)
        self.spec = wm.action_spec

    def _actions_tensor(self, actions: Any, n: int, where: str = "actions") -> torch.Tensor | None:
        spec = self.spec
        if spec.kind == "none":
            return None
        a = torch.as_tensor(np.asarray(actions))
        if spec.kind == "discrete":
            if a.dtype.is_floating_point or a.dtype == torch.bool:
                raise ValueError(f"{where}: got {a.dtype}, expected integer actions in [0, {spec.n})")
            return a.long().to(self.wm.device)
        return a.float().to(self.wm.device)

    @torch.inference_mode()
    def reset(
        self, frames: np.ndarray | torch.Tensor, actions: Any = None, rows: list[int] | None = None
    ) -> None:
        """Start ``rows`` (default all) from real context: frames uint8 (k, Tc, H, W, 3), actions (k, Tc-1[, A])."""
        frames_t = torch.as_tensor(np.asarray(frames))
        H, W, _ = self.wm.obs_shape
        k = self.B if rows is None else len(rows)
        if (
            frames_t.ndim != 5
            or frames_t.shape[0] != k
            or tuple(frames_t.shape[2:]) != (H, W, 3)
            or frames_t.dtype != torch.uint8
        ):
            raise ValueError(
                f"frames: got {frames_t.dtype}{tuple(frames_t.shape)}, expected uint8 ({k}, Tc, {H}, {W}, 3)"
            )
        tokens = self.wm.tokenizer.encode(frames_t.to(self.wm.device))
        acts = None
        if self.spec.kind != "none" and frames_t.shape[1] > 1:
            if actions is None:
                raise ValueError(
                    f"actions: a context of {frames_t.shape[1]} frames needs {frames_t.shape[1] - 1} actions per row"
                )
            acts = self._actions_tensor(actions, frames_t.shape[1] - 1)
        self.sampler.start(tokens, acts, rows=rows)

    @torch.inference_mode()
    def step(
        self,
        actions: Any,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        **decode_kw: Any,
    ) -> DreamStep:
        """Advance every environment by one step; ``actions`` (B,) discrete or (B, A) continuous.

        ``generator``: one generator, or B per-row generators (see :meth:`Rollout.step`);
        ``decode_kw`` go to :meth:`Rollout.step` (e.g. ``decode="maskgit"``).
        """
        a = self._actions_tensor(actions, 1)
        out = self.sampler.step(
            a, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, **decode_kw
        )
        frames = self.decode_latest()
        return DreamStep(
            frames=frames,
            rewards=out.reward.cpu().numpy().astype(np.float32),
            terminated=(out.terminated_prob > 0.5).cpu().numpy(),
            terminated_prob=out.terminated_prob.cpu().numpy().astype(np.float32),
            entropy=out.entropy.cpu().numpy().astype(np.float32),
            tokens=out.tokens.cpu().numpy(),
            rewards_if_terminated=out.reward_if_terminated.cpu().numpy().astype(np.float32),
            latent=out.hidden.cpu().numpy().astype(np.float32),
        )

    @property
    def latent(self) -> np.ndarray:
        """(B, C) float32: each row's latent state after its newest frame (the context's last frame right after
        :meth:`reset`; see :mod:`worldmodel.sampling`, "Latent state")."""
        return self.sampler.hidden.cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def observe(self, tokens: np.ndarray | torch.Tensor, actions: Any) -> np.ndarray:
        """Append known frames (teacher forcing, nothing sampled or decoded): ``tokens`` (B, h, w) reached by
        ``actions`` (B,) or (B, A), as :meth:`step` appends generated ones; returns :attr:`latent` after them."""
        t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
        self.sampler.observe(t.to(self.wm.device), self._actions_tensor(actions, 1))
        return self.latent

    def decode_latest(self) -> np.ndarray:
        """Decode the newest frame of every row with up to ``decode_context`` frames of token history."""
        s = self.sampler
        ctx = s.n_frames.clamp(max=self.decode_context)  # (B,) history each row has
        H, W, _ = self.wm.obs_shape
        out = np.empty((self.B, H, W, 3), np.uint8)
        for c in torch.unique(ctx).tolist():  # rows with equal history decode together (one group normally)
            rows = torch.nonzero(ctx == c).flatten()
            idx = s.n_frames[rows, None] - c + torch.arange(c, device=rows.device)[None]  # (k, c)
            window = s.tokens[rows[:, None], idx]  # (k, c, h, w)
            with torch.autocast(self.wm.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out[rows.cpu().numpy()] = self.wm.tokenizer.decode(window)[:, -1].cpu().numpy()
        return out
