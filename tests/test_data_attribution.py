"""Quoted spans and speaker attribution on short synthetic passages, in both quote styles."""

from __future__ import annotations

import textwrap

import pytest

from wonderland.data.attribution import analyse
from wonderland.data.book import parse_book
from wonderland.data.quotes import find_spans, gutenberg_to_curly, STYLES
from wonderland.errors import UserError

# A small cast so genders and names are learnt from the text itself, as in a real book.
PRELUDE = """\
  The Hatter took off his hat.  The March Hare dipped his watch in
his tea.  Alice folded her hands.  The Dormouse shook its head.
`Good morning,' said the Hatter.  `Good morning,' said Alice.
`Tea?' said the March Hare.  `Zzz,' said the Dormouse.

"""


def run(passage: str, style: str = "gutenberg"):
    text = PRELUDE + textwrap.dedent(passage)
    if style == "curly":
        text = gutenberg_to_curly(text)
    warnings: list[str] = []
    an = analyse(parse_book(text.encode("utf-8"), "test.txt"), warn=warnings.append)
    spans = [s for s in an.spans if s.line > PRELUDE.count("\n")]
    return spans, warnings


def who(spans):
    return [(s.text, s.speaker, s.attribution) for s in spans]


STYLES_UNDER_TEST = ["gutenberg", "curly"]


@pytest.mark.parametrize("style", STYLES_UNDER_TEST)
@pytest.mark.parametrize("passage, speaker", [
    ("  `Your hair wants cutting,' said the Hatter.\n", "Hatter"),
    ("  `Your hair wants cutting,' the Hatter said.\n", "Hatter"),
    ("  `Your hair wants cutting,' cried the Hatter.\n", "Hatter"),
    ("  `Your hair wants cutting,' the Hatter went on.\n", "Hatter"),
    ("  `Your hair wants cutting,' the Hatter replied.\n", "Hatter"),
    ("  `Your hair wants cutting,' the Hatter hastily remarked.\n", "Hatter"),
    ("  `Your hair wants cutting,' said the March Hare to the Hatter.\n", "March Hare"),
    ("  The Hatter said, `Your hair wants cutting.'\n", "Hatter"),
    ("  The Hatter opened his eyes, and said, `Your hair wants cutting.'\n", "Hatter"),
    ("  `Your hair wants cutting.' said the Hatter.\n", "Hatter"),  # the book's own typo: full stop
])
def test_explicit(passage, speaker, style):
    spans, _ = run(passage, style)
    assert len(spans) == 1 and spans[0].text.startswith("Your hair wants cutting")
    assert (spans[0].speaker, spans[0].attribution) == (speaker, "explicit")


@pytest.mark.parametrize("style", STYLES_UNDER_TEST)
def test_interrupted_quote_is_two_spans_of_one_speaker(style):
    spans, _ = run("  `Not at first, perhaps,' said the Hatter:  `but you could\nkeep it to half-past one.'\n",
                   style)
    assert who(spans) == [("Not at first, perhaps,", "Hatter", "explicit"),
                          ("but you could keep it to half-past one.", "Hatter", "explicit")]


@pytest.mark.parametrize("style", STYLES_UNDER_TEST)
def test_pronoun_resolves_to_the_subject_in_focus(style):
    spans, _ = run("""\
      The Hatter looked at the March Hare and Alice.  `Not I!' he
    replied.

      Alice looked at the Dormouse.  `Why not?' she asked.
    """, style)
    assert who(spans) == [("Not I!", "Hatter", "pronoun"), ("Why not?", "Alice", "pronoun")]


@pytest.mark.parametrize("style", STYLES_UNDER_TEST)
def test_implicit_turn_taking(style):
    spans, _ = run("""\
      `What day of the month is it?' said the Hatter.

      `The fourth,' said Alice.

      `Two days wrong!'
    """, style)
    assert who(spans)[-1] == ("Two days wrong!", "Hatter", "implicit")


@pytest.mark.parametrize("style", STYLES_UNDER_TEST)
def test_a_quote_does_not_inherit_the_speaker_across_a_new_scene(style):
    spans, _ = run("""\
      First the Hatter marked out a course, (`the shape doesn't matter,'
    said the Hatter,) and then the party was placed along it.  There
    was no `One, two, three, and away,' but they began running.

      `The race is over!' said the Hatter, and they all crowded round
    him, panting, and asking, `But who has won?'
    """, style)
    assert [(s.speaker, s.group) for s in spans] == [("Hatter", False), (None, False), ("Hatter", False),
                                                     (None, True)]


@pytest.mark.parametrize("style", STYLES_UNDER_TEST)
def test_group_lines_belong_to_nobody(style):
    spans, _ = run("""\
      `No room!  No room!' they cried out when they saw Alice.

      `Sh! sh!' cried the Hatter and the March Hare.
    """, style)
    assert [(s.speaker, s.group) for s in spans] == [(None, True), (None, True)]


@pytest.mark.parametrize("style", STYLES_UNDER_TEST)
def test_traps(style):
    spans, _ = run("""\
      `The Hatter said so, and the March Hare said so too,' said Alice.

      Alice looked at the Hatter.  `Why is that?'

      The King looked anxiously at the White Rabbit, who said in a low
    voice, `Your Majesty must cross-examine THIS witness.'

      `Treacle,' said a sleepy voice behind her.
    """, style)
    got = who(spans)
    assert got[0][1] == "Alice"  # names inside speech are never looked at
    assert got[1][1] is None  # named just before someone else speaks
    assert got[2][1] == "White Rabbit"  # not the King
    assert got[3][1] is None  # an unnamed speaker


@pytest.mark.parametrize("style", STYLES_UNDER_TEST)
def test_introducing_clauses(style):
    spans, _ = run("""\
      When the party came near, they all stopped, and the Hatter said
    severely `Who is this?'

      The Hatter turned crimson, and, after glaring at her for a
    moment, screamed `Off with her head!'

      The Hatter turned away from her, and said to the March Hare
    `Turn them over!'

      The Hatter began nursing his cup again, singing a sort of
    lullaby to it as he did so:

            `Speak roughly to your little cup,
              And beat it when it sneezes.'
    """, style)
    assert [(s.speaker, s.attribution) for s in spans] == [("Hatter", "explicit")] * 4


@pytest.mark.parametrize("style", STYLES_UNDER_TEST)
def test_the_one_spoken_to_is_not_the_speaker(style):
    spans, _ = run("""\
      `It must be removed,' said Alice, and she asked the Hatter, who
    was passing, `Will you remove it?'

      `Very well,' said Alice, and she called the March Hare, who was
    passing, `My dear!  Come here!'
    """, style)
    assert [s.speaker for s in spans] == ["Alice", "Alice", "Alice", "Alice"]


@pytest.mark.parametrize("style", STYLES_UNDER_TEST)
def test_multi_paragraph_song_is_one_span(style):
    spans, warnings = run("""\
      `Twinkle, twinkle, little bat!
      How I wonder what you're at!

    `Up above the world you fly,
      Like a tea-tray in the sky,'

    sang the Hatter.
    """, style)
    assert len(spans) == 1 and not warnings
    assert spans[0].text.replace("\u2019", "'") == ("Twinkle, twinkle, little bat! How I wonder what you're at! "
                             "Up above the world you fly, Like a tea-tray in the sky,")


@pytest.mark.parametrize("style", STYLES_UNDER_TEST)
def test_poem_whose_stanzas_do_not_reopen_the_quote(style):
    spans, warnings = run("""\
      The Hatter sang this, very slowly:--

    `"Will you walk a little faster?" said a whiting to a snail.
    "There's a porpoise close behind us, and he's treading on my tail.

    Will you, won't you, will you join the dance?"

    `"What matters it how far we go?" his scaly friend replied.'

      `Thank you,' said Alice.
    """, style)
    assert not warnings and len(spans) == 2
    assert spans[0].speaker == "Hatter" and "Will you, won" in spans[0].text.replace("\u2019", "'")
    assert spans[1].speaker == "Alice"


@pytest.mark.parametrize("style", STYLES_UNDER_TEST)
def test_verse_block_inside_speech(style):
    spans, warnings = run("""\
      `I had to sing

                "Twinkle, twinkle, little bat!"

    You know the song, perhaps?' said the Hatter.
    """, style)
    assert len(spans) == 1 and not warnings
    assert spans[0].speaker == "Hatter"
    assert spans[0].text.endswith("You know the song, perhaps?")


@pytest.mark.parametrize("style", STYLES_UNDER_TEST)
def test_apostrophes_are_not_closing_quotes(style):
    spans, _ = run("  `Don't touch the Hatter's hat, it's o'clock time,' said Alice.\n", style)
    assert who(spans) == [("Don't touch the Hatter's hat, it's o'clock time,".replace(
        "'", "'" if style == "gutenberg" else "\u2019"), "Alice", "explicit")]


def test_unbalanced_quote_warns_with_line_and_goes_on():
    spans, warnings = run("""\
      `This quote is never closed.

      Some narration with no quotes at all.

      `Hello,' said Alice.
    """)
    assert len(warnings) == 1 and "line 6" in warnings[0]
    assert who(spans)[-1] == ("Hello,", "Alice", "explicit")


def test_curly_style_with_nested_quotes_and_lf():
    text = ("\u201cYou might just as well say,\u201d added the March Hare, \u201cthat \u2018I like what I get\u2019 "
            "is the same thing as \u2018I get what I like\u2019!\u201d\n")
    an = analyse(parse_book((PRELUDE.replace("`", "\u201c").replace("',", "\u201d,").replace("?'", "?\u201d")
                             + text).encode(), "t.txt"))
    last = an.spans[-2:]
    assert [s.speaker for s in last] == ["March Hare", "March Hare"]
    assert last[1].text == "that \u2018I like what I get\u2019 is the same thing as \u2018I get what I like\u2019!"


def test_crlf_gutenberg_header_title_and_chapters():
    body = ("Title: A Tiny Tea\r\n\r\n*** START OF THE PROJECT GUTENBERG EBOOK A TINY TEA ***\r\n"
            "                CHAPTER I\r\n\r\n  `Hello,' said the Hatter.\r\n\r\n"
            "                CHAPTER II\r\n\r\n  `Goodbye,' said the Hatter.\r\n\r\n"
            "  The Hatter shook his head.  `No,' he said.\r\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK A TINY TEA ***\r\n`Footer quote,' said Nobody.\r\n")
    an = analyse(parse_book(body.encode(), "t.txt"))
    assert an.book.title == "A Tiny Tea"
    assert [(s.text, s.chapter, s.line, s.attribution) for s in an.spans] == [
        ("Hello,", 1, 6, "explicit"), ("Goodbye,", 2, 10, "explicit"), ("No,", 2, 12, "pronoun")]
    assert {s.speaker for s in an.spans} == {"Hatter"}


def test_find_spans_styles_directly():
    t = "x `a' y `b\n\n`c' z"
    assert [s.text for s in find_spans(t, 0, len(t), STYLES["gutenberg"])] == ["a", "b c"]
    t = 'x "a" y "b\n\n"c" z'
    assert [s.text for s in find_spans(t, 0, len(t), STYLES["straight"])] == ["a", "b c"]


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"   \n\n  ", "empty"),
    (b"\x00\x01\x02binary\x00" * 20, "binary"),
    ("caf\u00e9 `hello,' said Bob".encode("latin-1"), "UTF-8"),
    (b"Just narration.\n\nNo dialogue here at all.\n", "no quoted dialogue"),
])
def test_bad_books(data, message):
    with pytest.raises(UserError, match=message):
        analyse(parse_book(data, "bad.txt"))
