"""The result cache: the same normalised request is answered from disk instead of paying a backend again.

Images are content-addressed blob files under ``DATA_DIR/cache/blobs`` (identical images stored once, shared
by entries); an index maps cache keys to their images. Recently used entries also stay in memory with their
bytes. Every failure here is a miss and a warning, never an error for the user: the cache is an optimisation.

Where the index lives (:mod:`bot.engine.cache_index`): without ``DATABASE_URL``, ``DATA_DIR/cache/index.sqlite3``
(:class:`~bot.engine.cache_index.SqliteIndex`); with it, tables of the job store's PostgreSQL database
(:class:`~bot.engine.cache_pg.PgIndex`), so the processes of a fleet sharing one ``DATA_DIR`` volume share one
index. This module holds the cache's logic once for both: hits, the memory LRU, puts, eviction by TTL and by
size, pins, the orphan sweep and damaged blobs. File work and hashing run in worker threads
(``asyncio.to_thread``), never on the event loop.

The index's invariants (every implementation keeps them; the fleet's correctness rests on them):

- **What is referenced.** A blob is referenced while an entry uses it (``entry_blobs``) or a job pins it
  (``pins``). Every ref an entry uses has a ``blobs`` row (ext, format, size); a pin may name a ref that has
  none (pinned after the blob went: nothing to keep).
- **Who may unlink a file.** Only a remover (removing entries: eviction, delete, retention; unpinning;
  dropping a damaged blob) holding the index's lock exclusively (SQLite: ``flock`` on ``index.lock``;
  PostgreSQL: a transaction-scoped advisory lock), and only a blob whose ``blobs`` row it deleted in that
  critical section because no entry or pin referenced it any more (or that it found damaged, below). What
  makes a blob referenced (a put, a pin) holds the same lock too (SQLite: the same exclusive ``flock``;
  PostgreSQL: shared, so puts do not wait for each other), so it never overlaps a remover: no process
  unlinks a blob another is indexing, pinning or still references.
- **A put** writes each blob file that is missing (atomically: temporary file, then rename) and indexes the
  entry; no file it references is missing when it returns. SQLite writes and indexes inside the critical
  section. PostgreSQL writes first, indexes in one statement under the shared lock, and writes any file that
  went meanwhile again (a remover dropped the same image, unreferenced then): from its statement on, the
  entry references it and no remover may take it.
- **Reads take no lock.** A blob read (hash-checked) that is missing or damaged is dropped only after
  checking it again under the lock: a blob another process evicted (its entry gone too) or wrote again since
  is left alone. An entry served from memory is touched in the index first (the LRU order is shared); when
  the index no longer has it (another process evicted or deleted it) or cannot say (its database is away),
  it is a miss.
- **Orphans.** A blob file with no ``blobs`` row is an orphan (a crash between writing and indexing, or an
  unlink that failed); the sweep at open deletes orphans and temporary files older than ``ORPHAN_GRACE_S``
  only, since a younger one may be another process's put that has not committed yet.
- **Fills** (an index shared by a fleet): a lookup made to generate a key claims its fill for this process
  unless another live process holds the claim; a claim ends with that process's put of the key, its release
  (the generation failed or was stopped: :meth:`ResultCache.release_fill`), or its death, unless the
  generation outlives its process at the backend (handed over at a rolling restart, or followed up by its id
  after a death: :meth:`ResultCache.forget_fill`), when the follower's put ends it. So while a claim stands,
  the key is being generated exactly once, and identical requests elsewhere wait for its put instead of
  generating it again.
- **Order on failure.** SQLite commits the rows' deletion, then unlinks (still under the lock): a crash
  leaves orphans, never holes. PostgreSQL unlinks before the commit, while its lock still excludes every
  other writer; a commit that fails afterwards (the database gone at that instant) leaves entries whose
  blobs are missing, which reads find and drop: a miss, never a wrong image.

Pins: the images of a job whose result has not been posted yet are pinned under the job's id. Eviction (TTL or
size) may drop the entry (no more cache hits for it) but never a pinned blob file, so a restart can still post
the result; unpinning lets the blobs no entry uses go.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from bot.engine.cache_index import (
    INDEX_NAME,
    LOCK_NAME,
    BlobRow,
    EntryRow,
    Index,
    IndexUnavailable,
    Lookup,
    SqliteIndex,
    WriteFiles,
)
from bot.engine.models import GeneratedImage, GenerationResult, ImageRequest

__all__ = ["INDEX_NAME", "LOCK_NAME", "ORPHAN_GRACE_S", "Found", "ResultCache", "cache_key"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Bump when the normalisation changes, so old entries simply stop matching instead of matching wrongly.
KEY_VERSION = 1
#: Orphan blob files younger than this are left alone at open (another writer may be about to index them).
ORPHAN_GRACE_S = 60.0
#: Entries considered per round of size eviction.
EVICTION_BATCH = 100

_REF_RE = re.compile(r"[0-9a-f]{64}")
_EXT_RE = re.compile(r"[a-z0-9]{1,8}")


def _normalise_text(text: str) -> str:
    return " ".join(text.split())


def cache_key(request: ImageRequest, *, backend: str, model: str | None) -> str:
    """sha256 of the request's normalised, canonical JSON.

    Whitespace differences do not matter, case does. The seed counts only when the user fixed one: a request
    with a random seed may be answered by any earlier random-seed result. ``fresh`` is never part of it.
    """
    document: dict[str, Any] = {
        "v": KEY_VERSION,
        "backend": backend,
        "model": model,
        "prompt": _normalise_text(request.prompt),
        "negative_prompt": _normalise_text(request.negative_prompt),
        "width": request.width,
        "height": request.height,
        "count": request.count,
        "nsfw_allowed": request.nsfw_allowed,
    }
    if request.seed is not None:
        document["seed"] = request.seed
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _extension(fmt: str) -> str:
    ext = {"JPEG": "jpg"}.get(fmt, fmt.lower())
    return ext if _EXT_RE.fullmatch(ext) else "bin"


def _hash_all_sync(blobs: Sequence[bytes]) -> list[str]:
    return [hashlib.sha256(data).hexdigest() for data in blobs]


def _write_file_atomic_sync(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` then rename over it, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class _BadBlob(Exception):
    def __init__(self, ref: str, why: str) -> None:
        super().__init__(f"blob {ref[:12]}… {why}")
        self.ref = ref


@dataclass(frozen=True, slots=True)
class Found:
    """A lookup's answer: the hit (the result, ``from_cache=True``, and its images' refs), or a miss; a miss may
    say that another process of the fleet is generating this very request (see :meth:`ResultCache.lookup`)."""

    hit: tuple[GenerationResult, list[str]] | None
    filling_elsewhere: bool = False


@dataclass(slots=True)
class _Waiting:
    """Jobs here waiting for another process's fill of one key; ``event`` is set when it may be done."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    count: int = 0


@dataclass(frozen=True, slots=True)
class _Entry:
    result: GenerationResult  # as generated (from_cache False)
    created_at: float
    size: int
    refs: list[str]  # each image's content ref, in order


class ResultCache:
    """Generation results by cache key, on disk under ``directory`` with a bounded in-memory LRU in front.

    ``index``: where the index lives (default: :class:`~bot.engine.cache_index.SqliteIndex` in ``directory``).
    """

    def __init__(
        self,
        directory: Path,
        *,
        ttl_s: float,
        max_bytes: int,
        memory_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
        index: Index | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self._clock = clock
        self.index: Index = index if index is not None else SqliteIndex(self.directory)
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._memory: OrderedDict[str, _Entry] = OrderedDict()
        self._memory_used = 0
        #: The index opened: without it every operation is a quiet miss (open said why, once).
        self._usable = False
        #: An index failure was reported: further ones are quiet until an operation works again.
        self._failing = False
        #: Keys whose fill this process claimed and has not added or released yet.
        self._claimed: set[str] = set()
        #: Keys whose fill another process holds and someone here waits for.
        self._fills: dict[str, _Waiting] = {}

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_bytes > 0

    @property
    def blob_dir(self) -> Path:
        return self.directory / "blobs"

    def blob_path(self, ref: str, ext: str) -> Path:
        return self.blob_dir / ref[:2] / f"{ref}.{ext}"

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the index and sweep orphans; a disabled cache touches nothing on disk."""
        if not self.enabled:
            log.info("result cache disabled (ttl_s=%s, max_bytes=%s)", self.ttl_s, self.max_bytes)
            return
        try:
            await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
            await self.index.open(self._unlink_sync)
        except (OSError, IndexUnavailable) as exc:
            # The bot works without a cache; say so loudly and carry on.
            log.warning("result cache at %s is unavailable, running without it: %s", self.directory, exc)
            return
        self._usable = True
        known = await self._call(self.index.known_refs)
        if known is not None:
            await asyncio.to_thread(self._sweep_orphans_sync, known)
        totals = self.index.totals
        log.info(
            "result cache at %s (index %r): %d entries, %d bytes (limit %d)",
            self.directory,
            self.index,
            totals.entries,
            totals.bytes,
            self.max_bytes,
        )

    async def close(self) -> None:
        if self._usable:
            self._usable = False
            await self.index.close()
        self._memory.clear()
        self._memory_used = 0

    async def __aenter__(self) -> ResultCache:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- public operations -------------------------------------------------------------------------------------

    async def get(self, key: str) -> GenerationResult | None:
        """The cached result for ``key`` (``from_cache=True``), or None on a miss, expiry or damage."""
        hit = await self.get_with_refs(key)
        return hit[0] if hit is not None else None

    async def get_with_refs(self, key: str) -> tuple[GenerationResult, list[str]] | None:
        """Like :meth:`get`, with each image's content ref (known already: no need to hash the bytes again)."""
        return (await self.lookup(key)).hit

    async def lookup(self, key: str, *, claim: bool = False) -> Found:
        """Like :meth:`get_with_refs`. With ``claim`` (a fleet's process about to generate ``key``), a miss also
        claims the key's fill for this process, so that the fleet generates it once: unless another process
        holds the claim, in which case the miss says ``filling_elsewhere`` and the caller may
        :meth:`wait_for_fill` and look again. The claim ends with :meth:`put` of the key or
        :meth:`release_fill`; an index serving one process never claims anything."""
        entry, elsewhere = await self._lookup(key, claim) if self.enabled else (None, False)
        if entry is None:
            self.misses += 1
            return Found(None, elsewhere)
        self.hits += 1
        return Found((replace(entry.result, from_cache=True), list(entry.refs)))

    async def release_fill(self, key: str) -> None:
        """This process will not put ``key`` after all: others waiting for it are told (no-op if unclaimed)."""
        if key in self._claimed:
            self._claimed.discard(key)
            await self._call(self.index.release_fill, key)

    def forget_fill(self, key: str) -> None:
        """This process will not end its claim on ``key`` itself: the generation went on elsewhere (a hand-over),
        and whoever puts its result ends it there."""
        self._claimed.discard(key)

    def fill_changed(self, key: str) -> None:
        """Another process put or released ``key`` (a wake-up of the fleet's): those waiting here look again."""
        waiting = self._fills.get(key)
        if waiting is not None:
            waiting.event.set()

    async def wait_for_fill(self, key: str, at_most_s: float) -> None:
        """Until :meth:`fill_changed` says ``key`` may be filled, or ``at_most_s`` (wake-ups can be lost)."""
        waiting = self._fills.get(key)
        if waiting is None:
            waiting = self._fills[key] = _Waiting()
        waiting.count += 1
        try:
            async with asyncio.timeout(at_most_s):
                await waiting.event.wait()
        except TimeoutError:
            pass
        finally:
            waiting.count -= 1
            if not waiting.count and self._fills.get(key) is waiting:
                del self._fills[key]  # the next wait starts from a clear event

    async def put(self, key: str, result: GenerationResult) -> list[str]:
        """Store ``result`` under ``key``; return each image's content ref (sha256 hex), in order."""
        refs = await asyncio.to_thread(_hash_all_sync, [image.data for image in result.images])
        if not self.enabled:
            return refs
        result = replace(result, from_cache=False)
        now = self._clock()
        blobs = {
            ref: BlobRow(
                ref, _extension(image.format), image.format, image.width, image.height, len(image.data)
            )
            for image, ref in zip(result.images, refs, strict=True)
        }
        images = [
            {
                "ref": ref,
                "format": image.format,
                "width": image.width,
                "height": image.height,
                "seed": image.seed,
            }
            for image, ref in zip(result.images, refs, strict=True)
        ]
        size = sum(len(image.data) for image in result.images)
        entry = EntryRow(key, now, result.backend, result.model, result.elapsed_s, json.dumps(images), size)

        def write(indexed: set[str]) -> None:
            # An indexed blob is trusted when its file is there (reads verify it); anything else is (re)written.
            for image, ref in zip(result.images, refs, strict=True):
                path = self.blob_path(ref, _extension(image.format))
                if not (ref in indexed and path.exists()):
                    _write_file_atomic_sync(path, image.data)

        added = await self._call(self._add, entry, list(blobs.values()), write)
        if added is None:
            return refs  # not indexed (the failure was reported); a claim of its fill stays to be released
        self._claimed.discard(key)
        oldest = added[0]
        evicted = await self._enforce_limits(now, check_expired=oldest is None or self._expired(oldest, now))
        for gone in evicted:
            self._forget(gone)
        if key not in evicted:
            self._remember(key, _Entry(result, now, size, refs))
        return refs

    async def get_images(self, refs: Sequence[str]) -> list[GeneratedImage] | None:
        """Images by content ref, to re-post a past job; None if any is gone or damaged.

        Seeds are not a property of the bytes (two seeds can give identical images), so ``seed`` is None here:
        the job's record has them.
        """
        if not self.enabled:
            return None
        if not all(_REF_RE.fullmatch(ref) for ref in refs):
            return None
        if not refs:
            return []
        rows = await self._call(self.index.blobs, set(refs))
        if rows is None or any(ref not in rows for ref in refs):
            return None
        ordered = [rows[ref] for ref in refs]
        try:
            datas = await asyncio.to_thread(self._read_all_sync, [(row.ref, row.ext) for row in ordered])
        except _BadBlob as bad:
            await self._drop_blob(bad)
            return None
        except OSError as exc:
            self._report("result cache file error, treating as a miss: %s", exc)
            return None
        return [
            GeneratedImage(data, row.format, row.width, row.height)
            for data, row in zip(datas, ordered, strict=True)
        ]

    async def refs_of(self, keys: Iterable[str]) -> set[str]:
        """The image refs the entries ``keys`` use (an empty set for unknown keys or a disabled cache)."""
        keys = [key for key in keys if key]
        if not keys or not self.enabled:
            return set()
        return await self._call(self.index.refs_of, keys) or set()

    async def discard(self, keys: Iterable[str], refs: Iterable[str], *, keep: Iterable[str] = ()) -> int:
        """Drop the entries ``keys`` and delete the image files of ``refs`` (and of those entries) that neither
        another entry nor ``keep`` (images a remaining job still lists) uses. Returns how many files went.

        Delete and retention pruning go through here (see :mod:`bot.engine.retention`); the cache's own
        eviction is by age and size only.
        """
        keys = [key for key in keys if key]
        for key in keys:
            self._forget(key)
        if not self.enabled:
            return 0
        outcome = await self._call(self.index.remove, keys, set(refs), set(keep), self._unlink_sync)
        return outcome[1] if outcome is not None else 0

    async def pin(self, job_id: str, refs: Sequence[str]) -> None:
        """Keep these images on disk for ``job_id`` until :meth:`unpin` (its result is being posted)."""
        refs = [ref for ref in refs if _REF_RE.fullmatch(ref)]
        if self.enabled and refs:
            await self._call(self.index.pin, job_id, refs)

    async def unpin(self, job_id: str) -> None:
        """The job's result is posted (or never will be): its images are ordinary cache blobs again."""
        if self.enabled:
            await self._call(self.index.unpin, job_id, self._unlink_sync)

    async def pinned_jobs(self) -> set[str]:
        """Jobs holding pins (a probe for tests and checks)."""
        if not self.enabled:
            return set()
        return await self._call(self.index.pinned_jobs) or set()

    def stats(self) -> dict[str, int]:
        """Counters of this process; ``entries`` and ``bytes`` are the index's (with PostgreSQL: the fleet's),
        as of this process's latest write."""
        totals = self.index.totals
        return {
            "entries": totals.entries,
            "bytes": totals.bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }

    # -- the logic, once for every index -----------------------------------------------------------------------

    async def _call(self, operation: Callable[..., Awaitable[T]], *args: Any) -> T | None:
        """One index operation; any index or file failure becomes None (a miss) and, once, a warning."""
        if not self._usable:
            return None
        try:
            value = await operation(*args)
        except IndexUnavailable as exc:
            self._report("result cache index unavailable, treating as a miss: %s", exc, quiet=exc.reported)
            return None
        except OSError as exc:
            self._report("result cache file error, treating as a miss: %s", exc)
            return None
        if self._failing:
            self._failing = False
            log.info("result cache index usable again")
        return value

    def _report(self, message: str, exc: BaseException, *, quiet: bool = False) -> None:
        """The first failure of a run of them is a warning (unless ``quiet``: reported where it happened); the
        rest, until one call works, are debug lines."""
        log.log(logging.DEBUG if self._failing or quiet else logging.WARNING, message, exc)
        self._failing = True

    async def _add(self, entry: EntryRow, blobs: list[BlobRow], write: WriteFiles) -> tuple[float | None]:
        # In a tuple: the index's None (the oldest entry unknown) is not :meth:`_call`'s None (it failed).
        return (await self.index.add(entry, blobs, write, self._unlink_sync),)

    async def _lookup(self, key: str, claim: bool) -> tuple[_Entry | None, bool]:
        """The entry (memory first, then the index), and whether another process is filling a missing one."""
        now = self._clock()
        entry = self._memory.get(key)
        if entry is not None:
            if self._expired(entry.created_at, now):
                self._forget(key)
                await self._remove([key], count=True)
                return await self._remembered(key, now, claim)
            # Keep the shared LRU order honest for entries served from memory; an entry gone from the index
            # (another process evicted or deleted it) is gone here too, and one the index cannot vouch for is
            # not served.
            touched = await self._call(self.index.touch, key, now)
            if touched is None:
                return None, False  # the index cannot vouch for it now
            if touched:
                self._memory.move_to_end(key)
                return entry, False
            self._forget(key)  # gone from the index: another process evicted or deleted it
        return await self._remembered(key, now, claim)

    async def _remembered(self, key: str, now: float, claim: bool) -> tuple[_Entry | None, bool]:
        entry, elsewhere = await self._load(key, now, claim)
        if entry is not None:
            self._remember(key, entry)
        return entry, elsewhere

    async def _load(self, key: str, now: float, claim: bool) -> tuple[_Entry | None, bool]:
        claim_after = now - self.ttl_s if claim else None
        found: Lookup | None = await self._call(
            functools.partial(self.index.load, key, claim_after=claim_after)
        )
        if found is None:
            return None, False
        if found.claimed:
            self._claimed.add(key)
        row = found.entry
        if row is None:
            return None, found.filling_elsewhere
        if self._expired(row.created_at, now):
            await self._remove([key], count=True)
            return None, False
        try:
            items = [
                (item["ref"], item["format"], item["width"], item["height"], item.get("seed"))
                for item in json.loads(row.images)
            ]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("result cache entry %s is unreadable (%s); dropping it", key[:12], exc)
            await self._remove([key], count=False)
            return None, False
        try:
            datas = await asyncio.to_thread(
                self._read_all_sync, [(ref, _extension(fmt)) for ref, fmt, *_ in items]
            )
        except _BadBlob as bad:
            await self._drop_blob(bad)
            return None, False
        except OSError as exc:
            self._report("result cache file error, treating as a miss: %s", exc)
            return None, False
        # Read without the lock: another process may have removed the entry meanwhile.
        if not await self._call(self.index.touch, key, now):
            return None, False
        images = tuple(
            GeneratedImage(data, fmt, width, height, seed)
            for data, (_, fmt, width, height, seed) in zip(datas, items, strict=True)
        )
        result = GenerationResult(images, row.backend, row.model, row.elapsed_s)
        refs = [item[0] for item in items]
        return _Entry(result, row.created_at, sum(len(data) for data in datas), refs), False

    async def _remove(self, keys: list[str], *, count: bool) -> list[str]:
        """Drop entries (eviction when ``count``) and the blobs nothing else references; the keys dropped."""
        outcome = await self._call(self.index.remove, keys, set(), set(), self._unlink_sync)
        removed = outcome[0] if outcome is not None else []
        for key in removed:
            self._forget(key)
        if count:
            self.evictions += len(removed)
        return removed

    async def _enforce_limits(self, now: float, *, check_expired: bool = True) -> list[str]:
        """Expired entries go, then the least recently used until the blobs fit ``max_bytes``."""
        evicted: list[str] = []
        expired = await self._call(self.index.expired, now - self.ttl_s) if check_expired else None
        if expired:
            evicted += await self._remove(expired, count=True)
        while (excess := self.index.totals.bytes - self.max_bytes) > 0:
            oldest = await self._call(self.index.oldest, EVICTION_BATCH)
            if not oldest:
                break  # nothing left to evict (what remains is pinned), or the index cannot say
            # The fewest entries whose sizes cover the excess: shared or pinned blobs free less, never more,
            # so this never evicts an entry the one-at-a-time rule would keep; the loop takes more if needed.
            batch, covered = [], 0
            for key, size in oldest:
                batch.append(key)
                covered += size
                if covered >= excess:
                    break
            evicted += await self._remove(batch, count=True)
        return evicted

    async def _drop_blob(self, bad: _BadBlob) -> None:
        """A blob read missing or damaged: dropped with its entries if it still is (see the invariants)."""

        def still_bad(row: BlobRow) -> bool:
            try:
                self._read_blob_sync(row.ref, row.ext)
            except _BadBlob:
                return True
            return False

        dropped = await self._call(self.index.drop_blob, bad.ref, still_bad, self._unlink_sync)
        if dropped is None:
            return
        log.warning("result cache: %s; dropped the entries that use it", bad)
        for key in dropped:
            self._forget(key)

    def _expired(self, created_at: float, now: float) -> bool:
        return now - created_at >= self.ttl_s

    # -- memory LRU (event loop only) ---------------------------------------------------------------------------

    def _remember(self, key: str, entry: _Entry) -> None:
        self._forget(key)
        if entry.size > self.memory_bytes:
            return
        self._memory[key] = entry
        self._memory_used += entry.size
        while self._memory_used > self.memory_bytes:
            _, oldest = self._memory.popitem(last=False)
            self._memory_used -= oldest.size

    def _forget(self, key: str) -> None:
        entry = self._memory.pop(key, None)
        if entry is not None:
            self._memory_used -= entry.size

    # -- files (worker threads) ---------------------------------------------------------------------------------

    def _read_blob_sync(self, ref: str, ext: str) -> bytes:
        """Read a blob and check it still hashes to its name (cheap integrity, no image decoding)."""
        try:
            data = self.blob_path(ref, ext).read_bytes()
        except FileNotFoundError:
            raise _BadBlob(ref, "is missing") from None
        if hashlib.sha256(data).hexdigest() != ref:
            raise _BadBlob(ref, "does not match its hash")
        return data

    def _read_all_sync(self, blobs: list[tuple[str, str]]) -> list[bytes]:
        return [self._read_blob_sync(ref, ext) for ref, ext in blobs]

    def _unlink_sync(self, blobs: list[tuple[str, str]]) -> None:
        for ref, ext in blobs:
            try:
                self.blob_path(ref, ext).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not delete cache blob %s: %s", ref[:12], exc)

    def _sweep_orphans_sync(self, known: set[str]) -> None:
        """Delete old blob files the index does not know (left by a crash between writing and indexing)."""
        if not self.blob_dir.is_dir():
            return
        cutoff = time.time() - ORPHAN_GRACE_S
        removed = 0
        for path in self.blob_dir.glob("*/*"):
            ref = path.name.split(".", 1)[0]
            orphan = path.name.startswith(".") or ref not in known
            try:
                if orphan and path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError as exc:
                log.debug("could not sweep %s: %s", path, exc)
        if removed:
            log.info("result cache: removed %d orphan blob files", removed)
