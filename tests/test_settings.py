"""Settings: defaults, validation with one clear line, the token kept secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]
#: Every setting, from the Settings class itself: a new one must be documented in .env.example (test below).
ALL_NAMES = [name.upper() for name in Settings.model_fields]


def run_bot(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m bot ARGS`` from this checkout with only ``env`` set among the bot's settings."""
    clean = {k: v for k, v in os.environ.items() if k not in ALL_NAMES}
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=cwd,
        env={**clean, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALL_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    settings = load_settings(env_file=None)
    assert settings.image_backend == "horde"
    assert settings.backend_concurrency == 4
    assert settings.guild_concurrency == 2
    assert settings.user_max_jobs == 3
    assert settings.queue_timeout_s == 600
    assert settings.job_timeout_s == 300
    assert settings.shutdown_grace_s == 20
    assert settings.data_dir == Path("./data")
    assert settings.http_port == 8080
    assert settings.discord_token is None


def test_a1111_defaults_to_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_BACKEND", "A1111")
    monkeypatch.setenv("IMAGE_BACKEND_URL", "http://127.0.0.1:7860/")
    settings = load_settings(env_file=None)
    assert settings.backend_concurrency == 1
    assert settings.image_backend_url == "http://127.0.0.1:7860"


def test_comfyui_defaults_to_its_own_address_two_at_a_time_and_parses_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IMAGE_BACKEND", "comfyui")
    monkeypatch.setenv("COMFYUI_DEFAULTS", "steps=30, Scale=6.5,sampler=dpmpp_2m")
    monkeypatch.setenv("IMAGE_SIZES", "768x512,512x512,768x512")
    settings = load_settings(env_file=None)
    assert settings.image_backend_url == "http://127.0.0.1:8188"
    assert settings.backend_concurrency == 2
    assert settings.comfyui_defaults == {"steps": "30", "scale": "6.5", "sampler": "dpmpp_2m"}
    assert settings.image_sizes == [(768, 512), (512, 512)]
    assert settings.comfyui_workflow is None


def test_models_list_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_MODELS", "flux, sdxl ,")
    settings = load_settings(env_file=None)
    assert settings.image_models == ["flux", "sdxl"]
    assert settings.image_model == "flux"
    monkeypatch.setenv("IMAGE_MODEL", "dreamshaper")
    assert load_settings(env_file=None).image_models == ["dreamshaper", "flux", "sdxl"]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "IMAGE_BACKEND",
            "midjourney",
            "IMAGE_BACKEND: must be one of 'horde', 'openai', 'a1111' or 'comfyui'",
        ),
        ("IMAGE_SIZES", "512x512,big", "IMAGE_SIZES: 'big' is not WIDTHxHEIGHT"),
        ("IMAGE_SIZES", "16x16", "IMAGE_SIZES: '16x16': each side must be between 64 and 4096"),
        ("IMAGE_MAX_COUNT_PER_CALL", "0", "IMAGE_MAX_COUNT_PER_CALL: "),
        ("COMFYUI_DEFAULTS", "steps=25,cfg=7", "COMFYUI_DEFAULTS: unknown name 'cfg'; use steps, scale"),
        ("COMFYUI_DEFAULTS", "steps=many", "COMFYUI_DEFAULTS: steps must be a number"),
        ("COMFYUI_DEFAULTS", "sampler", "COMFYUI_DEFAULTS: 'sampler' is not name=value"),
        ("GUILD_CONCURRENCY", "zero", "GUILD_CONCURRENCY: "),
        ("USER_MAX_JOBS", "0", "USER_MAX_JOBS: "),
        ("QUEUE_TIMEOUT_S", "900", "QUEUE_TIMEOUT_S: "),
        ("HTTP_PORT", "70000", "HTTP_PORT: "),
        ("LOG_FORMAT", "xml", "LOG_FORMAT: must be one of"),
        ("DISCORD_API_BASE", "discord.com", "DISCORD_API_BASE: must be an http"),
        ("SHARD_COUNT", "0", "SHARD_COUNT: "),
        ("SHARD_COUNT", "two", "SHARD_COUNT: "),
        ("SHARD_IDS", "0,1", "SHARD_IDS: needs SHARD_COUNT"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as error:
        load_settings(env_file=None)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_guild_concurrency_over_ceiling_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUILD_CONCURRENCY", "9")
    monkeypatch.setenv("GUILD_CONCURRENCY_MAX", "4")
    with pytest.raises(SettingsError, match="GUILD_CONCURRENCY_MAX"):
        load_settings(env_file=None)


def test_backends_that_need_a_url_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_BACKEND", "openai")
    with pytest.raises(SettingsError, match="IMAGE_BACKEND_URL is required"):
        load_settings(env_file=None)


def test_token_never_in_repr_or_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    token = "MTIzNDU2Nzg5.secret-token-value"
    monkeypatch.setenv("DISCORD_TOKEN", token)
    monkeypatch.setenv("HTTP_PORT", "not-a-port")
    with pytest.raises(SettingsError) as error:
        load_settings(env_file=None)
    assert token not in str(error.value)
    monkeypatch.delenv("HTTP_PORT")
    settings = load_settings(env_file=None)
    assert token not in repr(settings)
    assert token not in str(settings.model_dump())
    assert settings.token() == token


def test_missing_token_is_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="DISCORD_TOKEN"):
        Settings().token()


def test_env_file_is_read(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("GUILD_CONCURRENCY=3\nIMAGE_MODELS=a,b\n")
    settings = load_settings(env_file=env)
    assert settings.guild_concurrency == 3
    assert settings.image_models == ["a", "b"]


def test_env_example_documents_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    for name in ALL_NAMES:
        assert f"{name}=" in text, name


def test_bad_setting_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    proc = run_bot(
        tmp_path,
        {"GUILD_CONCURRENCY": "lots", "DISCORD_TOKEN": "abcdef-secret-123456"},
        "imagine",
        "cat",
        "--out",
        str(tmp_path / "x.png"),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: GUILD_CONCURRENCY:")
    assert "Traceback" not in proc.stderr
    assert "abcdef-secret-123456" not in proc.stderr + proc.stdout


def test_blank_values_in_env_file_mean_default(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text((ROOT / ".env.example").read_text())
    settings = load_settings(env_file=env)
    assert settings.backend_concurrency == 4
    assert settings.discord_token is None
    assert settings.dev_guild_id is None


def test_http_host_is_loopback_unless_set() -> None:
    assert load_settings(env_file=None).http_host == "127.0.0.1"
    assert load_settings(env_file=None, http_host="  ").http_host == "127.0.0.1"
    assert load_settings(env_file=None, http_host="0.0.0.0").http_host == "0.0.0.0"
    assert load_settings(env_file=None, http_host="::").http_host == "::"
    with pytest.raises(SettingsError, match=r"^HTTP_HOST: must be an address to listen on"):
        load_settings(env_file=None, http_host="http://0.0.0.0:8080")


def test_settings_know_which_env_file_they_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings().env_file_note() == (
        f"none found at {tmp_path / '.env'} (settings come from the environment only)"
    )
    (tmp_path / ".env").write_text("USER_MAX_JOBS=5\n")
    settings = load_settings()
    assert settings.user_max_jobs == 5
    assert settings.env_file_read == tmp_path / ".env"
    assert settings.env_file_note() == f"read {tmp_path / '.env'}"


def test_database_url_is_a_secret_and_must_be_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().database_url is None  # unset: SQLite in DATA_DIR, as before
    monkeypatch.setenv("DATABASE_URL", "mysql://bot:hunter2-secret@db/imagine")
    with pytest.raises(SettingsError, match=r"DATABASE_URL: must be a postgresql://") as error:
        load_settings(env_file=None)
    assert "hunter2-secret" not in str(error.value)
    monkeypatch.setenv("DATABASE_URL", " postgresql://bot:hunter2-secret@db:5432/imagine ")
    settings = load_settings(env_file=None)
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == "postgresql://bot:hunter2-secret@db:5432/imagine"
    assert "hunter2-secret" not in repr(settings) and "hunter2-secret" not in str(settings.model_dump())


def test_shards_are_optional_and_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(env_file=None)
    assert settings.shard_count is None and settings.shard_ids is None  # discord.py decides
    monkeypatch.setenv("SHARD_COUNT", "4")
    settings = load_settings(env_file=None)
    assert settings.shard_count == 4 and settings.shard_ids is None  # this process runs all four
    monkeypatch.setenv("SHARD_IDS", " 3, 1 ,")
    assert load_settings(env_file=None).shard_ids == [1, 3]


@pytest.mark.parametrize(
    ("count", "ids", "expected"),
    [
        ("2", "0,2", "SHARD_IDS: shard 2 does not exist with SHARD_COUNT=2 (shards are numbered 0 to 1)"),
        ("3", "1,0,1", "SHARD_IDS: shard 1 is listed twice"),
        ("2", "0,one", "SHARD_IDS: 'one' is not a shard number"),
        ("2", "-1", "SHARD_IDS: '-1' is not a shard number"),
    ],
)
def test_bad_shard_ids_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, count: str, ids: str, expected: str
) -> None:
    monkeypatch.setenv("SHARD_COUNT", count)
    monkeypatch.setenv("SHARD_IDS", ids)
    with pytest.raises(SettingsError) as error:
        load_settings(env_file=None)
    assert str(error.value).startswith(expected)
    assert "\n" not in str(error.value)


def test_bad_shard_ids_stop_the_bot_with_exit_2(tmp_path: Path) -> None:
    proc = run_bot(tmp_path, {"SHARD_COUNT": "2", "SHARD_IDS": "5", "DISCORD_TOKEN": "abcdef-secret-123456"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: SHARD_IDS: shard 5 does not exist with SHARD_COUNT=2 (shards are numbered 0 to 1)"
    ]
    assert not (tmp_path / "data").exists()  # stopped before touching DATA_DIR or Discord
