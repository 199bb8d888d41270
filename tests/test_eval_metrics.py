"""Distinctness, repetition, copying and retention on hand-made replies."""

from __future__ import annotations

import pytest

from wonderland.errors import UserError
from wonderland.eval.metrics import (CopyDetector, RetentionItem, distinct_n, load_retention, ngrams, reply_stats,
                                     repetition_rate, shared_opening_rate)

BOOK = [
    "Twinkle, twinkle, little bat! How I wonder what you're at!",
    "It's always six o'clock now: always tea-time, and we've no time to wash the things between whiles.",
    "Your hair wants cutting.",
]
VARIED = [
    "Tea, of course, and plenty of it, before the clock strikes.",
    "My watch is two days wrong, I told him butter wouldn't suit the works.",
    "A riddle for you: why is a raven like a writing-desk?",
    "Move down, move down, clean cups for everyone at this table.",
]


def test_ngrams():
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert ngrams(["a"], 2) == []


def test_parrot_scores_low_on_distinctness():
    parrot = ["I am nothing, and I am nothing."] * 4
    assert distinct_n(parrot, 2) < 0.25
    assert distinct_n(VARIED, 2) > 0.95
    assert distinct_n(parrot, 1) < distinct_n(VARIED, 1)
    assert distinct_n([], 2) == 0.0


def test_loop_scores_high_on_repetition():
    loop = "I am nothing and I am nothing and I am nothing and I am nothing"
    assert repetition_rate(loop) > 0.6
    assert repetition_rate(VARIED[0]) == 0.0
    assert repetition_rate("too short") == 0.0


def test_shared_opening_catches_a_verbal_tic():
    tic = ["The same old thing, I suppose! Tea?", "The same old thing, I suppose, with butter.",
           "The same old story.", "Why is a raven like a writing-desk?"]
    # the first two share "the same old" with each other and with the third: 3 of 4 replies
    assert shared_opening_rate(tic) == 0.75
    assert shared_opening_rate(VARIED) == 0.0
    assert shared_opening_rate(["Hi.", "Hi."]) == 0.0  # too short to have an opening
    assert shared_opening_rate([]) == 0.0


def test_copy_detector_catches_recitation_not_catch_phrases():
    copies = CopyDetector(BOOK, n=8)
    recital = "Oh! It's always six o'clock now: always tea-time, and we've no time, my dear."
    assert copies.copied(recital)
    assert copies.copied("twinkle twinkle little bat how i wonder what you're at")  # case, punctuation folded
    assert not copies.copied("Your hair wants cutting, and so does mine.")  # a 4-word catch-phrase
    assert not copies.copied(VARIED[0])
    assert copies.rate([recital, VARIED[0]]) == 0.5
    assert copies.rate([]) == 0.0


def test_reply_stats_for_a_parrot_and_a_talker():
    copies = CopyDetector(BOOK)
    parrot = reply_stats([BOOK[1]] * 4, copies)
    talker = reply_stats(VARIED, copies)
    assert parrot["copy_rate"] == 1.0 and talker["copy_rate"] == 0.0
    assert parrot["distinct_2"] < 0.3 < talker["distinct_2"]
    assert set(talker) == {"distinct_1", "distinct_2", "repetition_rate", "shared_opening_rate", "copy_rate",
                           "mean_words", "empty_rate"}
    assert reply_stats(["", "hi"], copies)["empty_rate"] == 0.5


def test_retention_items_and_the_packaged_set(tmp_path):
    item = RetentionItem("What is 2 + 2?", ("4", "four"))
    assert item.passed("That would be Four, of course.")
    assert not item.passed("Tea-time!")
    packaged = load_retention()
    assert len(packaged) >= 4 and all(i.expected for i in packaged)
    bad = tmp_path / "r.txt"
    bad.write_text("# comment\nWhat is 2 + 2?\n")
    with pytest.raises(UserError, match="r.txt:2"):
        load_retention(bad)


def test_world_terms_are_the_characters_chapters_and_mentions_exclude_the_prompt():
    from wonderland.eval.metrics import world_mention_rate, world_terms

    utter = [{"line": i, "chapter": 1, "speaker": "Hatter", "text": "More tea!"} for i in range(1, 41)] + \
            [{"line": i, "chapter": 2, "speaker": "Alice", "text": "Oh dear."} for i in range(41, 81)]
    book = ["More tea, the Dormouse is asleep again by the treacle well."] * 40 + \
           ["I went down the rabbit hole, said Alice, and the cat smiled."] * 40
    terms = world_terms(utter, {"Hatter"}, book)
    assert {"dormouse", "tea"} <= terms.keys() and "rabbit" not in terms
    replies = ["The Dormouse knows.", "Tea, of course!", "I like cheese."]
    assert world_mention_rate(replies, ["Who knows?", "Would you like tea?", "Food?"], terms) == round(1 / 3, 4)


def test_retention_file_errors_name_the_file_and_line(tmp_path):
    import pytest

    from wonderland.errors import UserError
    from wonderland.eval.metrics import load_retention

    bad = tmp_path / "r.txt"
    bad.write_text("# ok\nWhat is 2 + 2? | 4\nno answers here\n")
    with pytest.raises(UserError, match=r"r\.txt:3: expected 'prompt \| answer"):
        load_retention(bad)
    with pytest.raises(UserError, match="cannot be read"):
        load_retention(tmp_path / "missing.txt")
    good = tmp_path / "ok.txt"
    good.write_text("What is 2 + 2? | 4 | four\n")
    assert [(i.prompt, i.expected) for i in load_retention(good)] == [("What is 2 + 2?", ("4", "four"))]


def test_retention_answers_match_at_word_starts_not_inside_numbers():
    from wonderland.eval.metrics import RetentionItem

    four = RetentionItem("2 + 2?", ("4", "four"))
    assert four.passed("It is 4.") and four.passed("Four!") and not four.passed("It is 24.") and not four.passed("45")
    assert RetentionItem("caterpillars?", ("butterfl",)).passed("They become butterflies.")
    assert not RetentionItem("frozen water?", ("ice",)).passed("That is nice.")
