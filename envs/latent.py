"""The world model's latent state as an observation: in the dream, and in the real game by tracking it.

World Models (Ha & Schmidhuber 2018) fed its controller [z_t, h_t], the world model's latent and recurrent
state: the controller sees exactly the state the dream's dynamics and death predictor see, and in the real game
the same world model runs on the real frames to produce the same inputs. Here that state is the prior's hidden
state at the last position of the newest frame (:mod:`worldmodel.sampling`, "Latent state"), a float32 vector
of the prior's width C.

- In the dream, :class:`~envs.dream.DreamVectorEnv` reports it in ``info["latent"]`` (N, C).
- In the real game, :class:`LatentTracker` computes it: every real frame is encoded by the bundle's tokenizer
  and appended to the prior's window with the action taken (teacher forcing, :meth:`Rollout.observe
  <worldmodel.sampling.Rollout.observe>`: nothing is sampled), through the same cache, window and slide as the
  dream's own frames. A frame is encoded together with the frames before it in its window of
  ``encode_window`` frames counted from the episode's start (default the bundle's ``data.clip_len``): exactly
  the tokens the token cache (:func:`worldmodel.token_cache.encode_store`) gave the prior to train on, since
  the causal tokenizer's tokens of a frame depend only on the frames before it in its window.
  ``encode_window=1`` encodes every frame alone (cheaper; what the ``"tokenized"`` real view does).
- :class:`LatentObservation` wraps either kind of vector env so that its observation *is* that vector,
  ``Box(-inf, inf, (C,), float32)`` per env: the controller (``features="latent"``, :mod:`envs.controller`)
  reads the same thing in both worlds.

Where they differ: a dream episode starts from ``context_frames`` real frames drawn from the held-out store (one
by default, encoded alone, as the tracker encodes a real episode's first frame), a real one from the game's
first frame.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

from envs.dream import DreamVectorEnv, refuse_whole_clip_conditioning
from worldmodel.bundle import WorldModel


class LatentTracker:
    """``num_envs`` real episodes followed by ``wm`` (see the module docstring): real frames and actions in, the
    world model's latent state (num_envs, C) float32 out.

    Args:
        wm: the world model (its tokenizer must have temporal stride 1: one latent frame per real frame).
        num_envs: rows (real envs) followed together; one prior forward per step for all of them.
        encode_window: frames a real frame is encoded with (its window counted from the episode's start);
            default ``wm.cfg.data.clip_len``, the token cache's windows.
        bf16: bf16 autocast for the prior.
    """

    def __init__(
        self, wm: WorldModel, num_envs: int, *, encode_window: int | None = None, bf16: bool = False
    ) -> None:
        refuse_whole_clip_conditioning(wm)
        st = wm.cfg.tokenizer.stride[0]
        if st != 1:
            raise ValueError(
                f"wm: the bundle's tokenizer has temporal stride {st}; tracking the real game frame by frame needs "
                "stride 1 in time"
            )
        window = wm.cfg.data.clip_len if encode_window is None else encode_window
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"encode_window: got {encode_window!r}, expected None or an integer >= 1")
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs: got {num_envs!r}, expected an integer >= 1")
        self.wm, self.N, self.encode_window = wm, num_envs, window
        self.rollout = wm.rollout(num_envs, bf16=bf16)
        self.history: list[list[np.ndarray]] = [[] for _ in range(num_envs)]  # frames of each row's window
        self.started = np.zeros(num_envs, bool)

    @property
    def dim(self) -> int:
        """C: numbers per latent (the prior's width)."""
        return self.wm.cfg.prior.n_embd

    @property
    def latent(self) -> np.ndarray:
        """(N, C) float32: each row's latent state after its newest frame."""
        return self.rollout.latent

    def _frames(self, frames: Any, k: int) -> np.ndarray:
        x = np.asarray(frames)
        shape = (k, *self.wm.obs_shape)
        if x.dtype != np.uint8 or x.shape != shape:
            raise ValueError(
                f"frames: got {x.dtype}{x.shape}, expected uint8 {shape} (one real frame per row)"
            )
        return x

    @torch.inference_mode()
    def _encode(self, rows: list[int]) -> torch.Tensor:
        """Tokens (k, h, w) of the newest frame of ``rows``, each encoded with its window's earlier frames (rows
        with equal history are encoded in one call)."""
        out = torch.empty(len(rows), *self.wm.tokenizer.grid, dtype=torch.long, device=self.wm.device)
        by_len: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_len.setdefault(len(self.history[r]), []).append(i)
        for idx in by_len.values():
            clips = np.stack([np.stack(self.history[rows[i]]) for i in idx])  # (k, n, H, W, 3)
            tok = self.wm.tokenizer.encode(torch.from_numpy(clips).to(self.wm.device))  # (k, n, h, w)
            out[torch.as_tensor(idx, device=out.device)] = tok[:, -1]
        return out

    def reset(self, frames: Any, rows: Any = None) -> np.ndarray:
        """Start ``rows`` (default all) at their episodes' first frames uint8 (k, H, W, 3); returns their latents
        (k, C)."""
        rows_l = list(range(self.N)) if rows is None else [int(r) for r in np.asarray(rows).reshape(-1)]
        if not rows_l:
            return np.zeros((0, self.dim), np.float32)
        if any(not 0 <= r < self.N for r in rows_l):
            raise ValueError(f"rows: got {rows_l}, expected indices in [0, {self.N})")
        x = self._frames(frames, len(rows_l))
        for r, f in zip(rows_l, x):
            self.history[r] = [f.copy()]
        tokens = self._encode(rows_l)
        self.rollout.sampler.start(tokens[:, None], None, rows=rows_l)
        self.started[rows_l] = True
        return self.latent[rows_l]

    def step(self, frames: Any, actions: Any) -> np.ndarray:
        """Append every row's next real frame uint8 (N, H, W, 3), reached by ``actions`` (N,) (the actions taken,
        in the env's units); returns the latents (N, C)."""
        if not self.started.all():
            raise RuntimeError(
                f"rows {np.flatnonzero(~self.started).tolist()} have no episode; call reset() first"
            )
        x = self._frames(frames, self.N)
        for r, f in enumerate(x):
            if len(self.history[r]) >= self.encode_window:  # a new encoding window starts at this frame
                self.history[r] = []
            self.history[r].append(f.copy())
        return self.rollout.observe(self._encode(list(range(self.N))), actions)


class LatentObservation(gym.vector.VectorWrapper):
    """A vector env whose observation is the world model's latent state, ``Box(-inf, inf, (C,), float32)`` per
    env: ``info["latent"]`` of a :class:`~envs.dream.DreamVectorEnv`, or for any other env of the bundle's frames
    (the real game) a :class:`LatentTracker` fed with its frames and the actions taken. The env's own frames stay
    in ``info["frames"]`` (N, H, W, 3). Every autoreset mode is followed (next-step, same-step, disabled with
    ``reset(options={"reset_mask": ...})``).

    Args:
        env: the vector env (the dream's, or the real game's at the bundle's resolution).
        wm: the world model (the dream's own for a dream env).
        encode_window, bf16: the tracker's (:class:`LatentTracker`; real envs only).
    """

    def __init__(
        self, env: VectorEnv, wm: WorldModel, *, encode_window: int | None = None, bf16: bool = False
    ) -> None:
        super().__init__(env)
        self.wm = wm
        self.dream = isinstance(env.unwrapped, DreamVectorEnv)
        if self.dream and env.unwrapped.world_model is not wm:
            raise ValueError(
                "wm: the dream env runs another world model; pass the dream's own (env.world_model)"
            )
        shape = tuple(env.single_observation_space.shape or ())
        if not self.dream and shape != tuple(wm.obs_shape):
            raise ValueError(
                f"env: observations of shape {shape}, the bundle's frames are {wm.obs_shape}; make the env at the "
                "bundle's resolution"
            )
        self.tracker = (
            None if self.dream else LatentTracker(wm, env.num_envs, encode_window=encode_window, bf16=bf16)
        )
        C = wm.cfg.prior.n_embd
        self.single_observation_space = spaces.Box(-np.inf, np.inf, (C,), np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, env.num_envs)
        self.autoreset_mode = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        self._done = np.zeros(env.num_envs, bool)

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        frames, info = self.env.reset(seed=seed, options=options)
        mask = np.ones(self.num_envs, bool)
        if options is not None and "reset_mask" in options:
            mask = np.asarray(options["reset_mask"], bool)
        if self.dream:
            latent = np.asarray(info["latent"], np.float32)
        else:
            self.tracker.reset(np.asarray(frames)[mask], np.flatnonzero(mask))
            latent = self.tracker.latent
        self._done[mask] = False
        return latent.copy(), {**info, "frames": frames}

    def step(self, actions: Any) -> tuple[np.ndarray, Any, Any, Any, dict[str, Any]]:
        frames, rew, term, trunc, info = self.env.step(actions)
        done = np.asarray(term, bool) | np.asarray(trunc, bool)
        if self.dream:
            latent = np.asarray(info["latent"], np.float32)
        else:
            frames_np = np.asarray(frames)
            if self.autoreset_mode == AutoresetMode.SAME_STEP:
                restarted = done  # their frames are already the next episodes' first
            elif self.autoreset_mode == AutoresetMode.NEXT_STEP:
                restarted = self._done  # rows that ended last step were reset by this one
            else:  # disabled: ended rows wait for reset(options={"reset_mask": ...})
                restarted = np.zeros(self.num_envs, bool)
            self.tracker.step(frames_np, np.asarray(actions))  # (restarted rows are started over below)
            if restarted.any():
                self.tracker.reset(frames_np[restarted], np.flatnonzero(restarted))
            latent = self.tracker.latent
        self._done = done
        return latent.copy(), rew, term, trunc, {**info, "frames": frames}


class LatentPolicy:
    """A policy on latent states as a collection policy on real frames (``envs.collect.Policy``): a
    :class:`LatentTracker` follows each env row's frames and the actions it took, and ``policy`` acts on the
    latents. Lets a ``features="latent"`` controller collect the real episodes of a "the policy collects" round.

    Args:
        policy: latent states float32 (N, C) -> actions (N,), optionally with ``reset(rows)``
            (e.g. :class:`envs.controller.LinearController`).
        wm: the world model whose latents ``policy`` reads.
        encode_window: the tracker's.

    The tracker is made at the first call, with one row per frame given. Collection tells it the actions the
    envs took through :meth:`taken` (an ``epsilon`` random action replaces the policy's own); without that call
    the policy's own actions are taken to be the ones played.
    """

    def __init__(self, policy: Any, wm: WorldModel, *, encode_window: int | None = None) -> None:
        if not callable(policy):
            raise TypeError(
                f"policy: got {type(policy).__name__}, expected a callable latents (N, C) -> actions (N,)"
            )
        self.policy, self.wm, self.encode_window = policy, wm, encode_window
        self.tracker: LatentTracker | None = None
        self._start = None  # bool (N,): rows whose next frame starts an episode
        self._actions: np.ndarray | None = None  # (N,) the actions taken after the latest frame

    def reset(self, rows: Any = None) -> None:
        """``rows`` (all when None) start an episode at their next frame."""
        if rows is None or self._start is None:
            self._start = None
        else:
            self._start[np.asarray(rows, int)] = True
        reset = getattr(self.policy, "reset", None)
        if callable(reset):
            reset(rows)

    def taken(self, actions: Any) -> None:
        """The actions (N,) the envs took after the latest frame (replacing the policy's own)."""
        self._actions = np.asarray(actions).reshape(-1)

    def latents(self, frames: Any) -> np.ndarray:
        """Latent states (N, C) float32 after each row's newest real frame uint8 (N, H, W, 3)."""
        x = np.asarray(frames)
        if self.tracker is None:
            self.tracker = LatentTracker(self.wm, len(x), encode_window=self.encode_window)
        if self._start is None:  # every row starts an episode
            self.tracker.reset(x)
        else:
            if self._actions is None:
                raise RuntimeError("LatentPolicy: no action was taken since the last frame")
            self.tracker.step(x, self._actions)  # rows that start an episode are started over below
            if self._start.any():
                self.tracker.reset(x[self._start], np.flatnonzero(self._start))
        self._start = np.zeros(len(x), bool)
        return self.tracker.latent.copy()

    def __call__(self, frames: Any) -> np.ndarray:
        """Actions (N,) for real frames uint8 (N, H, W, 3)."""
        a = np.asarray(self.policy(self.latents(frames)))
        self._actions = a.reshape(-1)
        return a
