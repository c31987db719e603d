"""IMAGE_BACKENDS: inline JSON or @file, validated entries with one clear line, and never beside IMAGE_BACKEND."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.settings import Settings, SettingsError, load_settings
from tests.test_settings import run_bot

ROOT = Path(__file__).resolve().parents[1]
ALL_NAMES = [name.upper() for name in Settings.model_fields]
POOL = [
    {"name": "gpu-1", "kind": "a1111", "url": "http://10.0.0.5:7860/"},
    {"name": "gpu-2", "kind": "comfyui", "url": "http://10.0.0.6:8188", "api_key": "s3cr3t-key", "sizes": ["768x512"]},
    {"name": "cloud", "kind": "openai", "url": "https://api.example.com/v1", "concurrency": 8,
     "models": ["flux"], "max_count_per_call": 1},
]  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALL_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_inline_json_entries_with_defaults_per_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_BACKENDS", json.dumps(POOL))
    entries = load_settings(env_file=None).backend_entries()
    assert [(e.name, e.kind, e.concurrency) for e in entries] == [
        ("gpu-1", "a1111", 1),  # as BACKEND_CONCURRENCY defaults for a1111
        ("gpu-2", "comfyui", 2),
        ("cloud", "openai", 8),
    ]
    assert entries[0].url == "http://10.0.0.5:7860"
    assert entries[1].sizes == ((768, 512),)
    assert entries[1].api_key is not None and entries[1].api_key.get_secret_value() == "s3cr3t-key"
    assert "s3cr3t-key" not in repr(entries)
    assert entries[2].models == ("flux",) and entries[2].max_count_per_call == 1
    assert load_settings(env_file=None).backend_keys() == ["s3cr3t-key"]


def test_a_file_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "backends.json"
    path.write_text(json.dumps(POOL[:2]))
    monkeypatch.setenv("IMAGE_BACKENDS", f"@{path}")
    assert [e.name for e in load_settings(env_file=None).backend_entries()] == ["gpu-1", "gpu-2"]


def test_image_backend_alone_is_a_pool_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_BACKEND", "a1111")
    monkeypatch.setenv("IMAGE_BACKEND_URL", "http://localhost:7860")
    monkeypatch.setenv("BACKEND_CONCURRENCY", "3")
    (entry,) = load_settings(env_file=None).backend_entries()
    assert (entry.name, entry.kind, entry.url, entry.concurrency) == (
        "a1111",
        "a1111",
        "http://localhost:7860",
        3,
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{", "IMAGE_BACKENDS: not valid JSON"),
        ("[]", "IMAGE_BACKENDS: must be a non-empty JSON list"),
        ('[{"name": "a", "kind": "dalle", "url": "http://x"}]', "entry 1 ('a'): kind must be one of"),
        ('[{"name": "a", "url": "http://x"}]', "entry 1 ('a'): kind is required"),
        ('[{"name": "a", "kind": "horde"}]', "entry 1 ('a'): url is required"),
        ('[{"name": "a", "kind": "a1111", "url": "ftp://x"}]', "url must be an http(s):// URL"),
        ('[{"name": "a b", "kind": "a1111", "url": "http://x"}]', "name must be 1-32 letters"),
        ('[{"name": "a", "kind": "a1111", "url": "http://x", "concurrency": 0}]', "concurrency must be"),
        ('[{"name": "a", "kind": "a1111", "url": "http://x", "sizes": ["big"]}]', "sizes: 'big' is not WIDTHxHEIGHT"),
        ('[{"name": "a", "kind": "a1111", "url": "http://x", "workflow": "w.json"}]', "workflow applies to kind comfyui"),
        ('[{"name": "a", "kind": "a1111", "url": "http://x", "colour": 1}]', "unknown key 'colour'"),
        ('[{"name": "a", "kind": "a1111", "url": "http://x"}, {"name": "a", "kind": "horde", "url": "http://y"}]',
         "entry 2: the name 'a' is used twice"),
        ("@/nonexistent/backends.json", "IMAGE_BACKENDS: cannot read /nonexistent/backends.json"),
    ],
)  # fmt: skip
def test_bad_entries_are_one_clear_line(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv("IMAGE_BACKENDS", value)
    with pytest.raises(SettingsError) as error:
        load_settings(env_file=None)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_both_settings_stop_start_up_with_one_line_exit_2(tmp_path: Path) -> None:
    env = {"IMAGE_BACKEND": "horde", "IMAGE_BACKENDS": json.dumps(POOL), "DISCORD_TOKEN": "abcdef-123456"}
    proc = run_bot(tmp_path, env, "imagine", "cat", "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "error: set IMAGE_BACKEND or IMAGE_BACKENDS, not both (IMAGE_BACKENDS lists every backend)"
    ]
    assert "s3cr3t-key" not in proc.stderr + proc.stdout
