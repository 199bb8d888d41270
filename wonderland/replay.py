"""The retention guard's data: general prompts answered by the base model itself (self-distillation).

``wonderland train --replay R`` mixes R replay records per character record into the training
set (and ``--kl W`` adds a KL term to the adapter-off model on the same records): each record is
the character's system prompt, a general request from ``data/replay/prompts.txt`` (everyday
questions, facts, arithmetic, short instructions; disjoint from every evaluation prompt) and the
answer the *base model* gave to it with the adapter off and the neutral system prompt, greedy. So
the adapter is trained to leave the model's general answers as they were while it learns the
voice on the character's own records.

The answers depend on the base model only. For the embedded model they ship precomputed
(``data/replay/<model>.jsonl``, written by ``python -m wonderland.replay``, reproducible: greedy
decoding, float32 on the CPU); for any other model they are generated once, with a progress bar,
and cached as ``$WONDERLAND_MODELS/replay/<weights sha256>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from wonderland.chat_format import NEUTRAL_SYSTEM_PROMPT
from wonderland.config import DEFAULT_MODEL, GenerationConfig
from wonderland.errors import UserError
from wonderland.fileio import atomic_write_jsonl

REPLAY_DIR = Path(__file__).parent / "data" / "replay"
PROMPTS_FILE = REPLAY_DIR / "prompts.txt"
PACKAGED = {DEFAULT_MODEL: REPLAY_DIR / f"{DEFAULT_MODEL}.jsonl"}
MAX_TOKENS = 96  # long enough for a short answer; a cut-off answer is trimmed to its last sentence
PROBE_EVERY = 12  # every 12th prompt is held out of training: the retention probe (teacher-forced)


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]


def split(answers: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(training answers, probe answers): the probe prompts are never trained on."""
    probe = [a for i, a in enumerate(answers) if i % PROBE_EVERY == PROBE_EVERY - 1]
    return [a for i, a in enumerate(answers) if i % PROBE_EVERY != PROBE_EVERY - 1], probe


def trim(text: str, finished: bool) -> str:
    """The answer as trained on: whole, or (cut off by the token limit) up to its last full sentence."""
    text = text.strip()
    if finished:
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[: ends[-1]] if ends else text


def generate_answers(chat, prompts: Sequence[str], progress: Callable[[int], None] | None = None) -> list[dict]:
    """The base model's (adapter off) greedy answers under the neutral system prompt."""
    gen = GenerationConfig(temperature=0.0, max_tokens=MAX_TOKENS, repetition_penalty=1.1)
    out = []
    for prompt in prompts:
        messages = [{"role": "system", "content": NEUTRAL_SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        pieces = list(chat.stream(messages, gen, adapter=False))
        n_tokens = len(chat.tokenizer.encode("".join(pieces), add_special_tokens=False)) if hasattr(chat.tokenizer, "encode") else 0
        out.append({"prompt": prompt, "answer": trim("".join(pieces), n_tokens < MAX_TOKENS - 1)})
        if progress:
            progress(1)
    return out


def read_answers(path: Path, sha256: str | None = None) -> list[dict] | None:
    """Cached answers, or None when the file is missing or made for other weights or other prompts."""
    try:
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    head, rows = (rows[0], rows[1:]) if rows and "model_sha256" in rows[0] else ({}, rows)
    if sha256 and head.get("model_sha256") != sha256 or [r["prompt"] for r in rows] != load_prompts():
        return None
    return rows


def answers_for(model_name: str, model_path: Path, sha256: str, load_chat: Callable[[], object],
                log: Callable[[str], None] = print) -> list[dict]:
    """The base model's replay answers: packaged, cached, or generated now (once) and cached."""
    from wonderland.models import models_root

    packaged = PACKAGED.get(model_name)
    found = read_answers(packaged, sha256) if packaged else None
    cache = models_root() / "replay" / f"{sha256}.jsonl"
    found = found or read_answers(cache, sha256)
    if found is not None:
        return found
    prompts = load_prompts()
    log(f"Answering {len(prompts)} replay prompts with the base model (once; cached in {cache}) ...")
    from tqdm import tqdm

    with tqdm(total=len(prompts), unit="answer", file=sys.stderr, leave=False) as bar:
        answers = generate_answers(load_chat(), prompts, bar.update)
    write_answers(cache, answers, sha256, model_name)
    return answers


def write_answers(path: Path, answers: Sequence[dict], sha256: str, model_name: str) -> None:
    head = {"model_sha256": sha256, "model": model_name, "system_prompt": NEUTRAL_SYSTEM_PROMPT,
            "decoding": {"temperature": 0.0, "max_tokens": MAX_TOKENS, "repetition_penalty": 1.1}}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(path, [head, *answers])


def records(answers: Sequence[dict], system_prompt: str) -> list[dict]:
    """Chat records: the character's system prompt, the request, the base model's answer."""
    return [{"messages": [{"role": "system", "content": system_prompt}, {"role": "user", "content": a["prompt"]},
                          {"role": "assistant", "content": a["answer"]}], "kind": "replay"}
            for a in answers if a["answer"]]


def mix(train_records: Sequence[dict], replay: Sequence[dict], ratio: float, seed: int) -> list[dict]:
    """``train_records`` plus round(ratio x their count) replay records (a seeded sample; repeated
    when the ratio asks for more than there are), shuffled in: R replay records per character record."""
    if ratio <= 0 or not replay:
        return list(train_records)
    rng = random.Random(seed)
    want = round(ratio * len(train_records))
    pool = [r for _ in range(want // len(replay) + 1) for r in rng.sample(list(replay), len(replay))][:want]
    mixed = list(train_records) + pool
    rng.shuffle(mixed)
    return mixed


def check_ratio(ratio: float, where: str = "--replay") -> float:
    if not 0 <= ratio <= 10:
        raise UserError(f"{where} must be between 0 and 10 replay records per character record (got {ratio})")
    return ratio


def main(argv: list[str] | None = None) -> int:
    """Regenerate the packaged answers of the embedded model: ``python -m wonderland.replay``."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", help=f"output file (default: {PACKAGED[DEFAULT_MODEL]})")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = p.parse_args(argv)
    import torch
    from tqdm import tqdm

    from wonderland.backends import get_backend
    from wonderland.models import resolve_model, weights_sha256

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    chat = get_backend("torch").load(path, device="cpu")
    prompts = load_prompts()
    with tqdm(total=len(prompts), unit="answer") as bar:
        answers = generate_answers(chat, prompts, bar.update)
    write_answers(Path(args.out) if args.out else PACKAGED[args.model], answers, weights_sha256(path), args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
