"""Per-guild rules: settings, blocked words and daily quotas, enforced in the job manager's one admission path.

:class:`GuildPolicy` keeps every guild's :class:`GuildSettings` and today's per-user image counts in memory and
plugs two hooks into :class:`~bot.engine.manager.JobManager`:

- a *request default* (``apply_defaults``): the guild's default size and model, and its NSFW policy;
- an *admission check* (``check``): allowed channels, blocked words, the daily image quota.

Both are synchronous and touch memory only, so ``/imagine`` and every button (Reroll, Variations) are judged the
same way within Discord's 3-second deadline. Settings are written to the store before they apply; today's counts
are loaded once at start-up and then kept up to date by a job listener. Nothing here imports discord.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bot.engine.errors import RequestRejected
from bot.engine.manager import AdmissionContext, JobEvent
from bot.engine.models import ImageRequest, Job, JobState, model_refusal, parse_size
from bot.engine.wordfilter import WordMatcher

if TYPE_CHECKING:
    from bot.engine.manager import JobManager
    from bot.engine.store import JobStore

log = logging.getLogger(__name__)

#: NSFW policies: ``age-restricted`` allows NSFW output only in age-restricted channels; ``never`` nowhere.
NSFW_AGE_RESTRICTED = "age-restricted"
NSFW_NEVER = "never"
NSFW_POLICIES = (NSFW_AGE_RESTRICTED, NSFW_NEVER)

MAX_BLOCKED_WORDS = 200
MAX_BLOCKED_WORD_CHARS = 50
#: Wildcards per entry: enough for ``*word*``, few enough that matching stays cheap.
MAX_WILDCARDS = 2
MAX_CHANNELS = 100
MAX_DAILY_IMAGES = 100_000

SETTING_NAMES = (
    "concurrency",
    "max_jobs_per_user",
    "daily_images",
    "nsfw",
    "default_size",
    "default_model",
    "channels",
    "blocked_words",
)


class InvalidGuildSetting(ValueError):
    """A setting value an admin gave cannot be used; ``message`` says why, in one sentence."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# -- text normalisation and blocked words ------------------------------------------------------------------


def fold(text: str) -> str:
    """Case-folded NFKC text without invisible format characters: what blocked words are matched against.

    NFKC maps compatibility forms (fullwidth letters, ligatures, ``U+01C5``) to plain letters; casefold is
    case-insensitive comparison done right (``ß`` -> ``ss``); NFKC again because casefold can un-normalise.
    Format characters (zero-width space/joiner, soft hyphen) are dropped so they cannot split a word.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def normalise_blocked_word(word: str) -> str:
    """The stored form of one entry: folded, spaces collapsed, runs of ``*`` collapsed; raises InvalidGuildSetting."""
    entry = " ".join(fold(word).split())
    entry = re.sub(r"\*+", "*", entry)
    if not entry:
        raise InvalidGuildSetting("A blocked word cannot be empty.")
    if not entry.replace("*", "").strip():
        raise InvalidGuildSetting(f"{word.strip()!r} would block every prompt; add some letters.")
    if len(entry) > MAX_BLOCKED_WORD_CHARS:
        raise InvalidGuildSetting(f"Blocked words are at most {MAX_BLOCKED_WORD_CHARS} characters each.")
    if entry.count("*") > MAX_WILDCARDS:
        raise InvalidGuildSetting(f"A blocked word can have at most {MAX_WILDCARDS} `*` wildcards.")
    return entry


def split_words(text: str) -> list[str]:
    """``"a, b ,c"`` -> ``["a", "b", "c"]`` (comma-separated, blanks dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]


class BlockedWords:
    """Whole-word matching of a guild's blocked words (``*`` wildcards, no regular expressions).

    ``*`` is any run of word characters within one word, a space any whitespace; an entry starting or ending
    with a letter, digit or ``*`` matches only at a word boundary there.

    ``cat`` matches "a Cat!" and its fullwidth form but not "concatenate"; ``cat*`` matches "cats"; ``*cat`` "bobcat";
    ``c++`` and ``a.b`` match only themselves.
    """

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.entries: tuple[str, ...] = tuple(dict.fromkeys(normalise_blocked_word(e) for e in entries))
        if len(self.entries) > MAX_BLOCKED_WORDS:
            raise InvalidGuildSetting(f"At most {MAX_BLOCKED_WORDS} blocked words per server.")
        # Compiled once per list (a guild's list changes rarely; admissions are many).
        self._matcher = WordMatcher(self.entries) if self.entries else None

    def __bool__(self) -> bool:
        return bool(self.entries)

    def find(self, *texts: str) -> str | None:
        """The first entry found in any of ``texts`` (for logs; never shown to the user), else None.

        Linear in the texts' length whatever the list holds (:mod:`bot.engine.wordfilter`).
        """
        if self._matcher is None:
            return None
        for text in texts:
            if text:
                found = self._matcher.first(fold(text))
                if found is not None:
                    return found
        return None

    def matches(self, *texts: str) -> bool:
        return self.find(*texts) is not None


# -- settings ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GuildSettings:
    """One guild's rules. ``None`` means "the operator's default" (from the environment)."""

    concurrency: int | None = None
    max_jobs_per_user: int | None = None
    daily_images: int = 0  # 0 = unlimited
    nsfw: str = NSFW_AGE_RESTRICTED
    default_size: str | None = None  # "WxH"
    default_model: str | None = None
    channels: tuple[int, ...] = ()  # empty = every channel
    blocked_words: tuple[str, ...] = ()

    def replace(self, **changes: Any) -> GuildSettings:
        return dataclasses.replace(self, **changes)

    def validated(
        self,
        *,
        concurrency_max: int | None = None,
        models: Sequence[str] = (),
        sizes: Sequence[tuple[int, int]] = (),
    ) -> tuple[GuildSettings, list[str]]:
        """Check every value; clamp concurrency to the operator's ceiling. Returns (settings, notes for the admin).

        Raises :class:`InvalidGuildSetting` for a value that cannot be used at all.
        """
        notes: list[str] = []
        concurrency = self.concurrency
        if concurrency is not None:
            if concurrency < 1:
                raise InvalidGuildSetting("Concurrency must be at least 1.")
            if concurrency_max is not None and concurrency > concurrency_max:
                notes.append(
                    f"Concurrency {concurrency} is above this bot's ceiling (GUILD_CONCURRENCY_MAX); "
                    f"set to {concurrency_max}."
                )
                concurrency = concurrency_max
        if self.max_jobs_per_user is not None and self.max_jobs_per_user < 1:
            raise InvalidGuildSetting("Max jobs per user must be at least 1.")
        if not 0 <= self.daily_images <= MAX_DAILY_IMAGES:
            raise InvalidGuildSetting(f"Daily images must be between 0 (unlimited) and {MAX_DAILY_IMAGES}.")
        if self.nsfw not in NSFW_POLICIES:
            raise InvalidGuildSetting(f"NSFW policy must be one of {', '.join(NSFW_POLICIES)}.")
        default_size = self.default_size
        if default_size is not None:
            try:
                width, height = parse_size(default_size)
            except RequestRejected as exc:
                raise InvalidGuildSetting(exc.message) from None
            if sizes and (width, height) not in sizes:
                offered = ", ".join(f"{w}x{h}" for w, h in sizes)
                raise InvalidGuildSetting(f"Size {default_size} is not offered; choose one of {offered}.")
            default_size = f"{width}x{height}"
        if self.default_model is not None and self.default_model not in models:
            if not models:
                raise InvalidGuildSetting(
                    "This bot offers no model choice (IMAGE_MODELS is empty and the backend lists none)."
                )
            raise InvalidGuildSetting(model_refusal(self.default_model, models))  # names a few of a long list
        if len(set(self.channels)) > MAX_CHANNELS:
            raise InvalidGuildSetting(f"At most {MAX_CHANNELS} channels.")
        words = BlockedWords(self.blocked_words)  # validates and normalises every entry, and the count
        settings = self.replace(
            concurrency=concurrency,
            default_size=default_size,
            channels=tuple(sorted(set(self.channels))),
            blocked_words=words.entries,
        )
        return settings, notes

    # -- JSON document (JobStore.set_guild_settings) -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Only what differs from the defaults, so a new default reaches guilds that never changed it."""
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if value != default:
                data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuildSettings:
        """Tolerant: a value this version cannot read is logged and left at its default, never fatal."""
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name not in SETTING_NAMES:
                continue
            try:
                values[name] = _coerce(name, value)
            except (TypeError, ValueError) as exc:
                log.warning("ignoring unreadable guild setting %s=%r: %s", name, value, exc)
        settings = cls(**values)
        try:
            BlockedWords(settings.blocked_words)
        except InvalidGuildSetting as exc:
            log.warning("ignoring unreadable blocked words: %s", exc.message)
            settings = settings.replace(blocked_words=())
        return settings


def _coerce(name: str, value: Any) -> Any:
    if name in ("concurrency", "max_jobs_per_user"):
        return None if value is None else _int(value)
    if name == "daily_images":
        return max(0, _int(value))
    if name == "nsfw":
        if value not in NSFW_POLICIES:
            raise ValueError("unknown NSFW policy")
        return value
    if name in ("default_size", "default_model"):
        return None if value is None else str(value)
    if name == "channels":
        return tuple(sorted({_int(v) for v in value}))
    if name == "blocked_words":
        if isinstance(value, str):
            raise TypeError("expected a list")
        return tuple(str(v) for v in value)
    raise ValueError(name)


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("expected an integer")
    return int(value)


# -- quotas -----------------------------------------------------------------------------------------------------


def utc_day(timestamp: float) -> dt.date:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).date()


def day_start(day: dt.date) -> float:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


class QuotaTracker:
    """Images generated today per (guild, user); the day resets at UTC midnight."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._day = utc_day(clock())
        self._used: Counter[tuple[int, int]] = Counter()

    def _roll(self) -> dt.date:
        today = utc_day(self.clock())
        if today != self._day:
            self._day = today
            self._used.clear()
        return today

    @property
    def today(self) -> dt.date:
        return self._roll()

    def today_start(self) -> float:
        return day_start(self._roll())

    def resets_at(self) -> float:
        """The next UTC midnight (a POSIX timestamp)."""
        return day_start(self._roll() + dt.timedelta(days=1))

    def load(self, day: dt.date, counts: Mapping[tuple[int, int], int]) -> None:
        """Counts read from the store for ``day``; ignored when the day is already over."""
        if day != self._roll():
            return
        for key, count in counts.items():
            self._used[key] = max(self._used[key], int(count))

    def used(self, guild_id: int, user_id: int) -> int:
        self._roll()
        return self._used[(guild_id, user_id)]

    def add(self, guild_id: int, user_id: int, images: int) -> None:
        self._roll()
        if images > 0:
            self._used[(guild_id, user_id)] += images


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    limit: int  # 0 = unlimited
    used: int  # generated today
    in_flight: int  # requested by queued and running jobs
    resets_at: float

    @property
    def unlimited(self) -> bool:
        return self.limit <= 0

    @property
    def remaining(self) -> int | None:
        return None if self.unlimited else max(0, self.limit - self.used - self.in_flight)


# -- the policy -----------------------------------------------------------------------------------------------


@dataclass
class _Compiled:
    settings: GuildSettings
    blocked: BlockedWords = field(default_factory=BlockedWords)


class GuildPolicy:
    """Owns the per-guild settings in memory and enforces them through the manager's admission hooks."""

    def __init__(
        self,
        manager: JobManager,
        *,
        store: JobStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.manager = manager
        self.store = store if store is not None else manager.store
        self.clock = clock
        self.quota = QuotaTracker(clock)
        self._guilds: dict[int, _Compiled] = {}
        self._lock = asyncio.Lock()
        self._installed = False

    # -- start-up ----------------------------------------------------------------------------------------------
    async def load(self) -> None:
        """Read every guild's settings and today's image counts; apply the limits to the manager."""
        if self.store is None:
            return
        for guild_id, document in (await self.store.all_guild_settings()).items():
            settings = GuildSettings.from_dict(document)
            self._set(guild_id, settings)
        day = self.quota.today
        counts = await self.store.count_images_by_user_since(day_start(day))
        self.quota.load(day, counts)
        log.info("guild policy loaded", extra={"guilds": len(self._guilds), "users_today": len(counts)})

    def install(self) -> None:
        """Plug the hooks into the manager (once)."""
        if self._installed:
            return
        self.manager.request_defaults.append(self.apply_defaults)
        self.manager.admission_checks.append(self.check)
        self.manager.add_listener(self.on_job_event)
        self._installed = True

    def uninstall(self) -> None:
        if not self._installed:
            return
        self.manager.request_defaults.remove(self.apply_defaults)
        self.manager.admission_checks.remove(self.check)
        self.manager.remove_listener(self.on_job_event)
        self._installed = False

    # -- settings ------------------------------------------------------------------------------------------
    def settings_for(self, guild_id: int) -> GuildSettings:
        compiled = self._guilds.get(guild_id)
        return compiled.settings if compiled else GuildSettings()

    def effective_concurrency(self, guild_id: int) -> int:
        return self.manager.guild_limit(guild_id)

    def effective_max_jobs(self, guild_id: int) -> int:
        return self.manager.user_limit(guild_id)

    async def update(self, guild_id: int, **changes: Any) -> tuple[GuildSettings, list[str]]:
        """Validate, persist, then apply. Returns the new settings and notes (e.g. a clamped value).

        Raises :class:`InvalidGuildSetting` for an unusable value (nothing changes then).
        """
        unknown = set(changes) - set(SETTING_NAMES)
        if unknown:
            raise InvalidGuildSetting(f"Unknown setting {', '.join(sorted(unknown))}.")
        async with self._lock:
            current = self.settings_for(guild_id)
            settings, notes = current.replace(**changes).validated(
                concurrency_max=self.manager.guild_concurrency_max,
                models=self.manager.models,
                sizes=self.manager.capabilities.sizes,
            )
            if self.store is not None:
                await self.store.set_guild_settings(guild_id, settings.to_dict())
            self._set(guild_id, settings)
            return settings, notes

    async def reset(self, guild_id: int, names: Iterable[str] | None = None) -> GuildSettings:
        """Put the named settings (all when None) back to their defaults."""
        defaults = GuildSettings()
        wanted = SETTING_NAMES if names is None else tuple(names)
        settings, _ = await self.update(guild_id, **{n: getattr(defaults, n) for n in wanted})
        return settings

    def _set(self, guild_id: int, settings: GuildSettings) -> None:
        self._guilds[guild_id] = _Compiled(settings, BlockedWords(settings.blocked_words))
        self.manager.set_guild_limit(guild_id, settings.concurrency)
        self.manager.set_user_limit(guild_id, settings.max_jobs_per_user)

    # -- quota ------------------------------------------------------------------------------------------------
    def quota_status(self, guild_id: int, user_id: int) -> QuotaStatus:
        return QuotaStatus(
            limit=self.settings_for(guild_id).daily_images,
            used=self.quota.used(guild_id, user_id),
            in_flight=self._in_flight(guild_id, user_id),
            resets_at=self.quota.resets_at(),
        )

    def _in_flight(self, guild_id: int, user_id: int) -> int:
        # The manager keeps the one record of what a member has queued, running or admitted (its images
        # stop counting only after FINISHED is heard here, so the quota below never has a gap).
        return self.manager.images_in_flight(guild_id, user_id)

    def on_job_event(self, job: Job, event: JobEvent) -> None:
        if event is JobEvent.FINISHED and job.state is JobState.SUCCEEDED and not job.from_cache:
            # Seeds, one per image, exist with or without a cache: the count a restart reloads is the same.
            self.quota.add(job.guild_id, job.user_id, len(job.seeds) or job.request.count)

    # -- admission hooks (synchronous, in memory) ---------------------------------------------------------
    def apply_defaults(self, request: ImageRequest, context: AdmissionContext) -> ImageRequest:
        settings = self.settings_for(context.guild_id)
        changes: dict[str, Any] = {}
        if request.model is None and settings.default_model and settings.default_model in self.manager.models:
            changes["model"] = settings.default_model
        if (request.width <= 0 or request.height <= 0) and settings.default_size:
            size = parse_size(settings.default_size)
            sizes = self.manager.capabilities.sizes
            if not sizes or size in sizes:
                changes["width"], changes["height"] = size
        allowed = request.nsfw_allowed and context.channel_nsfw and settings.nsfw == NSFW_AGE_RESTRICTED
        if allowed != request.nsfw_allowed:
            changes["nsfw_allowed"] = allowed
        return request.replace(**changes) if changes else request

    def check(self, request: ImageRequest, context: AdmissionContext) -> None:
        compiled = self._guilds.get(context.guild_id)
        if compiled is None:
            return
        settings = compiled.settings
        if settings.channels and context.channel_id not in settings.channels:
            where = ", ".join(f"<#{c}>" for c in settings.channels[:10])
            raise RequestRejected(
                f"Images can't be made in this channel on this server. Try {where}.", code="channel"
            )
        if compiled.blocked:
            found = compiled.blocked.find(request.prompt, request.negative_prompt)
            if found is not None:
                log.info("prompt refused: blocked word", extra={"guild": context.guild_id})
                raise RequestRejected(
                    "Your prompt contains a word this server does not allow; change it and try again.",
                    code="blocked_word",
                )
        limit = settings.daily_images
        if limit > 0:
            status = self.quota_status(context.guild_id, context.user_id)
            left = max(0, (status.remaining or 0) - context.pending_images)
            if request.count > left:
                reset = f"at 00:00 UTC (<t:{int(status.resets_at)}:R>)"
                pending = f" ({status.in_flight} still in progress)" if status.in_flight else ""
                if left == 0:
                    text = f"You have used your {limit} images for today{pending}; the quota resets {reset}."
                else:
                    text = (
                        f"You have {left} of your {limit} daily images left{pending} and asked for "
                        f"{request.count}; ask for fewer, or wait: the quota resets {reset}."
                    )
                raise RequestRejected(text, code="quota")
