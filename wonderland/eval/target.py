"""The product's target (issue 14) as explicit pass/fail checks over eval.json's three arms.

Training must clearly beat the character's own system prompt and keep the model's other abilities;
each threshold is a named constant. None values (no valid set, no retention set) fail their check.
"""

from __future__ import annotations

IN_CHARACTER = 0.70  # trained replies judged in character, at least
IN_CHARACTER_OVER_PROMPTED = 0.15  # ... and this many points above the prompted arm
PERSONA_OVER_PROMPTED = 0.05  # persona score (cosine margin) above the prompted arm
WORLD_OVER_PROMPTED = 0.15  # replies naming the character's own world, points above the prompted arm
RETENTION_LOSS = 0.10  # retention at most this many points below the base model's
PPL_RATIO = 0.70  # held-out perplexity at most this share of the base model's (and below prompted)
DISTINCT_KEEP = 0.85  # distinct-2 at least this share of the base model's: no collapse
OPENING_OVER_BASE = 0.10  # shared-opening rate at most this many points above the base model's


def _check(name: str, description: str, passed, measured: str) -> dict:
    return {"name": name, "description": description, "passed": bool(passed), "measured": measured}


def _num(x) -> float | None:
    return x if isinstance(x, (int, float)) else None


def _voice(b: dict, p: dict, t: dict) -> list[dict]:
    world_t, world_p = _num(t.get("world_mention_rate")), _num(p.get("world_mention_rate"))
    return [
        _check("trained_in_character", f"trained in character >= {IN_CHARACTER:.0%} and >= prompted + "
               f"{IN_CHARACTER_OVER_PROMPTED * 100:.0f} points",
               t["in_character_rate"] >= max(IN_CHARACTER, p["in_character_rate"] + IN_CHARACTER_OVER_PROMPTED),
               f"{t['in_character_rate']:.0%} vs prompted {p['in_character_rate']:.0%}"),
        _check("persona_vs_prompted", f"trained persona score >= prompted + {PERSONA_OVER_PROMPTED}",
               t["persona_score"] >= p["persona_score"] + PERSONA_OVER_PROMPTED,
               f"{t['persona_score']:+.3f} vs {p['persona_score']:+.3f}"),
        _check("world_vs_prompted", f"replies naming the character's world >= prompted + {WORLD_OVER_PROMPTED * 100:.0f} points",
               world_t is not None and world_p is not None and world_t >= world_p + WORLD_OVER_PROMPTED,
               f"{world_t:.0%} vs {world_p:.0%}" if world_t is not None and world_p is not None else "not measured"),
    ]


def _wits(b: dict, p: dict, t: dict) -> list[dict]:
    have_ppl = all(_num(x.get("perplexity")) for x in (b, p, t))
    ret_b, ret_t = _num(b.get("retention_rate")), _num(t.get("retention_rate"))
    return [
        _check("retention", f"trained retention >= base - {RETENTION_LOSS * 100:.0f} points",
               ret_b is not None and ret_t is not None and ret_t >= ret_b - RETENTION_LOSS,
               f"{ret_t:.0%} vs base {ret_b:.0%}" if ret_b is not None and ret_t is not None else "no retention set"),
        _check("ppl", f"held-out perplexity <= {PPL_RATIO} x base and < prompted",
               have_ppl and t["perplexity"] <= PPL_RATIO * b["perplexity"] and t["perplexity"] < p["perplexity"],
               f"{t['perplexity']:.2f} vs base {b['perplexity']:.2f}, prompted {p['perplexity']:.2f}" if have_ppl
               else "no valid set"),
        _check("no_collapse", f"trained distinct-2 >= {DISTINCT_KEEP:.0%} of base's",
               t["distinct_2"] >= DISTINCT_KEEP * b["distinct_2"], f"{t['distinct_2']:.3f} vs {b['distinct_2']:.3f}"),
        _check("no_copies", "trained copy rate 0 (no 8-word run of the book)", t["copy_rate"] == 0, f"{t['copy_rate']:.0%}"),
        _check("openings", f"shared-opening rate <= base + {OPENING_OVER_BASE * 100:.0f} points",
               t["shared_opening_rate"] <= b["shared_opening_rate"] + OPENING_OVER_BASE,
               f"{t['shared_opening_rate']:.0%} vs base {b['shared_opening_rate']:.0%}"),
    ]


def target_checks(results: dict[str, dict]) -> dict:
    """The target's checks over ``results`` (eval.json's ``base`` / ``prompted`` / ``trained``)."""
    b, p, t = results["base"], results["prompted"], results["trained"]
    have_ppl = all(_num(x.get("perplexity")) for x in (b, t))
    drop = 1 - t["perplexity"] / b["perplexity"] if have_ppl else None
    checks = _voice(b, p, t) + _wits(b, p, t)
    return {"ppl_drop": round(drop, 4) if drop is not None else None, "checks": checks,
            "passed": all(c["passed"] for c in checks)}
