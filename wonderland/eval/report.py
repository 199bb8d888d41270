"""The evaluation report: two PNG plots (matplotlib, Agg) and one self-contained HTML page.

The page references the plots by relative path (``loss.png``, ``persona.png``), so the eval folder
can be opened from disk, served by the web app, or copied elsewhere as a whole.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

from wonderland.eval.persona import MARGIN_CLEAR, MARGIN_MIN
from wonderland.fileio import iter_jsonl

ARM_COLORS = {"base": "#8c8c8c", "prompted": "#4e79a7", "trained": "#e15759"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers, CI or the web app's worker thread
    import matplotlib.pyplot as plt

    return plt


def read_curves(metrics_path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, validation loss) points from a run's metrics.jsonl."""
    train, val = [], []
    for rec in iter_jsonl(metrics_path):  # tolerates the torn last line of a running run
        if rec.get("event") == "step" and rec.get("loss") is not None:
            train.append((rec["step"], rec["loss"]))
        elif rec.get("event") == "eval" and rec.get("val_loss") is not None:
            val.append((rec["step"], rec["val_loss"]))
    return train, val


def plot_loss(metrics_path: Path, out: Path, title: str, start_val: float | None = None) -> None:
    """Train/validation loss curves; ``start_val`` (the held-out loss with the adapter off and the
    character's prompt, measured by the evaluation) is drawn at step 0, where training starts."""
    plt = _pyplot()
    train, val = read_curves(metrics_path)
    if start_val is not None and val and val[0][0] > 0:
        val.insert(0, (0, start_val))
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if train:
        ax.plot(*zip(*train), color="#4e79a7", lw=1.2, label="train loss")
    if val:
        ax.plot(*zip(*val), color="#e15759", marker="o", lw=1.5, label="validation loss")
    if not train and not val:
        ax.text(0.5, 0.5, "no metrics recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_persona(margins: dict[str, Sequence[float]], out: Path) -> None:
    """Per-reply persona scores of each arm (dots) with their means (bars) and the rule's thresholds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for i, (arm, values) in enumerate(margins.items()):
        color = ARM_COLORS.get(arm, "#59a14f")
        xs = [i + (j % 7 - 3) * 0.04 for j in range(len(values))]  # deterministic jitter
        ax.scatter(xs, values, s=14, color=color, alpha=0.7)
        if values:
            mean = sum(values) / len(values)
            ax.hlines(mean, i - 0.3, i + 0.3, color=color, lw=2.5)
    ax.axhline(MARGIN_MIN, color="black", lw=0.8, ls="--", label=f"margin {MARGIN_MIN:g} (with a style marker)")
    ax.axhline(MARGIN_CLEAR, color="black", lw=0.8, ls=":", label=f"margin {MARGIN_CLEAR:g} (without)")
    ax.set_xticks(range(len(margins)), list(margins))
    ax.set_ylabel("persona score (similarity margin)")
    ax.set_title("Persona score per reply (bar = mean)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


_ROWS = [  # (key, label, format, better)
    ("perplexity", "held-out perplexity", "{:.2f}", "lower"),
    ("in_character_rate", "in character", "{:.0%}", "higher"),
    ("persona_score", "persona score (mean margin)", "{:+.3f}", "higher"),
    ("marker_rate", "replies with a style marker", "{:.0%}", "higher"),
    ("distinct_2", "distinct-2", "{:.3f}", "higher"),
    ("repetition_rate", "repetition rate", "{:.3f}", "lower"),
    ("shared_opening_rate", "shared opening (tic)", "{:.0%}", "lower"),
    ("copy_rate", "copy rate (book lines)", "{:.0%}", "lower"),
    ("retention_rate", "retention (sanity set)", "{:.0%}", "higher"),
    ("mean_words", "mean reply length (words)", "{:.1f}", ""),
]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;color:#222}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.35rem .6rem;vertical-align:top;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37}.bad{color:#cf222e}.in{background:#eef8ee}.muted{color:#666;font-size:.9rem}
.samples td{width:25%;font-size:.92rem}.plots img{max-width:48%;margin-right:1%}
.markers{color:#8250df;font-size:.8rem}
"""


def _e(x: object) -> str:
    return html.escape(str(x))


def render_html(result: dict, samples: list[dict], arms: Sequence[str]) -> str:
    meta = result["meta"]
    head = "".join(f"<th>{_e(a)}</th>" for a in arms)
    rows = []
    for key, label, fmt, better in _ROWS:
        cells = []
        for a in arms:
            v = result[a].get(key)
            cells.append(f"<td class=num>{_e(fmt.format(v)) if v is not None else '—'}</td>")
        hint = f" <span class=muted>({better} is better)</span>" if better else ""
        rows.append(f"<tr><th>{_e(label)}{hint}</th>{''.join(cells)}</tr>")
    checks = "".join(
        f"<li class={'ok' if c['passed'] else 'bad'}>{'✔' if c['passed'] else '✘'} {_e(c['description'])}: "
        f"{_e(c['measured'])}</li>" for c in result["target"]["checks"])
    sample_rows = []
    for s in samples:
        cells = []
        for a in arms:
            sc = s["scores"][a]
            marks = f"<div class=markers>{_e(', '.join(sc['markers']))}</div>" if sc["markers"] else ""
            cells.append(f"<td class={'in' if sc['in_character'] else ''}>{_e(s[a]) or '<i>(empty)</i>'}"
                         f"<div class=muted>score {sc['margin']:+.3f}{' · in character' if sc['in_character'] else ''}"
                         f"</div>{marks}</td>")
        sample_rows.append(f"<tr><td><b>{_e(s['prompt'])}</b></td>{''.join(cells)}</tr>")
    markers = ", ".join(result["config"]["persona"]["markers"]) or "none found"
    gen = ", ".join(f"{k}={v}" for k, v in result["config"]["generation"].items())
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>Evaluation of {_e(meta['run'])}</title><style>{_CSS}</style></head>
<body>
<h1>Evaluation: {_e(meta['character'])} — run <code>{_e(meta['run'])}</code></h1>
<p class=muted>{_e(meta['created'])} · model {_e(meta['model'].get('id'))} ·
{_e(result['config'].get('prompts', len(samples)))} held-out prompts × {_e(result['config'].get('samples_per_prompt', 1))} replies ·
{_e(meta['valid_records'])} held-out records ({_e(meta['valid_tokens'])} tokens) · seed {_e(result['seed'])} · {_e(gen)}</p>
<p>Arms: <b>base</b> = adapter off, neutral system prompt; <b>prompted</b> = adapter off, the character's system prompt;
<b>trained</b> = adapter on, the same system prompt. Same decoding settings for all three, and the same seed
for a given reply (each reply its own seed: seed + index).</p>
<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>
<h2>Target</h2><ul>{checks}</ul>
<div class=plots><img src="loss.png" alt="training and validation loss"><img src="persona.png" alt="persona score per reply"></div>
<h2>How replies are judged</h2>
<p class=muted>Persona score = mean cosine similarity (all-MiniLM-L6-v2) to the {result['config']['persona']['k_nearest']}
nearest real lines of the character minus that to the nearest generic-assistant replies. In character = score &gt;
{MARGIN_MIN:g} and (score ≥ {MARGIN_CLEAR:g} or uses a style marker), and not a verbatim copy of a book line.
Style markers (log-odds vs the rest of the book): {_e(markers)}.</p>
<h2>Samples</h2>
<table class=samples><tr><th>prompt</th>{head}</tr>{''.join(sample_rows)}</table>
</body></html>
"""
