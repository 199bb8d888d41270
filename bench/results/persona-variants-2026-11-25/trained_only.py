"""Exploration helper (issue 5, 2026-11-25): the trained arm of `wonderland eval` only, on the default prompts.

usage: trained_only.py RUN_DIR [THREADS] [GENERATION_SEED]; prints each reply with its score, then a JSON summary."""
import sys, json, math, time
import torch
from wonderland.eval.evaluate import seeded_for, default_generation, load_prompts, DEFAULT_PROMPTS, _data_files, _split_lines
from wonderland.generate import load_run, ARMS
from wonderland.eval.persona import PersonaScorer
from wonderland.eval.metrics import CopyDetector, reply_stats
run = sys.argv[1]
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
gen = default_generation()
if len(sys.argv) > 3:
    from dataclasses import replace as _r; gen = _r(gen, seed=int(sys.argv[3]))
loaded = load_run(run)
prompts = load_prompts(DEFAULT_PROMPTS)
data_dir, valid, stats, utter = _data_files(loaded)
char, other = _split_lines(utter, stats, loaded.info.get("character"))
arm = [a for a in ARMS if a.name == "trained"][0]
recs = [{"messages": loaded.messages_for(arm, r["messages"])} for r in valid]
nll, n = loaded.model.loss(recs, adapter=arm.adapter)
t = time.time()
replies = ["".join(loaded.stream(arm, [{"role": "user", "content": p}], seeded_for(gen, i))).strip() for i, p in enumerate(prompts)]
scorer = PersonaScorer.from_lines(char, other); copies = CopyDetector(u["text"] for u in utter)
sc = scorer.score(replies)
ins = [s.in_character and not copies.copied(r) for s, r in zip(sc, replies)]
st = reply_stats(replies, copies)
for p, r, s, i in zip(prompts, replies, sc, ins):
    print(f"{'IN ' if i else '   '} {s.margin:+.3f} {s.markers} | {p} -> {r[:140]!r}")
print(json.dumps({"run": run, "ppl": round(math.exp(nll / n), 2), "in_character": round(sum(ins) / len(ins), 3),
                  "persona": round(sum(s.margin for s in sc) / len(sc), 4), **{k: st[k] for k in st if k in ("distinct_2", "copy_rate", "repetition_rate", "shared_opening_rate")},
                  "gen_s": round(time.time() - t, 1)}))
