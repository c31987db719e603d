"""Every setting the bot reads, validated once in ``main()`` and passed in from there.

Names are the operators' interface (environment variables, ``.env``): keep them stable.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BackendName = Literal["horde", "openai", "a1111", "comfyui"]

#: Discord interaction tokens live 15 minutes; a queued job must start (and report) well before that.
INTERACTION_TOKEN_LIFETIME_S = 15 * 60
MAX_QUEUE_TIMEOUT_S = 14 * 60


#: The names COMFYUI_DEFAULTS may set (the workflow placeholders /imagine never asks for).
COMFYUI_DEFAULT_NAMES = ("steps", "scale", "sampler", "scheduler")
#: ComfyUI's own default address (``python main.py`` listens there).
COMFYUI_DEFAULT_URL = "http://127.0.0.1:8188"


class SettingsError(Exception):
    """A setting has a value the bot cannot run with; the message names it and what is allowed."""


#: Slots per backend when its ``concurrency`` (or BACKEND_CONCURRENCY) is not set. A1111 runs one generation
#: at a time behind a global lock; more would only queue there. ComfyUI also runs one prompt at a time, but one
#: more waiting in its own queue keeps the GPU busy between prompts while the bot's queue still holds the rest.
DEFAULT_CONCURRENCY = {"a1111": 1, "comfyui": 2}
#: Pool entry names become a metrics label and appear in /backends: short and plain.
ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
ENTRY_KEYS = frozenset(
    {"name", "kind", "url", "api_key", "concurrency", "models", "sizes", "max_count_per_call", "workflow"}
)
KINDS = ("horde", "openai", "a1111", "comfyui")


@dataclass(frozen=True)
class BackendEntry:
    """One backend of the pool (an ``IMAGE_BACKENDS`` entry, or the one ``IMAGE_BACKEND`` describes)."""

    name: str
    kind: BackendName
    url: str | None
    api_key: SecretStr | None
    concurrency: int
    models: tuple[str, ...] = ()  # empty: what the backend lists (or only the default model)
    sizes: tuple[tuple[int, int], ...] = ()  # empty: the kind's own sizes
    max_count_per_call: int | None = None
    workflow: Path | None = None  # comfyui only


def parse_sizes(value: str) -> list[tuple[int, int]]:
    """``512x512,768x512`` -> sizes, each side 64..4096 (ValueError names the bad part)."""
    sizes: list[tuple[int, int]] = []
    for part in _split_csv(value):
        width, sep, height = part.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise ValueError(f"{part!r} is not WIDTHxHEIGHT (for example 512x512,768x512)")
        size = (int(width), int(height))
        if not all(64 <= side <= 4096 for side in size):
            raise ValueError(f"{part!r}: each side must be between 64 and 4096 pixels")
        if size not in sizes:
            sizes.append(size)
    return sizes


def parse_backends(value: Any) -> list[BackendEntry]:
    """``IMAGE_BACKENDS``: inline JSON or ``@/path/to/backends.json``, a list of entries (ValueError: one line)."""
    if isinstance(value, list) and all(isinstance(v, BackendEntry) for v in value):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("@"):
            path = Path(text[1:].strip()).expanduser()
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read {path} ({exc.strerror or exc})") from None
            except UnicodeDecodeError:
                raise ValueError(f"{path} is not UTF-8 text") from None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, list) or not value:
        raise ValueError(
            'must be a non-empty JSON list of backends, e.g. [{"name": "gpu1", "kind": "a1111", ...}]'
        )
    entries: list[BackendEntry] = []
    for number, item in enumerate(value, start=1):
        entry = _parse_entry(item, number)
        if any(e.name == entry.name for e in entries):
            raise ValueError(f"entry {number}: the name {entry.name!r} is used twice; names must be unique")
        entries.append(entry)
    return entries


def _parse_entry(item: Any, number: int) -> BackendEntry:
    where = f"entry {number}"
    if not isinstance(item, dict):
        raise ValueError(f"{where}: must be an object with name, kind and url")
    if isinstance(item.get("name"), str):
        where = f"entry {number} ({item['name']!r})"
    unknown = sorted(set(item) - ENTRY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; use {', '.join(sorted(ENTRY_KEYS))}")
    for key in ("name", "kind", "url"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise ValueError(f"{where}: {key} is required (a string)")
    name, kind, url = item["name"].strip(), item["kind"].strip().lower(), item["url"].strip().rstrip("/")
    if not ENTRY_NAME.fullmatch(name):
        raise ValueError(f"{where}: name must be 1-32 letters, digits, '.', '_' or '-'")
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{where}: url must be an http(s):// URL")
    api_key = item.get("api_key")
    if api_key is not None and not isinstance(api_key, str):
        raise ValueError(f"{where}: api_key must be a string")  # never repeats the value
    concurrency = item.get("concurrency")
    if concurrency is None:
        concurrency = DEFAULT_CONCURRENCY.get(kind, 4)
    elif isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 64:
        raise ValueError(f"{where}: concurrency must be a whole number from 1 to 64")
    models = item.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, str) and m.strip() for m in models):
        raise ValueError(f"{where}: models must be a list of model names")
    sizes_value = item.get("sizes") or []
    if isinstance(sizes_value, list) and all(isinstance(s, str) for s in sizes_value):
        sizes_value = ",".join(sizes_value)
    if not isinstance(sizes_value, str):
        raise ValueError(f'{where}: sizes must be a list like ["512x512", "768x512"]')
    try:
        sizes = parse_sizes(sizes_value)
    except ValueError as exc:
        raise ValueError(f"{where}: sizes: {exc}") from None
    per_call = item.get("max_count_per_call")
    if per_call is not None and (
        isinstance(per_call, bool) or not isinstance(per_call, int) or not 1 <= per_call <= 4
    ):
        raise ValueError(f"{where}: max_count_per_call must be a whole number from 1 to 4")
    workflow = item.get("workflow")
    if workflow is not None:
        if kind != "comfyui":
            raise ValueError(f"{where}: workflow applies to kind comfyui only")
        if not isinstance(workflow, str) or not workflow.strip():
            raise ValueError(f"{where}: workflow must be the path of an API-format workflow JSON file")
    return BackendEntry(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        url=url,
        api_key=SecretStr(api_key.strip()) if api_key and api_key.strip() else None,
        concurrency=concurrency,
        models=tuple(dict.fromkeys(m.strip() for m in models)),
        sizes=tuple(sizes),
        max_count_per_call=per_call,
        workflow=Path(workflow.strip()) if workflow else None,
    )


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=None,
        env_ignore_empty=True,  # `NAME=` in .env means "use the default", as .env.example shows
        case_sensitive=False,
        extra="ignore",
        hide_input_in_errors=True,
    )

    # Discord
    discord_token: SecretStr | None = Field(default=None, description="bot token, needed only to run the bot")
    discord_api_base: str | None = Field(default=None, description="REST base URL override (proxy, tests)")
    discord_gateway_url: str | None = Field(default=None, description="gateway URL override (proxy, tests)")
    dev_guild_id: int | None = Field(default=None, description="sync commands to this guild only")

    # Gateway sharding: unset, one process runs every shard discord.py is told to (GET /gateway/bot).
    shard_count: int | None = Field(default=None, ge=1, description="total shards across every process")
    shard_ids: Annotated[list[int] | None, NoDecode] = Field(
        default=None, description="the shards this process runs (0,1); needs SHARD_COUNT"
    )

    @field_validator("shard_count", mode="before")
    @classmethod
    def _blank_count_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("shard_ids", mode="before")
    @classmethod
    def _parse_shard_ids(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        parts = _split_csv(value)
        if not parts:
            return None
        bad = [part for part in parts if not part.isdigit()]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a shard number (for example 0,1)")
        ids = [int(part) for part in parts]
        twice = sorted({shard for shard in ids if ids.count(shard) > 1})
        if twice:
            raise ValueError(f"shard {twice[0]} is listed twice")
        return sorted(ids)

    @model_validator(mode="after")
    def _check_shards(self) -> Settings:
        if self.shard_ids is None:
            return self
        if self.shard_count is None:
            raise ValueError("SHARD_IDS: needs SHARD_COUNT (the total number of shards across every process)")
        outside = [shard for shard in self.shard_ids if shard >= self.shard_count]
        if outside:
            raise ValueError(
                f"SHARD_IDS: shard {outside[0]} does not exist with SHARD_COUNT={self.shard_count} "
                f"(shards are numbered 0 to {self.shard_count - 1})"
            )
        return self

    # Image backend
    image_backend: BackendName = "horde"
    #: A pool of several backends (inline JSON or ``@/path/to/backends.json``); replaces IMAGE_BACKEND.
    image_backends: Annotated[list[BackendEntry], NoDecode] = Field(default_factory=list)
    image_backend_url: str | None = None
    image_backend_api_key: SecretStr | None = None
    image_model: str | None = None
    image_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Sizes offered for the backend (``512x512,768x512``); empty keeps the backend kind's own list.
    image_sizes: Annotated[list[tuple[int, int]], NoDecode] = Field(default_factory=list)
    #: Images asked for in one call (``1`` for servers that refuse ``n>1``); empty lets the backend find out.
    image_max_count_per_call: int | None = Field(default=None, ge=1, le=4)

    # ComfyUI (IMAGE_BACKEND=comfyui)
    #: An API-format workflow JSON file (ComfyUI: Export (API)); empty uses the built-in txt2img workflow.
    comfyui_workflow: Path | None = None
    #: What /imagine never asks for: ``steps=25,scale=7,sampler=euler,scheduler=normal``.
    comfyui_defaults: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)

    # Limits
    backend_concurrency: int | None = Field(default=None, ge=1, le=64)
    guild_concurrency: int = Field(default=2, ge=1, le=64)
    guild_concurrency_max: int = Field(default=8, ge=1, le=64)
    user_max_jobs: int = Field(default=3, ge=1, le=100)
    queue_timeout_s: float = Field(default=600, gt=0, le=MAX_QUEUE_TIMEOUT_S)
    job_timeout_s: float = Field(default=300, gt=0, le=3600)
    shutdown_grace_s: float = Field(default=20, ge=0, le=600)

    # Storage
    data_dir: Path = Path("./data")
    cache_ttl_s: int = Field(default=7 * 24 * 3600, ge=0)
    cache_max_mb: int = Field(default=1024, ge=0)

    # Database: unset, the job store is SQLite in DATA_DIR (one process); set, it is this PostgreSQL database.
    database_url: SecretStr | None = Field(
        default=None, description="postgresql://user:pass@host:5432/db; the password is a secret"
    )

    # Fleet leases (DATABASE_URL only): a process whose heartbeat is older than this is dead, and its shards
    # may be taken by another; it heartbeats every third of it.
    lease_ttl_s: float = Field(
        default=30, ge=3, le=3600, description="seconds before a silent process is dead"
    )

    # Operations
    http_port: int = Field(default=8080, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    # Self-hosting: where /healthz and /metrics listen, and how long job history is kept
    http_host: str = Field(default="127.0.0.1", description="address /healthz and /metrics listen on")
    history_retention_days: int = Field(default=90, ge=0, le=36500, description="0 keeps history forever")

    #: Which .env file :func:`load_settings` read (None: none), and where it looked (None: it did not look).
    _env_file_read: Path | None = PrivateAttr(default=None)
    _env_file_sought: Path | None = PrivateAttr(default=None)

    @field_validator("image_models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("image_sizes", mode="before")
    @classmethod
    def _parse_sizes(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return parse_sizes(value)

    @field_validator("image_backends", mode="before")
    @classmethod
    def _parse_backends(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return []
        return parse_backends(value)

    @field_validator("comfyui_defaults", mode="before")
    @classmethod
    def _parse_defaults(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        defaults: dict[str, str] = {}
        for part in _split_csv(value):
            key, sep, item = part.partition("=")
            key, item = key.strip().lower(), item.strip()
            if not sep or not item:
                raise ValueError(f"{part!r} is not name=value (for example steps=25,scale=7)")
            if key not in COMFYUI_DEFAULT_NAMES:
                raise ValueError(f"unknown name {key!r}; use {', '.join(COMFYUI_DEFAULT_NAMES)}")
            if key in {"steps", "scale"}:
                try:
                    number = float(item)
                except ValueError:
                    raise ValueError(f"{key} must be a number, not {item!r}") from None
                if key == "steps" and (not number.is_integer() or not 1 <= number <= 200):
                    raise ValueError("steps must be a whole number from 1 to 200")
                if key == "scale" and not 0 <= number <= 100:
                    raise ValueError("scale must be between 0 and 100")
            defaults[key] = item
        return defaults

    @field_validator("comfyui_workflow", mode="before")
    @classmethod
    def _blank_path_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @field_validator("log_level", "log_format", "image_backend", mode="before")
    @classmethod
    def _normalise_case(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return (
                value.upper()
                if value.lower() in {"debug", "info", "warning", "error", "critical"}
                else (value.lower())
            )
        return value

    @field_validator(
        "discord_api_base",
        "discord_gateway_url",
        "image_backend_url",
        "image_model",
        "dev_guild_id",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @field_validator("database_url", mode="before")
    @classmethod
    def _database_url(cls, value: Any) -> Any:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return value
        value = value.strip()
        if not value:
            return None
        # The message never repeats the value: it holds a password.
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql://user:pass@host:5432/db URL")
        return value

    @field_validator("discord_api_base", "discord_gateway_url", "image_backend_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://", "ws://", "wss://")):
            raise ValueError("must be an http(s):// or ws(s):// URL")
        return value.rstrip("/")

    @field_validator("http_host", mode="before")
    @classmethod
    def _host(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        value = value.strip()
        if not value:  # blank: the default, loopback only
            return "127.0.0.1"
        if any(ch in value for ch in " /:") and not _is_ipv6(value):
            raise ValueError("must be an address to listen on, such as 127.0.0.1, 0.0.0.0 or ::")
        return value

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        if self.image_backends and "image_backend" in self.model_fields_set:
            raise ValueError(
                "set IMAGE_BACKEND or IMAGE_BACKENDS, not both (IMAGE_BACKENDS lists every backend)"
            )
        if self.backend_concurrency is None:
            self.backend_concurrency = DEFAULT_CONCURRENCY.get(self.image_backend, 4)
        if self.guild_concurrency > self.guild_concurrency_max:
            raise ValueError(
                f"GUILD_CONCURRENCY ({self.guild_concurrency}) must not exceed GUILD_CONCURRENCY_MAX "
                f"({self.guild_concurrency_max})"
            )
        if self.image_model and self.image_model not in self.image_models:
            self.image_models = [self.image_model, *self.image_models]
        if not self.image_model and self.image_models:
            self.image_model = self.image_models[0]
        if self.image_backend == "comfyui" and not self.image_backend_url:
            self.image_backend_url = COMFYUI_DEFAULT_URL
        if self.image_backend in {"openai", "a1111"} and not self.image_backend_url:
            raise ValueError(f"IMAGE_BACKEND_URL is required when IMAGE_BACKEND={self.image_backend}")
        return self

    @property
    def max_backend_concurrency(self) -> int:
        assert self.backend_concurrency is not None
        return self.backend_concurrency

    def backend_keys(self) -> list[str]:
        """Every backend API key set (IMAGE_BACKEND_API_KEY and each pool entry's): secrets to scrub."""
        keys = [self.image_backend_api_key] + [e.api_key for e in self.image_backends]
        return [k.get_secret_value().strip() for k in keys if k is not None and k.get_secret_value().strip()]

    def backend_entries(self) -> list[BackendEntry]:
        """Every backend the bot uses: the IMAGE_BACKENDS pool, or the one IMAGE_BACKEND describes."""
        if self.image_backends:
            return list(self.image_backends)
        return [
            BackendEntry(
                name=self.image_backend,
                kind=self.image_backend,
                url=self.image_backend_url,
                api_key=self.image_backend_api_key,
                concurrency=self.max_backend_concurrency,
                models=(),
                sizes=tuple(self.image_sizes),
                max_count_per_call=self.image_max_count_per_call,
                workflow=self.comfyui_workflow,
            )
        ]

    @property
    def env_file_read(self) -> Path | None:
        return self._env_file_read

    def env_file_note(self) -> str:
        """One clause for the start-up log and ``check``: which .env was read, or that none was found where."""
        if self._env_file_read is not None:
            return f"read {self._env_file_read}"
        if self._env_file_sought is not None:
            return f"none found at {self._env_file_sought} (settings come from the environment only)"
        return "not read (settings come from the environment only)"

    def token(self) -> str:
        """The Discord token; raises a clear error when it is missing (only the bot needs it)."""
        if self.discord_token is None or not self.discord_token.get_secret_value().strip():
            # Run from another directory, the .env is not found: say where it was looked for.
            missing = (
                f"; no .env found at {self._env_file_sought}"
                if self._env_file_read is None and self._env_file_sought is not None
                else ""
            )
            raise SettingsError(f"DISCORD_TOKEN: required to run the Discord bot (see .env.example){missing}")
        return self.discord_token.get_secret_value().strip()


def _is_ipv6(value: str) -> bool:
    try:
        return ipaddress.ip_address(value).version == 6
    except ValueError:
        return False


def _describe(error: dict[str, Any]) -> str:
    location = error.get("loc") or ()
    name = str(location[0]).upper() if location else "settings"
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    ctx = error.get("ctx") or {}
    if error.get("type") == "literal_error" and "expected" in ctx:
        message = f"must be one of {ctx['expected']}"
    if not location:
        return message
    return f"{name}: {message}"


def load_settings(env_file: str | os.PathLike[str] | None = ".env", **overrides: Any) -> Settings:
    """Build the settings from the environment (and ``.env`` when present).

    Raises :class:`SettingsError` with one line per bad variable, never a traceback's worth.
    """
    kwargs: dict[str, Any] = dict(overrides)
    # Relative to the working directory, as pydantic-settings reads it: say so (absolute) rather than silently.
    sought = None if env_file is None else Path(env_file).absolute()
    read = sought if sought is not None and sought.is_file() else None
    if read is not None:
        kwargs["_env_file"] = read
    try:
        settings = Settings(**kwargs)
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e) for e in exc.errors())) from None
    settings._env_file_read = read
    settings._env_file_sought = sought
    return settings
