"""Persona pairs: everyday prompts answered with the character's own lines, found by retrieval.

Only the *prompts* and their topic keywords are written here; every answer is one of the
character's lines from the book, chosen by weighted keyword overlap (idf) between the topic and the
line. A topic with no matching line produces nothing. Lines about the book's other characters are
found by their names.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass

# (topic, prompts, keywords). Keywords are plain English, not tied to one book.
TOPICS: list[tuple[str, list[str], list[str]]] = [
    ("time", ["What time is it?", "Do you know what time it is?", "Have you got the time?", "Are we late?",
              "Is it tea-time yet?", "How do you keep track of time?"],
     ["time", "clock", "o'clock", "watch", "hour", "late", "day", "month", "year", "minute", "half-past",
      "week", "morning", "dinner", "always"]),
    ("riddle", ["Tell me a riddle.", "Do you know any riddles?", "Can you ask me a puzzle?",
                "What's the answer to your riddle?"],
     ["riddle", "riddles", "answer", "guess", "idea", "raven", "writing-desk", "puzzle"]),
    ("tea", ["Would you like some tea?", "Shall I pour you a cup of tea?", "What would you like to drink?",
             "Is there any more tea?"],
     ["tea", "cup", "clean", "drink", "milk", "wine", "pour", "tea-time", "tea-things", "wash"]),
    ("food", ["Are you hungry?", "What shall we eat?", "What's your favourite food?"],
     ["eat", "bread", "butter", "bread-and-butter", "treacle", "hungry", "dinner", "tarts", "jam", "cake", "soup"]),
    ("song", ["Sing me a song.", "Do you know any songs?", "Can you sing?", "How does that song go?"],
     ["sing", "song", "sang", "verse", "concert", "twinkle", "music", "tune"]),
    ("identity", ["Who are you?", "Tell me about yourself.", "What do you do all day?", "What is your job?"],
     ["i'm", "am", "my", "own", "man", "poor", "keep", "sell", "work", "name"]),
    ("meaning", ["What do you mean?", "Can you explain that?", "That makes no sense.",
                 "Say what you mean."],
     ["mean", "meaning", "say", "same", "thing", "explain", "sense", "understand"]),
    ("rude", ["You're being very rude.", "Mind your manners!", "What do you think of my hair?"],
     ["rude", "civil", "remarks", "personal", "hair", "cutting", "manners", "opinion"]),
    ("mood", ["How are you today?", "Are you mad?", "Why do you look so sad?", "Are you nervous?"],
     ["mad", "poor", "nervous", "sad", "glad", "tired", "wrong", "mournful", "quarrelled"]),
    ("move", ["Where should I sit?", "Shall we move?", "Is there room for me?"],
     ["move", "place", "room", "sit", "seat", "round", "chair"]),
    ("talk", ["Can I say something?", "I don't think...", "May I ask a question?"],
     ["talk", "speak", "ask", "question", "think", "shouldn't", "opinion"]),
    ("farewell", ["Goodbye!", "I have to go now.", "See you later."],
     ["go", "gone", "leave", "goodbye", "away", "way", "floor", "down"]),
]
# prompts about the book's other characters; {name} is "the March Hare" / "Alice"
CHARACTER_PROMPTS = ["What do you think of {name}?", "Tell me about {name}.", "Do you know {name}?"]

_WORD = re.compile(r"[a-z][a-z'\-]*")
_STOP = set(
    "a an and are as at be but by do does did for from had has have he her him his how i if in is it its me "
    "my of on or she so that the their them then there they this to was we were what when where which who "
    "why will with would you your yes no not all any can could shall should very just now well oh".split()
)


def _stem(w: str) -> str:
    w = w.strip("'-")
    if w.endswith("'s"):
        w = w[:-2]
    for suf in ("ing", "ed", "es", "s"):
        if len(w) > len(suf) + 3 and w.endswith(suf):
            return w[: -len(suf)]
    return w


def tokens(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower())}


@dataclass
class PersonaPair:
    prompt: str
    answer_index: int  # index into the candidate lines
    topic: str
    score: float


def build_persona_pairs(lines: list[str], others: list[str], limit: int, seed: int) -> list[PersonaPair]:
    """Pick up to ``limit`` (prompt, line) pairs. ``lines``: the character's lines (one per turn);
    ``others``: display names of other characters ("the March Hare")."""
    if limit <= 0 or not lines:
        return []
    toks = [tokens(t) for t in lines]
    df = Counter(w for t in toks for w in t)
    n = len(lines)

    def idf(w: str) -> float:
        return math.log(1 + n / (1 + df[w]))

    def length_ok(i: int) -> bool:
        words = len(lines[i].split())
        return 3 <= words <= 60

    topics = [(name, prompts, {_stem(k) for k in kws}) for name, prompts, kws in TOPICS]
    for other in others:
        key = {_stem(w) for w in _WORD.findall(other.lower())} - _STOP - {"the"}
        if key:
            topics.append((f"character:{other}", [p.format(name=other) for p in CHARACTER_PROMPTS], key))

    rng = random.Random(seed)
    per_topic: list[list[PersonaPair]] = []
    for name, prompts, kws in topics:
        ranked = []
        for i, t in enumerate(toks):
            if not length_ok(i):
                continue
            hit = t & kws
            if not hit:
                continue
            if name.startswith("character:") and not kws <= t:
                continue  # all the name words, not just "Hare"
            score = sum(idf(w) for w in hit) / math.sqrt(1 + len(lines[i].split()) / 12)
            ranked.append((score, i))
        ranked.sort(key=lambda x: (-x[0], x[1]))
        ranked = [r for r in ranked if r[0] >= 1.0]
        if not ranked:
            continue
        order = prompts[:]
        rng.shuffle(order)
        pairs = []
        for j, prompt in enumerate(order):
            score, i = ranked[j % len(ranked)]
            if j >= len(ranked):  # fewer matching lines than prompts: don't repeat a line
                break
            pairs.append(PersonaPair(prompt, i, name, score))
        per_topic.append(pairs)
    # round-robin over topics so a small limit still covers many of them
    rng.shuffle(per_topic)
    out: list[PersonaPair] = []
    depth = 0
    while len(out) < limit and any(depth < len(p) for p in per_topic):
        for p in per_topic:
            if depth < len(p) and len(out) < limit:
                out.append(p[depth])
        depth += 1
    return out


def best_prompt_for(line: str, rng: random.Random) -> str | None:
    """A natural question for a line that answers nobody: the persona prompt of the best matching
    topic, if the line clearly is about one."""
    t = tokens(line)
    best, best_score = None, 0
    for name, prompts, kws in TOPICS:
        k = {_stem(w) for w in kws}
        score = len(t & k)
        if score > best_score:
            best, best_score = prompts, score
    if best is None or best_score < 2:
        return None
    return rng.choice(best)
