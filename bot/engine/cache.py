"""The result cache: the same normalised request is answered from disk instead of paying a backend again.

Images are content-addressed blob files (identical images stored once, shared by entries); an SQLite index maps
cache keys to their images. Recently used entries also stay in memory with their bytes. Every failure here is
a miss and a warning, never an error for the user: the cache is an optimisation.

All file and index work runs in worker threads (``asyncio.to_thread``) under one lock, so an operation such
as "store, then evict" is atomic with respect to the others and never blocks the event loop.

Several processes may share the directory (a fleet on one PostgreSQL, one ``DATA_DIR`` volume): each operation
also holds ``index.lock`` (``flock``, exclusive) across processes, so one process's eviction never unlinks a
blob another is indexing at that moment, and an entry served from one process's memory is checked against the
index (the touch it does anyway), so an entry another process evicted is a miss here too. SQLite's locking
needs a local filesystem (a Docker volume is; NFS is not).

Pins: the images of a job whose result has not been posted yet are pinned under the job's id. Eviction (TTL or
size) may drop the entry (no more cache hits for it) but never a pinned blob file, so a restart can still post
the result; unpinning lets the blobs no entry uses go.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from bot.engine.models import GeneratedImage, GenerationResult, ImageRequest
from bot.engine.store import has_foreign_header_sync, is_corruption, move_aside_sync

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Bump when the normalisation changes, so old entries simply stop matching instead of matching wrongly.
KEY_VERSION = 1
INDEX_VERSION = 1
INDEX_NAME = "index.sqlite3"
LOCK_NAME = "index.lock"
#: Orphan blob files younger than this are left alone at open (another writer may be about to index them).
ORPHAN_GRACE_S = 60.0

_REF_RE = re.compile(r"[0-9a-f]{64}")
_EXT_RE = re.compile(r"[a-z0-9]{1,8}")

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS entries (
        key          TEXT PRIMARY KEY,
        created_at   REAL NOT NULL,
        last_used_at REAL NOT NULL,
        backend      TEXT NOT NULL,
        model        TEXT,
        elapsed_s    REAL NOT NULL,
        images       TEXT NOT NULL,
        total_bytes  INTEGER NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS entries_last_used ON entries (last_used_at)",
    "CREATE INDEX IF NOT EXISTS entries_created ON entries (created_at)",
    # Which blobs each entry uses: a blob with no row here is unreferenced and can go.
    "CREATE TABLE IF NOT EXISTS entry_blobs (key TEXT NOT NULL, ref TEXT NOT NULL, PRIMARY KEY (key, ref))",
    "CREATE INDEX IF NOT EXISTS entry_blobs_ref ON entry_blobs (ref)",
    # Images of jobs whose result is not posted yet: kept on disk past TTL and size eviction until unpinned
    # (a restart re-posts them from here). Entries still expire; only the pinned blobs stay.
    "CREATE TABLE IF NOT EXISTS pins (job TEXT NOT NULL, ref TEXT NOT NULL, PRIMARY KEY (job, ref))",
    "CREATE INDEX IF NOT EXISTS pins_ref ON pins (ref)",
    """
    CREATE TABLE IF NOT EXISTS blobs (
        ref    TEXT PRIMARY KEY,
        ext    TEXT NOT NULL,
        format TEXT NOT NULL,
        width  INTEGER NOT NULL,
        height INTEGER NOT NULL,
        size   INTEGER NOT NULL
    )
    """,
)


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


class _IndexUnusable(Exception):
    """The index file is corrupt or from another version: move it aside and start empty."""


class _BadBlob(Exception):
    def __init__(self, ref: str, why: str) -> None:
        super().__init__(f"blob {ref[:12]}… {why}")
        self.ref = ref


@dataclass(frozen=True, slots=True)
class _Entry:
    result: GenerationResult  # as generated (from_cache False)
    created_at: float
    size: int
    refs: list[str]  # each image's content ref, in order


class ResultCache:
    """Generation results by cache key, on disk under ``directory`` with a bounded in-memory LRU in front."""

    def __init__(
        self,
        directory: Path,
        *,
        ttl_s: float,
        max_bytes: int,
        memory_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self._clock = clock
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._memory: OrderedDict[str, _Entry] = OrderedDict()
        self._memory_used = 0
        # Touched only from worker threads, under _lock.
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        #: ``index.lock``, flocked around each operation: other processes sharing the directory wait.
        self._lock_fd: int | None = None
        self._disk_entries = 0
        self._disk_bytes = 0

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_bytes > 0

    @property
    def blob_dir(self) -> Path:
        return self.directory / "blobs"

    @property
    def index_path(self) -> Path:
        return self.directory / INDEX_NAME

    def blob_path(self, ref: str, ext: str) -> Path:
        return self.blob_dir / ref[:2] / f"{ref}.{ext}"

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the index; a disabled cache touches nothing on disk."""
        if not self.enabled:
            log.info("result cache disabled (ttl_s=%s, max_bytes=%s)", self.ttl_s, self.max_bytes)
            return
        try:
            await asyncio.to_thread(self._open_sync)
        except (OSError, sqlite3.Error) as exc:
            # The bot works without a cache; say so loudly and carry on.
            log.warning("result cache at %s is unavailable, running without it: %s", self.directory, exc)
            return
        log.info(
            "result cache at %s: %d entries, %d bytes (limit %d)",
            self.directory,
            self._disk_entries,
            self._disk_bytes,
            self.max_bytes,
        )

    async def close(self) -> None:
        await asyncio.to_thread(self._close_sync)
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
        if not self.enabled:
            self.misses += 1
            return None
        now = self._clock()
        entry = self._memory.get(key)
        if entry is not None:
            if self._expired(entry.created_at, now):
                self._forget(key)
                await asyncio.to_thread(self._guarded, self._remove_sync, [key], True)
                self.misses += 1
                return None
            # Keep the disk LRU order honest for entries served from memory; an entry gone from the index
            # (another process sharing the cache evicted it) is gone here too.
            touched = await asyncio.to_thread(self._guarded, self._touch_sync, key, now)
            if touched is False:
                self._forget(key)
                self.misses += 1
                return None
            self._memory.move_to_end(key)
            self.hits += 1
            return replace(entry.result, from_cache=True), list(entry.refs)
        entry = await asyncio.to_thread(self._guarded, self._load_sync, key, now)
        if entry is None:
            self.misses += 1
            return None
        self._remember(key, entry)
        self.hits += 1
        return replace(entry.result, from_cache=True), list(entry.refs)

    async def put(self, key: str, result: GenerationResult) -> list[str]:
        """Store ``result`` under ``key``; return each image's content ref (sha256 hex), in order."""
        refs = await asyncio.to_thread(_hash_all_sync, [image.data for image in result.images])
        if not self.enabled:
            return refs
        result = replace(result, from_cache=False)
        now = self._clock()
        outcome = await asyncio.to_thread(self._guarded, self._store_sync, key, result, refs, now)
        if outcome is None:
            return refs
        stored, evicted = outcome
        for gone in evicted:
            self._forget(gone)
        if stored:
            size = sum(len(image.data) for image in result.images)
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
        return await asyncio.to_thread(self._guarded, self._read_images_sync, list(refs))

    async def refs_of(self, keys: Iterable[str]) -> set[str]:
        """The image refs the entries ``keys`` use (an empty set for unknown keys or a disabled cache)."""
        keys = [key for key in keys if key]
        if not keys or not self.enabled:
            return set()
        refs = await asyncio.to_thread(self._guarded, self._refs_of_sync, keys)
        return refs or set()

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
        removed = await asyncio.to_thread(self._guarded, self._discard_sync, keys, set(refs), set(keep))
        return removed or 0

    async def pin(self, job_id: str, refs: Sequence[str]) -> None:
        """Keep these images on disk for ``job_id`` until :meth:`unpin` (its result is being posted)."""
        refs = [ref for ref in refs if _REF_RE.fullmatch(ref)]
        if self.enabled and refs:
            await asyncio.to_thread(self._guarded, self._pin_sync, job_id, refs)

    async def unpin(self, job_id: str) -> None:
        """The job's result is posted (or never will be): its images are ordinary cache blobs again."""
        if self.enabled:
            await asyncio.to_thread(self._guarded, self._unpin_sync, job_id)

    def pinned_jobs(self) -> set[str]:
        """Jobs holding pins (blocking: a probe for tests and checks, not for the event loop)."""
        with self._lock, self._shared_lock():
            if self._db is None:
                return set()
            return {row[0] for row in self._db.execute("SELECT DISTINCT job FROM pins")}

    def stats(self) -> dict[str, int]:
        return {
            "entries": self._disk_entries,
            "bytes": self._disk_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }

    # -- memory LRU (event loop only) ---------------------------------------------------------------------------

    def _expired(self, created_at: float, now: float) -> bool:
        return now - created_at >= self.ttl_s

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

    # -- disk (worker threads, under _lock) ---------------------------------------------------------------------

    @contextmanager
    def _shared_lock(self) -> Iterator[None]:
        """Exclusive among the processes sharing the directory (callers hold ``_lock`` already)."""
        fd = self._lock_fd
        if fd is None:
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T | None:
        """Run ``fn`` under the locks; any index or file failure becomes None (a miss) and a warning."""
        with self._lock, self._shared_lock():
            if self._db is None:
                return None
            try:
                return fn(*args)
            except sqlite3.Error as exc:
                if is_corruption(exc):
                    log.warning("result cache index %s is corrupt (%s); starting empty", self.index_path, exc)
                    self._reset_index_sync()
                else:
                    log.warning("result cache index error, treating as a miss: %s", exc)
                return None
            except OSError as exc:
                log.warning("result cache file error, treating as a miss: %s", exc)
                return None

    def _open_sync(self) -> None:
        with self._lock:
            if self._db is not None:
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            if self._lock_fd is None:
                self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                with self._shared_lock():
                    self._open_index_sync()
            except BaseException:
                self._close_db_sync()
                self._close_lock_sync()
                raise

    def _open_index_sync(self) -> None:
        try:
            self._connect_sync()
        except _IndexUnusable as exc:
            self._close_db_sync()
            moved = move_aside_sync(self.index_path)
            log.warning("result cache index %s is unusable (%s); moved to %s", self.index_path, exc, moved)
            self._connect_sync()
        self._refresh_totals_sync()
        self._sweep_orphans_sync()

    def _close_lock_sync(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def _connect_sync(self) -> None:
        """Connect and create the schema; raise _IndexUnusable when the file must be moved aside."""
        if has_foreign_header_sync(self.index_path):
            raise _IndexUnusable("file is not a database")
        db = sqlite3.connect(self.index_path, timeout=5.0, isolation_level=None, check_same_thread=False)
        self._db = db
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            check = db.execute("PRAGMA quick_check").fetchone()
            (version,) = db.execute("PRAGMA user_version").fetchone()
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                raise _IndexUnusable(str(exc)) from exc
            raise
        if check is None or check[0] != "ok":
            raise _IndexUnusable(f"quick_check: {check}")
        if version not in (0, INDEX_VERSION):
            # A cache is disposable: an index from another version is set aside rather than migrated.
            raise _IndexUnusable(f"index version {version}, this code uses {INDEX_VERSION}")
        with self._transaction():
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {INDEX_VERSION}")

    def _close_db_sync(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error as exc:
                log.debug("closing the cache index: %s", exc)

    def _close_sync(self) -> None:
        with self._lock:
            self._close_db_sync()
            self._close_lock_sync()

    def _reset_index_sync(self) -> None:
        """Quarantine a corrupt index met at runtime and carry on with an empty one."""
        self._close_db_sync()
        try:
            moved = move_aside_sync(self.index_path)
            log.warning("moved the corrupt cache index to %s", moved)
            self._connect_sync()
            self._refresh_totals_sync()
        except (OSError, sqlite3.Error, _IndexUnusable) as exc:
            log.warning("result cache index could not be recreated, cache off until restart: %s", exc)
            self._close_db_sync()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._require_db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("cache index is closed")
        return self._db

    def _refresh_totals_sync(self) -> None:
        db = self._require_db()
        self._disk_entries = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        self._disk_bytes = db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]

    def _sweep_orphans_sync(self) -> None:
        """Delete blob files no entry references (left by a crash between writing a blob and indexing it)."""
        if not self.blob_dir.is_dir():
            return
        known = {row[0] for row in self._require_db().execute("SELECT ref FROM blobs")}
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

    def _touch_sync(self, key: str, now: float) -> bool:
        """Mark the entry used; False when the index has no such entry (any more)."""
        cursor = self._require_db().execute("UPDATE entries SET last_used_at = ? WHERE key = ?", (now, key))
        return cursor.rowcount > 0

    def _read_blob_sync(self, ref: str, ext: str) -> bytes:
        """Read a blob and check it still hashes to its name (cheap integrity, no image decoding)."""
        try:
            data = self.blob_path(ref, ext).read_bytes()
        except FileNotFoundError:
            raise _BadBlob(ref, "is missing") from None
        if hashlib.sha256(data).hexdigest() != ref:
            raise _BadBlob(ref, "does not match its hash")
        return data

    def _drop_blob_sync(self, bad: _BadBlob) -> list[str]:
        """Forget a damaged or missing blob and every entry using it; return those entries' keys."""
        log.warning("result cache: %s; dropping the entries that use it", bad)
        db = self._require_db()
        keys = [row[0] for row in db.execute("SELECT key FROM entry_blobs WHERE ref = ?", (bad.ref,))]
        row = db.execute("SELECT ext FROM blobs WHERE ref = ?", (bad.ref,)).fetchone()
        self._remove_sync(keys, False)
        # If nothing referenced it the row is already gone; make sure the bad file is too.
        if row is not None:
            self.blob_path(bad.ref, row[0]).unlink(missing_ok=True)
            with self._transaction() as tx:
                tx.execute("DELETE FROM blobs WHERE ref = ?", (bad.ref,))
            self._refresh_totals_sync()
        return keys

    def _load_sync(self, key: str, now: float) -> _Entry | None:
        db = self._require_db()
        row = db.execute(
            "SELECT created_at, backend, model, elapsed_s, images FROM entries WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        created_at, backend, model, elapsed_s, images_json = row
        if self._expired(created_at, now):
            self._remove_sync([key], True)
            return None
        images: list[GeneratedImage] = []
        refs: list[str] = []
        try:
            for item in json.loads(images_json):
                ref, fmt = item["ref"], item["format"]
                data = self._read_blob_sync(ref, _extension(fmt))
                images.append(GeneratedImage(data, fmt, item["width"], item["height"], item.get("seed")))
                refs.append(ref)
        except _BadBlob as bad:
            self._drop_blob_sync(bad)
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("result cache entry %s is unreadable (%s); dropping it", key[:12], exc)
            self._remove_sync([key], False)
            return None
        self._touch_sync(key, now)
        result = GenerationResult(tuple(images), backend, model, elapsed_s)
        return _Entry(result, created_at, sum(len(image.data) for image in images), refs)

    def _store_sync(
        self, key: str, result: GenerationResult, refs: list[str], now: float
    ) -> tuple[bool, list[str]]:
        """Write blobs then index the entry, then enforce TTL and size. Returns (stored, evicted keys)."""
        db = self._require_db()
        for image, ref in zip(result.images, refs, strict=True):
            path = self.blob_path(ref, _extension(image.format))
            indexed = db.execute("SELECT 1 FROM blobs WHERE ref = ?", (ref,)).fetchone() is not None
            # An indexed blob is trusted (reads verify it); anything else is (re)written.
            if not (indexed and path.exists()):
                _write_file_atomic_sync(path, image.data)
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
        total = sum(len(image.data) for image in result.images)
        with self._transaction() as db:
            old = [row[0] for row in db.execute("SELECT ref FROM entry_blobs WHERE key = ?", (key,))]
            db.execute("DELETE FROM entry_blobs WHERE key = ?", (key,))
            db.execute(
                "INSERT OR REPLACE INTO entries "
                "(key, created_at, last_used_at, backend, model, elapsed_s, images, total_bytes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, now, now, result.backend, result.model, result.elapsed_s, json.dumps(images), total),
            )
            for image, ref in zip(result.images, refs, strict=True):
                db.execute(
                    "INSERT OR IGNORE INTO blobs (ref, ext, format, width, height, size) VALUES (?, ?, ?, ?, ?, ?)",
                    (ref, _extension(image.format), image.format, image.width, image.height, len(image.data)),
                )
                db.execute("INSERT OR IGNORE INTO entry_blobs (key, ref) VALUES (?, ?)", (key, ref))
            unreferenced = self._unreferenced_sync(old)
            db.executemany("DELETE FROM blobs WHERE ref = ?", [(ref,) for ref, _ in unreferenced])
        self._unlink_blobs_sync(unreferenced)
        self._refresh_totals_sync()
        evicted = self._enforce_limits_sync(now)
        return key not in evicted, evicted

    def _enforce_limits_sync(self, now: float) -> list[str]:
        db = self._require_db()
        expired = [
            row[0] for row in db.execute("SELECT key FROM entries WHERE created_at <= ?", (now - self.ttl_s,))
        ]
        if expired:
            self._remove_sync(expired, True)
        evicted = list(expired)
        if self._disk_bytes <= self.max_bytes:
            return evicted
        oldest_first = [row[0] for row in db.execute("SELECT key FROM entries ORDER BY last_used_at, rowid")]
        for key in oldest_first:
            if self._disk_bytes <= self.max_bytes:
                break
            self._remove_sync([key], True)
            evicted.append(key)
        return evicted

    def _pin_sync(self, job_id: str, refs: list[str]) -> None:
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO pins (job, ref) VALUES (?, ?)", [(job_id, r) for r in refs])

    def _unpin_sync(self, job_id: str) -> None:
        with self._transaction() as db:
            refs = [row[0] for row in db.execute("SELECT ref FROM pins WHERE job = ?", (job_id,))]
            db.execute("DELETE FROM pins WHERE job = ?", (job_id,))
            unreferenced = self._unreferenced_sync(refs)
            db.executemany("DELETE FROM blobs WHERE ref = ?", [(ref,) for ref, _ in unreferenced])
        self._unlink_blobs_sync(unreferenced)
        self._refresh_totals_sync()

    def _unreferenced_sync(self, refs: Iterable[str]) -> list[tuple[str, str]]:
        """Those of ``refs`` no entry uses and no job pins any more, with their extensions."""
        db = self._require_db()
        result = []
        for ref in set(refs):
            used = db.execute(
                "SELECT 1 FROM entry_blobs WHERE ref = ? UNION ALL SELECT 1 FROM pins WHERE ref = ? LIMIT 1",
                (ref, ref),
            ).fetchone()
            if used is None:
                row = db.execute("SELECT ext FROM blobs WHERE ref = ?", (ref,)).fetchone()
                if row is not None:
                    result.append((ref, row[0]))
        return result

    def _unlink_blobs_sync(self, blobs: Iterable[tuple[str, str]]) -> None:
        for ref, ext in blobs:
            try:
                self.blob_path(ref, ext).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not delete cache blob %s: %s", ref[:12], exc)

    def _remove_sync(self, keys: list[str], count_eviction: bool) -> None:
        """Delete entries, then the blobs no other entry shares (index first: a crash leaves orphans, not holes)."""
        if not keys:
            return
        with self._transaction() as db:
            refs: list[str] = []
            for key in keys:
                refs.extend(row[0] for row in db.execute("SELECT ref FROM entry_blobs WHERE key = ?", (key,)))
                db.execute("DELETE FROM entry_blobs WHERE key = ?", (key,))
                removed = db.execute("DELETE FROM entries WHERE key = ?", (key,)).rowcount
                if count_eviction and removed:
                    self.evictions += 1
            unreferenced = self._unreferenced_sync(refs)
            db.executemany("DELETE FROM blobs WHERE ref = ?", [(ref,) for ref, _ in unreferenced])
        self._unlink_blobs_sync(unreferenced)
        self._refresh_totals_sync()

    def _refs_of_sync(self, keys: list[str]) -> set[str]:
        db = self._require_db()
        refs: set[str] = set()
        for key in keys:
            refs.update(row[0] for row in db.execute("SELECT ref FROM entry_blobs WHERE key = ?", (key,)))
        return refs

    def _discard_sync(self, keys: list[str], refs: set[str], keep: set[str]) -> int:
        """Entries first, then unreferenced blobs (index before files: a crash leaves orphans, not holes)."""
        with self._transaction() as db:
            for key in keys:
                refs.update(row[0] for row in db.execute("SELECT ref FROM entry_blobs WHERE key = ?", (key,)))
                db.execute("DELETE FROM entry_blobs WHERE key = ?", (key,))
                db.execute("DELETE FROM entries WHERE key = ?", (key,))
            # A blob a remaining job lists keeps its row (so /show still finds it) and its file.
            unreferenced = [(ref, ext) for ref, ext in self._unreferenced_sync(refs) if ref not in keep]
            db.executemany("DELETE FROM blobs WHERE ref = ?", [(ref,) for ref, _ in unreferenced])
        self._unlink_blobs_sync(unreferenced)
        self._refresh_totals_sync()
        return len(unreferenced)

    def _read_images_sync(self, refs: list[str]) -> list[GeneratedImage] | None:
        db = self._require_db()
        images = []
        for ref in refs:
            row = db.execute("SELECT ext, format, width, height FROM blobs WHERE ref = ?", (ref,)).fetchone()
            if row is None:
                return None
            ext, fmt, width, height = row
            try:
                data = self._read_blob_sync(ref, ext)
            except _BadBlob as bad:
                self._drop_blob_sync(bad)
                return None
            images.append(GeneratedImage(data, fmt, width, height))
        return images
