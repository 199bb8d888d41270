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
from wonderland.fileio import atomic_write_jsonl

REPLAY_DIR = Path(__file__).parent / "data" / "replay"
PROMPTS_FILE = REPLAY_DIR / "prompts.txt"
PACKAGED = {DEFAULT_MODEL: REPLAY_DIR / f"{DEFAULT_MODEL}.jsonl"}
MAX_TOKENS = 96  # long enough for a short answer; a cut-off answer is trimmed to its last sentence
PROBE_EVERY = 12  # every 12th prompt is held out of training: the retention probe (teacher-forced)


SECTIONS = ("closed", "open")  # "#: closed" / "#: open" lines in prompts.txt start each section


def load_prompts(path: Path = PROMPTS_FILE, section: str = "all") -> list[str]:
    """The replay prompts of one section (``closed``: questions with one right answer; ``open``:
    advice, how-to, writing) or ``all``, in file order."""
    out, current = [], None
    for ln in path.read_text(encoding="utf-8").splitlines():
        ln = ln.strip()
        if ln.startswith("#:"):
            current = ln[2:].strip()
        elif ln and not ln.startswith("#") and section in ("all", current):
            out.append(ln)
    return out


def split(items: Sequence) -> tuple[list, list]:
    """(training part, probe part) of the replay prompts (or their answers): the probe prompts are
    never trained on."""
    probe = [a for i, a in enumerate(items) if i % PROBE_EVERY == PROBE_EVERY - 1]
    return [a for i, a in enumerate(items) if i % PROBE_EVERY != PROBE_EVERY - 1], probe


def trim(text: str, finished: bool) -> str:
    """The answer as trained on: whole, or (cut off by the token limit) up to its last full sentence."""
    text = text.strip()
    if finished:
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[: ends[-1]] if ends else text


def first_sentence(text: str) -> str:
    """The answer's first sentence, or "" when it has none worth training on (under 3 words, or a
    lead-in ending in a colon such as "Here is how:")."""
    head = text.strip().split("\n", 1)[0].strip()
    m = re.search(r"[.!?](?=\s|$)", head)
    head = head[: m.end()] if m else head
    return "" if len(head.split()) < 3 or head.endswith(":") else head


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


def read_answers(path: Path, sha256: str | None = None) -> dict[str, str]:
    """Cached answers by prompt; empty when the file is missing or made for other weights."""
    try:
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    head, rows = (rows[0], rows[1:]) if rows and "model_sha256" in rows[0] else ({}, rows)
    if sha256 and head.get("model_sha256") != sha256:
        return {}
    return {r["prompt"]: r["answer"] for r in rows}


def answers_for(model_name: str, model_path: Path, sha256: str, load_chat: Callable[[], object],
                log: Callable[[str], None] = print, prompts: Sequence[str] | None = None) -> list[dict]:
    """The base model's answers to ``prompts`` (default: all replay prompts): packaged, cached, or
    generated now (once, the missing ones only) and cached."""
    from wonderland.models import models_root

    prompts = list(prompts if prompts is not None else load_prompts())
    cache = models_root() / "replay" / f"{sha256}.jsonl"
    known = read_answers(cache, sha256)
    for name, packaged in PACKAGED.items():  # by weights too: `--model <the converted folder>` finds them
        if sha256 or name == model_name:
            known.update(read_answers(packaged, sha256))
    missing = [q for q in prompts if q not in known]
    if missing:
        log(f"Answering {len(missing)} replay prompts with the base model (once; cached in {cache}) ...")
        from tqdm import tqdm

        with tqdm(total=len(missing), unit="answer", file=sys.stderr, leave=False) as bar:
            known.update((a["prompt"], a["answer"]) for a in generate_answers(load_chat(), missing, bar.update))
        write_answers(cache, [{"prompt": q, "answer": a} for q, a in known.items()], sha256, model_name)
    return [{"prompt": q, "answer": known[q]} for q in prompts]


def write_answers(path: Path, answers: Sequence[dict], sha256: str, model_name: str) -> None:
    head = {"model_sha256": sha256, "model": model_name, "system_prompt": NEUTRAL_SYSTEM_PROMPT,
            "decoding": {"temperature": 0.0, "max_tokens": MAX_TOKENS, "repetition_penalty": 1.1}}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(path, [head, *answers])


def records(answers: Sequence[dict], system_prompt: str, answer: str = "whole") -> list[dict]:
    """Chat records: the character's system prompt, the request, the base model's answer (whole,
    or its ``first`` sentence; an answer with no usable first sentence is left out)."""
    cut = first_sentence if answer == "first" else str.strip
    return [{"messages": [{"role": "system", "content": system_prompt}, {"role": "user", "content": a["prompt"]},
                          {"role": "assistant", "content": cut(a["answer"])}], "kind": "replay"}
            for a in answers if cut(a["answer"])]


def draw(prompts: Sequence[str], count: int, seed: int) -> list[str]:
    """``count`` replay prompts, a seeded sample (each prompt once before any repeats)."""
    if count <= 0 or not prompts:
        return []
    rng = random.Random(seed)
    return [q for _ in range(count // len(prompts) + 1) for q in rng.sample(list(prompts), len(prompts))][:count]


def pool(section: str) -> list[str]:
    """The replay prompts a run may train on: the section's, less the probe's (held out)."""
    keep = set(load_prompts(section=section))
    return [q for q in split(load_prompts())[0] if q in keep]


def mix(train_records: Sequence[dict], replay: Sequence[dict], seed: int) -> list[dict]:
    """The character's records and the replay records, shuffled together (seeded)."""
    mixed = list(train_records) + list(replay)
    random.Random(seed).shuffle(mixed)
    return mixed


def guard(config, model_path: Path, sha256: str, train_records: list[dict], valid_records: list[dict],
          system_prompt: str, load_chat: Callable[[], object], log: Callable[[str], None] = print,
          with_probe: bool = True):
    """The retention guard of a run: (training records with replay mixed in, the replay records
    for ``--kl``, the checkpoint probe: None without ``valid_records`` or ``with_probe``, for a
    backend that scores none). Only the answers these need are looked up (or made)."""
    from wonderland.probe import Probe

    train_prompts, probe_prompts = pool(config.replay_set), split(load_prompts())[1]
    ratio = config.replay or (1.0 if config.kl else 0.0)  # --kl alone: one replay record per character record
    drawn = draw(train_prompts, round(ratio * len(train_records)), config.seed)
    with_probe = with_probe and bool(valid_records)
    wanted = list(dict.fromkeys(drawn)) + (probe_prompts if with_probe else [])
    known = {a["prompt"]: a for a in answers_for(config.model, model_path, sha256, load_chat, log, wanted)}
    replay_system = NEUTRAL_SYSTEM_PROMPT if config.replay_prompt == "neutral" else system_prompt
    replay = records([known[q] for q in drawn], replay_system, config.replay_answer)
    probe = Probe(valid=list(valid_records), retention=records([known[q] for q in probe_prompts], system_prompt)) \
        if with_probe else None
    mixed = mix(train_records, replay, config.seed) if config.replay else list(train_records)
    return mixed, (replay if config.kl else []), probe


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
