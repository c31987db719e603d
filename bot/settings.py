"""Every setting the bot reads, validated once in ``main()`` and passed in from there.

Names are the operators' interface (environment variables, ``.env``): keep them stable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BackendName = Literal["horde", "openai", "a1111"]

#: Discord interaction tokens live 15 minutes; a queued job must start (and report) well before that.
INTERACTION_TOKEN_LIFETIME_S = 15 * 60
MAX_QUEUE_TIMEOUT_S = 14 * 60


class SettingsError(Exception):
    """A setting has a value the bot cannot run with; the message names it and what is allowed."""


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

    # Image backend
    image_backend: BackendName = "horde"
    image_backend_url: str | None = None
    image_backend_api_key: SecretStr | None = None
    image_model: str | None = None
    image_models: Annotated[list[str], NoDecode] = Field(default_factory=list)

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

    # Operations
    http_port: int = Field(default=8080, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("image_models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        return _split_csv(value)

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

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        if self.backend_concurrency is None:
            # A1111 runs one generation at a time behind a global lock; more would only queue there.
            self.backend_concurrency = 1 if self.image_backend == "a1111" else 4
        if self.guild_concurrency > self.guild_concurrency_max:
            raise ValueError(
                f"GUILD_CONCURRENCY ({self.guild_concurrency}) must not exceed GUILD_CONCURRENCY_MAX "
                f"({self.guild_concurrency_max})"
            )
        if self.image_model and self.image_model not in self.image_models:
            self.image_models = [self.image_model, *self.image_models]
        if not self.image_model and self.image_models:
            self.image_model = self.image_models[0]
        if self.image_backend in {"openai", "a1111"} and not self.image_backend_url:
            raise ValueError(f"IMAGE_BACKEND_URL is required when IMAGE_BACKEND={self.image_backend}")
        return self

    @property
    def max_backend_concurrency(self) -> int:
        assert self.backend_concurrency is not None
        return self.backend_concurrency

    def token(self) -> str:
        """The Discord token; raises a clear error when it is missing (only the bot needs it)."""
        if self.discord_token is None or not self.discord_token.get_secret_value().strip():
            raise SettingsError("DISCORD_TOKEN: required to run the Discord bot (see .env.example)")
        return self.discord_token.get_secret_value().strip()


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
    if env_file is not None and Path(env_file).is_file():
        kwargs["_env_file"] = env_file
    try:
        return Settings(**kwargs)
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e) for e in exc.errors())) from None
