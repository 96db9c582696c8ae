"""Termination and reward heads: pos_weight, end-padded training windows, the dream-schedule evaluation,
the reward head's split by termination (``reward_given_termination``).

Synthetic token worlds (2×2 tokens, vocabulary 4) make the termination rule known exactly; the
priors are tiny and train for a few hundred steps on one thread.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tests.conftest import make_bundle, tiny_experiment
from worldmodel.bundle import WorldModel
from worldmodel.checkpoint import CONFIG_JSON
from worldmodel.config import PriorConfig
from worldmodel.evaluation import dream_episode_section, dream_schedule_windows, heads_on_dream_schedule
from worldmodel.prior import Prior
from worldmodel.prior_heads import symexp, symlog
from worldmodel.sampling import Rollout
from worldmodel.stages import EndPaddedClips
from worldmodel.store import EpisodeStore
from worldmodel.training_data import ClipDataset, SeededSampler

L = 4  # prior window (frames)
SIGNAL = 0  # a frame made of SIGNAL tokens may end the episode (the heads read the frame's last token)
CFG = PriorConfig(
    n_layer=1,
    n_head=2,
    n_embd=32,
    dropout=0.0,
    attn_dropout=0.0,
    vocab_size=4,
    frames=L,
    tokens_h=2,
    tokens_w=2,
    action_kind="discrete",
    n_actions=2,
)


class TokenEpisodes:
    """In-memory token episodes with the read interface :class:`ClipDataset` documents."""

    root = "memory"

    def __init__(self, episodes: list[dict[str, np.ndarray]]) -> None:
        self.eps = {f"ep-{i:03d}": ep for i, ep in enumerate(episodes)}

    def episode_ids(self, split: str | None = None) -> list[str]:
        return sorted(self.eps)

    def length(self, eid: str) -> int:
        return len(self.eps[eid]["tokens"])

    def read_clip(self, eid: str, start: int, length: int) -> dict[str, np.ndarray]:
        ep, s, e = self.eps[eid], start, start + length
        return {
            "tokens": ep["tokens"][s:e],
            "actions": ep["actions"][s : e - 1],
            "rewards": ep["rewards"][s : e - 1],
            "terminated": ep["terminated"][s : e - 1],
        }


def episode(rng: np.random.Generator, T: int, p_signal: float, p_end: float) -> dict[str, np.ndarray]:
    """Random tokens in {1, 2, 3}; a frame is all SIGNAL with probability ``p_signal`` and the transition
    into a SIGNAL frame ends the episode with probability ``p_end`` (the episode is cut there); reward
    +1 per step, -10 on the terminal one."""
    tokens = rng.integers(1, 4, (T, 2, 2))
    ends = False
    for t in range(1, T):
        if rng.random() < p_signal:
            tokens[t] = SIGNAL
            if rng.random() < p_end:
                tokens, T, ends = tokens[: t + 1], t + 1, True
                break
    term = np.zeros(T - 1, bool)
    term[-1] = ends
    return {
        "tokens": tokens.astype(np.int64),
        "actions": rng.integers(0, 2, T - 1),
        "terminated": term,
        "rewards": np.where(term, -10.0, 1.0).astype(np.float32),
    }


def train(cfg: PriorConfig, data: Dataset, steps: int, seed: int = 0) -> Prior:
    torch.manual_seed(seed)
    model = Prior(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = iter(DataLoader(data, batch_size=32, sampler=SeededSampler(len(data), seed=seed)))
    for _ in range(steps):
        loss, _ = model.compute_loss(next(loader))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def term_prob_at(model: Prior, ep: dict[str, np.ndarray], t: int, pos: int) -> float:
    """p(terminated) of transition t -> t+1 read at window position ``pos`` (window starts at t+1-pos)."""
    s = t + 1 - pos
    tok = torch.as_tensor(ep["tokens"][s : t + 2])[None]
    act = torch.as_tensor(ep["actions"][s : t + 1])[None]
    return torch.sigmoid(model(tok, act).term_logit[0, -1]).item()


class NoisySignalWindows(Dataset):
    """Fixed-length windows of random tokens in {1, 2, 3}; each frame after the first is all SIGNAL with
    probability ``p_signal``, and a transition into a SIGNAL frame is labelled terminated with probability
    ``hazard`` (label noise: the frames alone cannot tell which SIGNAL transitions end). Rewards are 0, or
    ``rewards = (step, terminal)``: ``terminal`` on terminated transitions and ``step`` on the others."""

    def __init__(
        self,
        n: int,
        hazard: float,
        seed: int,
        p_signal: float = 0.5,
        rewards: tuple[float, float] | None = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(1, 4, (n, L, 2, 2))
        self.signal = rng.random((n, L - 1)) < p_signal
        self.tokens[:, 1:] = np.where(self.signal[..., None, None], SIGNAL, self.tokens[:, 1:])
        self.terminated = self.signal & (rng.random((n, L - 1)) < hazard)
        self.actions = rng.integers(0, 2, (n, L - 1))
        step, terminal = rewards or (0.0, 0.0)
        self.rewards = np.where(self.terminated, terminal, step).astype(np.float32)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "tokens": torch.as_tensor(self.tokens[i]),
            "actions": torch.as_tensor(self.actions[i]),
            "terminated": torch.as_tensor(self.terminated[i]),
            "rewards": torch.as_tensor(self.rewards[i]),
        }


def test_pos_weight_lifts_recall_where_plain_bce_stays_below_half(one_thread):
    """SIGNAL transitions end with probability 0.3: calibrated BCE predicts ~0.3 on them (recall 0 at
    0.5); pos_weight w multiplies the predicted odds by ~w (w = 4: p ~ 0.63), so recall at 0.5 rises."""
    data, held = NoisySignalWindows(2000, 0.3, seed=0), NoisySignalWindows(64, 0.3, seed=1)
    tok, act = torch.as_tensor(held.tokens), torch.as_tensor(held.actions)
    is_signal = tok[:, 1:, 0, 0] == SIGNAL  # (64, L-1)
    terminal = torch.as_tensor(held.terminated)
    assert terminal.sum() >= 20
    probs = {}
    for w in (1.0, 4.0):
        model = train(PriorConfig(**{**CFG.__dict__, "termination_pos_weight": w}), data, steps=300)
        with torch.no_grad():
            p = torch.sigmoid(model(tok, act).term_logit[:, 1:])
        probs[w] = (p[is_signal].mean().item(), p[~is_signal].mean().item())
        recall = ((p > 0.5) & terminal).sum().item() / terminal.sum().item()
        assert recall <= 0.1 if w == 1.0 else recall >= 0.9, (w, recall)
    # plain BCE is calibrated: the mean p on SIGNAL transitions is near their hazard, 0.3, and ~0 elsewhere ...
    assert abs(probs[1.0][0] - 0.3) < 0.07 and probs[1.0][1] < 0.05, probs
    # ... and pos_weight multiplies the odds by about w
    odds = {w: p / (1 - p) for w, (p, _) in probs.items()}
    assert 2.5 < odds[4.0] / odds[1.0] < 6.0, odds


def test_end_padding_teaches_termination_at_every_window_position(one_thread):
    """Inside-episode windows only ever hold a terminal transition on their last position: a head trained
    on them predicts ~0 on earlier positions, where the dream's sliding window reads most transitions.
    The end-padded windows fix that (same data, same steps)."""
    rng = np.random.default_rng(2)
    eps = [episode(rng, 20, p_signal=0.1, p_end=0.5) for _ in range(80)]
    src = TokenEpisodes(eps)
    rng_held = np.random.default_rng(3)
    held = [episode(rng_held, 20, 0.1, 0.5) for _ in range(60)]
    terminal = [
        (ep, len(ep["terminated"]) - 1) for ep in held if ep["terminated"][-1] and len(ep["terminated"]) >= L
    ]
    assert len(terminal) >= 20
    plain = train(CFG, ClipDataset(src, split=None, clip_len=L), steps=300)
    padded = train(CFG, EndPaddedClips(src, "train", L), steps=300)
    p = {
        (name, pos): np.mean([term_prob_at(m, ep, t, pos) for ep, t in terminal])
        for name, m in (("plain", plain), ("padded", padded))
        for pos in (1, L - 1)
    }
    assert p["plain", L - 1] > 0.3 and p["plain", 1] < 0.05, p  # the position artefact
    assert p["padded", 1] > 0.3 and abs(p["padded", 1] - p["padded", L - 1]) < 0.15, p  # gone


def test_end_padded_clips_put_each_last_transition_on_every_position(hgs_store):
    store = EpisodeStore(hgs_store)
    inside = ClipDataset(store, split="train", clip_len=L)
    ds = EndPaddedClips(store, "train", L)
    assert len(ds) == len(inside) + sum(min(store.length(e), L) - 2 for e in store.episode_ids("train"))
    for i in (0, len(inside) - 1):
        assert bool(ds[i]["valid"].all()) and torch.equal(ds[i]["frames"], inside[i]["frames"])
    positions: dict[str, list[int]] = {}
    for i in range(len(ds)):
        eid, start = inside.locate(i) if i < len(inside) else ds.padded[i - len(inside)]
        item, T = ds[i], store.length(eid)
        n = int(item["valid"].sum())
        assert item["valid"].tolist() == [True] * n + [False] * (L - n) and n == min(L, T - start)
        ep = store.read_clip(eid, start, n)
        np.testing.assert_array_equal(item["frames"][:n].numpy(), ep["frames"])
        np.testing.assert_array_equal(item["rewards"][: n - 1].numpy(), ep["rewards"])
        assert not item["terminated"][n - 1 :].any() and not item["rewards"][n - 1 :].any()
        assert (item["frames"][n:] == item["frames"][n - 1]).all()  # padding repeats the last real frame
        if start + n == T:  # holds the episode's last transition, at position n-1
            positions.setdefault(eid, []).append(n - 1)
    for eid, pos in positions.items():
        assert sorted(pos) == list(range(1, min(L, store.length(eid)))), eid


def test_valid_mask_ignores_padding_frames_entirely():
    torch.manual_seed(0)
    model = Prior(CFG).eval()
    for head in (model.head, model.reward_head[-1], model.term_head[-1]):  # non-trivial outputs
        torch.nn.init.normal_(head.weight, std=0.5)
    g = torch.Generator().manual_seed(1)
    n = 3  # real frames; the 4th is padding
    tok = torch.randint(0, 4, (5, L, 2, 2), generator=g)
    batch = {
        "tokens": tok,
        "actions": torch.randint(0, 2, (5, L - 1), generator=g),
        "rewards": torch.randn(5, L - 1, generator=g),
        "terminated": torch.rand(5, L - 1, generator=g) < 0.3,
    }
    short = {k: v[:, :n] if k == "tokens" else v[:, : n - 1] for k, v in batch.items()}
    ref_loss, ref = model.compute_loss(short)
    for fill in range(2):  # whatever the padding holds
        padded = {k: v.clone() for k, v in batch.items()}
        padded["tokens"][:, n:] = fill
        padded["rewards"][:, n - 1 :] = 1000.0 * fill
        padded["terminated"][:, n - 1 :] = bool(fill)
        padded["valid"] = torch.arange(L).expand(5, L) < n
        loss, m = model.compute_loss(padded)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        for k in ("nats_per_token", "reward_loss", "termination_loss", "termination_accuracy"):
            assert m[k] == pytest.approx(ref[k], rel=1e-5), k
    # a pos_weight only scales the terminating transitions' BCE terms
    d = short["terminated"].float()
    logit = model(short["tokens"], short["actions"]).term_logit[:, 1:]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, d, reduction="none")
    weighted = Prior(PriorConfig(**{**CFG.__dict__, "termination_pos_weight": 3.0}))
    weighted.load_state_dict(model.state_dict())
    assert weighted.eval().compute_loss(short)[1]["termination_loss"] == pytest.approx(
        (bce * (1 + 2 * d)).mean().item(), rel=1e-5
    )
    assert ref["reward_loss"] == pytest.approx(
        ((model(short["tokens"], short["actions"]).reward[:, 1:] - symlog(short["rewards"])) ** 2)
        .mean()
        .item(),
        rel=1e-5,
    )


def test_termination_only_windows_train_the_termination_head_alone():
    torch.manual_seed(0)
    model = Prior(CFG).eval()
    for head in (model.head, model.term_head[-1]):
        torch.nn.init.normal_(head.weight, std=0.5)
    g = torch.Generator().manual_seed(2)
    batch = {
        "tokens": torch.randint(0, 4, (4, L, 2, 2), generator=g),
        "actions": torch.randint(0, 2, (4, L - 1), generator=g),
        "rewards": torch.randn(4, L - 1, generator=g),
        "terminated": torch.rand(4, L - 1, generator=g) < 0.5,
        "valid": torch.ones(4, L, dtype=torch.bool),
        "termination_only": torch.tensor([False, False, True, True]),
    }
    inside = {k: v[:2] for k, v in batch.items()}
    _, m_all = model.compute_loss(batch)
    _, m_in = model.compute_loss(inside)
    for k in (
        "nats_per_token",
        "nats_with_history",
        "nats_first_frame",
        "reward_loss",
        "reward_mae",
    ):  # inside only
        assert m_all[k] == pytest.approx(m_in[k], rel=1e-5), k
    logit = model(batch["tokens"], batch["actions"]).term_logit[:, 1:]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, batch["terminated"].float())
    assert m_all["termination_loss"] == pytest.approx(bce.item(), rel=1e-5)  # heads: all four windows
    assert m_all["termination_loss"] != pytest.approx(m_in["termination_loss"], rel=1e-3)


def test_end_padded_clips_mark_padded_windows_termination_only(hgs_store):
    store = EpisodeStore(hgs_store)
    for flag in (True, False):
        ds = EndPaddedClips(store, "train", L, termination_only=flag)
        n_in = len(ds.inside)
        assert not bool(ds[0]["termination_only"]) and bool(ds[n_in]["termination_only"]) is flag


@pytest.mark.parametrize(
    "field,value",
    [
        ("termination_pos_weight", 0.0),
        ("termination_pos_weight", float("nan")),
        ("termination_pos_weight", -1.0),
        ("reward_weight", -0.5),
        ("termination_weight", float("nan")),
    ],
)
def test_head_loss_settings_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        PriorConfig(**{field: value})


def test_dream_schedule_matches_the_sampler_window(one_thread):
    """Each frame m >= 1 is predicted once, at the window position a Rollout started from one frame
    generates it at (the sampler slides its window keeping ``keep`` frames)."""
    torch.manual_seed(0)
    model = Prior(CFG)
    T = 23
    for keep in (1, 2, 3):
        ro = Rollout(model, 1, keep=keep)
        ro.start(torch.zeros(1, 1, 2, 2, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long))
        sampler_pos = []
        for _ in range(T - 1):
            ro.step(torch.zeros(1, dtype=torch.long), temperature=0)
            sampler_pos.append(int(ro.n_frames[0]) - 1)  # the new frame's window position
        sched = {}
        for start, n, first in dream_schedule_windows(T, L, keep):
            for m in range(start + first, start + n):
                assert m not in sched
                sched[m] = m - start
        assert sorted(sched) == list(range(1, T)) and [sched[m] for m in range(1, T)] == sampler_pos, keep
    with pytest.raises(ValueError, match="keep"):
        dream_schedule_windows(10, L, L)


def test_dream_episode_lengths_follow_the_termination_head(tiny_bundle, hgs_store, one_thread):
    wm = WorldModel.from_pretrained(tiny_bundle)
    store = EpisodeStore(hgs_store)
    ids = store.episode_ids()[:3]
    real = np.mean([store.length(e) - 1 for e in ids])
    with torch.no_grad():
        head = wm.prior.term_head[-1]
        head.weight.zero_()
        head.bias.fill_(20.0)  # p = 1: every rule ends at the first step
        rep = dream_episode_section(wm, store, ids, rows=4, thresholds={"t": 0.5}, seed=0)
        assert rep["real_mean_length"] == pytest.approx(real) and rep["steps_run"] == 1
        assert rep["sample"]["mean_length"] == rep["t"]["mean_length"] == 1.0
        head.bias.fill_(-20.0)  # p = 0: never ends; cut (censored) at max_steps
        rep = dream_episode_section(wm, store, ids, rows=2, max_steps=5, thresholds={"t": 0.5, "skip": None})
        assert rep["sample"] == {"mean_length": 5.0, "median_length": 5.0, "n_censored": 2}
        assert rep["t"]["n_censored"] == 2 and "skip" not in rep
        # heads on the dream schedule cover every transition once, with the head's constant output
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hs = heads_on_dream_schedule(wm, store, ids)
        assert [len(p) for p in hs.term_prob] == [store.length(e) - 1 for e in ids]
        assert np.allclose(np.concatenate(hs.term_prob), 1 / (1 + np.exp(20.0)))


SPLIT_CFG = replace(CFG, reward_given_termination=True)


def test_split_reward_head_learns_the_rare_terminal_reward(one_thread):
    """HGS in miniature: +4 per step, -100 on the ~3% of transitions that end, and which SIGNAL transition
    ends is chance (hazard 0.3), so termination cannot be predicted exactly. With ``reward_given_termination``
    the terminal output learns -100 on terminal transitions and the other output stays at +4 even on the
    SIGNAL transitions that did not end. The one-output head, same data and steps, is the contrast:
    it regresses to the (symlog) mean on SIGNAL transitions, about -0.2 (measured: terminal-transition
    MAE 99.8 and -0.19 on non-terminal SIGNAL transitions, against 0.77 and 3.97 with the split), so
    the tolerances below fail for it."""
    data = NoisySignalWindows(2000, 0.3, seed=0, p_signal=0.1, rewards=(4.0, -100.0))
    held = NoisySignalWindows(256, 0.3, seed=1, p_signal=0.1, rewards=(4.0, -100.0))
    tok, act = torch.as_tensor(held.tokens), torch.as_tensor(held.actions)
    d, signal = torch.as_tensor(held.terminated), torch.as_tensor(held.signal)
    assert 0.01 < data.terminated.mean() < 0.05 and d.sum() >= 15 and (signal & ~d).sum() >= 30
    got = {}
    for split in (True, False):
        model = train(replace(CFG, reward_given_termination=split), data, steps=300)
        assert model.reward_head[-1].out_features == (2 if split else 1)
        with torch.no_grad():
            out = model(tok, act)
            _, m = model.compute_loss(
                {"tokens": tok, "actions": act, "terminated": d, "rewards": torch.as_tensor(held.rewards)}
            )
        r_cont, r_term = symexp(out.reward[:, 1:]), symexp(out.reward_if_terminated[:, 1:])  # (256, L-1)
        got[split] = {
            "mae_terminal": (r_term[d] + 100).abs().mean().item(),
            "cont_nonterminal": r_cont[~d].mean().item(),
            "cont_signal_nonterminal": r_cont[signal & ~d].mean().item(),
            "metrics": m,
        }
    on, off = got[True], got[False]
    assert on["mae_terminal"] < 10.0, got  # within 10 of -100 on every terminal transition, on average
    assert abs(on["cont_nonterminal"] - 4.0) < 0.5 and abs(on["cont_signal_nonterminal"] - 4.0) < 0.5, got
    assert on["metrics"]["reward_mae_terminal"] == pytest.approx(on["mae_terminal"], rel=1e-4)
    # the same tolerances fail for the one-output head (the contrast that makes the split worth having)
    assert off["mae_terminal"] > 50.0 and abs(off["cont_signal_nonterminal"] - 4.0) > 0.5, got
    assert "reward_mae_terminal" not in off["metrics"]


def test_split_reward_loss_scores_each_output_on_its_own_transitions():
    torch.manual_seed(0)
    model = Prior(SPLIT_CFG).eval()
    for head in (model.reward_head[-1], model.term_head[-1]):  # non-trivial outputs
        torch.nn.init.normal_(head.weight, std=0.5)
    g = torch.Generator().manual_seed(3)
    B = 6
    batch = {
        "tokens": torch.randint(0, 4, (B, L, 2, 2), generator=g),
        "actions": torch.randint(0, 2, (B, L - 1), generator=g),
        "rewards": 10 * torch.randn(B, L - 1, generator=g),
        "terminated": torch.rand(B, L - 1, generator=g) < 0.3,
        "valid": torch.arange(L).expand(B, L) < torch.tensor([L, L, L, 3, 3, 2])[:, None],
        "termination_only": torch.tensor([False, False, False, False, True, True]),
    }
    loss, m = model.compute_loss(batch)
    with torch.no_grad():
        out = model(batch["tokens"], batch["actions"])
    rc, rt, r, d = out.reward[:, 1:], out.reward_if_terminated[:, 1:], batch["rewards"], batch["terminated"]
    scored = (
        batch["valid"][:, 1:] & ~batch["termination_only"][:, None]
    )  # as the one-output loss scores rewards
    assert (scored & d).sum() >= 2 and (scored & ~d).sum() >= 2 and (~scored & d).any()
    loss_c = ((rc - symlog(r)) ** 2)[scored & ~d].mean()
    loss_t = ((rt - symlog(r)) ** 2)[scored & d].mean()
    assert m["reward_loss"] == pytest.approx((loss_c + loss_t).item(), rel=1e-5)
    assert m["reward_loss_terminal"] == pytest.approx(loss_t.item(), rel=1e-5)
    matching = symexp(torch.where(d, rt, rc))
    assert m["reward_mae"] == pytest.approx((matching - r).abs()[scored].mean().item(), rel=1e-5)
    assert m["reward_mae_terminal"] == pytest.approx(
        (symexp(rt) - r).abs()[scored & d].mean().item(), rel=1e-5
    )

    # no scored terminal transition (none at all, or only in termination-only windows): the terminal
    # output's loss is 0 (not NaN) and it gets no gradient
    for name, term in (
        ("none", torch.zeros_like(d)),
        ("termination_only", d & batch["termination_only"][:, None]),
    ):
        model.zero_grad()
        loss, m = model.compute_loss({**batch, "terminated": term})
        loss.backward()
        assert torch.isfinite(loss) and m["reward_loss_terminal"] == 0.0 and "reward_mae_terminal" not in m, (
            name
        )
        w, b = model.reward_head[-1].weight.grad, model.reward_head[-1].bias.grad
        assert not w[1].any() and b[1] == 0 and w[0].abs().sum() > 0, name
    with pytest.raises(ValueError, match="terminated"):
        model.compute_loss({k: v for k, v in batch.items() if k != "terminated"})


def test_bundle_saved_before_the_split_loads_with_one_reward_output(hgs_store, tmp_path, one_thread):
    """A config.json without ``reward_given_termination`` (bundles from before the field) loads with the
    one-output head its weights have, and dreams with the same reward for both outcomes; a bundle saved
    with the flag round-trips with two outputs."""
    old = make_bundle(tiny_experiment(hgs_store), tmp_path / "old")
    conf = json.loads((old / CONFIG_JSON).read_text())
    assert conf["experiment"]["prior"].pop("reward_given_termination") is False
    (old / CONFIG_JSON).write_text(json.dumps(conf))
    cfg = tiny_experiment(hgs_store)
    new = make_bundle(replace(cfg, prior=replace(cfg.prior, reward_given_termination=True)), tmp_path / "new")
    assert (
        json.loads((new / CONFIG_JSON).read_text())["experiment"]["prior"]["reward_given_termination"] is True
    )
    store = EpisodeStore(hgs_store)
    frames = np.stack(
        [store.read_clip(e, 0, 1)["frames"] for e in store.episode_ids()[:2]]
    )  # (2, 1, H, W, 3)
    for path, n_out in ((old, 1), (new, 2)):
        wm = WorldModel.from_pretrained(path)
        assert wm.cfg.prior.reward_given_termination is (n_out == 2)
        assert wm.prior.reward_head[-1].out_features == n_out
        with torch.no_grad():  # distinct biases: a 2-output head then predicts two different rewards
            wm.prior.reward_head[-1].bias.copy_(torch.tensor([1.0, -2.0][:n_out]))
        ro = wm.rollout(2)
        ro.reset(frames)
        for _ in range(3):
            step = ro.step(np.array([0, 3]), generator=torch.Generator().manual_seed(0))
            assert (
                step.rewards.shape == step.rewards_if_terminated.shape == (2,)
                and np.isfinite(step.rewards).all()
            )
            if n_out == 1:
                np.testing.assert_array_equal(step.rewards_if_terminated, step.rewards)
                np.testing.assert_array_equal(step.expected_rewards, step.rewards)
            else:
                assert (step.rewards_if_terminated < step.rewards).all()
                p = step.terminated_prob
                np.testing.assert_allclose(
                    step.expected_rewards, p * step.rewards_if_terminated + (1 - p) * step.rewards, rtol=1e-6
                )
