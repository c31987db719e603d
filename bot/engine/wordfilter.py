"""Blocked-word matching in time linear in the text: one Aho-Corasick scan, no backtracking.

The contract (what :class:`WordMatcher` decides) is exactly that of the regular expression each entry used to
compile to, searched in folded text:

- an entry is literal text with ``*`` wildcards (runs of ``*`` already collapsed, spaces collapsed to one);
- ``*`` stands for any run of word characters (``\\w*``: possibly empty, never crossing a space or punctuation);
- a space stands for any run of whitespace (``\\s+``);
- an entry that starts with ``*`` or a word character must start at a word boundary (``(?<!\\w)``), and one
  that ends with ``*`` or a word character must end at one (``(?!\\w)``); an edge of punctuation (``c++``)
  needs none.

How it stays linear. Whitespace runs in the text are collapsed to one space first (a space in an entry then
matches exactly one space). An entry is then its literal *pieces* (the text between wildcards) in order, with a
start rule and an end rule. Entries sharing leading pieces share nodes of a trie, so ``a*a*1`` ... ``a*a*199``
cost one node per shared piece, not two hundred. One Aho-Corasick automaton over every distinct piece reports
each occurrence once, in order of where it ends. A node *completes* at an occurrence of its piece when its
parent completed at a point ``e`` with only word characters between ``e`` and the piece's start (the
wildcard's span); the latest such ``e`` at or before the start is found by looking back over the parent's
completions, of which at most ``len(piece)`` lie past the start. An entry matches when its last node completes
and the end rule holds. A leading ``*`` needs no check at all (the start of the word run is a boundary), and a
trailing ``*`` drops the end rule (the run of word characters can always be extended to the word's end).

Work per text character is bounded by the list (how many trie nodes share a piece ending there, times the
piece length), never by the text: there is no retrying from earlier positions. The automaton is built once
per list (:class:`bot.engine.policy.BlockedWords` is built when a guild's list changes), not per admission.
``steps`` counts the work of the last scan so tests can check linearity without a stopwatch.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

_WHITESPACE_RUN = re.compile(r"\s+")  # one pass, no backtracking: a run of one character class


def is_word_char(ch: str) -> bool:
    """Python's ``\\w`` for str patterns (checked against ``re`` over every code point)."""
    return ch.isalnum() or ch == "_"


@dataclass(eq=False, slots=True)
class _Node:
    """One piece of one or more entries, after the pieces its parent chain stands for."""

    piece: str
    parent: _Node | None
    #: Only for a first piece: must it start at a word boundary?
    bounded_start: bool = False
    children: dict[str, _Node] = field(default_factory=dict)
    #: Entries ending with this node: (entry index, must it end at a word boundary?).
    ends: list[tuple[int, bool]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Shape:
    pieces: tuple[str, ...]
    bounded_start: bool
    bounded_end: bool


def entry_shape(entry: str) -> _Shape:
    """An entry's literal pieces and its boundary rules (see the module docstring)."""
    parts = entry.split("*")
    lead_star, trail_star = entry.startswith("*"), entry.endswith("*")
    pieces = tuple(part for part in parts if part)
    bounded_start = not lead_star and is_word_char(entry[0])
    bounded_end = not trail_star and is_word_char(entry[-1])
    return _Shape(pieces, bounded_start, bounded_end)


class WordMatcher:
    """All of a list's entries compiled into one automaton; :meth:`first` scans a folded text once."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.entries = tuple(entries)
        self.steps = 0
        roots: dict[tuple[bool, str], _Node] = {}
        nodes_by_piece: dict[str, list[_Node]] = {}
        for index, entry in enumerate(self.entries):
            shape = entry_shape(entry)
            if not shape.pieces:
                raise ValueError(f"entry {entry!r} has no literal text")
            first = shape.pieces[0]
            node = roots.get((shape.bounded_start, first))
            if node is None:
                node = roots[(shape.bounded_start, first)] = _Node(first, None, shape.bounded_start)
                nodes_by_piece.setdefault(first, []).append(node)
            for piece in shape.pieces[1:]:
                child = node.children.get(piece)
                if child is None:
                    child = node.children[piece] = _Node(piece, node)
                    nodes_by_piece.setdefault(piece, []).append(child)
                node = child
            node.ends.append((index, shape.bounded_end))
        self._build_automaton(nodes_by_piece)

    def _build_automaton(self, nodes_by_piece: dict[str, list[_Node]]) -> None:
        goto: list[dict[str, int]] = [{}]
        own: list[list[str]] = [[]]
        for piece in nodes_by_piece:
            state = 0
            for ch in piece:
                nxt = goto[state].get(ch)
                if nxt is None:
                    nxt = len(goto)
                    goto[state][ch] = nxt
                    goto.append({})
                    own.append([])
                state = nxt
            own[state].append(piece)
        fail = [0] * len(goto)
        order: list[int] = []
        queue = deque(goto[0].values())
        while queue:
            state = queue.popleft()
            order.append(state)
            for ch, nxt in goto[state].items():
                queue.append(nxt)
                back = fail[state]
                while back and ch not in goto[back]:
                    back = fail[back]
                fail[nxt] = goto[back].get(ch, 0) if goto[back].get(ch) != nxt else 0
        # Every state's output: its own pieces and those of its failure chain (breadth-first order makes the
        # failure state's list final before it is used), as (node, piece length) pairs ready for the scan.
        # First pieces are checked at every occurrence; later pieces only for nodes whose parent completed in
        # this scan (``live`` in :meth:`first`), so a piece shared under many parents costs nothing until one
        # of those parents is seen.
        outputs: list[tuple[tuple[tuple[_Node, int], ...], tuple[tuple[str, int], ...]]] = [((), ())] * len(
            goto
        )
        for state in order:
            roots = tuple(
                (node, len(piece))
                for piece in own[state]
                for node in nodes_by_piece[piece]
                if node.parent is None
            )
            later = tuple(
                (piece, len(piece))
                for piece in own[state]
                if any(node.parent is not None for node in nodes_by_piece[piece])
            )
            inherited_roots, inherited_later = outputs[fail[state]]
            outputs[state] = (roots + inherited_roots, later + inherited_later)
        self._goto = goto
        self._fail = fail
        self._outputs = outputs

    def first(self, folded: str) -> str | None:
        """The entry whose match ends first in ``folded`` (ties: the earlier entry), else None."""
        text = _WHITESPACE_RUN.sub(" ", folded)
        n = len(text)
        word = [is_word_char(ch) for ch in text]
        # run_start[j]: where the run of word characters ending at j starts (j itself after a non-word).
        run_start = [0] * (n + 1)
        for i in range(n):
            run_start[i + 1] = run_start[i] if word[i] else i + 1
        goto, fail, outputs = self._goto, self._fail, self._outputs
        completions: dict[_Node, list[int]] = {}
        live: dict[str, list[_Node]] = {}  # nodes whose parent has completed, by their piece
        steps = n
        state = 0
        for i, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
                steps += 1
            state = goto[state].get(ch, 0)
            found: int | None = None
            end = i + 1
            roots, later = outputs[state]
            for node, length in roots:
                steps += 1
                start = end - length
                if node.bounded_start and start > 0 and word[start - 1]:
                    continue
                found = self._complete(node, end, n, word, completions, live, found)
            for piece, length in later:
                start = end - length
                for node in live.get(piece, ()):
                    steps += 1
                    # The parent's latest completion at or before `start`; later ones (at most `length` of
                    # them) overlap this occurrence and cannot precede it.
                    done = completions[node.parent]  # type: ignore[index]  # live nodes have a parent
                    k = len(done) - 1
                    while k >= 0 and done[k] > start:
                        k -= 1
                        steps += 1
                    if k < 0 or done[k] < run_start[start]:
                        continue  # the wildcard would have to cross a non-word character
                    found = self._complete(node, end, n, word, completions, live, found)
            if found is not None:
                self.steps = steps
                return self.entries[found]
        self.steps = steps
        return None

    @staticmethod
    def _complete(
        node: _Node,
        end: int,
        n: int,
        word: list[bool],
        completions: dict[_Node, list[int]],
        live: dict[str, list[_Node]],
        found: int | None,
    ) -> int | None:
        """``node`` matched up to ``end``: record it for its children; the lowest entry it finishes, if any."""
        if node.children:
            done = completions.get(node)
            if done is None:
                completions[node] = [end]
                for child in node.children.values():
                    live.setdefault(child.piece, []).append(child)
            else:
                done.append(end)
        for index, bounded_end in node.ends:
            if (not bounded_end or end == n or not word[end]) and (found is None or index < found):
                found = index
        return found
