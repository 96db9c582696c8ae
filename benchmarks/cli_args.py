"""Command-line arguments that several benchmarks share (imported as a sibling module: the benchmarks run as
scripts, ``python benchmarks/<name>.py``, which puts this directory first on ``sys.path``)."""

from __future__ import annotations

import argparse

from worldmodel.sampling import DECODES


def add_decode_arguments(p: argparse.ArgumentParser, maskgit_steps: int = 4) -> None:
    """``--decode`` and ``--maskgit-steps`` (default ``maskgit_steps``): how the dream draws each frame's tokens."""
    p.add_argument(
        "--decode",
        choices=list(DECODES),
        default="autoregressive",
        help="how the dream draws each frame's tokens (maskgit: a bundle trained with the MaskGIT objective)",
    )
    p.add_argument(
        "--maskgit-steps",
        type=int,
        default=maskgit_steps,
        help="MaskGIT refinements per frame (--decode maskgit)",
    )


def decode_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The dream's decode keywords (``decode``, ``maskgit_steps``) from parsed :func:`add_decode_arguments`."""
    if args.decode == "maskgit":
        return {"decode": "maskgit", "maskgit_steps": args.maskgit_steps}
    return {"decode": args.decode}
