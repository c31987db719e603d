"""docker-compose.yml's profiles: a plain ``docker compose up`` runs the single SQLite bot and nothing else;
the ``fleet`` profile runs PostgreSQL and two shard processes on it, and never the single bot beside them.

The file is resolved twice, and every test runs on both:

- ``yaml``: PyYAML plus Compose's rules for what this file uses (anchors and ``<<`` merges, ``${VAR:-default}``,
  ``env_file`` under ``environment``, profiles chosen by ``--profile`` or else ``COMPOSE_PROFILES`` from .env).
  Always runs.
- ``compose``: the real ``docker compose config`` (the CLI plugin, or a v2 ``docker-compose`` on PATH). Skipped
  when there is none; with ``IMAGINE_REQUIRE_COMPOSE=1`` (.ci/docker-check installs one and sets it) a missing
  one fails instead.

Each resolves a copy of the file in a scratch directory beside an .env made from .env.example, as a user's
``cp .env.example .env`` makes it, so a developer's own .env never takes part.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

FLEET_SHARDS = ("bot-shard-0", "bot-shard-1")


@dataclass(frozen=True)
class Service:
    """What the tests compare of one service, the same whichever reader resolved it."""

    image: str | None
    profiles: tuple[str, ...]
    environment: Mapping[str, str]
    volumes: tuple[tuple[str, str], ...]  # (named volume, mount point)
    depends_on: Mapping[str, str]  # service -> condition
    healthcheck: Mapping[str, Any]
    stop_grace_period: str | None
    logging: Mapping[str, Any]
    restart: str | None

    @property
    def reads_bot_env(self) -> bool:
        """Whether the .env's variables reach it (Compose's config folds env_file into environment)."""
        return "DISCORD_TOKEN" in self.environment


Resolver = Callable[..., dict[str, Service]]


def read_dotenv(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            values[name.strip()] = value.strip()
    return values


def env_example_with(**changes: str | None) -> str:
    """.env.example's text with some variables set to other values (None: the line removed)."""
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        name = line.split("=", 1)[0]
        if "=" in line and not line.startswith("#") and name in changes:
            value = changes[name]
            if value is not None:
                lines.append(f"{name}={value}")
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


# -- the yaml reader --------------------------------------------------------------------------------------------
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def _interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``${NAME}`` / ``${NAME:-default}`` (empty counts as unset for ``:-``); ``$$`` stays as Compose's
    config prints it."""
    if isinstance(value, str):

        def one(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$$"
            found = env.get(match.group("name"), "")
            default = match.group("default")
            return found if found or default is None else default

        return _VARIABLE.sub(one, value)
    if isinstance(value, list):
        return [_interpolate(item, env) for item in value]
    if isinstance(value, dict):
        return {key: _interpolate(item, env) for key, item in value.items()}
    return value


def _yaml_service(raw: dict[str, Any], project: Path) -> Service:
    environment: dict[str, str] = {}
    env_files = raw.get("env_file") or []
    for env_file in [env_files] if isinstance(env_files, str) else env_files:
        environment |= read_dotenv((project / env_file).read_text())
    environment |= {
        key: "" if value is None else str(value) for key, value in (raw.get("environment") or {}).items()
    }
    volumes = tuple(tuple(entry.split(":")[:2]) for entry in raw.get("volumes") or [])
    depends = raw.get("depends_on") or {}
    if isinstance(depends, list):
        depends = {name: {"condition": "service_started"} for name in depends}
    return Service(
        image=raw.get("image"),
        profiles=tuple(raw.get("profiles") or ()),
        environment=environment,
        volumes=volumes,  # type: ignore[arg-type]
        depends_on={name: spec["condition"] for name, spec in depends.items()},
        healthcheck=raw.get("healthcheck") or {},
        stop_grace_period=raw.get("stop_grace_period"),
        logging=raw.get("logging") or {},
        restart=raw.get("restart"),
    )


def resolve_with_yaml(project: Path, profiles: list[str] | None) -> dict[str, Service]:
    dotenv = read_dotenv((project / ".env").read_text())
    model = _interpolate(yaml.safe_load((project / "docker-compose.yml").read_text()), dotenv)
    active = set(profiles) if profiles is not None else set(dotenv.get("COMPOSE_PROFILES", "").split(","))
    services = {}
    for name, raw in model["services"].items():
        wanted = raw.get("profiles") or []
        if not wanted or "*" in active or active & set(wanted):
            services[name] = _yaml_service(raw, project)
    return services


# -- the compose reader -----------------------------------------------------------------------------------------
def compose_command() -> list[str] | None:
    """``docker compose`` (the plugin) or a v2 ``docker-compose``, whichever answers; None when neither."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for command in candidates:
        try:
            out = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.search(r"\bv?2\.\d+", out.stdout):
            return command
    return None


def resolve_with_compose(command: list[str], project: Path, profiles: list[str] | None) -> dict[str, Service]:
    # Nothing from this shell's environment: only the scratch .env speaks (COMPOSE_PROFILES included).
    env = {key: os.environ[key] for key in ("PATH", "HOME", "DOCKER_CONFIG") if key in os.environ}
    flags = [arg for profile in profiles or () for arg in ("--profile", profile)]
    out = subprocess.run(
        [
            *command,
            "--project-directory",
            str(project),
            "-p",
            "imagine-test",
            *flags,
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    services = {}
    for name, raw in (json.loads(out.stdout).get("services") or {}).items():
        services[name] = Service(
            image=raw.get("image"),
            profiles=tuple(raw.get("profiles") or ()),
            environment={
                key: "" if value is None else str(value) for key, value in raw.get("environment", {}).items()
            },
            volumes=tuple(
                (v["source"], v["target"]) for v in raw.get("volumes") or [] if v["type"] == "volume"
            ),
            depends_on={dep: spec["condition"] for dep, spec in (raw.get("depends_on") or {}).items()},
            healthcheck=raw.get("healthcheck") or {},
            stop_grace_period=raw.get("stop_grace_period"),
            logging=raw.get("logging") or {},
            restart=raw.get("restart"),
        )
    return services


@pytest.fixture(params=["yaml", "compose"])
def resolve(request: pytest.FixtureRequest, tmp_path: Path) -> Resolver:
    """``resolve(profiles=None, env=None)``: the services ``docker compose up`` would start, given ``--profile``
    flags (None: none given) and an .env text (None: .env.example's)."""
    command = None
    if request.param == "compose":
        command = compose_command()
        if command is None:
            if os.environ.get("IMAGINE_REQUIRE_COMPOSE") == "1":
                pytest.fail(
                    "IMAGINE_REQUIRE_COMPOSE=1 but neither `docker compose` nor a v2 docker-compose runs"
                )
            pytest.skip("no Docker Compose v2 here (.ci/docker-check runs these with one)")
    shutil.copy(COMPOSE_FILE, tmp_path / "docker-compose.yml")

    def run(profiles: list[str] | None = None, env: str | None = None) -> dict[str, Service]:
        (tmp_path / ".env").write_text(ENV_EXAMPLE.read_text() if env is None else env)
        if command is None:
            return resolve_with_yaml(tmp_path, profiles)
        return resolve_with_compose(command, tmp_path, profiles)

    return run


# -- the tests ----------------------------------------------------------------------------------------------------
def data_volume(service: Service) -> str:
    (source,) = [source for source, target in service.volumes if target == "/data"]
    return source


def test_env_example_chooses_the_single_profile() -> None:
    assert read_dotenv(ENV_EXAMPLE.read_text())["COMPOSE_PROFILES"] == "single"


def test_plain_up_starts_the_single_sqlite_bot_and_nothing_else(resolve: Resolver) -> None:
    services = resolve()
    assert set(services) == {"bot"}
    bot = services["bot"]
    assert bot.environment["DATABASE_URL"] == ""  # SQLite in DATA_DIR
    assert bot.environment["SHARD_IDS"] == ""  # every shard in this one process
    assert (bot.environment["DATA_DIR"], bot.environment["HTTP_HOST"]) == ("/data", "0.0.0.0")
    assert data_volume(bot) == "bot-data"
    assert bot.reads_bot_env


@pytest.mark.parametrize("how", ["--profile fleet", "COMPOSE_PROFILES=fleet"])
def test_the_fleet_is_postgres_and_two_shards_and_never_the_single_bot(resolve: Resolver, how: str) -> None:
    if how == "--profile fleet":
        services = resolve(["fleet"])  # over .env.example's COMPOSE_PROFILES=single
    else:
        services = resolve(env=env_example_with(COMPOSE_PROFILES="fleet"))
    assert set(services) == {"postgres", *FLEET_SHARDS}


def test_the_fleet_shards_split_one_shard_count_and_share_the_database_and_the_data_volume(
    resolve: Resolver,
) -> None:
    services = resolve(["fleet"])
    shards = [services[name] for name in FLEET_SHARDS]
    (count,) = {int(shard.environment["SHARD_COUNT"]) for shard in shards}
    assert count == 2
    assert sorted(int(shard.environment["SHARD_IDS"]) for shard in shards) == list(range(count))
    postgres = services["postgres"]
    (url,) = {shard.environment["DATABASE_URL"] for shard in shards}
    parts = urlsplit(url)
    assert parts.scheme == "postgresql" and parts.hostname == "postgres" and parts.port == 5432
    assert (parts.username, parts.password, parts.path.lstrip("/")) == (
        postgres.environment["POSTGRES_USER"],
        postgres.environment["POSTGRES_PASSWORD"],
        postgres.environment["POSTGRES_DB"],
    )
    for shard in shards:
        assert shard.depends_on == {"postgres": "service_healthy"}
        assert (shard.environment["DATA_DIR"], shard.environment["HTTP_HOST"]) == ("/data", "0.0.0.0")
    # One image cache for both, the same volume the single bot uses.
    assert {data_volume(shard) for shard in shards} == {"bot-data"}


def test_the_fleet_shards_are_run_like_the_single_bot(resolve: Resolver) -> None:
    bot = resolve()["bot"]
    fleet = resolve(["fleet"])
    for name in FLEET_SHARDS:
        shard = fleet[name]
        assert shard.image == bot.image and shard.reads_bot_env
        assert shard.healthcheck == bot.healthcheck and "bot.service.healthcheck" in shard.healthcheck["test"]
        assert shard.stop_grace_period == bot.stop_grace_period == "30s"
        assert shard.logging == bot.logging and shard.restart == bot.restart == "unless-stopped"


def test_postgres_keeps_its_data_in_a_named_volume_is_probed_and_never_sees_the_bot_s_env(
    resolve: Resolver,
) -> None:
    postgres = resolve(["fleet"])["postgres"]
    assert postgres.image is not None and re.fullmatch(r"postgres:1[56](\b.*)?", postgres.image)
    assert postgres.volumes == (("postgres-data", "/var/lib/postgresql/data"),)
    test = " ".join(postgres.healthcheck["test"])
    assert "pg_isready" in test and "POSTGRES_USER" in test and "POSTGRES_DB" in test
    assert not postgres.reads_bot_env


def test_postgres_credentials_come_from_env_and_default_when_empty(resolve: Resolver) -> None:
    defaults = resolve(["fleet"])
    assert (
        defaults["bot-shard-0"].environment["DATABASE_URL"]
        == "postgresql://imagine:imagine@postgres:5432/imagine"
    )
    mine = resolve(
        ["fleet"], env=env_example_with(POSTGRES_USER="u1", POSTGRES_PASSWORD="s3cret-x", POSTGRES_DB="d1")
    )
    assert mine["bot-shard-1"].environment["DATABASE_URL"] == "postgresql://u1:s3cret-x@postgres:5432/d1"
    assert dict(mine["postgres"].environment) == {
        "POSTGRES_USER": "u1",
        "POSTGRES_PASSWORD": "s3cret-x",
        "POSTGRES_DB": "d1",
    }


def test_an_env_from_before_the_profiles_starts_no_bot_at_all(resolve: Resolver) -> None:
    """What the upgrade note is about: without COMPOSE_PROFILES nothing starts (rather than two bots)."""
    assert resolve(env=env_example_with(COMPOSE_PROFILES=None)) == {}


def test_every_variable_the_compose_file_reads_is_documented_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    assert used  # the fleet's credentials at least
    documented = read_dotenv(ENV_EXAMPLE.read_text())
    assert sorted(used - set(documented)) == []
