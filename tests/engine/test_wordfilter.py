"""The blocked-words matcher against a simple reference (the regular expressions it replaced), and its cost."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bot.engine.policy import (
    MAX_BLOCKED_WORDS,
    BlockedWords,
    InvalidGuildSetting,
    fold,
    normalise_blocked_word,
)
from bot.engine.wordfilter import WordMatcher


def reference_pattern(entry: str) -> str:
    """The old definition, kept as the specification: literal text, ``*`` = ``\\w*``, space = ``\\s+``, word
    boundaries on the sides that start/end with a word character or ``*``."""
    pieces = []
    for part in entry.split("*"):
        pieces.append(r"\s+".join(re.escape(word) for word in part.split(" ")) if part else "")
    body = r"\w*".join(pieces)
    first, last = entry[0], entry[-1]
    before = r"(?<!\w)" if first == "*" or re.match(r"\w", first) else ""
    after = r"(?!\w)" if last == "*" or re.match(r"\w", last) else ""
    return f"{before}{body}{after}"


def reference_matches(entry: str, text: str) -> bool:
    return re.search(reference_pattern(entry), fold(text)) is not None


def usable(raw: str) -> str | None:
    try:
        return normalise_blocked_word(raw)
    except InvalidGuildSetting:
        return None


# Few letters, so that entries and texts collide often; a word character that is not ASCII, punctuation that
# regex would treat specially, and several kinds of whitespace.
ENTRY_ALPHABET = "ab*  .+é_"
TEXT_ALPHABET = "ab .+é_\t\n\u3000-"
entries_st = st.lists(
    st.text(ENTRY_ALPHABET, min_size=1, max_size=8).map(usable), min_size=1, max_size=6
).map(lambda raw: [e for e in dict.fromkeys(raw) if e is not None])
texts_st = st.text(TEXT_ALPHABET, max_size=40)


@settings(
    max_examples=1500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much]
)
@given(entries=entries_st, text=texts_st)
@example(entries=["* b"], text=" b")  # a leading space in the text is whitespace for `\s+`
@example(entries=["a* *b"], text="ax  yb")
@example(entries=["a*a*b"], text="aab aaab")
@example(entries=["a*b", "b"], text="a.b")
@example(entries=["+a"], text="b+a")
def test_matcher_agrees_with_the_reference(entries: list[str], text: str) -> None:
    if not entries:
        return
    expected = {e for e in entries if reference_matches(e, text)}
    for entry in entries:  # each entry alone
        assert (WordMatcher([entry]).first(fold(text)) is not None) == (entry in expected), (entry, text)
    found = WordMatcher(entries).first(fold(text))  # all together: one of the matching entries, or none
    assert (found is None) == (not expected) and (found is None or found in expected), (found, expected)


def test_first_reports_the_entry_whose_match_ends_first() -> None:
    words = BlockedWords(["dog", "cat*"])
    assert words.find("a catalogue of dogs and a dog") == "cat*"
    assert WordMatcher(["b", "a*b"]).first("ab") == "a*b"  # ties at the same end: the earlier entry
    assert WordMatcher(["b", "a*b"]).first("a b") == "b"


HOSTILE_LISTS = {
    "a*a*i": [f"a*a*{i}" for i in range(MAX_BLOCKED_WORDS)],
    "s*e*x": [f"s*e*x{i}" for i in range(MAX_BLOCKED_WORDS)],
    "*a..ab*": [f"*{'a' * (i % 40 + 1)}b{i}*" for i in range(MAX_BLOCKED_WORDS)],
    "b*a fan-out": [f"b{i}*a" for i in range(MAX_BLOCKED_WORDS)],  # one piece under 200 parents
    "long pieces": [f"{'a' * 20}*{'a' * 20}{i}" for i in range(MAX_BLOCKED_WORDS)],
}
HOSTILE_TEXTS = {"a": "a", "ab": "ab", "se": "se", "a space": "a "}


@pytest.mark.parametrize("unit", HOSTILE_TEXTS.values(), ids=HOSTILE_TEXTS.keys())
@pytest.mark.parametrize("entries", HOSTILE_LISTS.values(), ids=HOSTILE_LISTS.keys())
def test_work_grows_linearly_with_the_text(entries: list[str], unit: str) -> None:
    """Operations counted by the matcher itself (no stopwatch): twice the text, at most twice the work
    (plus a constant), and a small constant per character whatever the list."""
    matcher = WordMatcher(BlockedWords(entries).entries)
    work = {}
    for n in (500, 1000, 2000):
        assert matcher.first(fold(unit * n)) is None  # the worst case: nothing matches, all is scanned
        work[n] = matcher.steps
    assert work[2000] <= 2 * work[1000] + 200 and work[1000] <= 2 * work[500] + 200, work
    # Per character, bounded by the list (how many trie nodes share a piece), not by the text.
    assert work[2000] <= 10 * 2000 * len(unit), work


def test_the_regex_it_replaced_was_superlinear() -> None:
    """Why: the reference backtracks on this list (the test above holds the matcher to linear work)."""
    words = BlockedWords(HOSTILE_LISTS["a*a*i"])
    regex = re.compile("|".join(f"(?:{reference_pattern(e)})" for e in words.entries))
    assert regex.search("a" * 300) is None  # quick for 300 characters; the same list took 0.6 s on 2,000
    assert not words.matches("a" * 1500, "a" * 500)
