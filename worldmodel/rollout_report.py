"""The report of one rollout: its video, trace plot, optimism figure, summary JSON and one HTML page over them.

:func:`write_report` writes, next to each other::

    <stem>.mp4  <stem>.gif  <stem>.png (per-step traces)  <stem>-optimism.png  <stem>.json  <stem>.html

The HTML page is self-contained in the sense that matters for a debugging artefact: it needs no server, no
network and no script — it references only the files beside it, by relative name, so the directory can be
opened from disk, copied or zipped as it is. It shows the video, the summary table
(:class:`~worldmodel.rollout_summary.RolloutSummary`), the trace plot, the optimism figure, the steps where the
policy chose differently in the dream, and a per-step table.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from worldmodel.atomic import write_json, write_text
from worldmodel.rollout_summary import DEFAULT_PSNR_THRESHOLD, RolloutSummary, optimism_figure, summarize
from worldmodel.rollout_video import RolloutTrace, render_trace
from worldmodel.video import save_figure

_CSS = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#eee}td.k{text-align:left}img,video{max-width:100%;image-rendering:pixelated}
.bad{color:#b00;font-weight:bold}details{margin:1em 0}"""

_ROWS = (  # summary table: field, label, unit/explanation
    ("steps", "steps", "real env steps, each also taken in the dream"),
    ("mean_psnr_db", "mean PSNR, open loop", "dB, dream vs real frame"),
    ("first_divergence_step", "first step below the threshold", "open loop"),
    ("psnr_threshold_db", "PSNR threshold", "dB"),
    ("real_return", "real return", "sum of the game's rewards"),
    ("predicted_return", "predicted return, open loop", "sum of the dream's expected rewards"),
    ("optimism", "dream optimism", "predicted - real"),
    ("real_terminated_step", "real episode terminated at", "step"),
    ("max_term_prob", "max p(termination), open loop", ""),
    ("mean_entropy", "mean token entropy, open loop", "nats"),
    ("resync_every", "re-synced dream: every", "steps"),
    ("mean_psnr_resync_db", "mean PSNR, re-synced", "dB"),
    ("first_divergence_step_resync", "first step below the threshold, re-synced", ""),
    ("predicted_return_resync", "predicted return, re-synced", ""),
    ("optimism_resync", "dream optimism, re-synced", "predicted - real"),
    ("policy", "policy", ""),
    ("disagreement_rate", "steps where the policy chooses differently in the dream", "fraction"),
    ("mean_tv_distance", "mean total variation, policy on real vs on dream", "0 = same distribution"),
    ("mean_value_real", "mean value estimate on real frames", ""),
    ("mean_value_dream", "mean value estimate on dream frames", ""),
)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _src(path: Path) -> str:
    return html.escape(quote(path.name), quote=True)


def _table(rows: list[list[str]], header: list[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append(
            "<tr>"
            + "".join(f"<td{' class=k' if i == 0 else ''}>{html.escape(c)}</td>" for i, c in enumerate(r))
            + "</tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def step_rows(trace: RolloutTrace) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-step table (one row per step t = 1..T)."""
    head = ["t", "action"]
    pr, pd, rs = trace.policy_real, trace.policy_dream, trace.resync
    if pr is not None and pr.probs is not None:
        head.append("p(actions) on real")
    if pr is not None and pr.value is not None:
        head.append("value on real")
    if pd is not None:
        head.append("choice real/dream")
    if trace.reward_real is not None:
        head.append("r real")
    head += ["r^ open", "p(end)", "H"]
    psnr = trace.psnr()
    if psnr is not None:
        head.append("PSNR open")
    if rs is not None:
        head += ["r^ resync", "PSNR resync"]
    psnr_rs = trace.psnr_resync()
    rows = []
    for i in range(trace.steps):  # step t = i + 1 took action a_i, decided on frame i
        r = [str(i + 1), trace.action_label(i)]
        if pr is not None and pr.probs is not None:
            r.append(" ".join(f"{p:.2f}" for p in pr.probs[i]))
        if pr is not None and pr.value is not None:
            r.append(f"{pr.value[i]:.2f}")
        if pd is not None:
            r.append(f"{pr.choice[i]}/{pd.choice[i]}" + (" *" if pr.choice[i] != pd.choice[i] else ""))
        if trace.reward_real is not None:
            r.append(f"{trace.reward_real[i]:+.2f}" + (" TERM" if trace.terminated_real[i] else ""))
        r += [f"{trace.reward_pred[i]:+.2f}", f"{trace.term_prob[i]:.3f}", f"{trace.entropy[i]:.2f}"]
        if psnr is not None:
            r.append(f"{psnr[i]:.1f}")
        if rs is not None:
            r += [f"{rs.reward_pred[i]:+.2f}", f"{psnr_rs[i]:.1f}"]
        rows.append(r)
    return head, rows


def report_html(
    trace: RolloutTrace,
    files: dict[str, Path],
    summary: RolloutSummary | None,
    *,
    title: str,
    meta: dict[str, Any],
) -> str:
    """The HTML page of a rollout whose ``files`` (``mp4``, ``gif``, ``png``, ``optimism``, ``json``; all in one
    directory) are written; ``meta`` (bundle, policy, mode, seed, ...) is shown as a table at the top."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _table([[str(k), _fmt(v)] for k, v in meta.items()]),
    ]
    if "mp4" in files:
        parts.append(
            f'<h2>Video</h2><video controls loop muted playsinline src="{_src(files["mp4"])}"></video>'
        )
        links = [f'<a href="{_src(files[k])}">{k}</a>' for k in ("mp4", "gif") if k in files]
        parts.append(f"<p>{' · '.join(links)}</p>")
    if summary is None:  # a dream-only rollout: nothing real to compare with
        parts += [
            "<h2>Summary</h2>",
            _table(
                [
                    ["steps", str(trace.steps), "dream steps (until the dream predicted the end or --steps)"],
                    [
                        "predicted return",
                        _fmt(float(np.sum(trace.reward_pred))),
                        "sum of the dream's rewards",
                    ],
                    ["max p(termination)", _fmt(float(np.max(trace.term_prob, initial=0.0))), ""],
                    [
                        "mean token entropy",
                        _fmt(float(np.mean(trace.entropy)) if trace.steps else None),
                        "nats",
                    ],
                ],
                ["", "value", ""],
            ),
        ]
    else:
        d = summary.to_dict()
        rows = [[label, _fmt(d[k]), unit] for k, label, unit in _ROWS if d.get(k) is not None]
        parts += ["<h2>Summary</h2>", _table(rows, ["", "value", ""])]
        if summary.disagreement_steps is not None:
            steps = ", ".join(map(str, summary.disagreement_steps)) or "none"
            parts.append(
                f"<p>Steps where the policy's choice on the dream frame differs from its choice on the real "
                f'frame (it sees a different world there): <span class="bad">{html.escape(steps)}</span></p>'
            )
    if "png" in files:
        parts.append(f'<h2>Per-step trace</h2><img alt="per-step trace" src="{_src(files["png"])}">')
    if "optimism" in files:
        parts.append(
            f'<h2>Dream optimism</h2><img alt="cumulative predicted vs real reward" '
            f'src="{_src(files["optimism"])}">'
        )
    if trace.action_names:
        parts += [
            "<h2>Actions</h2>",
            _table([[str(i), n] for i, n in enumerate(trace.action_names)], ["index", "name"]),
        ]
    head, rows = step_rows(trace)
    parts += ["<details><summary>Per-step table</summary>", _table(rows, head), "</details>"]
    if "json" in files:
        parts.append(
            f'<p>Summary as JSON: <a href="{_src(files["json"])}">{html.escape(files["json"].name)}</a></p>'
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    trace: RolloutTrace,
    out_stem: str | os.PathLike,
    *,
    scale: int = 4,
    fps: float = 8.75,
    gif: bool = True,
    psnr_threshold: float = DEFAULT_PSNR_THRESHOLD,
    title: str | None = None,
    meta: dict[str, Any] | None = None,
) -> tuple[dict[str, Path], RolloutSummary | None]:
    """Write the rollout's files (see the module docstring) and return their paths (keys ``mp4``, ``gif``,
    ``png``, ``optimism``, ``json``, ``html``) and the summary (None for a dream-only trace, which has no real
    frames to compare with: then there is no optimism figure either)."""
    stem = Path(out_stem)
    files = render_trace(
        trace,
        stem,
        scale=scale,
        fps=fps,
        gif=gif,
        psnr_threshold=psnr_threshold if trace.real is not None else None,
    )
    summary = summarize(trace, psnr_threshold) if trace.real is not None else None
    if trace.reward_real is not None:
        files["optimism"] = save_figure(optimism_figure(trace), stem.with_name(f"{stem.name}-optimism.png"))
    meta = dict(meta or {})
    doc = {
        "meta": meta,
        "summary": None if summary is None else summary.to_dict(),
        "files": {k: v.name for k, v in files.items()},
    }
    files["json"] = stem.with_suffix(".json")
    write_json(files["json"], doc)
    files["html"] = write_text(
        stem.with_suffix(".html"),
        report_html(trace, files, summary, title=title or f"Rollout {stem.name}", meta=meta),
    )
    return files, summary
