"""Did the LoRA do anything? Base vs Prompted vs Trained on held-out data, in numbers and pictures.

``evaluate(run)`` (and ``wonderland eval --run RUN``) measures each arm of
:data:`wonderland.generate.ARMS` with the same seeded decoding settings:

1. held-out loss / perplexity on the assistant tokens of the run's ``valid.jsonl`` (the character's
   real lines), with each arm's system prompt and adapter setting;
2. replies to held-out everyday prompts (``wonderland/eval/prompts.txt``, disjoint from the
   training prompts), scored for persona (:mod:`wonderland.eval.persona`), distinctness, repetition
   and copying (:mod:`wonderland.eval.metrics`);
3. a small retention sanity set (plain facts and arithmetic).

It writes ``eval.json``, ``samples.jsonl``, ``report.html``, ``loss.png`` and ``persona.png`` into
``out`` (default ``RUN/eval/``), all at once (staged, then renamed into place).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from wonderland.config import GenerationConfig, seeded_for
from wonderland.errors import UserError
from wonderland.eval.metrics import CopyDetector, load_retention, reply_stats, world_mention_rate, world_terms
from wonderland.eval.persona import PersonaScorer
from wonderland.eval.target import target_checks
from wonderland.eval.report import plot_loss, plot_persona, render_html
from wonderland.fileio import atomic_replace_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text, staging_dir
from wonderland.generate import ARMS, LoadedRun, load_run
from wonderland.runs import RunDir, now_iso

SCHEMA_VERSION = 1
DEFAULT_PROMPTS = Path(__file__).with_name("prompts.txt")
EVAL_MAX_TOKENS = 60  # ~3.5 s per reply at ~17 tokens/s on one CPU core: 24 prompts x 3 arms in ~4 min
RETENTION_MAX_TOKENS = 32
OUTPUT_FILES = ("eval.json", "samples.jsonl", "report.html", "loss.png", "persona.png")

Progress = Callable[[dict], None]


def default_generation() -> GenerationConfig:
    """The decoding settings every arm shares unless the caller gives others."""
    return GenerationConfig(max_tokens=EVAL_MAX_TOKENS)


def load_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompts file not found: {path}") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise UserError(f"{path}: expected a UTF-8 text file with one prompt per line") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"{path}: no prompts (one per line; lines starting with # are comments)")
    return prompts


def _data_files(loaded: LoadedRun) -> tuple[Path, list[dict], dict, list[dict]]:
    """(data folder, valid records, stats, utterances) of the dataset the run was trained on."""
    from wonderland.data import load_chat_jsonl

    data_dir = Path(loaded.info.get("data", {}).get("path", ""))
    utter = data_dir / "utterances.jsonl"
    if not utter.exists():
        raise UserError(f"run {loaded.run.name}: its dataset {data_dir} (with utterances.jsonl) is gone; "
                        f"rebuild it with `wonderland data --out {data_dir}`")
    valid = load_chat_jsonl(data_dir / "valid.jsonl") if (data_dir / "valid.jsonl").exists() \
        and (data_dir / "valid.jsonl").stat().st_size else []
    stats = json.loads((data_dir / "stats.json").read_text(encoding="utf-8")) if (data_dir / "stats.json").exists() else {}
    utterances = [json.loads(ln) for ln in utter.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return data_dir, valid, stats, utterances


def _split_lines(utterances: list[dict], stats: dict, character: str) -> tuple[list[str], list[str]]:
    """The character's lines and everybody else's."""
    who = {stats.get("character") or character, *stats.get("aliases", [])}
    mine = [u["text"] for u in utterances if u.get("speaker") in who]
    rest = [u["text"] for u in utterances if u.get("speaker") not in who]
    if not mine:
        raise UserError(f"no lines of {sorted(who)} in the run's utterances.jsonl; rebuild the dataset")
    return mine, rest


def _world(utterances: list[dict], stats: dict, character: str) -> dict[str, float]:
    """The character's world terms, from the whole text of their chapters when the book is at hand."""
    who = {stats.get("character") or character, *stats.get("aliases", [])}
    try:
        book = Path(stats["book_path"]).read_text(encoding="utf-8").splitlines() if stats.get("book_path") else []
    except OSError:
        book = []
    return world_terms(utterances, who, book)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / "eval.json").exists()):
        raise UserError(f"{out} exists and is not an evaluation folder; choose another --out")


def evaluate(run_ref: str | Path | RunDir, prompts: str | Path | Sequence[str] | None = None,
             out: str | Path | None = None, gen: GenerationConfig | None = None, *, device: str = "auto",
             retention: bool | str | Path = True, samples: int = 1, checkpoint: int | None = None, progress: Progress | None = None,
             log: Callable[[str], None] = lambda m: None) -> dict:
    """Evaluate a finished run; write the report into ``out`` (default ``RUN/eval``); return eval.json.

    ``prompts``: None (the packaged held-out set), a file (one per line) or a list of prompts.
    ``samples``: replies per prompt and arm (each its own seed); rates are over all replies, so more
    samples give steadier numbers (one sample of 24 prompts moves by ~10 points from seed to seed).
    ``progress`` receives ``{"phase", "done", "total", ...}`` after each reply (web app progress).
    """
    t0 = time.time()
    gen = gen or default_generation()
    prompts_file, prompt_list = _prompt_list(prompts, samples)
    loaded = load_run(run_ref, device=device, checkpoint=checkpoint)
    run = loaded.run
    out_dir = Path(out).expanduser().resolve() if out else run.path / ("eval" if checkpoint is None else f"eval-step-{checkpoint:06d}")
    _check_out(out_dir)
    character = loaded.info.get("character") or "character"
    data_dir, valid, stats, utterances = _data_files(loaded)
    char_lines, other_lines = _split_lines(utterances, stats, character)
    retention_items = (load_retention(retention) if isinstance(retention, (str, Path)) else load_retention()) if retention else []
    log(f"evaluating {run.name}: {len(prompt_list)} prompts x {samples} replies, {len(valid)} held-out records, "
        f"{len(retention_items)} retention prompts, arms {', '.join(a.name for a in ARMS)}")
    progress = _Progress(progress or (lambda p: None), (samples * len(prompt_list) + len(retention_items)) * len(ARMS))
    timings: dict[str, float] = {"load_s": round(time.time() - t0, 2)}
    # (sample, prompt) pairs; sample 0 of prompt i has seed + i, as with one sample
    asks = [(k, i, p) for k in range(samples) for i, p in enumerate(prompt_list)]
    t = time.time()
    results, n_tokens = _held_out_losses(loaded, valid, progress)  # 1. held-out loss
    timings["loss_s"] = round(time.time() - t, 2)
    replies, gen_s = _replies(loaded, asks, len(prompt_list), gen, progress)  # 2. replies
    retention_gen = GenerationConfig(**{**gen.to_dict(), "max_tokens": min(gen.max_tokens, RETENTION_MAX_TOKENS)})
    retained = _retention_replies(loaded, retention_items, retention_gen, progress)
    timings["generate_s"] = round(sum(gen_s.values()), 2)
    log(f"generated {progress.total} replies in {time.time() - t0:.0f} s")
    t = time.time()
    scorer = PersonaScorer.from_lines(char_lines, other_lines)  # 3. scores
    copies = CopyDetector(u["text"] for u in utterances)
    scores = _score_arms(loaded, results, replies, retained, gen_s, scorer, copies)
    terms = _world_mentions(results, replies, asks, _world(utterances, stats, character))
    timings["score_s"] = round(time.time() - t, 2)
    rows = _rows(asks, replies, scores)
    result = {
        "schema_version": SCHEMA_VERSION,
        **results,
        "seed": gen.seed,
        "model": loaded.info.get("model", {}),
        "config": {**_result_config(loaded, gen, retention_gen, prompts_file, prompt_list, samples, scorer, copies),
                   "world_terms": list(terms), **_retention_config(retention, retention_items)},
        "target": target_checks(results),
        "meta": _meta(loaded, stats.get("display_name") or character, data_dir, len(valid), n_tokens, device),
        "timings": timings,
    }
    _write(out_dir, result, rows, run, [a.name for a in ARMS], t0)
    result["out"] = str(out_dir)
    log(f"wrote {out_dir / 'report.html'}")
    return result


def _world_mentions(results: dict[str, dict], replies: dict[str, list[str]], asks: list, terms) -> list:
    """Per arm: the rate of replies naming things of the character's world that their prompt did not."""
    for arm in ARMS:
        results[arm.name]["world_mention_rate"] = world_mention_rate(replies[arm.name], [p for _, _, p in asks], terms)
    return terms


def _rows(asks: list, replies: dict[str, list[str]], scores: dict[str, list]) -> list[dict]:
    """samples.jsonl: one row per (sample, prompt), every arm's reply and scores."""
    return [{"prompt": p, "sample": k, **{a.name: replies[a.name][j] for a in ARMS},
             "scores": {a.name: scores[a.name][j].to_dict() for a in ARMS}} for j, (k, _, p) in enumerate(asks)]


def _retention_config(retention: bool | str | Path, items: list) -> dict:
    return {"retention_file": str(retention) if isinstance(retention, (str, Path)) else None,
            "retention_prompts": len(items)}


def _prompt_list(prompts: str | Path | Sequence[str] | None, samples: int) -> tuple[str | None, list[str]]:
    """(prompts file or None, the prompts)."""
    if samples < 1:
        raise UserError(f"samples per prompt must be at least 1, got {samples}")
    if prompts is None or isinstance(prompts, (str, Path)):
        prompts_file = str(prompts or DEFAULT_PROMPTS)
        return prompts_file, load_prompts(prompts_file)
    prompt_list = [p.strip() for p in prompts if p.strip()]
    if not prompt_list:
        raise UserError("no prompts to evaluate")
    return None, prompt_list


class _Progress:
    """Counts generated replies and reports each to the caller's ``progress``."""

    def __init__(self, fn: Progress, total: int) -> None:
        self.fn, self.total, self.done = fn, total, 0

    def __call__(self, **fields) -> None:
        self.fn({**fields, "done": self.done, "total": self.total})

    def reply(self, phase: str, arm: str, prompt: str, reply: str) -> None:
        self.done += 1
        self(phase=phase, arm=arm, prompt=prompt, reply=reply)


def _held_out_losses(loaded: LoadedRun, valid: list[dict], progress: _Progress) -> tuple[dict[str, dict], int]:
    """Per arm: loss and perplexity on the valid set with the arm's prompt and adapter; token count."""
    results: dict[str, dict] = {}
    n_tokens = 0
    for arm in ARMS:
        records = [{"messages": loaded.messages_for(arm, r["messages"])} for r in valid]
        nll, n_tokens = loaded.model.loss(records, adapter=arm.adapter) if records else (0.0, 0)
        loss = nll / n_tokens if n_tokens else None
        results[arm.name] = {"loss": round(loss, 4) if loss is not None else None,
                             "perplexity": round(math.exp(loss), 3) if loss is not None else None}
        progress(phase="loss", arm=arm.name, perplexity=results[arm.name]["perplexity"])
    return results, n_tokens


EVAL_BATCH = 8  # prompts whose replies (every arm's) are decoded as one batch (LoadedRun.replies)


def _batched(loaded: LoadedRun, asks: Sequence[tuple[str, GenerationConfig]]) -> Iterator[tuple[str, str, str, float]]:
    """(arm, prompt, reply, seconds) for every arm's reply to each ``(prompt, gen)``, :data:`EVAL_BATCH`
    prompts at a time; ``seconds`` is the reply's share of its batch's time."""
    for start in range(0, len(asks), EVAL_BATCH):
        requests = [(arm, [{"role": "user", "content": p}], g) for p, g in asks[start:start + EVAL_BATCH] for arm in ARMS]
        t = time.time()
        texts = loaded.replies(requests)
        each = (time.time() - t) / len(requests)
        for (arm, messages, _), reply in zip(requests, texts):
            yield arm.name, messages[0]["content"], reply, each


def _replies(loaded: LoadedRun, asks: list[tuple[int, int, str]], n_prompts: int, gen: GenerationConfig,
             progress: _Progress) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Every arm with the same settings and seed per prompt; (replies, seconds) per arm."""
    replies: dict[str, list[str]] = {a.name: [] for a in ARMS}
    gen_s = {a.name: 0.0 for a in ARMS}
    for arm, prompt, reply, seconds in _batched(loaded, [(p, seeded_for(gen, k * n_prompts + i)) for k, i, p in asks]):
        gen_s[arm] += seconds
        replies[arm].append(reply)
        progress.reply("generate", arm, prompt, reply)
    return replies, gen_s


def _retention_replies(loaded: LoadedRun, items: list, gen: GenerationConfig,
                       progress: _Progress) -> dict[str, list[dict]]:
    retained: dict[str, list[dict]] = {a.name: [] for a in ARMS}
    asks = [(item.prompt, seeded_for(gen, i)) for i, item in enumerate(items)]
    for j, (arm, prompt, reply, _) in enumerate(_batched(loaded, asks)):
        item = items[j // len(ARMS)]
        retained[arm].append({"prompt": prompt, "reply": reply, "expected": list(item.expected), "passed": item.passed(reply)})
        progress.reply("retention", arm, prompt, reply)
    return retained


def _score_arms(loaded: LoadedRun, results: dict[str, dict], replies: dict[str, list[str]],
                retained: dict[str, list[dict]], gen_s: dict[str, float], scorer: PersonaScorer,
                copies: CopyDetector) -> dict[str, list]:
    """Fill each arm's rates into ``results``; the per-reply scores per arm."""
    scores = {}
    for arm in ARMS:
        arm_scores = scorer.score(replies[arm.name])
        for s, reply in zip(arm_scores, replies[arm.name]):
            s.in_character = s.in_character and not copies.copied(reply)  # reciting the book is not talking
        scores[arm.name] = arm_scores
        n = len(arm_scores)
        r = results[arm.name]
        r["in_character_rate"] = round(sum(s.in_character for s in arm_scores) / n, 4)
        r["persona_score"] = round(sum(s.margin for s in arm_scores) / n, 4)
        r["similarity_character"] = round(sum(s.similarity_character for s in arm_scores) / n, 4)
        r["similarity_generic"] = round(sum(s.similarity_generic for s in arm_scores) / n, 4)
        r["marker_rate"] = round(sum(bool(s.markers) for s in arm_scores) / n, 4)
        r.update(reply_stats(replies[arm.name], copies))
        ret = retained[arm.name]
        r["retention_rate"] = round(sum(x["passed"] for x in ret) / len(ret), 4) if ret else None
        r["retention"] = ret
        r["generation_s"] = round(gen_s[arm.name], 2)
        r["adapter"] = arm.adapter
        r["system_prompt"] = loaded.messages_for(arm, [])[0]["content"]
    return scores


def _meta(loaded: LoadedRun, character: str, data_dir: Path, valid_records: int, valid_tokens: int, device: str) -> dict:
    return {"run": loaded.run.name, "run_path": str(loaded.run.path), "character": loaded.info.get("display_name")
            or character, "created": now_iso(), "data": str(data_dir),
            "model": loaded.info.get("model", {}), "valid_records": valid_records, "valid_tokens": valid_tokens,
            "machine": f"{platform.system()} {platform.machine()}, {_cpu_count()} CPUs",
            "backend": loaded.info.get("backend"), "device": device}


def _result_config(loaded: LoadedRun, gen: GenerationConfig, retention_gen: GenerationConfig,
                   prompts_file: str | None, prompt_list: list[str], samples: int, scorer: PersonaScorer,
                   copies: CopyDetector) -> dict:
    return {
        "generation": gen.to_dict(),
        "seed_per_reply": "generation.seed + sample * prompts + prompt index (the same for every arm)",
        "retention_max_tokens": retention_gen.max_tokens,
        "prompts_file": prompts_file,
        "prompts": len(prompt_list),
        "samples_per_prompt": samples,
        "persona": {**scorer.config(), "copy_n": copies.n},
        "train": loaded.info.get("config", {}),
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write(out_dir: Path, result: dict, samples: list[dict], run: RunDir, arms: list[str], t0: float) -> None:
    stage = staging_dir(out_dir)
    try:
        plot_loss(run.metrics, stage / "loss.png", f"{run.name}: training", start_val=result["prompted"]["loss"])
        plot_persona({a: [s["scores"][a]["margin"] for s in samples] for a in arms}, stage / "persona.png")
        result["timings"]["total_s"] = round(time.time() - t0, 2)
        atomic_write_jsonl(stage / "samples.jsonl", samples)
        atomic_write_text(stage / "report.html", render_html(result, samples, arms))
        atomic_write_json(stage / "eval.json", result)
        atomic_replace_dir(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
