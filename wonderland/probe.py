"""The checkpoint probe: is the model in character, and has it kept its wits? Teacher-forced, cheap.

At every validation point both backends score the model (adapter on) on three fixed sets of
records, with the character's system prompt, and the run keeps one row per checkpoint:

* ``val_loss``: mean NLL per token of the character's held-out lines (the valid set);
* ``persona_margin``: how much more likely the model finds those lines than a generic assistant
  reply to the same prompts (``eval/generic_replies.txt``): mean NLL per token of the generic
  replies minus ``val_loss``. It grows as the voice takes, and falls again when the model merely
  memorises its training lines (their held-out siblings get less likely);
* ``retention_drift``: mean NLL per token of the base model's own answers to held-out general
  prompts (:func:`wonderland.replay.split`, never trained on), adapter on, minus the same with the
  adapter off (measured once, at the first point). 0 = general answers as likely as before.

**The best checkpoint** (the rule was written before any tuning, issue 14): among the validation
points whose ``retention_drift`` is at most :data:`MAX_DRIFT` nats per token, the one with the
highest ``persona_margin``; if no point qualifies, the one with the least drift. Ties go to the
earlier step. The run serves it (``adapter/``) unless the user picks another checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from wonderland.fileio import atomic_write_json

BEST_FILE = "best.json"
MAX_DRIFT = 0.25  # nats per token of the base model's own answers: larger means general answers changed
Scorer = Callable[[Sequence[dict], bool], tuple[float, int]]  # (records, adapter on?) -> (summed NLL, tokens)


def _per_token(total: float, n: int) -> float:
    return total / n if n else float("nan")


def generic_records(valid_records: Sequence[dict]) -> list[dict]:
    """The valid records' prompts answered by a generic assistant reply instead of the character."""
    from wonderland.eval.persona import load_generic_replies

    generic = load_generic_replies()
    out = []
    for i, r in enumerate(valid_records):
        msgs = [m for m in r["messages"] if m["role"] != "assistant"][:2]  # system + first user turn
        out.append({"messages": [*msgs, {"role": "assistant", "content": generic[i % len(generic)]}]})
    return out


@dataclass
class Probe:
    """The three probe sets of a run; :meth:`score` is called at each validation point."""

    valid: list[dict]
    retention: list[dict]
    generic: list[dict] = field(default_factory=list)
    baseline_retention: float | None = None  # adapter-off NLL per token of ``retention``

    def __post_init__(self) -> None:
        self.generic = self.generic or generic_records(self.valid)

    def score(self, nll: Scorer, val_loss: float | None = None) -> dict:
        """One probe row: ``val_loss``, ``persona_margin``, ``retention_drift`` (the latter two None
        when their records are missing). ``val_loss``: the valid set's, when validation just scored it
        (not scored twice)."""
        if val_loss is None and self.valid:
            val_loss = _per_token(*nll(self.valid, True))
        row: dict = {"val_loss": val_loss if self.valid else None,
                     "persona_margin": None, "retention_drift": None}
        if self.valid:
            row["persona_margin"] = _per_token(*nll(self.generic, True)) - row["val_loss"]
        if self.retention:
            if self.baseline_retention is None:
                self.baseline_retention = _per_token(*nll(self.retention, False))
            row["retention_drift"] = _per_token(*nll(self.retention, True)) - self.baseline_retention
        return row


def best(rows: Sequence[dict], max_drift: float = MAX_DRIFT) -> dict | None:
    """The best row by the rule above (rows carry ``step``); None when no row has a persona margin."""
    scored = [r for r in rows if r.get("persona_margin") is not None]
    if not scored:
        return None
    ok = [r for r in scored if r.get("retention_drift") is None or r["retention_drift"] <= max_drift]
    if ok:
        return min(ok, key=lambda r: (-r["persona_margin"], r["step"]))
    return min(scored, key=lambda r: (r["retention_drift"], r["step"]))


class Ledger:
    """The probe rows of one run and its best checkpoint so far, recorded in
    ``checkpoints/best.json`` (checkpoint pruning never removes that one)."""

    def __init__(self, checkpoints: Path, rows: Sequence[dict] = ()) -> None:
        self.path, self.rows = checkpoints / BEST_FILE, list(rows)

    def add(self, step: int, row: dict) -> dict | None:
        self.rows = [r for r in self.rows if r["step"] != step] + [{"step": step, **row}]
        top = best(self.rows)
        if top is not None and (len(self.rows) > 1 or self.path.parent.is_dir()):  # a choice to keep
            atomic_write_json(self.path, {"step": top["step"], "rule": f"max persona_margin with retention_drift <= {MAX_DRIFT}"})
        return top

    @classmethod
    def resumed(cls, run, upto: int) -> "Ledger":
        """The rows an earlier process of the run wrote (its eval events up to step ``upto``)."""
        from wonderland.events import read_metrics

        rows = [{"step": r["step"], **{k: r.get(k) for k in ("val_loss", "persona_margin", "retention_drift")}}
                for r in read_metrics(run.metrics) if r.get("event") == "eval" and r.get("persona_margin") is not None
                and r["step"] <= upto] if upto else []
        return cls(run.checkpoints, rows)

    def best_step(self) -> int | None:
        top = best(self.rows)
        return top["step"] if top else None

    def stalled(self, patience: int) -> bool:
        """Early stopping: ``patience`` (> 0) probed points came after the best one and none beat it.
        Training on cannot change the points already probed, so the checkpoint served stays the
        best of those; a later point could only have won after ``patience`` losing ones in a row."""
        top = self.best_step()
        return bool(patience) and top is not None and sum(r["step"] > top for r in self.rows) >= patience

    def summary(self) -> dict:
        return {"best_step": self.best_step(), "checkpoints": self.rows}


def best_checkpoint_step(checkpoints: Path) -> int | None:
    """The step recorded in ``checkpoints/best.json``, if any."""
    try:
        return int(json.loads((checkpoints / BEST_FILE).read_text())["step"])
    except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError):
        return None
