"""A tiny trained run for the export and OpenAI-API tests (shared by their modules).

Six steps at a high learning rate on the ``tiny_model`` fixture move the LoRA B matrices far
from zero, so the adapter visibly changes logits and greedy text: an export that dropped or
mis-scaled the adapter fails the comparisons.
"""

from __future__ import annotations

import json
from pathlib import Path

SYSTEM = "You are the Mad Hatter. Answer in riddles."
PROMPTS = ["What time is it?", "Who are you?", "Tell me a riddle.", "Is 12 + 7 nineteen?"]
_PAIRS = [("What time is it?", "Always six o'clock: tea-time!"), ("Who are you?", "The Hatter, of course."),
          ("Why is a raven like a writing-desk?", "I haven't the slightest idea."), ("More tea?", "Take some more tea.")]


def write_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                             {"role": "assistant", "content": a}]} for q, a in _PAIRS * 2]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (folder / "stats.json").write_text(json.dumps({"system_prompt": SYSTEM, "character": "Hatter"}), encoding="utf-8")
    return folder


def train_tiny_run(base: Path, tiny_model: Path, name: str = "hatter", **overrides):
    """A finished torch run at ``base/name`` (trained in a few seconds on the tiny model)."""
    from wonderland.config import TrainConfig
    from wonderland.train import train

    cfg = {"model": str(tiny_model), "iters": 6, "lr": 2e-2, "schedule": "constant", "warmup": 0, "batch_size": 4,
           "val_every": 0, "save_every": 0, "rank": 8, "alpha": 16.0, "seed": 0,
           "targets": "q_proj,k_proj,v_proj,o_proj", "kl": 0.0, "replay": 0.0}  # pinned: the export mechanics, not the product default
    cfg.update(overrides)
    return train(TrainConfig(**cfg), write_dataset(base / f"{name}-data"), out=str(base / name), log=lambda m: None)


_shared: dict[str, object] = {}


def shared_tiny_run(tmp_path_factory, tiny_model: Path):
    """One default run per test session, shared by the export and API test modules (they copy it
    before changing anything)."""
    key = str(tiny_model)
    if key not in _shared:
        _shared[key] = train_tiny_run(tmp_path_factory.mktemp("tiny-run"), tiny_model)
    return _shared[key]
