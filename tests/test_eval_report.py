"""Report pieces: loss curves from metrics.jsonl, plots, HTML escaping."""

from __future__ import annotations

import json

from wonderland.eval.report import plot_loss, plot_persona, read_curves, render_html


def test_read_curves_skips_other_events_and_a_torn_last_line(tmp_path):
    m = tmp_path / "metrics.jsonl"
    rows = [{"event": "started", "step": 0}, {"event": "step", "step": 1, "loss": 3.0},
            {"event": "eval", "step": 1, "val_loss": 3.5}, {"event": "step", "step": 2, "loss": 2.0}]
    m.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"event": "st')
    assert read_curves(m) == ([(1, 3.0), (2, 2.0)], [(1, 3.5)])
    assert read_curves(tmp_path / "missing.jsonl") == ([], [])
    plot_loss(m, tmp_path / "loss.png", "t", start_val=4.0)
    plot_persona({"base": [-0.1, 0.0], "trained": [0.2]}, tmp_path / "persona.png")
    for png in ("loss.png", "persona.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_html_escapes_replies():
    arm = {"perplexity": 2.0, "in_character_rate": 0.5, "persona_score": 0.1, "marker_rate": 0.5, "distinct_2": 0.9,
           "repetition_rate": 0.0, "shared_opening_rate": 0.0, "copy_rate": 0.0, "retention_rate": None,
           "mean_words": 3.0}
    result = {"base": arm, "trained": arm, "seed": 0,
              "meta": {"run": "r<1>", "character": "the Hatter", "created": "now", "model": {"id": "m"},
                       "valid_records": 1, "valid_tokens": 5},
              "config": {"generation": {"seed": 0}, "persona": {"k_nearest": 3, "markers": {"tea": 3.0}}},
              "target": {"checks": [{"description": "d", "measured": "m", "passed": True}]}}
    score = {"margin": 0.2, "in_character": True, "markers": ["tea"]}
    html = render_html(result, [{"prompt": "Hi", "base": "<script>x</script>", "trained": "tea",
                                 "scores": {"base": score, "trained": score}}], ["base", "trained"])
    assert "<script>x" not in html and "&lt;script&gt;x" in html and "r&lt;1&gt;" in html
    assert html.count("<tr>") == 1 + 10 + 1 + 1  # header, metric rows, samples header, one sample
