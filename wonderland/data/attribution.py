"""Speaker attribution for quoted spans.

Each span gets a speaker and how it was decided:

* ``explicit``: a speech verb next to a name, in either order, right after the span
  (`` `…,' said the Hatter ``, `` `…' the Hatter went on ``) or introducing it
  (`` the Hatter said, `…' ``, `` the White Rabbit, who said in a low voice, `…' ``, or a narration
  paragraph ending in a colon before a song); a later span of the same paragraph continues it when
  the narration in between names nobody else, no group, and starts no new scene;
* ``pronoun``: `` `…,' he said `` resolved to the latest grammatical subject (or speaker) of a
  compatible gender, learnt from the book's own he/she/it usage;
* ``implicit``: an unattributed paragraph of pure speech in an A–B–? exchange goes to A;
* ``unknown``: anything else, including lines of a group (``they both cried``; flagged ``group``)
  and of unnamed speakers (``said one of the jury``).

Precision comes first: a name inside someone else's speech is never looked at, a name in narration
counts only as a grammatical subject or next to a speech verb ("asked the Hatter" names the
listener), and every rule stands down when another character could be meant.
"""

from __future__ import annotations

import re
from bisect import bisect_right, insort
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from wonderland.data.book import Book
from wonderland.data.quotes import QuoteStyle, RawSpan, detect_style, find_spans

_VERB_WORDS = (
    "said says cried replied answered asked added remarked exclaimed shouted screamed shrieked whispered "
    "muttered murmured repeated began interrupted observed continued thought roared growled sighed sobbed "
    "yelled pleaded persisted retorted returned inquired enquired grumbled bawled suggested explained "
    "declared insisted protested agreed urged ventured whimpered panted gasped squeaked snapped demanded "
    "responded stammered hissed sang read cackled echoed mused wondered moaned groaned faltered chorused "
    "called cried laughed sneered whined croaked hinted concluded resumed "
    "saying shouting crying screaming singing muttering whispering repeating exclaiming asking calling"
).split()
VERB = r"(?i:went\s+on|broke\s+in|called\s+out|cried\s+out|" + "|".join(sorted(set(_VERB_WORDS), key=len, reverse=True)) + r")\b"
# verbs whose object, right after them, is the one spoken to: "she asked the Hatter, `…'"
_ADDRESSING = re.compile(r"(?i:asked|answered|interrupted|urged|thanked|begged|called)\b")
_ADV = r"(?:(?:[a-z]+ly|then|again|at\s+once|both|all|together|also|still|now|only|first|at\s+last)\s+)"
_CAP = r"[A-Z][a-z]+"
_NAME = (
    r"(?P<art>(?:[Tt]he|[Hh]is|[Hh]er|[Tt]heir|[Oo]ur|[Mm]y)\s+(?:[a-z]+\s+){0,2}"
    r"|(?:poor|little|old|young|dear|good|great|tiny|big|wretched|miserable)\s+)?"
    r"(?P<name>" + _CAP + r"(?:[ \t\n]+" + _CAP + r"){0,2}(?:[ \t\n]+of[ \t\n]+" + _CAP + r")?)"
)
_NAME2 = _NAME.replace("?P<art>", "?:").replace("?P<name>", "?P<name2>")
_PRON = r"(?P<pron>he|she|it|they|we|He|She|It|They|We)"
_SP = r"[ \t\n]+"

# right after the closing quote
_AFTER = [
    ("verb_name", re.compile(r"(?:" + _ADV + r")?" + VERB + r"(?:" + _SP + _ADV + r")?" + _SP + _NAME
                             + r"(?P<and>" + _SP + r"and" + _SP + _NAME2 + r")?")),
    ("name_verb", re.compile(_NAME + r"(?P<and>" + _SP + r"and" + _SP + _NAME2 + r")?" + _SP
                             + r"(?:" + _ADV + r")*" + VERB)),
    ("pron_verb", re.compile(_PRON + _SP + r"(?:" + _ADV + r")*" + VERB)),
    ("verb_pron", re.compile(VERB + _SP + _PRON + r"\b")),
]
# an unnamed speaker: `…,' said a sleepy voice / one of the jury asked
_AFTER_OTHER = re.compile(
    r"(?:" + VERB + _SP + r"(?:a|an|one|another|some|the|his|her)\b(?!" + _SP + _CAP + r")"
    r"|(?:[Oo]ne|[Aa]nother|[Ss]ome|[Aa]|[Aa]n|[Tt]he)" + _SP + r"(?:[a-z\-]+" + _SP + r"){0,4}" + VERB + r")"
)
_NAMED_AFTER = re.compile(r"(?:" + VERB + _SP + r")?(?:[Tt]he" + _SP + r")?" + _CAP)
# introducing the quote: the last clause of the narration before it
_BEFORE = [
    ("who_verb", re.compile(_NAME + r",\s+who\s+(?:" + _ADV + r")*" + VERB)),
    ("name_verb", re.compile(_NAME + _SP + r"(?:" + _ADV + r")*" + VERB)),
    ("verb_name", re.compile(VERB + _SP + _NAME)),
    ("pron_verb", re.compile(r"\b" + _PRON + _SP + r"(?:" + _ADV + r")*" + VERB)),
]
_BEFORE_AND = re.compile(
    r"^(?:(?:and|but|so|then|here|just\s+then)\s+)*"
    r"(?:(?:in|at|on|after|before|during|for|by)\s+(?:[a-z]+\s+){0,4}?)?"  # "and in a very short time the Queen …"
    + _NAME + r"\b[\s\S]*?\b(?:and|then)\s*(?:,[^,]{0,80},\s*)?(?:then\s+)?(?:"  # "and, after glaring at her, screamed"
    + _ADV + r")*" + VERB
)
# the King, who had been busily writing in his note-book, cackled out `…'
_BEFORE_REL = re.compile(
    r"(?:^|\s)" + _NAME + r",\s+who\b[^.;!?]*?,\s+(?:" + _ADV + r")*" + VERB + r"(?:\s+(?:out|aloud|up))?[,:]?\s*$"
)
# at last it unfolded its arms, took the hookah out of its mouth, and said, `…'
_BEFORE_PRON_AND = re.compile(
    r"\b" + _PRON + r"\s+[a-z]+\b[^.;!?]*?\band\s+(?:then\s+)?(?:" + _ADV + r")*" + VERB + r"[^.;!?]{0,40}$"
)
# the clause before a quote introduces it: it ends in , : -- or has a speech verb among its last words
# ("the Queen said severely `…'", "and said to the Knave `…'")
_TAIL_OK = re.compile(r"(?:[,:\-\u2014]|" + VERB + r"(?:\s+[\w']+){0,6})\s*\(?\s*$")

_STOP = set(
    "I He She It They We You The This That These Those Then But And So Or Oh Here There What Why How When Where "
    "Who Whom Which Yes No Well Now Come Alas Ah Do Don Your His Her Its Their My Our One Some All Everybody "
    "Nobody Everyone Anybody Somebody Nothing Presently Just Once After Before As At In On If For Not Only "
    "Majesty Sir Madam Miss Mrs Mr Let Please Perhaps First Next Last Soon Still Even Suddenly Again Quite "
    "Very Chapter".split()
)
# gender evidence: forms that cannot be an object pointing at someone else ("her", "him" and "it" can:
# "the Caterpillar called after her")
_PRON_ANY = re.compile(r"\b(he|his|himself|she|hers|herself|its|itself)\b", re.I)
_PRON_CLASS = {"he": "m", "his": "m", "him": "m", "himself": "m", "she": "f", "her": "f", "hers": "f",
               "herself": "f", "it": "n", "its": "n", "itself": "n"}
_TITLE_GENDER = {"king": "m", "duke": "m", "lord": "m", "sir": "m", "mr": "m", "father": "m", "brother": "m",
                 "boy": "m", "man": "m", "prince": "m", "uncle": "m", "queen": "f", "duchess": "f", "lady": "f",
                 "mrs": "f", "miss": "f", "mother": "f", "sister": "f", "girl": "f", "princess": "f", "aunt": "f"}
_SENT_END = re.compile(r"[.!?;]")
_GROUP_WORDS = re.compile(r"\b(?:they|we|everybody|everyone|all of them|the others|the whole party|the party|"
                          r"the crowd|the jury|in chorus)\b", re.I)
_CLAUSE_END = re.compile(r"[.!?;:,(]|--")


@dataclass
class Span:
    index: int
    start: int
    end: int
    line: int
    chapter: int
    text: str
    block: int
    speaker: str | None = None
    attribution: str = "unknown"
    group: bool = False
    other: bool = False  # spoken by someone unnamed (said a voice, one of the jury asked)
    rule: str = ""

    def record(self) -> dict:
        r = {"line": self.line, "text": self.text, "speaker": self.speaker, "attribution": self.attribution,
             "chapter": self.chapter}
        if self.group:
            r["group"] = True
        return r


@dataclass
class Analysis:
    book: Book
    style: QuoteStyle
    spans: list[Span]
    blocks: list[tuple[int, int]]  # (start, end) offsets of each paragraph-or-merged-paragraphs
    names: dict[str, str]  # surface form -> canonical speaker
    uses_article: dict[str, bool]  # canonical -> usually written "the X"
    genders: dict[str, Counter] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def speaker_counts(self) -> list[tuple[str, int]]:
        c = Counter(s.speaker for s in self.spans if s.speaker)
        return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))

    def display_name(self, canonical: str) -> str:
        return f"the {canonical}" if self.uses_article.get(canonical) else canonical


def _clean_name(raw: str) -> str | None:
    words = raw.split()
    keep = []
    for w in words:
        if w in _STOP and w != "of":
            break
        keep.append(w)
    while keep and keep[-1] == "of":
        keep.pop()
    name = " ".join(keep)
    return name or None


def analyse(book: Book, warn=None) -> Analysis:
    """Find every quoted span of ``book`` and attribute it."""
    text = book.text
    style = detect_style(text[book.start:book.end])
    warnings: list[str] = []

    def _warn(msg: str) -> None:
        warnings.append(msg)
        if warn:
            warn(msg)

    raw = find_spans(text, book.start, book.end, style, line_of=book.line_of, warn=_warn)
    blocks, block_of = _blocks(text, book.start, book.end, raw)
    spans = [Span(i, r.start, r.end, book.line_of(r.start), book.chapter_of(r.start), r.text, block_of[i])
             for i, r in enumerate(raw)]
    an = Analysis(book, style, spans, blocks, {}, {}, warnings=warnings)
    by_block: dict[int, list[Span]] = defaultdict(list)
    for s in spans:
        by_block[s.block].append(s)
    # 1. explicit attributions with any capitalised name; collect speaker names
    hits = _explicit_hits(text, by_block, blocks)
    _set_names(an, hits)
    # 2. mention regex over the known names; subjects and genders from narration
    mention_re = _mention_regex(an.names)
    subj_re = _subject_regex(mention_re)
    events, genders = _subjects_and_genders(text, _narration_ranges(spans, book), an.names, mention_re, subj_re)
    events_named = _apply_explicit(spans, hits.found, an.names)
    events.extend(events_named)
    events.sort()
    an.genders = dict(genders)
    # 3. pronouns, in book order (a resolved speaker is in focus for the next pronoun)
    _resolve_pronouns(an, hits.pron_hits, events, events_named, genders)
    # 4. continuation inside a paragraph: narration between names nobody else
    _continuations(text, by_block, an.names, mention_re, subj_re)
    # 5. turn-taking: A, B, ? -> A (pure-speech paragraphs of one exchange)
    _implicit(an, by_block, text)
    return an


@dataclass
class _Hits:
    found: dict[int, tuple[str, int, bool]] = field(default_factory=dict)  # span index -> (name, name offset, group)
    pron_hits: dict[int, tuple[str, int]] = field(default_factory=dict)  # span index -> (pronoun, offset)
    surface: Counter = field(default_factory=Counter)
    article: Counter = field(default_factory=Counter)


def _explicit_hits(text: str, by_block: dict[int, list[Span]], blocks: list[tuple[int, int]]) -> _Hits:
    hits = _Hits()
    for b, bspans in by_block.items():
        for k, s in enumerate(bspans):
            hit = _hit_for(text, by_block, blocks, b, k)
            if hit is not None:
                _record_hit(hits, s, hit)
    return hits


def _hit_for(text: str, by_block: dict[int, list[Span]], blocks: list[tuple[int, int]], b: int, k: int):
    """The speech-verb match that attributes span ``k`` of paragraph ``b``, or None."""
    bspans = by_block[b]
    bstart, bend = blocks[b]
    s = bspans[k]
    after_start = s.end + 1
    after_end = bspans[k + 1].start if k + 1 < len(bspans) else bend
    before_start = bspans[k - 1].end + 1 if k else bstart
    hit = _match_after(text, after_start, after_end)
    if hit is None or _is_pronoun(hit):
        # a name introducing the quote beats a pronoun after it
        before = _match_before(text, before_start, s.start)
        if before is not None and (hit is None or not _is_pronoun(before)):
            hit = before
    if hit is None and k == 0 and b > 0 and not text[bstart:s.start].strip():
        # a paragraph that opens with the quote, after "…, singing a sort of lullaby:--"
        pb = by_block.get(b - 1)
        intro_start = pb[-1].end + 1 if pb else blocks[b - 1][0]
        if re.search(r":\s*(?:--|\u2014)?\s*$", text[intro_start:blocks[b - 1][1]]):
            hit = _match_before(text, intro_start, blocks[b - 1][1], intro=True)
    return hit


def _record_hit(hits: _Hits, s: Span, hit) -> None:
    kind, m, off = hit
    if kind == "other":
        s.other = True
        return
    if kind == "group":
        s.group = True
        return
    if "pron" in m.groupdict() and m.group("pron"):
        p = m.group("pron").lower()
        if p in ("they", "we"):
            s.group = True
        else:
            hits.pron_hits[s.index] = (p, off + m.start("pron"))
        return
    name = _clean_name(m.group("name"))
    if not name:
        return
    grp = bool(m.groupdict().get("and"))
    hits.found[s.index] = (name, off + m.start("name"), grp)
    if not grp:
        hits.surface[name] += 1
        if m.group("art") and m.group("art").lower().startswith("the"):
            hits.article[name] += 1


def _set_names(an: Analysis, hits: _Hits) -> None:
    names = _canonical_names(hits.surface)
    an.names = names
    an.uses_article = {}
    for form, canon in names.items():
        an.uses_article[canon] = an.uses_article.get(canon, False) or hits.article[form] * 2 > hits.surface[form]


def _subject_regex(mention_re: re.Pattern) -> re.Pattern:
    return re.compile(
        r"(?:(?:^\s*|\n[ \t]*\n\s*|[.!?;:]\s+|--\s*|\(\s*)(?:(?:[Aa]nd|[Bb]ut|[Tt]hen|[Ss]o|[Hh]ere|[Hh]owever|[Jj]ust|[Nn]ow|[Ss]uddenly)"
        r",?\s+)*|\b(?:was|is)\s+)(?:[Tt]he\s+(?:[a-z]+\s+){0,2})?(?:" + mention_re.pattern + r")"
    )


def _subjects_and_genders(text: str, narr, names: dict[str, str], mention_re: re.Pattern,
                          subj_re: re.Pattern) -> tuple[list[tuple[int, str]], dict[str, Counter]]:
    """(offset, canonical) of every grammatical subject in narration, and gender evidence: the
    first he/she/its… after a named subject, in its clause, before another name."""
    events: list[tuple[int, str]] = []
    genders: dict[str, Counter] = defaultdict(Counter)
    for a, z in narr:
        seg = text[a:z]
        for m in subj_re.finditer(seg):
            canon = names[_norm_ws(m.group("m"))]
            events.append((a + m.start("m"), canon))
            rest = seg[m.end(): m.end() + 80]
            nxt = mention_re.search(rest)
            cut = min([len(rest)] + [x.start() for x in [nxt, _CLAUSE_END.search(rest)] if x])
            pm = _PRON_ANY.search(rest[:cut])
            if pm:
                genders[canon][_PRON_CLASS[pm.group(1).lower()]] += 1
    return events, genders


def _apply_explicit(spans: list[Span], found: dict[int, tuple[str, int, bool]],
                    names: dict[str, str]) -> list[tuple[int, str]]:
    events_named: list[tuple[int, str]] = []
    for idx, (name, off, grp) in found.items():
        s = spans[idx]
        if grp:
            s.group = True
            continue
        canon = names.get(name)
        if canon is None:
            continue
        s.speaker, s.attribution, s.rule = canon, "explicit", "explicit"
        events_named.append((off, canon))
    return events_named


def _resolve_pronouns(an: Analysis, pron_hits: dict[int, tuple[str, int]], events: list[tuple[int, str]],
                      events_named: list[tuple[int, str]], genders: dict[str, Counter]) -> None:
    """The latest candidate the book clearly shows with this pronoun; else the protagonist, if so;
    else the latest candidate the pronoun can fit."""
    book, text = an.book, an.book.text
    para_starts = _paragraph_starts(text, book.start, book.end)
    named = Counter(c for _, c in events_named)
    protagonist = named.most_common(1)[0][0] if named else None
    for idx in sorted(pron_hits):
        p, off = pron_hits[idx]
        s = an.spans[idx]
        cls = _PRON_CLASS[p]
        pi = bisect_right(para_starts, off) - 1
        floor = para_starts[max(0, pi - 2)]
        window = [c for o, c in reversed(events[: bisect_right(events, (off, "\uffff"))]) if o >= floor]
        cand = next((c for c in window if _compatible(c, cls, genders, evidence=True)), None)
        if cand is None and protagonist and _compatible(protagonist, cls, genders, evidence=True):
            cand = protagonist
        if cand is None:
            cand = next((c for c in window if _compatible(c, cls, genders)), None)
        if cand:
            s.speaker, s.attribution, s.rule = cand, "pronoun", "pronoun"
            insort(events, (off, cand))


def _continuations(text: str, by_block: dict[int, list[Span]], names: dict[str, str], mention_re: re.Pattern,
                   subj_re: re.Pattern) -> None:
    for b, bspans in by_block.items():
        for k, s in enumerate(bspans):
            if s.speaker or s.group or s.other or k == 0:
                continue
            prev = bspans[k - 1]
            if not prev.speaker:
                continue
            between = text[prev.end + 1: s.start]
            others = {names[_norm_ws(m.group("m"))] for m in mention_re.finditer(between)}
            others.discard(prev.speaker)
            if others and _subject_in(between, others, names, subj_re):
                continue
            if _GROUP_WORDS.search(between):
                continue  # "…, and they all crowded round it, asking, `…'"
            parts = _SENT_END.split(between)
            tail = parts[-1].strip(" \t\n()")
            if len(parts) > 1 and tail and not re.search(VERB, tail):
                continue  # a new sentence of narration that introduces nobody: "There was no `…'"
            s.speaker, s.attribution, s.rule = prev.speaker, prev.attribution, "continuation"


def _is_pronoun(hit) -> bool:
    m = hit[1]
    return m is not None and bool(m.groupdict().get("pron"))


def _match_after(text: str, a: int, z: int):
    seg = text[a:z]
    lead = len(seg) - len(seg.lstrip(" \t\n,.;:)"))
    seg2 = seg[lead:]
    if not seg2:
        return None
    m = _AFTER_OTHER.match(seg2)
    if m and not _NAMED_AFTER.match(seg2):  # `…,' said the Hatter: "the" + capital is a name
        return "other", m, a + lead
    for kind, rx in _AFTER:
        m = rx.match(seg2)
        if not m:
            continue
        if kind == "name_verb" and m.group("art") and m.group("art").startswith("The"):
            continue  # a new sentence, not an attribution
        if kind in ("name_verb", "verb_name") and not _clean_name(m.group("name")):
            continue
        if kind in ("name_verb",) and re.match(r"\s*nothing\b", seg2[m.end():]):
            continue
        return kind, m, a + lead
    if re.match(r"(?:they|we)\b", seg2):
        return "group", None, a + lead
    return None


def _match_before(text: str, a: int, z: int, intro: bool = False):
    """The clause introducing a quote. ``intro``: a narration paragraph ending in a colon that
    introduces the next paragraph (a song, a recitation): the speech verb need not end the clause."""
    seg = text[a:z]
    if not seg.strip() or not _TAIL_OK.search(seg):
        return None
    cut = 0
    for m in _SENT_END.finditer(seg):
        if seg[m.end():].strip():
            cut = m.end()
    tail = seg[cut:]
    off = a + cut
    best = None
    for kind, rx in _BEFORE:
        for m in rx.finditer(tail):
            if kind != "pron_verb" and not _clean_name(m.group("name")):
                continue
            if kind == "name_verb" and re.search(r",\s*$", tail[: m.start()]) and "who" in tail[max(0, m.start() - 6): m.start()]:
                continue
            if kind == "verb_name" and _ADDRESSING.match(tail, m.start()):
                continue  # "and asked the Hatter, `…'": the Hatter is spoken to
            # the verb must end the clause: only a short adverbial may follow it
            rest = tail[m.end():]
            if len(rest.split()) > 10 and not intro or _GROUP_WORDS.search(rest):
                continue  # "said the Hatter, and they all crowded round him, asking, `…'": not his
            if best is None or m.end() > best[1].end():
                best = (kind, m)
    if best is None:
        m = _BEFORE_REL.search(tail)
        if m and _clean_name(m.group("name")):
            return "name_rel_verb", m, off
        m = _BEFORE_AND.match(tail.lstrip())
        if m and len(tail[m.end():].split()) <= 10 and _clean_name(m.group("name")):
            return "name_and_verb", m, off + (len(tail) - len(tail.lstrip()))
        m = None if intro else _BEFORE_PRON_AND.search(tail)
        if m:
            return "pron_and_verb", m, off
        return None
    kind, m = best
    if kind == "name_verb" and re.search(_CAP + r"\s+and\s*$", tail[: m.start()]):
        return "group", None, off
    return kind, m, off


def _canonical_names(surface: Counter) -> dict[str, str]:
    """surface form -> canonical name; ``Rabbit`` joins ``White Rabbit`` when that is the only
    multi-word name ending in it."""
    names = {n: n for n in surface}
    multi = [n for n in surface if " " in n and " of " not in n]
    for n in surface:
        if " " in n:
            if " of " in n:  # Queen of Hearts -> Queen, when Queen speaks too
                head = n.split(" of ")[0]
                if head in surface:
                    names[n] = head
            continue
        longer = [m for m in multi if m.split()[-1] == n]
        if len(longer) == 1:
            names[n] = longer[0]
    # at most two hops, no cycles: "Queen of Hearts" -> "Queen" -> ("Red Queen", if that were the only one)
    return {n: names[c] for n, c in names.items()}


def _mention_regex(names: dict[str, str]) -> re.Pattern:
    """Any surface form of a known speaker (matches nothing when there is none)."""
    if not names:
        return re.compile(r"(?P<m>(?!))")
    forms = sorted(names, key=len, reverse=True)
    alts = "|".join(r"[ \t\n]+".join(map(re.escape, f.split())) for f in forms)
    return re.compile(r"\b(?P<m>" + alts + r")\b")


def _norm_ws(s: str) -> str:
    return " ".join(s.split())


def _subject_in(seg: str, who: set[str], names: dict[str, str], subj_re) -> bool:
    """Does ``seg`` contain a clause whose subject (or speech verb) is one of ``who``?"""
    for m in subj_re.finditer(seg):
        if names[_norm_ws(m.group("m"))] in who:
            return True
    for kind, rx in _BEFORE[:3]:
        for m in rx.finditer(seg):
            n = _clean_name(m.group("name") or "")
            if n and names.get(n) in who:
                return True
    return False


def _compatible(name: str, cls: str, genders: dict[str, Counter], evidence: bool = False) -> bool:
    """Can ``name`` be referred to by a pronoun of class ``cls``? With ``evidence``, only if the book
    (or a gendered title: King, Duchess) says so."""
    c = genders.get(name)
    total = sum(c.values()) if c else 0
    if evidence and total:
        return c[cls] / total >= 0.6
    if total >= 2:
        return c[cls] >= 1 and c[cls] / total >= 0.2
    lex = _TITLE_GENDER.get(name.split()[-1].lower()) or _TITLE_GENDER.get(name.split()[0].lower())
    if lex:
        return lex == cls
    if evidence:
        return False
    return total == 0 or c[cls] > 0


_PARA_BREAK = re.compile(r"\n[ \t]*\n")


def _paragraph_starts(text: str, a: int, z: int) -> list[int]:
    """Offsets where the paragraphs of ``text[a:z]`` start."""
    return [a] + [m.end() for m in _PARA_BREAK.finditer(text, a, z)]


def _blocks(text: str, a: int, z: int, raw: list[RawSpan]):
    """Paragraphs (blank-line separated), merged where a span crosses a paragraph break."""
    pstarts = _paragraph_starts(text, a, z)
    pend = pstarts[1:] + [z]
    para_block = list(range(len(pstarts)))
    for r in raw:
        p0 = bisect_right(pstarts, r.start) - 1
        p1 = bisect_right(pstarts, max(r.start, r.end)) - 1
        for p in range(p0 + 1, p1 + 1):
            para_block[p] = para_block[p0]
    blocks: list[tuple[int, int]] = []
    block_idx = {}
    for p, root in enumerate(para_block):
        if root == p:
            block_idx[p] = len(blocks)
            blocks.append((pstarts[p], pend[p]))
        else:
            bi = block_idx[root]
            blocks[bi] = (blocks[bi][0], pend[p])
            block_idx[p] = bi
    block_of = [block_idx[bisect_right(pstarts, r.start) - 1] for r in raw]
    return blocks, block_of


def _narration_ranges(spans: list[Span], book: Book) -> list[tuple[int, int]]:
    """Offsets of all narration (text outside quotes) in the body."""
    out = []
    pos = book.start
    for s in spans:
        if s.start > pos:
            out.append((pos, s.start))
        pos = max(pos, s.end + 1)
    if pos < book.end:
        out.append((pos, book.end))
    return out


def _implicit(an: Analysis, by_block: dict[int, list[Span]], text: str) -> None:
    blocks = an.blocks

    def sole_speaker(b):
        ss = by_block.get(b)
        if not ss or any(s.group or s.other for s in ss):
            return None
        sp = {s.speaker for s in ss}
        return sp.pop() if len(sp) == 1 else None

    def pure(b):
        ss = by_block.get(b)
        if not ss:
            return False
        a, z = blocks[b]
        rest, pos = [], a
        for s in ss:
            rest.append(text[pos:s.start])
            pos = s.end + 1
        rest.append(text[pos:z])
        return not re.search(r"[A-Za-z]", "".join(rest))

    for b in sorted(by_block):
        ss = by_block[b]
        if any(s.speaker or s.group or s.other for s in ss) or not pure(b):
            continue
        if b < 2 or not by_block.get(b - 1) or not by_block.get(b - 2):
            continue
        a_sp, b_sp = sole_speaker(b - 2), sole_speaker(b - 1)
        if not a_sp or not b_sp or a_sp == b_sp:
            continue
        # the paragraph before must end as a conversational turn, not introduce a song or a
        # recitation ("…, singing a sort of lullaby:", "the words came very queer indeed:--")
        tail = text[by_block[b - 1][-1].end + 1: blocks[b - 1][1]].strip()
        if len(tail.split()) > 20 or re.search(r"[:\-—]$", tail):
            continue
        nxt = sole_speaker(b + 1) if by_block.get(b + 1) else None
        if nxt == a_sp:
            continue
        for s in ss:
            s.speaker, s.attribution, s.rule = a_sp, "implicit", "implicit"
