"""Guild policy units: the blocked-words matcher, quota days, settings validation and the admission hooks."""

from __future__ import annotations

import datetime as dt

import pytest

from bot.engine.backend import Backend, Capabilities
from bot.engine.errors import RequestRejected
from bot.engine.manager import AdmissionContext, JobEvent, JobManager
from bot.engine.models import ImageRequest, Job, JobState
from bot.engine.policy import (
    MAX_BLOCKED_WORDS,
    NSFW_NEVER,
    BlockedWords,
    GuildPolicy,
    GuildSettings,
    InvalidGuildSetting,
    QuotaTracker,
    fold,
    split_words,
)

# -- blocked words ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "text", "blocked"),
    [
        ("cat", "a cat sat", True),
        ("cat", "A CAT!", True),
        ("cat", "concatenate", False),  # word boundaries
        ("cat", "cats", False),
        ("cat", "bobcat", False),
        ("cat*", "cats and dogs", True),
        ("cat*", "category", True),
        ("cat*", "bobcat", False),
        ("*cat", "bobcat", True),
        ("*cat*", "bobcats", True),
        ("c*t", "coat", True),
        ("c*t", "c t", False),  # a wildcard never crosses a word
        ("red fox", "a red   fox", True),  # phrases: any whitespace between words
        ("red fox", "redfox", False),
        ("cat", "\uff43\uff41\uff54 picture", True),  # fullwidth letters (NFKC)
        ("dž", "\u01c5ungla", False),  # U+01C5 is a whole letter pair: not the word "dž" alone
        ("džungla", "\u01c5ungla", True),  # ... but folds to "dž" inside words (NFKC + casefold)
        ("\u01c4", "dž", True),  # an entry in one case form matches every form
        ("strasse", "Straße", True),  # casefold, not lower()
        ("cat", "c\u200bat", True),  # zero-width space cannot split a word
        ("a.b", "axb", False),  # regex metacharacters are literal
        ("a.b", "see a.b now", True),
        ("c++", "I like c++", True),
        ("c++", "I like cc", False),
        ("(x|y)", "x", False),
        ("(x|y)", "try (x|y) here", True),
        ("[a-z]", "q", False),
        ("\\d", "5", False),
    ],
)
def test_blocked_words_match_whole_words_literally(entry: str, text: str, blocked: bool) -> None:
    assert BlockedWords([entry]).matches(text) is blocked


def test_blocked_words_check_every_text_and_report_the_entry() -> None:
    words = BlockedWords(["gore", "blood*"])
    assert words.find("a nice landscape", "") is None
    assert words.find("a nice landscape", "no bloody stuff") == "blood*"  # the negative prompt counts too
    assert words.find("GORE") == "gore"


def test_blocked_words_entries_are_normalised_and_deduplicated() -> None:
    words = BlockedWords(["Cat", " cat ", "\uff23\uff21\uff34", "Red   Fox", "cat**"])
    assert words.entries == ("cat", "red fox", "cat*")


@pytest.mark.parametrize("entry", ["", "   ", "*", "**", "a***b***c***d", "x" * 51])
def test_unusable_blocked_words_are_refused(entry: str) -> None:
    with pytest.raises(InvalidGuildSetting):
        BlockedWords([entry])


def test_at_most_200_blocked_words() -> None:
    assert len(BlockedWords([f"w{i}" for i in range(MAX_BLOCKED_WORDS)]).entries) == MAX_BLOCKED_WORDS
    with pytest.raises(InvalidGuildSetting, match="200"):
        BlockedWords([f"w{i}" for i in range(MAX_BLOCKED_WORDS + 1)])


def test_fold_and_split_words() -> None:
    assert fold("\uff21\uff22\uff23") == "abc"
    assert fold("\u01c5") == "dž"
    assert split_words(" gore, blood* ,, red fox ") == ["gore", "blood*", "red fox"]


# -- quota days ---------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, when: dt.datetime) -> None:
        self.now = when.timestamp()

    def __call__(self) -> float:
        return self.now


def test_quota_resets_at_utc_midnight() -> None:
    clock = Clock(dt.datetime(2026, 3, 1, 23, 59, 0, tzinfo=dt.UTC))
    quota = QuotaTracker(clock)
    quota.add(1, 10, 3)
    quota.add(1, 11, 1)
    assert quota.used(1, 10) == 3
    assert quota.resets_at() == dt.datetime(2026, 3, 2, tzinfo=dt.UTC).timestamp()
    clock.now += 59  # 23:59:59
    assert quota.used(1, 10) == 3
    clock.now += 1  # midnight: a new day
    assert quota.used(1, 10) == 0 and quota.used(1, 11) == 0
    assert quota.resets_at() == dt.datetime(2026, 3, 3, tzinfo=dt.UTC).timestamp()


def test_quota_load_applies_only_to_today() -> None:
    clock = Clock(dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC))
    quota = QuotaTracker(clock)
    quota.load(dt.date(2026, 2, 28), {(1, 10): 9})
    assert quota.used(1, 10) == 0
    quota.load(dt.date(2026, 3, 1), {(1, 10): 4})
    assert quota.used(1, 10) == 4


# -- settings --------------------------------------------------------------------------------------------------


def test_settings_validation_clamps_concurrency_and_normalises() -> None:
    settings, notes = GuildSettings(
        concurrency=50, default_size="768X512", channels=(3, 1, 3), blocked_words=("Gore", "gore")
    ).validated(concurrency_max=8, sizes=[(512, 512), (768, 512)])
    assert settings.concurrency == 8
    assert notes and "8" in notes[0]
    assert settings.default_size == "768x512"
    assert settings.channels == (1, 3)
    assert settings.blocked_words == ("gore",)
    _, notes = GuildSettings(concurrency=4).validated(concurrency_max=8)
    assert notes == []


@pytest.mark.parametrize(
    "settings",
    [
        GuildSettings(concurrency=0),
        GuildSettings(max_jobs_per_user=0),
        GuildSettings(daily_images=-1),
        GuildSettings(nsfw="always"),
        GuildSettings(default_size="huge"),
        GuildSettings(default_size="1024x1024"),  # not one of the backend's sizes
        GuildSettings(default_model="nope"),
        GuildSettings(blocked_words=("*",)),
    ],
)
def test_invalid_settings_are_refused(settings: GuildSettings) -> None:
    with pytest.raises(InvalidGuildSetting):
        settings.validated(concurrency_max=8, models=["a", "b"], sizes=[(512, 512)])


def test_settings_json_round_trip_and_tolerant_reading() -> None:
    settings = GuildSettings(
        concurrency=3,
        max_jobs_per_user=2,
        daily_images=20,
        nsfw=NSFW_NEVER,
        default_size="512x512",
        default_model="b",
        channels=(5, 7),
        blocked_words=("gore", "blood*"),
    )
    document = settings.to_dict()
    assert document["channels"] == [5, 7]
    assert GuildSettings.from_dict(document) == settings
    assert GuildSettings().to_dict() == {}
    # A damaged or newer document: unknown keys and bad values fall back to defaults, never fatal.
    read = GuildSettings.from_dict(
        {"daily_images": "lots", "nsfw": "always", "future": 1, "concurrency": 2, "blocked_words": ["*"]}
    )
    assert read == GuildSettings(concurrency=2)


# -- the policy on a manager -------------------------------------------------------------------------------------


class NullBackend(Backend):
    name = "null"
    capabilities = Capabilities(sizes=((512, 512), (768, 768)))

    async def generate(self, request, on_progress=None):  # pragma: no cover - never called here
        raise AssertionError

    async def list_models(self) -> list[str]:
        return []


class MemoryStore:
    def __init__(self) -> None:
        self.settings: dict[int, dict] = {}
        self.counts: dict[tuple[int, int], int] = {}

    async def all_guild_settings(self) -> dict[int, dict]:
        return dict(self.settings)

    async def set_guild_settings(self, guild_id: int, values: dict) -> None:
        self.settings[guild_id] = values

    async def count_images_by_user_since(self, since: float) -> dict[tuple[int, int], int]:
        return dict(self.counts)


def make_policy(store: MemoryStore | None = None, **manager_options) -> GuildPolicy:
    manager = JobManager(NullBackend(), models=["a", "b"], guild_concurrency_max=4, **manager_options)
    policy = GuildPolicy(manager, store=store or MemoryStore())  # type: ignore[arg-type]
    policy.install()
    return policy


def admit(policy: GuildPolicy, request: ImageRequest, *, channel_id: int = 100, nsfw: bool = False):
    return policy.manager.check_admission(request, 1, 10, channel_id=channel_id, channel_nsfw=nsfw)


async def test_update_persists_applies_and_clamps() -> None:
    store = MemoryStore()
    policy = make_policy(store)
    settings, notes = await policy.update(1, concurrency=9, max_jobs_per_user=1)
    assert settings.concurrency == 4 and notes
    assert policy.manager.guild_limit(1) == 4 and policy.manager.user_limit(1) == 1
    assert store.settings[1] == {"concurrency": 4, "max_jobs_per_user": 1}
    with pytest.raises(InvalidGuildSetting):
        await policy.update(1, default_model="zzz")
    assert store.settings[1] == {"concurrency": 4, "max_jobs_per_user": 1}  # nothing changed
    # A new process reads it back.
    again = make_policy(store)
    await again.load()
    assert again.settings_for(1).concurrency == 4 and again.manager.guild_limit(1) == 4
    await again.reset(1)
    assert again.manager.guild_limit(1) == again.manager.guild_concurrency and store.settings[1] == {}


async def test_defaults_and_nsfw_policy_are_applied_in_admission() -> None:
    policy = make_policy()
    await policy.update(1, default_size="768x768", default_model="b")
    request = admit(policy, ImageRequest("x", width=0, height=0, nsfw_allowed=True), nsfw=True)
    assert (request.width, request.height, request.model) == (768, 768, "b")
    assert request.nsfw_allowed
    explicit = admit(policy, ImageRequest("x", width=512, height=512, model="a"))
    assert (explicit.size, explicit.model) == ("512x512", "a")
    # NSFW output only in an age-restricted channel, whatever the request says ...
    assert not admit(policy, ImageRequest("x", nsfw_allowed=True), nsfw=False).nsfw_allowed
    # ... and never at all with the "never" policy.
    await policy.update(1, nsfw=NSFW_NEVER)
    assert not admit(policy, ImageRequest("x", nsfw_allowed=True), nsfw=True).nsfw_allowed


async def test_channel_and_blocked_word_checks() -> None:
    policy = make_policy()
    await policy.update(1, channels=(100,), blocked_words=("gore",))
    admit(policy, ImageRequest("a fox"), channel_id=100)
    with pytest.raises(RequestRejected) as refused:
        admit(policy, ImageRequest("a fox"), channel_id=200)
    assert refused.value.code == "channel" and "<#100>" in refused.value.message
    with pytest.raises(RequestRejected) as refused:
        admit(policy, ImageRequest("a fox", negative_prompt="GORE"), channel_id=100)
    assert refused.value.code == "blocked_word" and "gore" not in refused.value.message.lower()
    # Other guilds are not affected.
    policy.manager.check_admission(ImageRequest("gore"), 2, 10, channel_id=200)


def finished(job_id: str, count: int, *, from_cache: bool = False, state=JobState.SUCCEEDED) -> Job:
    job = Job(id=job_id, request=ImageRequest("x", count=count), guild_id=1, user_id=10, state=state)
    job.image_refs = ["r"] * count if state is JobState.SUCCEEDED else []
    job.from_cache = from_cache
    return job


async def test_quota_counts_fresh_images_and_in_flight_requests() -> None:
    store = MemoryStore()
    store.counts = {(1, 10): 2}  # made earlier today, by a previous process
    policy = make_policy(store)
    await policy.load()
    await policy.update(1, daily_images=5)
    assert policy.quota_status(1, 10).remaining == 3
    # A request asking for 2 images holds them until it finishes (the manager's one record counts it).
    with policy.manager.holding(1, 10, 2):
        assert policy.quota_status(1, 10).remaining == 1
        with pytest.raises(RequestRejected) as refused:
            admit(policy, ImageRequest("x", count=2))
        assert refused.value.code == "quota" and "1 of your 5" in refused.value.message
        admit(policy, ImageRequest("x", count=1))
    # Cache hits and failures are free; fresh successes count.
    policy.on_job_event(finished("q", 2, from_cache=True), JobEvent.FINISHED)
    policy.on_job_event(finished("f", 2, state=JobState.FAILED), JobEvent.FINISHED)
    assert policy.quota_status(1, 10).remaining == 3
    policy.on_job_event(finished("ok", 3), JobEvent.FINISHED)
    status = policy.quota_status(1, 10)
    assert (status.used, status.remaining) == (5, 0)
    with pytest.raises(RequestRejected, match="used your 5 images"):
        admit(policy, ImageRequest("x"))
    # Another member, and 0 = unlimited.
    policy.manager.check_admission(ImageRequest("x"), 1, 11)
    await policy.update(1, daily_images=0)
    admit(policy, ImageRequest("x", count=4))


async def test_hooks_are_installed_once_and_removable() -> None:
    policy = make_policy()
    policy.install()
    assert policy.manager.admission_checks == [policy.check]
    policy.uninstall()
    assert policy.manager.admission_checks == [] and policy.manager.request_defaults == []


def test_admission_context_is_what_the_hooks_see() -> None:
    policy = make_policy()
    request = policy.apply_defaults(ImageRequest("x", nsfw_allowed=True), AdmissionContext(1, 10, 5, True))
    assert request.nsfw_allowed


async def test_blocked_words_compile_when_the_list_changes_not_per_admission(monkeypatch) -> None:
    import bot.engine.policy as policy_module
    from bot.engine.wordfilter import WordMatcher

    built: list[tuple[str, ...]] = []

    class Counting(WordMatcher):
        def __init__(self, entries) -> None:  # type: ignore[no-untyped-def]
            built.append(tuple(entries))
            super().__init__(entries)

    monkeypatch.setattr(policy_module, "WordMatcher", Counting)
    policy = make_policy()
    await policy.update(1, blocked_words=("gore", "blood*"))
    compiled = len(built)
    for _ in range(20):
        admit(policy, ImageRequest("a calm lake", width=512, height=512))
    with pytest.raises(RequestRejected) as refused:
        admit(policy, ImageRequest("bloody", width=512, height=512))
    assert "blood" not in refused.value.message  # never echoed back
    assert len(built) == compiled  # nothing compiled during admissions
    await policy.update(1, blocked_words=("gore",))
    assert built[-1] == ("gore",) and len(built) > compiled
