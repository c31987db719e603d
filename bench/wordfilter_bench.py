"""Blocked-words benchmark: one admission's check against hostile lists, the linear matcher next to the
backtracking regex it replaced (the issue's case: 200 entries like ``s*e*x1``).

    python -m bench.wordfilter_bench [--repeat 5]

Prints, per list and text, the median time of ``BlockedWords.find`` (prompt 1,500 + negative 500 characters)
and of the old combined regex on the same folded text, and the matcher's counted steps per character.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

from bot.engine.policy import MAX_BLOCKED_WORDS, BlockedWords, fold

LISTS = {
    "a*a*N": [f"a*a*{i}" for i in range(MAX_BLOCKED_WORDS)],
    "s*e*xN": [f"s*e*x{i}" for i in range(MAX_BLOCKED_WORDS)],
    "*wordN*": [f"*word{i}*" for i in range(MAX_BLOCKED_WORDS)],
    "bN*a": [f"b{i}*a" for i in range(MAX_BLOCKED_WORDS)],
}
TEXTS = {"a": "a", "se": "se", "ab ": "ab ", "words": "wordy word "}


def old_pattern(entry: str) -> str:
    """The regex each entry used to compile to (kept here only to measure against)."""
    pieces = []
    for part in entry.split("*"):
        pieces.append(r"\s+".join(re.escape(word) for word in part.split(" ")) if part else "")
    body = r"\w*".join(pieces)
    before = r"(?<!\w)" if entry[0] == "*" or re.match(r"\w", entry[0]) else ""
    after = r"(?!\w)" if entry[-1] == "*" or re.match(r"\w", entry[-1]) else ""
    return f"{before}{body}{after}"


def median_s(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{'list':>8} {'text':>6} {'matcher ms':>11} {'steps/char':>11} {'old regex ms':>13}")
    for name, entries in LISTS.items():
        words = BlockedWords(entries)
        regex = re.compile("|".join(f"(?:{old_pattern(e)})" for e in words.entries))
        matcher = words._matcher  # the benchmark looks inside on purpose: it reports the step count
        assert matcher is not None
        for label, unit in TEXTS.items():
            prompt, negative = (unit * 1500)[:1500], (unit * 500)[:500]
            new = median_s(lambda: words.find(prompt, negative), args.repeat)  # noqa: B023
            matcher.first(fold(prompt))
            steps = matcher.steps  # of the 1,500-character prompt alone
            folded = fold(prompt), fold(negative)
            old = median_s(lambda: [regex.search(t) for t in folded], max(1, args.repeat // 2))  # noqa: B023
            print(f"{name:>8} {label!r:>6} {new * 1000:>11.2f} {steps / 1500:>11.1f} {old * 1000:>13.1f}")


if __name__ == "__main__":
    main()
