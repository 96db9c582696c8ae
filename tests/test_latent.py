"""The world model's latent state in the real game: the tracker (teacher forcing) and the latent observation."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from envs.dream import DreamVectorEnv
from envs.latent import LatentObservation, LatentPolicy, LatentTracker
from envs.real import make_real_env_fn
from tests.conftest import TINY_RES
from worldmodel.bundle import WorldModel
from worldmodel.dynamics_eval import encode_windows
from worldmodel.store import EpisodeStore


@torch.no_grad()
def reference_latents(wm: WorldModel, frames: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """(T, C): for each t, a full teacher-forced prior forward over the window the dream would hold after frame t
    (it starts with one frame, grows to ``frames``, then keeps the last ``frames // 2`` and grows again), on the
    tokens the token cache gives the episode (windows of ``data.clip_len`` frames from its start)."""
    tokens = encode_windows(wm, frames[None])[0]  # (T, h, w)
    acts = torch.as_tensor(actions)
    F, keep, n, out = wm.cfg.prior.frames, max(1, wm.cfg.prior.frames // 2), 0, []
    for t in range(len(frames)):
        n = 1 if t == 0 else (keep if n >= F else n) + 1
        out.append(wm.prior(tokens[None, t - n + 1 : t + 1], acts[None, t - n + 1 : t]).hidden[0, -1])
    return torch.stack(out).numpy()


def test_tracker_latent_equals_the_teacher_forced_full_forward(tc_bundle):
    wm = WorldModel.from_pretrained(tc_bundle)
    assert wm.cfg.data.clip_len == 4 and wm.cfg.prior.frames == 4  # windows and slides are both crossed below
    store = EpisodeStore(wm.store_path)
    eps = [store.load(e) for e in store.episode_ids()[:2]]
    T = min(len(e.frames) for e in eps)
    assert T >= 9
    tracker = LatentTracker(wm, 2)
    got = [tracker.reset(np.stack([e.frames[0] for e in eps]))]
    for t in range(1, T):
        got.append(
            tracker.step(np.stack([e.frames[t] for e in eps]), np.array([e.actions[t - 1] for e in eps]))
        )
    got = np.stack(got, 1)  # (2, T, C)
    assert got.dtype == np.float32 and got.shape == (2, T, wm.cfg.prior.n_embd)
    for i, e in enumerate(eps):
        np.testing.assert_allclose(got[i], reference_latents(wm, e.frames[:T], e.actions[: T - 1]), atol=1e-4)
    alone = LatentTracker(wm, 1, encode_window=1)  # every frame encoded alone: other tokens, other latents
    alone.reset(eps[0].frames[:1])
    for t in range(1, 6):
        lat = alone.step(eps[0].frames[t : t + 1], eps[0].actions[t - 1 : t])
    assert not np.allclose(lat[0], got[0, 5], atol=1e-4)
    with pytest.raises(ValueError, match="encode_window"):
        LatentTracker(wm, 1, encode_window=0)
    with pytest.raises(ValueError, match=r"frames: got uint8\(2, 8, 8, 3\)"):
        tracker.step(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(RuntimeError, match="reset"):
        LatentTracker(wm, 1).step(eps[0].frames[:1], np.zeros(1, np.int64))


def test_latent_observation_follows_real_episodes_across_autoresets(tc_bundle):
    """Wrapping the real game: every observation is the tracker's latent of the frame the env returned, and a row
    the env restarted (next-step autoreset) starts over from its new first frame."""
    wm = WorldModel.from_pretrained(tc_bundle)
    real = gym.vector.SyncVectorEnv(
        [make_real_env_fn("vizdoom_take_cover", resolution=TINY_RES, max_episode_steps=4) for _ in range(2)]
    )
    env = LatentObservation(real, wm)
    try:
        assert env.single_observation_space.shape == (wm.cfg.prior.n_embd,)
        obs, info = env.reset(seed=[3, 4])
        lat, frames, acts, starts = [obs], [info["frames"]], [], [np.ones(2, bool)]
        done = np.zeros(2, bool)
        rng = np.random.default_rng(0)
        for _ in range(7):  # episodes of 4 steps: each row restarts at step 5
            a = rng.integers(0, 2, 2)
            obs, _, term, trunc, info = env.step(a)
            lat.append(obs)
            frames.append(info["frames"])
            acts.append(a)
            starts.append(done.copy())  # next-step autoreset: rows done last step show a first frame now
            done = term | trunc
        assert any(s.any() for s in starts[1:])
        for i in range(2):  # cut each row's stream into episodes and compare with the full forward
            cuts = [t for t in range(len(lat)) if starts[t][i]] + [len(lat)]
            for a, b in zip(cuts[:-1], cuts[1:]):
                f = np.stack([frames[t][i] for t in range(a, b)])
                ac = np.array([acts[t - 1][i] for t in range(a + 1, b)], np.int64)
                np.testing.assert_allclose(
                    np.stack([lat[t][i] for t in range(a, b)]), reference_latents(wm, f, ac), atol=1e-4
                )
    finally:
        env.close()
    with pytest.raises(ValueError, match="resolution"):
        LatentObservation(
            gym.vector.SyncVectorEnv(
                [make_real_env_fn("vizdoom_take_cover", resolution=64, max_episode_steps=2)]
            ),
            wm,
        )


def test_latent_observation_of_the_dream_is_its_info_latent(tc_bundle):
    wm = WorldModel.from_pretrained(tc_bundle)
    dream = DreamVectorEnv(2, world_model=wm, max_episode_steps=3)
    env = LatentObservation(dream, wm)
    obs, info = env.reset(seed=0)
    assert obs.shape == (2, wm.cfg.prior.n_embd) and np.array_equal(obs, info["latent"])
    assert info["frames"].shape == (2, *wm.obs_shape)
    for _ in range(4):
        obs, *_, info = env.step(np.array([0, 1]))
        assert np.array_equal(obs, info["latent"])
    with pytest.raises(ValueError, match="another world model"):
        LatentObservation(DreamVectorEnv(1, world_model=WorldModel.from_pretrained(tc_bundle)), wm)


def test_latent_policy_tracks_the_actions_taken_and_restarted_rows(tc_bundle):
    """As a collection policy behind epsilon-random replacements: the latents it acts on are the teacher-forced
    ones of the frames and the actions the envs took (not its own), and a row told to restart starts over."""
    from envs.collect import EpsilonRandom

    wm = WorldModel.from_pretrained(tc_bundle)
    store = EpisodeStore(wm.store_path)
    ep_a, ep_b, ep_c = (store.load(e) for e in store.episode_ids()[:3])
    seen: list[np.ndarray] = []

    def always_left(latents: np.ndarray) -> np.ndarray:
        seen.append(latents.copy())
        return np.zeros(len(latents), np.int64)

    act = EpsilonRandom(LatentPolicy(always_left, wm), wm.action_spec, epsilon=0.5, seed=0)
    T, cut = 9, 4  # row 1 plays episode B for `cut` frames, then restarts on episode C
    taken = []
    act.reset(None)
    for t in range(T):
        f1 = ep_b.frames[t] if t < cut else ep_c.frames[t - cut]
        if t == cut:
            act.reset(np.array([1]))
        taken.append(act(np.stack([ep_a.frames[t], f1])))
    taken = np.stack(taken)  # (T, 2)
    assert 0 < taken.sum() < taken.size  # the replacements did take the other action
    got = np.stack(seen)  # (T, 2, C)
    np.testing.assert_allclose(got[:, 0], reference_latents(wm, ep_a.frames[:T], taken[:-1, 0]), atol=1e-4)
    np.testing.assert_allclose(
        got[:cut, 1], reference_latents(wm, ep_b.frames[:cut], taken[: cut - 1, 1]), atol=1e-4
    )
    np.testing.assert_allclose(
        got[cut:, 1], reference_latents(wm, ep_c.frames[: T - cut], taken[cut:-1, 1]), atol=1e-4
    )
    own = reference_latents(wm, ep_a.frames[:T], np.zeros(T - 1, np.int64))  # what its own actions would give
    assert not np.allclose(got[:, 0], own, atol=1e-4)
    with pytest.raises(TypeError, match="policy: got int"):
        LatentPolicy(3, wm)
