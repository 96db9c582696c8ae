"""Our ``paper`` scale next to the paper's own code: hyperparameters side by side and parameter counts.

The reference is the authors' code, wilson1yan/VideoGPT-Paper at commit f4579d1 (``videogpt/config_model.py``,
``config_cond.py``, ``layers/vqvae.py``, ``layers/attention/*``, ``models/{vqvae,gpt,resnet}.py``,
``train_vqvae.py``, ``train_videogpt.py``). ``python experiments/train.py --env X --scale paper --print-config``
prints :func:`side_by_side`; tests/test_paper_scale.py checks that our counts equal the pinned ones.

Every difference that remains is listed in ``DEVIATIONS`` (one line, with its reason) and in
docs/ARCHITECTURE.md "Paper scale".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worldmodel.config import ExperimentConfig

PAPER_COMMIT = "wilson1yan/VideoGPT-Paper@f4579d1"

# Parameter counts of the paper code's models, computed once from its layer shapes (SamePadConvNd /
# SamePadConvTransposeNd with kernel 4 resampling, conv_last 3x3x3, decoder conv1 3x3x3, residual blocks
# BN-ReLU-conv3(no bias)-BN-ReLU-conv1(no bias)-BN-ReLU-AxialAttention (lucidrains axial_attention: per axis
# to_q, to_kv without bias, to_out with bias), one BroadcastPosEmbedND of the latent grid, pre_vq_conv1 1x1x1;
# ImageGPT: fc_in (embedding_dim -> width, no bias), SOS vector, BroadcastPosEmbedND over (T, h, w, 1), per layer
# LayerNorm + w_qs/w_ks/w_vs/fc (no bias, n_head x proj_dim 128) + LayerNorm + Linear-GeLU2-Linear (ff x4, biases),
# final LayerNorm, fc_out (no bias); affine-norm LayerNorms (class/action vector of size d) replace each g, b by
# two d x width maps; BAIR's cond net: resnet_v1 depth 34, 3D convs, LayerNorm, cifar stem, resnet_dim 576,
# output (1, 16, 16), + per layer LayerNorm and encoder attention, + a BroadcastPosEmbedND of (1, 16, 16)).
PAPER_PARAMS: dict[str, int] = {
    "vae_res64_ds222": 15_801_747,  # VQVAE(input_shape=(16, 64, 64), downsample=(2, 2, 2), ...)
    "vae_res64_ds122": 15_802_387,  # the same code at downsample=(1, 2, 2) (our action presets' stride)
    "vae_res64_ds422": 23_174_707,  # downsample=(4, 2, 2)
    "vae_res128_ds444": 23_174_707,  # input (16, 128, 128), downsample=(4, 4, 4)
    "gpt_small@16x32x32": 25_869_952,  # ImageGPT(shape=(16, 32, 32, 1), in_features=256, n_vocab=1024), no cond
    "gpt_small@8x32x32": 25_868_928,  # shape (8, 32, 32, 1): the paper's BAIR/ViZDoom/RoboNet grid, no cond
    "gpt_small@7x32x32": 25_868_800,  # shape (7, 32, 32, 1), no cond (our bair_paper grid)
    "gpt_large@4x32x32": 253_174_016,  # shape (4, 32, 32, 1), no cond (TGIF, UCF-101 unconditional)
    "gpt_large@4x32x32+class101": 261_570_816,  # + class_cond: affine-norm LayerNorms of a 101-d one-hot
    "gpt_small@8x32x32+resnet34": 108_113_408,  # BAIR: + n_cond_frames=1 through the ResNet-34 (73,317,056)
    # models/resnet.py resnet_v1(depth 34, width_multiplier 1, resnet_dim 576, input (3, 1, 64, 64), output
    # (1, 16, 16), cifar_stem, norm_type 'ln', pool=False) as config_cond.py / train_videogpt.py build it for BAIR:
    # stem 3x3x3 conv 3->64 + LN; groups of 3/4/6/3 basic blocks (two 3x3x3 bias-free convs + LN each; every
    # group's first block with a 1x1x1 projection + LN) of 64/128/256/576 channels = 73,317,056; + the encoder
    # attention's BroadcastPosEmbedND((1, 16, 16), 576) 6,336 (our PixelFrameEncoder: both).
    "resnet34@bair": 73_317_056,
    # gpt_small at 8x32x32 with an affine-norm condition vector of d values (train_videogpt.py --class_cond,
    # "condition on actions"): each of the 17 LayerNorms' g, b (2 x 512) becomes two bias-free d x 512 maps.
    "gpt_small@8x32x32+clip60": 26_896_000,  # d = 60: the paper's ViZDoom HGS condition size
    "gpt_small@8x32x32+clip315": 31_335_040,  # d = 315: the paper's ViZDoom Battle2
    "gpt_small@8x32x32+clip64": 26_965_632,  # d = 64: the paper's RoboNet
    "gpt_small@8x32x32+clip75": 27_157_120,  # d = 75: our HGS / RoboNet clip vector (15 x 5)
    "gpt_small@8x32x32+clip120": 27_940_480,  # d = 120: our Battle2 clip vector (15 x 8)
}

# The condition sizes the paper reports for its action-conditioned datasets. The released code builds the vector
# through --class_cond (affine_norm of the dataset's vector) but ships no ViZDoom/RoboNet dataset, so how they
# factor is not in the code; 60 = 15 x 4 and 315 = 15 x 21 fit a 16-frame clip's 15 transitions one-hot over 4 /
# 21 actions. Ours is 15 x our env's action space (HGS 5, Battle2 8 actions one-hot; RoboNet 5-d).
PAPER_CLIP_SIZES: dict[str, int] = {"vizdoom_hgs": 60, "vizdoom_battle2": 315, "robonet": 64}


@dataclass(frozen=True)
class PaperSetup:
    """What the paper code runs for one of our presets, and which pinned counts compare to ours."""

    tokenizer: str
    """The paper's tokenizer config name (``config_model.py``)."""
    prior: str
    """The paper's prior config name."""
    tokenizer_same: str
    """Key of ``PAPER_PARAMS`` of the paper code at our tokenizer's config."""
    prior_same: str
    """Key of ``PAPER_PARAMS`` of the paper code's prior at our config: the whole prior where the paper code has
    our conditioning, else its unconditional trunk at our latent grid (``prior_paper`` is then the paper's own)."""
    prior_same_is_trunk: bool
    prior_paper: str
    """Key of ``PAPER_PARAMS`` of the paper's own setup for this dataset."""
    conditioning: str
    """How the paper conditions (``config_cond.py`` / ``train_videogpt.py``)."""


def paper_setup(cfg: ExperimentConfig) -> PaperSetup:
    """The paper's setup for our preset ``cfg`` (a ``paper``-scale config); ``ValueError`` for other presets."""
    name = cfg.name
    p = cfg.prior
    if p.action_cond == "clip" and name in PAPER_CLIP_SIZES:  # the paper's protocol (paper_actions="clip")
        d = p.clip_actions * (p.n_actions if p.action_kind == "discrete" else p.action_dim)
        return PaperSetup(
            "vae_res64_ds222", "gpt_small", "vae_res64_ds222", f"gpt_small@8x32x32+clip{d}", False,
            f"gpt_small@8x32x32+clip{PAPER_CLIP_SIZES[name]}", "whole-clip action vector -> affine-norm LayerNorms",
        )  # fmt: skip
    if name.startswith("vizdoom") or name in ("bair", "robonet"):
        cond = (
            "whole-clip action vector -> affine-norm LayerNorms"
            if name != "bair"
            else "one 64x64 pixel frame -> ResNet-34 -> cross-attention (n_cond_frames=1), no actions"
        )
        return PaperSetup(
            "vae_res64_ds222", "gpt_small", "vae_res64_ds122", "gpt_small@16x32x32", True,
            "gpt_small@8x32x32+resnet34" if name == "bair"
            else f"gpt_small@8x32x32+clip{PAPER_CLIP_SIZES[name]}" if name in PAPER_CLIP_SIZES
            else "gpt_small@8x32x32", cond,
        )  # fmt: skip
    if name == "bair_paper":
        return PaperSetup(
            "vae_res64_ds222", "gpt_small", "vae_res64_ds222", "gpt_small@8x32x32+resnet34", False,
            "gpt_small@8x32x32+resnet34",
            "1 64x64 pixel frame(s) -> ResNet-34 (LayerNorm, width x1, 576 channels, (1, 16, 16)) -> cross-attention",
        )  # fmt: skip
    if name.startswith("ucf101") or name == "tgif":
        tok = "vae_res128_ds444" if name.startswith("ucf101") else "vae_res64_ds422"
        prior = "gpt_large@4x32x32+class101" if name == "ucf101" else "gpt_large@4x32x32"
        cond = "class label one-hot -> affine-norm LayerNorms" if name == "ucf101" else "none (unconditional)"
        return PaperSetup(tok, "gpt_large", tok, prior, False, prior, cond)
    raise ValueError(
        f"no paper setup for preset {name!r}: the paper scale of {cfg.name} is not a paper config"
    )


# (row, our value from the config, the paper's value, note); notes name the deviation's reason in one line.
DEVIATIONS: dict[str, str] = {
    "tokenizer.stride": "temporal stride 1: per-step action conditioning (the dream env) needs one latent frame per "
    "action (bair, vizdoom_take_cover, --paper-actions step); the paper conditions on the whole clip's actions "
    "at once (--paper-actions clip, the default of its datasets)",
    "tokenizer.causal_time": "causal in time so a frame's tokens do not depend on later frames in the dream's "
    "sliding windows",
    "tokenizer.norm": "per-position LayerNorm: batch statistics pool over time (leak future frames) and differ "
    "between training and inference",
    "prior.conditioning": "per-step causal actions (each frame sees a_{<t}, so the dream env can step; "
    "--paper-actions step); the paper's whole-clip vector (--paper-actions clip) needs every action up front",
    "prior.clip_size": "15 transitions x our env's action space (one-hot of HGS's 5 / Battle2's 8 actions, "
    "RoboNet's 5-d vector); the paper's data encoded actions differently (60 / 315 / 64 values)",
    "prior.bair_actions": "bair is our action-conditioned BAIR dream (per-step actions, so the dream env can "
    "step); the paper's BAIR setup (one pixel frame, no actions) is the bair_paper preset",
    "prior.layout": "one slot position per frame (predicts the frame's first token, carries the frame's "
    "condition) + reward/termination heads: the world model's transition outputs",
    "prior.pos": "position embeddings summed per axis (T, h, w, width each) instead of concatenated quarters",
    "prior.sparse_kernel": "a dense boolean mask (any device, KV cache) instead of DeepSpeed's block-sparse "
    "kernels: same pattern, O(S^2) memory",
    "prior.init": "GPT-2's initialisation (normal 0.02, residual projections / sqrt(2 n_layer), zero head) instead "
    "of the paper's fan-in scaled one; conditional LayerNorms keep their own gain/bias (+4 x width each)",
    "train.optimizer": "AdamW, linear warmup, cosine to 10% (paper: Adam, constant for the VQ-VAE, cosine to 0 "
    "for the prior, grad clip 1 for the prior only)",
}


def _rows(cfg: ExperimentConfig, setup: PaperSetup) -> list[tuple[str, str, str, str]]:
    t, p = cfg.tokenizer, cfg.prior
    ds = {"vae_res64_ds222": (2, 2, 2), "vae_res64_ds422": (4, 2, 2), "vae_res128_ds444": (4, 4, 4)}
    res = 128 if setup.tokenizer == "vae_res128_ds444" else 64
    st = ds[setup.tokenizer]
    small = setup.prior == "gpt_small"
    lat_t = 16 // st[0]  # the paper models every latent frame of the clip
    rows: list[tuple[str, str, str, str]] = [
        ("tokenizer.resolution", str(t.resolution), str(res), ""),
        ("tokenizer.stride", str(tuple(t.stride)), str(st), ""),
        ("tokenizer.channels (num_hiddens)", str(t.channels), "240", ""),
        ("tokenizer.res_channels (num_residual_hiddens)", str(t.res_channels or t.channels // 2), "128", ""),
        ("tokenizer.n_res_layers", str(t.n_res_layers), "4", ""),
        ("tokenizer.n_heads (attn_n_heads)", str(t.n_heads), "2", ""),
        ("tokenizer.codebook_size", str(t.codebook_size), "1024", ""),
        ("tokenizer.embedding_dim", str(t.embedding_dim), "256", ""),
        ("tokenizer.beta (commitment_cost)", str(t.beta), "0.25", ""),
        ("tokenizer.ema_decay", str(t.ema_decay), "0.99", ""),
        ("tokenizer.paper_layers", str(t.paper_layers), "True", ""),
        ("tokenizer.causal_time", str(t.causal_time), "False", ""),
        ("tokenizer.norm", "LayerNorm", "SyncBatchNorm", ""),
        ("prior.n_layer", str(p.n_layer), "8" if small else "20", ""),
        ("prior.n_head", str(p.n_head), "4" if small else "8", ""),
        ("prior.n_embd (out_features)", str(p.n_embd), "512" if small else "1024", ""),
        ("prior head dim (proj_dim)", str(p.n_embd // p.n_head), "128", ""),
        ("prior MLP width (ff_mult)", "4", "4", ""),
        ("prior.dropout", str(p.dropout), "0.2", ""),
        ("prior.attn_dropout", str(p.attn_dropout), "0.0", ""),
        ("prior.attn_pattern (attn_type)", p.attn_pattern, "strided (sparse)", ""),
        ("prior.sparse_block", str(p.sparse_block), "32", ""),
        ("prior.sparse_local_blocks", str(p.sparse_local_blocks), "4", ""),
        ("prior.code_dim (fc_in in_features)", str(p.code_dim), "256", ""),
        ("prior.paper_layers", str(p.paper_layers), "True", ""),
        ("prior.frames", str(p.frames), str(lat_t), ""),
        ("prior.tokens_h x tokens_w", f"{p.tokens_h}x{p.tokens_w}", f"{res // st[1]}x{res // st[2]}", ""),
        ("prior.conditioning", _our_conditioning(cfg), setup.conditioning, ""),
        *_clip_rows(cfg),
        ("prior positions per frame", f"1 + {p.tokens_h * p.tokens_w}", str(p.tokens_h * p.tokens_w), ""),
        ("prior.pos", "per axis, summed", "per axis, concatenated", ""),
        ("prior.sparse_kernel", "dense boolean mask", "DeepSpeed block-sparse", ""),
        ("prior.init", "GPT-2 (normal 0.02)", "per-layer fan-in scaled normal", ""),
        ("tokenizer_train steps / batch / lr", _train(cfg.tokenizer_train), "100000 / 32 / 0.0003, Adam", ""),
        ("prior_train steps / batch / lr", _train(cfg.prior_train), "200000 / 32 / 0.0003, Adam", ""),
    ]
    out = []
    for key, ours, paper, _ in rows:
        note = "" if _same(ours, paper) else _note(key, cfg)
        out.append((key, ours, paper, note))
    return out


def _clip_rows(cfg: ExperimentConfig) -> list[tuple[str, str, str, str]]:
    """The whole-clip condition's size, ours vs the paper's, for the presets of its action-conditioned datasets."""
    p = cfg.prior
    if p.action_cond != "clip" or cfg.name not in PAPER_CLIP_SIZES:
        return []
    d = p.clip_actions * (p.n_actions if p.action_kind == "discrete" else p.action_dim)
    width = f"{p.n_actions} one-hot" if p.action_kind == "discrete" else f"{p.action_dim}-d"
    return [("prior.clip_size (affine-norm vector)", f"{d} ({p.clip_actions} x {width})",
             str(PAPER_CLIP_SIZES[cfg.name]), "")]  # fmt: skip


def _same(ours: str, paper: str) -> bool:
    """Equal, or ours names the paper's value followed by its own wording (``strided`` vs ``strided (sparse)``)."""
    return ours == paper or ours.lower() == paper.split(" ")[0].lower()


def _note(key: str, cfg: ExperimentConfig) -> str:
    if key == "prior.conditioning":
        if cfg.name == "bair":
            return DEVIATIONS["prior.bair_actions"]
        if cfg.name.startswith("vizdoom") or cfg.name in ("bair", "robonet"):
            return DEVIATIONS["prior.conditioning"]
        return ""
    if key == "prior.frames":
        return DEVIATIONS["tokenizer.stride"]
    if key.startswith("prior.clip_size"):
        return DEVIATIONS["prior.clip_size"]
    if key.startswith("prior positions"):
        return DEVIATIONS["prior.layout"]
    if key.startswith(("tokenizer_train", "prior_train")):
        return DEVIATIONS["train.optimizer"]
    return DEVIATIONS.get(key.split(" ")[0], "DIFFERS (unexplained)")


def _our_conditioning(cfg: ExperimentConfig) -> str:
    p = cfg.prior
    if p.cond_pixels:
        R, o = p.cond_resolution, p.resnet_out
        return (
            f"{p.n_cond_frames} {R}x{R} pixel frame(s) -> ResNet-{p.resnet_depth} (LayerNorm, width x{p.resnet_width}, "
            f"{p.resnet_dim} channels, {tuple(o)}) -> cross-attention"
        )
    if p.n_cond_frames:
        return f"{p.n_cond_frames} latent frame(s) of tokens -> ResNet -> cross-attention"
    if p.action_kind != "none" and p.action_cond == "clip":
        return "whole-clip action vector -> affine-norm LayerNorms"
    if p.action_kind != "none":
        return f"per-step {p.action_kind} action a_(t-1) of each frame -> affine-norm LayerNorms"
    if p.n_classes:
        return "class label one-hot -> affine-norm LayerNorms"
    return "none (unconditional)"


def _train(t: object) -> str:
    return f"{t.steps} / {t.batch_size} / {t.lr}, AdamW"  # type: ignore[attr-defined]


def param_counts(cfg: ExperimentConfig) -> dict[str, int]:
    """Our parameter counts at ``cfg`` (built on the meta device: no memory, no time): ``tokenizer``; ``prior``
    (everything); ``prior_heads`` (our reward/termination heads, which the paper has not);
    ``prior_conditioning`` (condition maps, frame-conditioning encoder and cross-attention; ``prior_resnet`` the
    pixel conditioning's ResNet alone, 0 without one); ``prior_trunk``
    (the rest: what the paper's unconditional ImageGPT has)."""
    from worldmodel.prior import Prior
    from worldmodel.tokenizer import VQVAE

    with torch.device("meta"):
        tok, prior = VQVAE(cfg.tokenizer), Prior(cfg.prior)
    heads = cond = 0
    for name, prm in prior.named_parameters():
        if name.startswith(("reward_head.", "term_head.")):
            heads += prm.numel()
        elif ".to_gain_bias." in name or name.startswith(
            ("act_emb.", "class_emb.", "start_emb", "cond_encoder.")
        ):
            cond += prm.numel()
        elif ".xattn." in name or ".ln_x." in name:
            cond += prm.numel()
    total = sum(p.numel() for p in prior.parameters())
    resnet = getattr(prior.cond_encoder, "resnet", None)  # the pixel conditioning's ResNet (cond_pixels)
    return {
        "prior_resnet": 0 if resnet is None else sum(p.numel() for p in resnet.parameters()),
        "tokenizer": sum(p.numel() for p in tok.parameters()),
        "prior": total,
        "prior_heads": heads,
        "prior_conditioning": cond,
        "prior_trunk": total - heads - cond,
    }


def side_by_side(cfg: ExperimentConfig) -> str:
    """The table ``--print-config`` prints for a paper-scale preset: each hyperparameter ours vs the paper's (with
    the reason of every difference) and the parameter counts, ours and the paper code's."""
    setup = paper_setup(cfg)
    rows = _rows(cfg, setup)
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(len(r[1]) for r in rows) + 2
    lines = [
        f"== {cfg.name} --scale paper vs the paper's code ({PAPER_COMMIT}: {setup.tokenizer} + {setup.prior}) ==",
        f"{'':{w0}}{'ours':{w1}}paper",
    ]
    for key, ours, paper, note in rows:
        mark = "  =" if not note else f"  <- {note}"
        lines.append(f"{key:{w0}}{ours:{w1}}{paper}{mark}")
    n = param_counts(cfg)
    pp = PAPER_PARAMS
    same_tok = pp[setup.tokenizer_same]

    def pct(a: int, b: int) -> str:
        return f"{100 * (a - b) / b:+.2f}%"

    lines += [
        "",
        "parameters                        ours           paper code",
        f"tokenizer                  {n['tokenizer']:>13,}  {same_tok:>13,}  ({setup.tokenizer_same}; "
        f"{pct(n['tokenizer'], same_tok)})",
    ]
    if setup.prior_same_is_trunk:
        trunk = pp[setup.prior_same]
        lines += [
            f"prior trunk                {n['prior_trunk']:>13,}  {trunk:>13,}  ({setup.prior_same}, unconditional; "
            f"{pct(n['prior_trunk'], trunk)})",
            f"prior conditioning         {n['prior_conditioning']:>13,}  {'':>13}  (ours; the paper conditions "
            "differently, see prior.conditioning)",
        ]
    else:
        same = pp[setup.prior_same]
        ours = n["prior"] - n["prior_heads"]
        lines.append(
            f"prior (trunk + cond.)      {ours:>13,}  {same:>13,}  ({setup.prior_same}; {pct(ours, same)})"
        )
    if cfg.prior.cond_pixels:  # the conditioning ResNet alone (resnet_v1 of models/resnet.py)
        ours_rn, paper_rn = n["prior_resnet"], pp["resnet34@bair"]
        lines.append(
            f"  of which ResNet-{cfg.prior.resnet_depth}       {ours_rn:>13,}  {paper_rn:>13,}  (resnet34@bair; "
            f"{pct(ours_rn, paper_rn)})"
        )
    lines += [
        f"prior heads (ours only)    {n['prior_heads']:>13,}  {0:>13,}  (reward and termination heads)",
        f"prior total                {n['prior']:>13,}  {pp[setup.prior_paper]:>13,}  (paper: {setup.prior_paper}, "
        "its own setup for this dataset)",
        f"paper tokenizer {setup.tokenizer}: {pp[setup.tokenizer]:,} parameters",
    ]
    return "\n".join(lines)
