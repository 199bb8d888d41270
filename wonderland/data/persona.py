"""Persona pairs: everyday prompts answered with the character's own lines, found by retrieval.

Only the *prompts* and their topic keywords are written here; every answer is one of the
character's lines from the book, chosen by idf-weighted keyword overlap between the prompt (its own
content words count double, plus its topic's keywords) and the line. A prompt with no line scoring
above the threshold produces nothing. "Who are you?" also looks for the character's own name
("I'm a hatter"); questions about the book's other characters look for their names.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass

# (topic, prompts, keywords). Keywords are plain English, not tied to one book.
TOPICS: list[tuple[str, list[str], list[str]]] = [
    ("greeting", ["Hello!", "Good morning!", "Hi there, may I join you?", "Nice to meet you.", "Good evening!",
                  "How do you do?", "What's going on here?"],
     ["morning", "welcome", "join", "room", "sit", "glad", "hello"]),
    ("time", ["What time is it?", "Do you know what time it is?", "Have you got the time?", "Are we late?",
              "Is it tea-time yet?", "How do you keep track of time?", "What day is it today?",
              "Is your watch broken?", "How long have you been sitting here?", "Why is it always six o'clock?"],
     ["time", "clock", "o'clock", "watch", "hour", "late", "day", "month", "year", "minute", "half-past",
      "week", "morning", "tea-time"]),
    ("riddle", ["Tell me a riddle.", "Do you know any riddles?", "Can you ask me a puzzle?",
                "What's the answer to your riddle?", "I love puzzles. Got one for me?",
                "Give me something to think about."],
     ["riddle", "answer", "guess", "idea", "puzzle"]),
    ("tea", ["Would you like some tea?", "Shall I pour you a cup of tea?", "What would you like to drink?",
             "Is there any more tea?", "How do you take your tea?", "Do you want milk in your tea?",
             "Can I have a clean cup?"],
     ["tea", "cup", "clean", "drink", "milk", "wine", "pour", "tea-time", "tea-things", "wash"]),
    ("food", ["Are you hungry?", "What shall we eat?", "What's your favourite food?",
              "Would you like some bread and butter?", "Is there anything to eat?", "Pass the butter, please."],
     ["eat", "bread", "butter", "bread-and-butter", "treacle", "hungry", "dinner", "tarts", "jam", "cake",
      "soup", "food"]),
    ("song", ["Sing me a song.", "Do you know any songs?", "Can you sing?", "How does that song go?",
              "What's your favourite song?", "Will you sing for us?", "Have you ever sung at a concert?"],
     ["sing", "song", "sang", "verse", "concert", "twinkle", "music", "tune"]),
    ("identity", ["Who are you?", "Tell me about yourself.", "What do you do all day?", "What is your job?",
                  "What's your name?", "What do you do for a living?"],
     ["i'm", "name", "myself"]),
    ("meaning", ["What do you mean?", "Can you explain that?", "That makes no sense.", "Say what you mean.",
                 "I don't understand you.", "Is that the same thing?", "Could you say that again?"],
     ["mean", "meaning", "say", "same", "thing", "explain", "sense", "understand"]),
    ("rude", ["You're being very rude.", "Mind your manners!", "What do you think of my hair?",
              "That's not a nice thing to say.", "Please be polite."],
     ["rude", "civil", "remarks", "personal", "hair", "cutting", "manners", "opinion"]),
    ("mood", ["How are you today?", "Are you mad?", "Why do you look so sad?", "Are you nervous?",
              "Are you happy?", "Why are you so cross?", "Are you feeling all right?"],
     ["mad", "sad", "glad", "tired", "nervous", "afraid", "sorry", "angry", "happy", "feel"]),
    ("move", ["Where should I sit?", "Shall we move?", "Is there room for me?", "Can I sit here?",
              "Why are there so many cups on the table?"],
     ["move", "place", "room", "sit", "seat", "round", "chair"]),
    ("talk", ["Can I say something?", "May I ask you a question?", "Do you like talking?", "Tell me more.",
              "Why won't you listen to me?"],
     ["talk", "speak", "ask", "question", "say", "tell"]),
    ("farewell", ["Goodbye!", "I have to go now.", "See you later.", "I'm leaving.", "Thanks, I must be off."],
     ["go", "goodbye", "gone", "away", "later"]),
    ("trouble", ["What happened to you?", "Are you in trouble?", "What went wrong?", "Why were you sent for?"],
     ["trouble", "wrong", "matter", "sent", "happened", "fault", "poor", "mistake"]),
    ("memory", ["Do you remember what happened?", "When did it all start?", "What did you do next?"],
     ["remember", "began", "first", "after", "last", "ago", "since"]),
    ("opinion", ["Don't you agree?", "Am I right?", "Is that true?"],
     ["right", "true", "course", "wrong", "agree", "exactly", "case"]),
    ("money", ["Are you rich?", "Is that hat yours?", "How much does it cost?"],
     ["poor", "sell", "mine", "own", "money", "keep", "cost", "rich"]),
]
# prompts about the book's other characters; {name} is "the March Hare" / "Alice"
CHARACTER_PROMPTS = ["What do you think of {name}?", "Tell me about {name}.", "Do you know {name}?"]
# a line shaped like the topic counts too: a riddle is "Why is a raven like a writing-desk?"
SHAPES = {"riddle": re.compile(r"^(?:why is|what is the difference|what has|what goes)\b[^.!]*\?$", re.I)}
SHAPE_BONUS = 3.0
MAX_WORDS = 45  # persona answers are one line of talk, not a whole song
MIN_SCORE = 1.2
USES_PER_LINE = 2  # a line may answer this many persona prompts

_WORD = re.compile(r"[a-z][a-z'\-]*")
_STOP = set(
    "a an and are as at be but by do does did for from had has have he her him his how i if in is it its me "
    "my of on or she so that the their them then there they this to was we were what when where which who "
    "why will with would you your yes no not all any can could shall should very just now well oh "
    "tell know think something today really about some more like get got there's what's you're see ask go "
    "yet yourself may let me".split()
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


def content_tokens(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP} - {""}


@dataclass
class PersonaPair:
    prompt: str
    answer_index: int  # index into the candidate lines
    topic: str
    score: float


def build_persona_pairs(lines: list[str], others: list[str], limit: int, seed: int,
                        self_name: str = "", uses_per_line: int = USES_PER_LINE) -> list[PersonaPair]:
    """Pick up to ``limit`` (prompt, line) pairs. ``lines``: the character's lines (one per turn);
    ``others``: display names of other characters ("the March Hare"); ``self_name``: the character's;
    ``uses_per_line``: how many prompts (of different topics, or of one topic) one line may answer."""
    if limit <= 0 or not lines:
        return []
    toks = [tokens(t) for t in lines]
    df = Counter(w for t in toks for w in t)
    n = len(lines)

    def idf(w: str) -> float:
        return math.log(1 + n / (1 + df[w]))

    rng = random.Random(seed)
    per_topic: list[list[PersonaPair]] = []
    for name, prompts, kws, need_all in _topics(others, self_name):
        order = prompts[:]
        rng.shuffle(order)
        pairs = _topic_pairs(name, order, kws, need_all, lines, toks, idf)
        if pairs:
            per_topic.append(pairs)
    rng.shuffle(per_topic)
    return _round_robin(per_topic, limit, uses_per_line)


def _topics(others: list[str], self_name: str) -> list[tuple[str, list[str], set[str], bool]]:
    """(name, prompts, keyword stems, all keywords needed): the fixed topics, then one per other character."""
    topics = []
    for name, prompts, kws in TOPICS:
        kw = {_stem(k) for k in kws}
        if name == "identity":
            kw |= content_tokens(self_name)
        topics.append((name, prompts, kw, False))
    for other in others:
        key = content_tokens(other)
        if key:
            topics.append((f"character:{other}", [p.format(name=other) for p in CHARACTER_PROMPTS], key, True))
    return topics


def _topic_pairs(name: str, order: list[str], kws: set[str], need_all: bool, lines: list[str],
                 toks: list[set[str]], idf) -> list[PersonaPair]:
    """Each prompt of one topic with its best-scoring line (a line answers one prompt per topic)."""
    used: set[int] = set()
    pairs = []
    for prompt in order:
        own = content_tokens(prompt) - {"time"} if name != "time" else content_tokens(prompt)
        best = None
        for i, t in enumerate(toks):
            words = len(lines[i].split())
            if i in used or not 2 <= words <= MAX_WORDS:
                continue
            if need_all and not kws <= t:
                continue  # all the name's words: "March Hare", not just "Hare"
            hit = t & (kws | own)
            shaped = name in SHAPES and bool(SHAPES[name].match(lines[i]))
            if not (t & kws) and not shaped:
                continue  # the prompt's own words only rank lines that are on the topic
            score = sum(idf(w) * (2 if w in own else 1) for w in hit) / math.sqrt(1 + words / 15)
            score += SHAPE_BONUS if shaped else 0.0
            if score >= MIN_SCORE and (best is None or score > best[0]):
                best = (score, i)
        if best:
            used.add(best[1])
            pairs.append(PersonaPair(prompt, best[1], name, round(best[0], 3)))
    return pairs


def _round_robin(per_topic: list[list[PersonaPair]], limit: int, uses_per_line: int) -> list[PersonaPair]:
    """Round-robin over topics so a small limit still covers many of them; a line answers at most
    ``uses_per_line`` prompts, so one apt line does not become the answer to everything."""
    out: list[PersonaPair] = []
    answered: Counter[int] = Counter()
    depth = 0
    while len(out) < limit and any(depth < len(p) for p in per_topic):
        for p in per_topic:
            if depth < len(p) and len(out) < limit and answered[p[depth].answer_index] < uses_per_line:
                out.append(p[depth])
                answered[p[depth].answer_index] += 1
        depth += 1
    return out


def best_prompt_for(line: str, rng: random.Random) -> str | None:
    """A natural question for a line that answers nobody: a persona prompt of the topic the line is
    clearly about (two keywords or more), if any."""
    t = tokens(line)
    best, best_score = None, 0
    for name, prompts, kws in TOPICS:
        score = len(t & {_stem(w) for w in kws})
        if score > best_score:
            best, best_score = prompts, score
    if best is None or best_score < 2:
        return None
    return rng.choice(best)
