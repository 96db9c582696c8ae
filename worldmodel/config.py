"""Frozen configuration dataclasses and the named presets.

Every model and training stage is built from these dataclasses only (never from an argparse
namespace). A preset is a complete :class:`ExperimentConfig`; ``get_preset(name, scale)`` returns
it and the CLI overrides individual fields. The resolved config is saved in the bundle's
``config.json`` (see :mod:`worldmodel.bundle`), so ``to_dict``/``from_dict`` must round-trip.

Conventions: sizes are in pixels / tokens / frames; ``stride`` is (t, h, w).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

Scale = Literal["tiny", "small", "paper"]
SCALES: tuple[str, ...] = ("tiny", "small", "paper")
GYM_PREFIX = "gym:"
"""Preset names ``"gym:<Gymnasium id>"`` (e.g. ``gym:ALE/Pong-v5``) name the generic preset of that env
(:func:`generic_preset`); ``envs.gym_source`` makes the env itself."""


@dataclass(frozen=True)
class DataConfig:
    """Where the episodes come from and how clips are cut from them."""

    store: str = "data/hgs"
    """Episode store directory (see :mod:`worldmodel.store`)."""
    clip_len: int = 16
    """Frames per training clip (tokenizer and prior)."""
    resolution: int = 64
    """Frame height and width in pixels (frames are square)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    use_actions: bool = True
    """Condition the prior on the store's actions; False models the frames alone (the paper's
    BAIR setup, or action-free video presets)."""
    pad_episode_ends: bool = True
    """Prior training also reads windows that run past an episode's end (padded, masked out of the
    loss; they train the termination head only), so terminal transitions sit on every window
    position, where the dream's sliding window reads them (``worldmodel.stages.EndPaddedClips``).
    On 300 HGS episodes (3000 steps, seed 1) it cost 0.06 bits per token, left tuned termination recall
    at 0.92, raised precision 0.13 -> 0.19, brought dream episode lengths to the real ones, and PPO
    trained 30k steps in that dream scored 1.12x random in the real env against 1.01x without it
    (README "Results"). Ignored by frame-conditioned priors."""


@dataclass(frozen=True)
class TokenizerConfig:
    """VQ-VAE geometry (VideoGPT §3.1 and appendix)."""

    resolution: int = 64
    """Input frame height/width in pixels."""
    stride: tuple[int, int, int] = (1, 8, 8)
    """Downsampling factor per axis (t, h, w); each must be a power of two."""
    channels: int = 128
    """Width of the conv/attention trunk."""
    n_res_layers: int = 2
    """Residual blocks with axial attention in encoder and decoder."""
    n_heads: int = 2
    """Heads of the axial attention."""
    codebook_size: int = 512
    """Number of codes K."""
    embedding_dim: int = 64
    """Dimension of each code vector."""
    beta: float = 0.25
    """Commitment loss weight."""
    ema_decay: float = 0.99
    """EMA decay of the codebook statistics."""
    quantizer: Literal["ema", "fsq"] = "ema"
    """``ema``: the paper's codebook (``codebook_size`` learned codes of ``embedding_dim``, EMA updates, commitment
    loss ``beta``). ``fsq``: finite scalar quantisation (``worldmodel.fsq``): each of ``embedding_dim`` channels
    rounded to ``fsq_levels[i]`` values, no codebook to learn; then ``codebook_size`` must be prod(fsq_levels) and
    ``embedding_dim`` len(fsq_levels)."""
    fsq_levels: tuple[int, ...] = ()
    """Values per channel of the FSQ grid (``quantizer="fsq"``), e.g. (8, 5, 5, 5) = 1000 codes of dimension 4."""
    causal_time: bool = True
    """Temporal convs pad from the past only and temporal attention is masked."""
    max_frames: int = 16
    """Largest clip length seen by the temporal position embedding."""
    res_channels: int = 0
    """Width of the residual blocks' inner 3x3x3 conv (0 = ``channels // 2``; the paper's configs: 128)."""
    paper_layers: bool = False
    """The paper code's layer details (wilson1yan/VideoGPT-Paper ``layers/vqvae.py``): a 3x3x3 conv after the
    downsampling stack, a 3x3x3 (not 1x1x1) decoder input conv, kernel 4 on every axis of every resampling layer
    (also where that layer keeps an axis), the decoder upsampling all halved axes first, bias-free residual
    convs, and one broadcast position embedding (T', h, w; ``channels / 3`` each, concatenated) shared by every
    axial-attention block of encoder and decoder. False: our layers (see docs/ARCHITECTURE.md)."""
    # -- training objective (not geometry: the bundle's encode/decode never read these) ------------
    recon_loss: Literal["mse", "l1", "l1+mse"] = "mse"
    """Pixel reconstruction term: ``mse`` (the paper's: MSE / data variance), ``l1`` (mean absolute error /
    data standard deviation: the median, not the mean, of what the tokens leave uncertain, so less
    averaging into blur) or ``l1+mse`` (their sum)."""
    perceptual_weight: float = 0.0
    """Weight of a feature-space L1 term between reconstruction and frame, per frame (0 = off). The
    features are a small *fixed random* conv net (``worldmodel.perceptual.RandomFeatures``, seeded, no
    download): they re-weight the error toward local structure (edges, small high-contrast objects) that
    a pixel MSE averages away. Not a learned perceptual metric (no LPIPS/VGG offline): measure it."""
    hard_pixel_weight: float = 0.0
    """Weight of a hard-pixel term (0 = off): the mean squared error of the ``hard_pixel_fraction`` worst
    pixels of each clip, over the data variance. Small objects (a fireball, a medkit) are a few pixels
    whose large error a mean over the frame barely sees; this term is the mean over those pixels only
    (online hard-example mining on pixels), so their error is not averaged away."""
    hard_pixel_fraction: float = 0.01
    """Share of each clip's pixels (by squared error, channels summed) that the hard-pixel term averages."""
    object_weight: float = 0.0
    """Weight of an object term (0 = off): the mean squared error over the pixels inside the boxes of the small
    objects a policy reacts to (fireballs, medkits), over the data variance. The boxes come from the game
    (the store's per-frame ``object_mask``, collected with ViZDoom's labels buffer: ``collect_object_masks``),
    so unlike the hard-pixel term it cannot spend its weight on textured walls. Needs a store with masks. Off in
    every preset: on Take Cover, weight 1 cut the error inside the boxes by 8 % and raised it elsewhere by 50 %."""
    adv_weight: float = 0.0
    """Weight of the adversarial (hinge) term from a 2D PatchGAN discriminator on single frames
    (``worldmodel.discriminator``; 0 = off, no discriminator is built). Trained jointly, from scratch."""
    adv_start_step: int = 0
    """Tokenizer training step from which the discriminator trains and the adversarial term applies
    (VQGAN's ``disc_start``): start it once the autoencoder roughly reconstructs (e.g. half the steps)."""
    adv_adaptive: bool = True
    """Scale the adversarial term by VQGAN's adaptive weight ||grad L_rec|| / ||grad L_adv|| at the
    decoder's last layer (clamped to [0, 1e4]), so ``adv_weight`` is relative to the reconstruction."""
    disc_channels: int = 32
    """Width of the discriminator's first layer (doubling per layer, at most 4x)."""
    disc_layers: int = 3
    """Stride-2 layers of the discriminator (3: 70x70-pixel patches at 64x64 in, 6x6 logits out)."""

    def __post_init__(self) -> None:
        if self.recon_loss not in ("mse", "l1", "l1+mse"):
            raise ValueError(
                f"tokenizer.recon_loss: got {self.recon_loss!r}, expected 'mse', 'l1' or 'l1+mse'"
            )
        if not 0 < self.hard_pixel_fraction <= 1:
            raise ValueError(
                f"tokenizer.hard_pixel_fraction: got {self.hard_pixel_fraction}, expected a share in (0, 1]"
            )
        for name in ("perceptual_weight", "adv_weight", "hard_pixel_weight", "object_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(
                    f"tokenizer.{name}: got {getattr(self, name)}, expected a weight >= 0 (0 = off)"
                )
        if self.quantizer not in ("ema", "fsq"):
            raise ValueError(f"tokenizer.quantizer: got {self.quantizer!r}, expected 'ema' or 'fsq'")
        if self.codebook_size > 32767:
            raise ValueError(
                f"tokenizer.codebook_size: got {self.codebook_size}, expected at most 32767 (token caches store int16)"
            )
        if self.fsq_levels and self.quantizer != "fsq":
            raise ValueError(
                f"tokenizer.fsq_levels: got {tuple(self.fsq_levels)} with quantizer={self.quantizer!r}; "
                "pass --config.tokenizer.quantizer fsq, or no levels"
            )
        if self.quantizer == "fsq":
            levels = tuple(self.fsq_levels)
            if not levels or any(not isinstance(n, int) or n < 2 for n in levels):
                raise ValueError(
                    f"tokenizer.fsq_levels: got {levels}, expected one or more integers >= 2 with "
                    "quantizer='fsq' (e.g. 8 5 5 5)"
                )
            if self.codebook_size != math.prod(levels) or self.embedding_dim != len(levels):
                raise ValueError(
                    f"tokenizer: quantizer='fsq' with fsq_levels={levels} has {math.prod(levels)} codes of dimension "
                    f"{len(levels)}; got codebook_size={self.codebook_size}, embedding_dim={self.embedding_dim} "
                    f"(pass --config.tokenizer.codebook-size {math.prod(levels)} "
                    f"--config.tokenizer.embedding-dim {len(levels)})"
                )
        if self.adv_start_step < 0:
            raise ValueError(f"tokenizer.adv_start_step: got {self.adv_start_step}, expected a step >= 0")
        if self.disc_channels < 1 or self.disc_layers < 1:
            raise ValueError(
                f"tokenizer.disc_channels / disc_layers: got {self.disc_channels}, {self.disc_layers}, "
                "expected both >= 1"
            )


@dataclass(frozen=True)
class PriorConfig:
    """GPT prior over token grids (VideoGPT §3.2), with conditioning and heads."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.1
    attn_dropout: float = 0.1
    vocab_size: int = 512
    """Codebook size of the tokenizer this prior models."""
    frames: int = 16
    """Frames in the trained context window (latent T)."""
    tokens_h: int = 8
    tokens_w: int = 8
    action_kind: Literal["discrete", "continuous", "none"] = "discrete"
    n_actions: int = 0
    """Number of discrete actions (action_kind='discrete')."""
    action_dim: int = 0
    """Action vector size (action_kind='continuous')."""
    action_cond: Literal["cond_ln", "token", "add", "clip"] = "cond_ln"
    """How actions enter: conditional LayerNorm, a per-frame action token, or an added embedding
    (cond_ln is the default: lower held-out loss than the action token on HGS, docs/ARCHITECTURE.md), each
    per step and causal (block t sees a_{t-1}); or ``"clip"``, the paper's ViZDoom/RoboNet protocol: the whole
    clip's ``clip_actions`` pixel-rate actions, flattened into one vector (one-hot per step, or the continuous
    vectors), condition every conditional LayerNorm of every block. A clip-conditioned prior needs every action
    before the first frame, so it samples clips (video sampling, FVD) but cannot be stepped as a dream env."""
    clip_actions: int = 0
    """Actions in the whole-clip condition vector (``action_cond="clip"``): the clip's transitions at the pixel
    frame rate (16 frames: 15)."""
    n_classes: int = 0
    """Class-conditional prior (UCF-101) when > 0."""
    n_cond_frames: int = 0
    """Context frames read by a ResNet encoder + cross-attention (paper's BAIR setup) when > 0: latent frames of
    tokens (not modelled), or with ``cond_pixels`` pixel frames."""
    cond_pixels: bool = False
    """Frame conditioning on pixels, as the paper's BAIR prior: the clip's first ``n_cond_frames`` pixel frames
    (uint8, ``cond_resolution`` square) go through the paper's 3D ResNet (``resnet_depth``, ``resnet_width``,
    ``resnet_dim``, output grid ``resnet_out``; :mod:`worldmodel.resnet`) into the cross-attention memory, and
    every latent frame of the clip is modelled. False: the first ``n_cond_frames`` latent frames' tokens condition
    through a 2-block ResNet over their embeddings and are not modelled (no pixels needed)."""
    cond_resolution: int = 64
    """Height and width of the conditioning pixel frames (``cond_pixels``)."""
    resnet_depth: int = 34
    """Depth of the conditioning ResNet (``cond_pixels``): 18 or 34 (the paper's BAIR: 34)."""
    resnet_width: int = 1
    """Width multiplier of the conditioning ResNet (the paper's: 1)."""
    resnet_dim: int = 576
    """Output channels of the conditioning ResNet, the cross-attention memory's width (the paper's: 576)."""
    resnet_out: tuple[int, int, int] = (1, 16, 16)
    """Output grid (k', h', w') of the conditioning ResNet (the paper's BAIR: (1, 16, 16))."""
    reward_weight: float = 1.0
    """Weight of the reward head's loss (symlog MSE)."""
    reward_given_termination: bool = False
    """The reward head predicts two rewards per frame, in the env's reward units: the reward of the
    transition if it did *not* end the episode, and the reward if it *did*; each output is trained
    (symlog MSE) only on transitions of its kind. Why: where the terminal reward differs from the
    others and termination is rare and hard to predict (HGS: +4 per step alive, about -100 on the
    death step, ~1 transition in 120), one regression output predicts about the mean on terminal
    transitions (measured MAE ~96-100 there), and a dream episode that the termination head ends
    carries no death penalty. With two outputs the dream env reports the one that matches the
    termination it drew. False (one output, the behaviour before the split) is the default so that
    bundles whose config.json predates the field load with the head their weights have; the
    ViZDoom presets set it True."""
    termination_from: Literal["frame", "history"] = "frame"
    """Which hidden state the termination head reads for the transition into frame t: ``"frame"`` the last
    position of block t (it has seen the new frame t), ``"history"`` the slot of block t (frames < t and the
    action a_{t-1} only: a hazard, p(the episode ends now | history, action)). ``"history"`` is for envs whose
    terminal observation says nothing new: ViZDoom returns the previous frame again at death, so with
    ``"frame"`` the dream ends an episode only if its token sampler happens to draw that frozen frame
    (Take Cover, one-step-ahead on real histories: p(term) at real deaths 0.50, 0.002, 0.002, 0.01).
    ``"frame"`` is the default so that bundles whose config.json predates the field keep their head."""
    termination_weight: float = 1.0
    """Weight of the termination head's loss (BCE)."""
    termination_pos_weight: float = 1.0
    """BCE weight of the terminating transitions (``pos_weight``): > 1 trades calibration for recall at
    probability 0.5 (the optimum logit moves up by ln(w)). Kept at 1: the dream env draws termination as
    Bernoulli(p), which needs a calibrated p, and the evaluation reports recall at a threshold tuned on
    validation episodes. Measured on 300 HGS episodes (health bar, tiny scale; README "Results")."""
    maskgit_weight: float = 0.0
    """Weight of the masked-token objective that enables MaskGIT decoding (0 = off)."""
    object_weight: float = 0.0
    """Weight of an object term in the token loss (0 = off): the mean cross-entropy of the tokens whose patch
    holds part of a small object a policy reacts to (a fireball, a medkit; the token cache's ``object_tokens``,
    from the store's per-frame ``object_mask``). Those tokens are a few percent of a frame, so the plain mean
    barely sees them. Needs a store with masks. Off in every preset: the weighted loss is the loss of a data set with
    more objects, and on Take Cover (weight 0.1 and 1) the dream drew fireballs everywhere (README, Sharp tokens)."""
    object_aux_weight: float = 0.0
    """Weight of an auxiliary object head (0 = off, no head is built): a linear read-out of every token position's
    hidden state that predicts whether the token it predicts holds a small object (BCE against the token cache's
    ``object_tokens``). Unlike ``object_weight`` it leaves the token distribution's weighting alone: it asks the
    hidden state to track the objects without making the prior draw them more often. Needs a store with masks.
    Off in every preset: on Take Cover (weight 1) it changed nothing measurable."""
    context_noise: float = 0.0
    """Training only: probability that an *input* token is replaced by a uniformly random one (targets stay
    clean), so the prior learns to predict from imperfect history, as it must in open-loop rollouts."""
    prev_frame_kernel: int = 3
    """Each position also sees the previous frame's tokens around the location it predicts, through a
    k×k conv over their embeddings (0 = off): a direct path for copying and shifting content."""
    prev_frames: int = 1
    """Frames the previous-frame path reads: 1 (z_{t-1}) or 2 (also z_{t-2} through a second k×k conv, so each
    position sees the local motion of what it predicts -- a small object's velocity, not only its place). A block
    whose window holds no z_{t-2} gets a learned vector instead, as block 0 does for z_{t-1}."""
    attn_pattern: Literal["full", "strided"] = "full"
    """Self-attention pattern: ``full`` causal, or the paper's ``strided`` sparse pattern (DeepSpeed
    ``StridedSparsityConfig`` semantics as a boolean mask, :mod:`worldmodel.sparse_attention`): blocks of
    ``sparse_block`` tokens read the ``sparse_local_blocks`` blocks before them and the same block of every
    earlier frame. Training and every cached sampling path apply the same mask."""
    sparse_block: int = 32
    """Tokens per block of the strided pattern (the paper's 32: one row of a 32-wide grid)."""
    sparse_local_blocks: int = 4
    """Earlier blocks every block reads in the strided pattern (the paper's 4)."""
    code_dim: int = 0
    """0: a learned token embedding table (V, n_embd). > 0 (the paper's input): the tokenizer's code vectors of this
    dimension (a frozen copy, set when the prior's training starts) through a bias-free linear layer (the paper's
    ``fc_in``)."""
    paper_layers: bool = False
    """The paper's transformer layer details (wilson1yan/VideoGPT-Paper ``layers/attention``): bias-free query,
    key, value and output projections, the sigmoid GELU ``x * sigmoid(1.702 x)`` in the MLP and no dropout on the
    input embeddings. False: nanoGPT's (biases, exact GELU, embedding dropout)."""

    def __post_init__(self) -> None:  # the heads' loss settings; the model's own are checked by Prior
        for name in ("reward_weight", "termination_weight", "object_weight", "object_aux_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"prior.{name}: got {getattr(self, name)}, expected a weight >= 0")
        if self.termination_from not in ("frame", "history"):
            raise ValueError(
                f"prior.termination_from: got {self.termination_from!r}, expected 'frame' or 'history'"
            )
        if self.attn_pattern not in ("full", "strided"):
            raise ValueError(f"prior.attn_pattern: got {self.attn_pattern!r}, expected 'full' or 'strided'")
        if self.sparse_block < 1 or self.sparse_local_blocks < 0 or self.code_dim < 0:
            raise ValueError(
                f"prior.sparse_block / sparse_local_blocks / code_dim: got {self.sparse_block}, "
                f"{self.sparse_local_blocks}, {self.code_dim}; expected >= 1, >= 0, >= 0"
            )
        if self.action_cond == "clip" and (self.clip_actions < 1 or self.action_kind == "none"):
            raise ValueError(
                f"prior.action_cond='clip' needs actions (action_kind 'discrete' or 'continuous', got "
                f"{self.action_kind!r}) and clip_actions >= 1 (got {self.clip_actions})"
            )
        if self.cond_pixels and self.n_cond_frames < 1:
            raise ValueError("prior.cond_pixels needs n_cond_frames >= 1 (the pixel frames to condition on)")
        if not self.termination_pos_weight > 0:
            raise ValueError(
                f"prior.termination_pos_weight: got {self.termination_pos_weight}, expected a BCE "
                "pos_weight > 0 (1 = plain, calibrated BCE)"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training stage."""

    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 16
    """Clips per step and process (global batch = batch_size × processes)."""
    lr: float = 3e-4
    """Peak learning rate (AdamW), reached after warmup, cosine-decayed to 10% at the end."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (not on biases and norms)."""
    warmup_steps: int = 100
    """Linear learning-rate warmup steps."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    log_every: int = 25
    """TensorBoard scalars every this many steps."""
    eval_every: int = 500
    """Validation (held-out episodes) and sample media every this many steps."""
    ckpt_every: int = 500
    """Checkpoint every this many steps; a kill loses at most this much training."""
    seed: int = 0
    """Seed of initialisation, dropout and data order."""
    bf16: bool | Literal["auto"] = False
    """bf16 autocast (CPU and CUDA): true, false, or ``"auto"``: a start-up probe on this device times a few
    training steps each way and turns bf16 on when it is at least 5% faster and the loss of one batch agrees
    to 1% (``worldmodel.training.probe_bf16``; the choice is logged and kept in the trainer state, so a
    resumed run keeps it). Measured at issue 22's anchor prior on a CPU with AMX: bf16 2.1x fp32
    (benchmarks/bench_anchor.py)."""
    max_minutes: float = 0.0
    """Stop after this many minutes of training (0 = no limit); the last checkpoint is written."""
    fit_minutes: float = 0.0
    """Size the run to this many minutes (0 = off: ``steps`` as given). When > 0, a fresh run times a few
    training steps on this device at its start and replaces ``steps`` by what fits, so the learning-rate
    schedule ends on time (``worldmodel.training.plan_steps``); the planned count is logged and kept in the
    trainer state, so a resumed run keeps it. ``train.py --budget-minutes`` sets it for both stages."""

    def __post_init__(self) -> None:
        if not isinstance(self.bf16, bool) and self.bf16 != "auto":
            raise ValueError(f"bf16: got {self.bf16!r}, expected true, false or 'auto'")
        if not (isinstance(self.fit_minutes, (int, float)) and self.fit_minutes >= 0):
            raise ValueError(
                f"fit_minutes: got {self.fit_minutes!r}, expected a number of minutes >= 0 (0 = off)"
            )


@dataclass(frozen=True)
class ExperimentConfig:
    """A complete, named experiment: data + tokenizer + prior + both training stages."""

    name: str = "vizdoom_hgs"
    """Preset name (recorded in the bundle)."""
    scale: str = "tiny"
    """Preset scale: tiny | small | paper."""
    env: str = "vizdoom_hgs"
    """Real env (for collection/evaluation) or dataset source this preset reads."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    tokenizer_train: TrainConfig = field(default_factory=TrainConfig)
    prior_train: TrainConfig = field(default_factory=TrainConfig)
    collect_episodes: int = 200
    """Episodes the main job collects when the store is missing (real-env presets)."""
    dream_policy: Literal["none", "distill"] = "none"
    """What the main job trains after the prior: nothing, or (``distill``; ViZDoom presets) the hazard unroll
    (``worldmodel/hazard.py``) and a frame policy distilled from the planner over it (``envs/planner.py``), saved to
    ``<run>/policies/distill_dream.safetensors``. The measured Take Cover recipe (README, Take Cover)."""
    collect_object_masks: bool = False
    """The main job's collection also stores each frame's object mask (ViZDoom envs: the boxes of the medkits /
    fireballs from the labels buffer), which ``tokenizer.object_weight`` and ``prior.object_weight`` /
    ``object_aux_weight`` read."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Rebuild from :meth:`to_dict` output; ``ValueError`` naming the field (``prior.n_layer``) and the
        expected type for anything else (a wrong type, an unknown field, a value outside a ``Literal``)."""
        return _from_dict(cls, d, "")


def _typename(t: Any) -> str:
    return repr(t).replace("typing.", "") if typing.get_origin(t) else getattr(t, "__name__", repr(t))


_SCALARS: dict[type, tuple[Callable[[Any], bool], str, Callable[[Any], Any]]] = {
    bool: (lambda v: isinstance(v, bool), "true or false", lambda v: v),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", lambda v: v),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number", float),
    str: (lambda v: isinstance(v, str), "a string", lambda v: v),
}
"""Scalar field types: (accepts the JSON value, what was expected, conversion)."""


def _expected(t: Any) -> str:
    """What a JSON value of field type ``t`` should be, in words (for errors)."""
    if typing.get_origin(t) is Literal:
        return f"one of {list(typing.get_args(t))}"
    return _SCALARS[t][1] if t in _SCALARS else _typename(t)


def _checked(value: Any, t: Any, where: str) -> Any:
    """``value`` (from JSON) as the type ``t`` of a config field, or ``ValueError`` naming ``where``."""

    def bad(expected: str) -> ValueError:
        return ValueError(f"{where}: got {value!r} ({type(value).__name__}), expected {expected}")

    if dataclasses.is_dataclass(t):
        return _from_dict(t, value, where)
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):  # the first member that accepts the value
        for a in args:
            try:
                return _checked(value, a, where)
            except ValueError:
                pass
        raise bad(" or ".join(_expected(a) for a in args))
    if origin is Literal:
        if value not in args or type(value) is bool:
            raise bad(f"one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list ({_typename(t)})")
        items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(items) != len(value):
            raise bad(f"a list of {len(items)} values ({_typename(t)})")
        return tuple(_checked(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, items)))
    if t in _SCALARS:
        accepts, expected, convert = _SCALARS[t]
        if not accepts(value):
            raise bad(expected)
        return convert(value)
    return value


def _from_dict(cls: type, d: Any, where: str = "") -> Any:
    """Rebuild a (nested) frozen dataclass from ``dataclasses.asdict`` output (JSON-safe), checking every
    field's type; errors name the field path (``tokenizer.channels``)."""
    name = where or cls.__name__
    if not isinstance(d, dict):
        raise ValueError(
            f"{name}: got {type(d).__name__} {d!r:.80}, expected a JSON object of {cls.__name__} fields"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(
            f"{name}: unknown config fields {sorted(unknown)}; expected a subset of {sorted(known)}"
        )
    for f in fields(cls):
        if f.name in d:
            kwargs[f.name] = _checked(d[f.name], hints[f.name], f"{where}.{f.name}" if where else f.name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a dataclass's own range checks (__post_init__)
        raise ValueError(f"{name}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Presets. Each returns a full ExperimentConfig for a scale. ``tiny`` finishes in minutes on two
# CPU cores; ``small`` is the default quality/time trade-off on CPU; ``paper`` follows the paper.
# ----------------------------------------------------------------------------------------------


# The paper's own configs (wilson1yan/VideoGPT-Paper, videogpt/config_model.py): vae_res64_ds222 /
# vae_res64_ds422 / vae_res128_ds444 = VQ-VAE with 240 hidden units, 128 residual hidden units, 4 residual
# layers with axial attention (2 heads), 1024 codes of dim 256, beta 0.25, EMA 0.99, the paper's layer details
# (TokenizerConfig.paper_layers); BAIR/ViZDoom/RoboNet "16×64×64 -> 8×32×32" (stride 2, 2, 2) with gpt_small
# (8 layers, 4 heads of 128, width 512, ff x4, residual dropout 0.2, attention dropout 0, strided sparse
# attention: block 32, 4 local blocks); UCF-101 128×128 and TGIF 64×64 "-> 4×32×32" (strides 4, 4, 4 and
# 4, 2, 2) with gpt_large (20 layers, 8 heads of 128, width 1024). worldmodel/paper_reference.py lists them
# next to ours (--print-config). The tiny/small scales keep the conditioning and the 16-frame clips but halve
# the latents and shrink the widths (our layers, full attention) so they run on 2 CPU cores.
_PAPER_TOKENIZER = TokenizerConfig(
    channels=240,
    res_channels=128,
    n_res_layers=4,
    n_heads=2,
    codebook_size=1024,
    embedding_dim=256,
    beta=0.25,
    ema_decay=0.99,
    causal_time=False,
    max_frames=16,
    paper_layers=True,
)
_PAPER_GPT_SMALL = PriorConfig(
    n_layer=8,
    n_head=4,
    n_embd=512,
    dropout=0.2,
    attn_dropout=0.0,
    vocab_size=1024,
    action_kind="none",
    prev_frame_kernel=0,
    context_noise=0.0,
    attn_pattern="strided",
    sparse_block=32,
    sparse_local_blocks=4,
    code_dim=256,
    paper_layers=True,
)
_PAPER_GPT_LARGE = replace(_PAPER_GPT_SMALL, n_layer=20, n_head=8, n_embd=1024)
# The paper scale's training budget (every paper-scale preset): tokenizer, prior.
_PAPER_TOKENIZER_TRAIN = TrainConfig(steps=100_000, batch_size=32, lr=3e-4)
_PAPER_PRIOR_TRAIN = TrainConfig(steps=200_000, batch_size=32, lr=3e-4)


PaperActions = Literal["clip", "step"]
PAPER_CLIP_PRESETS: tuple[str, ...] = ("vizdoom_hgs", "vizdoom_battle2", "robonet")
"""The presets of the paper's action-conditioned datasets: at ``--scale paper`` they follow the paper's protocol
(``paper_actions="clip"``: stride (2, 2, 2) tokenizer, 8x32x32 latents, the whole clip's actions condition the
prior) unless ``paper_actions="step"`` asks for our steppable per-step conditioning at the paper's widths."""


def _vizdoom(
    name: str, scale: str, n_actions: int, paper_arch: bool = True, paper_actions: PaperActions = "step"
) -> ExperimentConfig:
    """A ViZDoom dream preset. ``paper_arch=False``: at the paper scale, the paper's widths on our dream geometry
    (stride (1, 8, 8), our layers, full attention; the generic ``gym:<ID>`` preset's paper scale).
    ``paper_actions`` (paper scale only): ``"clip"`` the paper's protocol (whole-clip action vector, 8x32x32
    latents; not steppable as a dream env), ``"step"`` our per-step causal conditioning (16x32x32 latents)."""
    if paper_actions not in ("clip", "step"):
        raise ValueError(f"paper_actions: got {paper_actions!r}, expected 'clip' or 'step'")
    tok = TokenizerConfig(resolution=64, stride=(1, 8, 8), causal_time=True)
    # context_noise 0.1: on 300 HGS episodes, tiny scale, 3000 steps (benchmarks/bench_dynamics.py) it
    # trades 0.4 dB at open-loop step 1 (25.47 -> 25.07) for +0.4 dB at step 16 (20.00 -> 20.36, copy-last
    # 20.11): errors compound less in long rollouts, which is what a dream env is for. Held-out
    # nats/token with history 2.45 -> 2.50; the gap to shuffled actions stays (0.40 -> 0.34 nats).
    # reward_given_termination: death ends HGS and Battle2 episodes with a reward unlike any other step's
    # (HGS: -100 vs +4; Battle2: the health lost), which one regression output averages away.
    prior = PriorConfig(
        action_kind="discrete",
        n_actions=n_actions,
        tokens_h=8,
        tokens_w=8,
        context_noise=0.1,
        reward_given_termination=True,
    )
    if scale == "tiny":
        tok = replace(tok, channels=64, n_res_layers=1, codebook_size=256, embedding_dim=32)
        # frames=6 (5 context frames + the new one): attention, most of a training step, costs (6/8)^2 of 8 frames,
        # so the prior learns more per minute. Measured on the HGS main job's store and
        # tokens (held-out test split, bf16 auto): 8 frames x 3000 steps 3.58 bits per token, open-loop step 1 / 16
        # 24.99 / 18.60 dB, 8.1 min; 6 frames x 3600 steps 3.53, 25.05 / 18.96 dB, 7.9 min (README "Results").
        prior = replace(
            prior, n_layer=2, n_head=4, n_embd=128, frames=6, vocab_size=256, dropout=0.0, attn_dropout=0.0
        )
        # bf16 "auto" (both stages, tiny and small; these presets are ViZDoom's, BAIR's and RoboNet's): the
        # start-up probe turns bf16 autocast on where it is >= 5 % faster. Measured on the HGS main job with
        # AMX (2 threads, same store, held-out test split): 12.7 -> 10.7 min (tokenizer 2.44 -> 1.59, prior
        # 9.27 -> 8.08) at equal quality (reconstruction 29.36 / 29.31 dB, 3.62 / 3.58 bits per token,
        # open-loop step 1 24.91 / 24.99 dB; README "Results").
        tt = TrainConfig(
            steps=600, batch_size=8, lr=1e-3, warmup_steps=20, eval_every=200, ckpt_every=200, bf16="auto"
        )
        # On ~300 random-policy HGS episodes (benchmarks/bench_dynamics.py, context 4), without context
        # noise: after 1800 prior steps true actions beat shuffled ones at every open-loop step but
        # copy-last-frame only up to step 4; after 3000 (8-10 min on 2 cores, what fits the tiny scale's
        # 10-minute budget) up to step 8 (16: -0.1 dB); after 5000 at steps 1-16 (+0.6 dB at 16).
        # With context_noise 0.1, 3000 steps beat both at steps 1-16 (+0.25 dB over copy-last at 16).
        # lr 2e-3 (was 1e-3): on the same tokens, 6 frames x 3200 steps, held-out test bits per token 3.56 -> 3.49,
        # open-loop step 1 / 16 25.25 / 19.33 -> 25.41 / 19.64 dB (copy-last 19.14), reward MAE 0.056 -> 0.134
        # (1e-3 at 8 frames: 0.203); 3000 steps keep the main job under 10 minutes (README "Results").
        pt = TrainConfig(
            steps=3000, batch_size=8, lr=2e-3, warmup_steps=20, eval_every=750, ckpt_every=500, bf16="auto"
        )
        data = DataConfig(store=f"data/{name}", clip_len=8)
        episodes = 300
    elif scale == "small":
        tok = replace(tok, channels=128, n_res_layers=2, codebook_size=512, embedding_dim=64)
        prior = replace(prior, n_layer=4, n_head=4, n_embd=256, frames=8, vocab_size=512)
        tt = TrainConfig(
            steps=1500,
            batch_size=8,
            lr=7e-4,
            warmup_steps=50,
            eval_every=250,
            ckpt_every=250,
            max_minutes=30.0,
            bf16="auto",
        )
        pt = TrainConfig(steps=6000, batch_size=16, lr=5e-4, eval_every=500, ckpt_every=500, bf16="auto")
        data = DataConfig(store=f"data/{name}", clip_len=8)
        episodes = 400
    else:  # the paper scale: the paper's training budget, 16-frame clips
        tt, pt = _PAPER_TOKENIZER_TRAIN, _PAPER_PRIOR_TRAIN
        data = DataConfig(store=f"data/{name}", clip_len=16)
        episodes = 5000
        # gpt_small with our actions, rewards and terminations on the paper's 32x32 latent grid
        paper_prior = replace(
            _PAPER_GPT_SMALL,
            action_kind="discrete",
            n_actions=n_actions,
            tokens_h=32,
            tokens_w=32,
            reward_given_termination=True,
        )
        if not paper_arch:  # the paper's widths on our dream geometry
            tok = replace(tok, channels=240, n_res_layers=4, codebook_size=1024, embedding_dim=256)
            prior = replace(
                prior,
                n_layer=8,
                n_head=4,
                n_embd=512,
                frames=16,
                vocab_size=1024,
                dropout=0.2,
                attn_dropout=0.3,
            )
        elif paper_actions == "clip":  # paper: vae_res64_ds222 + gpt_small, the paper's action protocol
            # 16x64x64 -> 8x32x32 (stride 2, 2, 2; not causal in time) and the whole clip's 15 actions (one-hot
            # per step) as one affine-norm condition vector, as the paper; a dream env cannot step it (it needs
            # every action before the first frame): paper_actions="step" is the steppable variant.
            tok = replace(_PAPER_TOKENIZER, resolution=64, stride=(2, 2, 2))
            prior = replace(paper_prior, action_cond="clip", clip_actions=15, frames=8)
        else:  # paper widths and layers, our per-step protocol: temporal stride 1 (see below)
            # Per-step action conditioning (the dream env steps one action per latent frame) needs temporal
            # stride 1: 16x32x32 latents where the paper's vae_res64_ds222 has 8x32x32 (it conditions on the
            # whole clip's actions at once instead; docs/ARCHITECTURE.md "Paper scale"). Causal in time for the
            # dream's sliding windows (the paper's tokenizer is not). Every layer and width is the paper's.
            tok = replace(_PAPER_TOKENIZER, resolution=64, stride=(1, 2, 2), causal_time=True)
            prior = replace(paper_prior, frames=16)
    return ExperimentConfig(
        name=name,
        scale=scale,
        env=name,
        data=data,
        tokenizer=tok,
        prior=prior,
        tokenizer_train=tt,
        prior_train=pt,
        collect_episodes=episodes,
    )


def _take_cover(scale: str) -> ExperimentConfig:
    """Take Cover: the ViZDoom preset with two actions, a termination head that reads the history, 4000 random
    episodes, a 4x longer tokenizer schedule (tiny) and a distilled dream policy. ViZDoom returns the previous frame again at death, so a head
    reading the new frame can end a dream episode only when the sampler happens to draw that frozen frame (README,
    "Take Cover"): on held-out real episodes the history head ranks deaths with AUC 0.90 where the frame head's
    probability at real deaths was 0.002-0.5. 1000 random episodes (98.5k steps, ~1.3 min to collect) is the
    measured recipe for the world model; the distilled policy needs more deaths, so the main job collects 4000
    (393k steps, ~4.5 min) and trains the unroll and the policy after the prior (``dream_policy="distill"``: 767 real
    tics over 3 seeds, README "Take Cover")."""
    base = _vizdoom("vizdoom_take_cover", scale, n_actions=2)
    episodes = 4000 if scale == "tiny" else max(4000, base.collect_episodes)
    tt = base.tokenizer_train
    if scale == "tiny":
        # 2400 tokenizer steps at lr 2e-3 (6-7 min on 2 cores, bf16), not the ViZDoom tiny preset's 600 at 1e-3
        # (1.4 min): on the 1900-episode store (held-out clips, benchmarks/bench_tokenizer.py, 3 seeds)
        # reconstructions 30.9 -> 33.3 dB, SSIM 0.78 -> 0.85, sharpness ratio 0.12 -> 0.31, fvd_recon 1249 -> 724
        # (real-vs-real floor 730), and the prior's dream frames are about 3x sharper (README "Sharp tokens").
        tt = replace(tt, steps=2400, lr=2e-3, eval_every=800, ckpt_every=400)
    return replace(
        base,
        prior=replace(base.prior, termination_from="history"),
        tokenizer_train=tt,
        collect_episodes=episodes,
        dream_policy="distill",
    )


def _robot(name: str, scale: str, action_dim: int, paper_actions: PaperActions = "step") -> ExperimentConfig:
    """BAIR / RoboNet as action-conditioned dreams: 64×64 frames, one latent frame per action, 8×8 tokens (at the
    paper scale with ``paper_actions="clip"``: the paper's protocol, 8×32×32 latents and the whole clip's actions)."""
    base = _vizdoom(name, scale, n_actions=0, paper_actions=paper_actions)
    # BAIR/RoboNet stores carry no rewards and no terminations: a terminal-reward output would never train
    prior = replace(
        base.prior,
        action_kind="continuous",
        n_actions=0,
        action_dim=action_dim,
        reward_given_termination=False,
    )
    clip = 16 if scale == "paper" else 8  # BAIR trajectories have 30 frames, RoboNet's ~31
    frames = clip // base.tokenizer.stride[0]
    # the ViZDoom tiny prior's lr 2e-3 was measured on HGS only: the robot datasets keep the 1e-3 they were run with
    pt = replace(base.prior_train, lr=1e-3) if scale == "tiny" else base.prior_train
    return replace(
        base,
        prior=replace(prior, frames=frames),
        prior_train=pt,
        data=replace(base.data, clip_len=clip),
        collect_episodes=0,
    )


def _shrunk(
    tok: TokenizerConfig, prior: PriorConfig, scale: str
) -> tuple[TokenizerConfig, PriorConfig, TrainConfig]:
    """tiny/small widths of an action-free paper preset (geometry and conditioning unchanged; our layers and full
    attention, as before the paper's layers were added)."""
    tiny = scale == "tiny"
    tok = replace(
        tok,
        res_channels=0,
        paper_layers=False,
        channels=32 if tiny else 128,
        n_res_layers=1 if tiny else 2,
        codebook_size=256 if tiny else 512,
        embedding_dim=32 if tiny else 64,
    )
    prior = replace(
        prior,
        n_layer=2 if tiny else 4,
        n_head=4,
        n_embd=128 if tiny else 256,
        dropout=0.0,
        attn_dropout=0.0,
        vocab_size=tok.codebook_size,
        attn_pattern="full",
        code_dim=0,
        paper_layers=False,
    )
    return tok, prior, TrainConfig(steps=600 if tiny else 3000, batch_size=4, lr=1e-3 if tiny else 5e-4)


def _bair_paper(scale: str) -> ExperimentConfig:
    """The paper's BAIR setup: 16 frames of 64×64, no actions. Paper scale, as the paper: the clip's first 64×64
    pixel frame conditions through the paper's 3D ResNet-34 (LayerNorm, width 1, 576 channels, (1, 16, 16) output)
    and cross-attention, and the prior models all 8×32×32 latents of the stride (2, 2, 2) tokenizer. tiny/small:
    the first latent frame's *tokens* condition (a 2-block ResNet over their embeddings: a ResNet-34 is 73 M
    parameters, more than these scales' whole model) and the remaining latent frames are modelled, at the
    official ``bair_stride4x2x2`` VQ-VAE's stride (4, 2, 2): ``frames = 16 / 4 - 1``."""
    paper = scale == "paper"
    tok = replace(_PAPER_TOKENIZER, resolution=64, stride=(2, 2, 2) if paper else (4, 2, 2))
    n_latent = 16 // tok.stride[0]
    if paper:
        prior = replace(
            _PAPER_GPT_SMALL,
            frames=n_latent,
            tokens_h=32,
            tokens_w=32,
            n_cond_frames=1,
            cond_pixels=True,
            cond_resolution=64,
            resnet_depth=34,
            resnet_width=1,
            resnet_dim=576,
            resnet_out=(1, 16, 16),
        )
    else:
        prior = replace(_PAPER_GPT_SMALL, frames=n_latent - 1, tokens_h=32, tokens_w=32, n_cond_frames=1)
    tt, pt = _PAPER_TOKENIZER_TRAIN, _PAPER_PRIOR_TRAIN
    if not paper:
        tok, prior, tt = _shrunk(tok, prior, scale)
        pt = tt
    return ExperimentConfig(
        name="bair_paper",
        scale=scale,
        env="bair",
        data=DataConfig(store="data/bair", clip_len=16, use_actions=False),
        tokenizer=tok,
        prior=prior,
        tokenizer_train=tt,
        prior_train=pt,
        collect_episodes=0,
    )


def _video(name: str, scale: str, n_classes: int) -> ExperimentConfig:
    """Action-free 16-frame video, 4 latent frames: UCF-101 (class-conditional through conditional
    LayerNorm, or unconditional) at 128×128 with stride (4, 4, 4) -> 4×32×32 as the paper (and the
    official ``ucf101_stride4x4x4``); TGIF at 64×64 with stride (4, 2, 2) -> 4×32×32 as the paper.
    tiny/small: 64×64 at stride (4, 4, 4) -> 4×16×16 for both. Convert with ``--resolution`` = the
    preset's resolution (the store's frame size decides the tokenizer's)."""
    paper = scale == "paper"
    res, stride = (
        (128, (4, 4, 4)) if paper and name.startswith("ucf101") else (64, (4, 2, 2) if paper else (4, 4, 4))
    )
    tok = replace(_PAPER_TOKENIZER, resolution=res, stride=stride)
    prior = replace(
        _PAPER_GPT_LARGE,
        frames=16 // stride[0],
        tokens_h=res // stride[1],
        tokens_w=res // stride[2],
        n_classes=n_classes,
    )
    tt, pt = _PAPER_TOKENIZER_TRAIN, _PAPER_PRIOR_TRAIN
    if not paper:
        tok, prior, tt = _shrunk(tok, prior, scale)
        pt = tt
    store = "data/ucf101" if name.startswith("ucf101") else f"data/{name}"
    return ExperimentConfig(
        name=name,
        scale=scale,
        env=name.split("_")[0],
        data=DataConfig(store=store, clip_len=16, resolution=res, use_actions=False),
        tokenizer=tok,
        prior=prior,
        tokenizer_train=tt,
        prior_train=pt,
        collect_episodes=0,
    )


def safe_name(preset: str) -> str:
    """``preset`` as one path component: every character other than letters, digits, ``_``, ``.`` and ``-`` becomes
    ``-`` (``"gym:ALE/Pong-v5"`` -> ``"gym-ALE-Pong-v5"``); names of the named presets are unchanged."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", preset)


# Resolution of the generic preset per scale (before the frame-size bound).
_GENERIC_RESOLUTION = {"tiny": 64, "small": 64, "paper": 128}
_GENERIC_EPISODES = {"tiny": 60, "small": 300, "paper": 2000}


def generic_preset(
    name: str,
    scale: str,
    *,
    frame_size: int | None = None,
    action_kind: Literal["discrete", "continuous", "none"] = "discrete",
    n_actions: int = 0,
    action_dim: int = 0,
) -> ExperimentConfig:
    """The preset of an env that has no tuned one (``"gym:<ID>"``): the ViZDoom presets' dream geometry
    (per-frame tokens, stride (1, 8, 8), causal tokenizer, conditional-LayerNorm prior with context noise and a
    reward head split by termination) with the env's spaces filled in.

    Args:
        name: the preset name, e.g. ``"gym:CarRacing-v3"`` (its store is ``data/<safe_name(name)>``).
        scale: ``tiny`` | ``small`` | ``paper``.
        frame_size: the env's smaller frame side in pixels, if known: the resolution is the scale's (64, 64, 128)
            or, for smaller frames, the largest multiple of 8 not above ``frame_size`` (no upsampling).
        action_kind, n_actions, action_dim: the env's action space (the store's decides in the end:
            ``worldmodel.stages.resolve_config``).
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {list(SCALES)}")
    base = _vizdoom(name, scale, n_actions=n_actions, paper_arch=False)
    res = _GENERIC_RESOLUTION[scale]
    if frame_size is not None:
        if frame_size < 8:
            raise ValueError(
                f"frame_size: got {frame_size}, expected the frame's smaller side in pixels (>= 8)"
            )
        res = min(res, frame_size // 8 * 8)
    # Termination and its reward differ from other steps in most envs (a crash, a lost point, a death): the
    # split reward head (see PriorConfig.reward_given_termination) keeps the terminal reward in the dream.
    prior = replace(
        base.prior,
        action_kind=action_kind,
        n_actions=n_actions if action_kind == "discrete" else 0,
        action_dim=action_dim if action_kind == "continuous" else 0,
    )
    return replace(
        base,
        env=name,
        tokenizer=replace(base.tokenizer, resolution=res),
        prior=prior,
        data=replace(base.data, store=f"data/{safe_name(name)}", resolution=res),
        collect_episodes=_GENERIC_EPISODES[scale],
    )


_PRESETS: dict[str, Any] = {
    "vizdoom_hgs": lambda scale, paper_actions="clip": _vizdoom("vizdoom_hgs", scale, 5, True, paper_actions),
    "vizdoom_battle2": lambda scale, paper_actions="clip": _vizdoom(
        "vizdoom_battle2", scale, 8, True, paper_actions
    ),
    "vizdoom_take_cover": lambda scale: _take_cover(scale),
    "bair": lambda scale: _robot("bair", scale, action_dim=4),  # store data/bair
    "robonet": lambda scale, paper_actions="clip": _robot("robonet", scale, 5, paper_actions),  # data/robonet
    "bair_paper": _bair_paper,
    "ucf101": lambda scale: _video("ucf101", scale, n_classes=101),
    "ucf101_uncond": lambda scale: _video("ucf101_uncond", scale, n_classes=0),
    "tgif": lambda scale: _video("tgif", scale, n_classes=0),
}


def register_preset(name: str, factory: Any) -> None:
    """Add a preset: ``factory(scale) -> ExperimentConfig``."""
    _PRESETS[name] = factory


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def is_preset(name: str) -> bool:
    """A named preset, or ``"gym:<ID>"`` (the generic preset of a Gymnasium env)."""
    return name in _PRESETS or (name.startswith(GYM_PREFIX) and len(name) > len(GYM_PREFIX))


def get_preset(name: str, scale: str = "tiny", *, paper_actions: PaperActions = "clip") -> ExperimentConfig:
    """Return the named preset at ``scale`` ('tiny' | 'small' | 'paper'). ``"gym:<ID>"`` without a registered preset
    (``envs.gym_source.register_gym_preset`` builds one from the env's spaces) is :func:`generic_preset` without
    the env's spaces. ``paper_actions`` picks the action protocol of the ``PAPER_CLIP_PRESETS`` at the paper
    scale: ``"clip"`` the paper's (whole-clip action vector, not steppable as a dream env), ``"step"`` ours
    (per-step causal actions, steppable); other presets and scales ignore it."""
    if paper_actions not in ("clip", "step"):
        raise ValueError(f"paper_actions: got {paper_actions!r}, expected 'clip' or 'step'")
    if name not in _PRESETS and is_preset(name):
        return generic_preset(name, scale)
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {preset_names()} or 'gym:<Gymnasium id>'")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {list(SCALES)}")
    if name in PAPER_CLIP_PRESETS:
        return _PRESETS[name](scale, paper_actions)
    return _PRESETS[name](scale)
