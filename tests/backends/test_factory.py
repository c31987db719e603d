"""create_backend: the settings pick and configure the backend; the shared session is used, never a new one."""

from __future__ import annotations

import pytest

from bot.backends import create_backend
from bot.backends.a1111 import A1111Backend
from bot.backends.horde import ANONYMOUS_KEY, DEFAULT_URL, HordeBackend
from bot.backends.openai import OpenAIBackend
from bot.engine.models import ImageRequest
from bot.settings import Settings, SettingsError
from tests.backends.conftest import RecordingSleep
from tests.fakes.a1111 import FakeA1111
from tests.fakes.horde import FakeHorde
from tests.fakes.openai_api import FakeOpenAI


def test_horde_is_zero_config(session) -> None:
    backend = create_backend(Settings(image_backend="horde"), session)
    assert isinstance(backend, HordeBackend)
    assert backend._api == DEFAULT_URL and backend._key == ANONYMOUS_KEY
    assert backend._session is session


def test_openai_and_a1111_get_url_key_and_model(session) -> None:
    openai = create_backend(
        Settings(
            image_backend="openai",
            image_backend_url="http://h:1337/v1",
            image_backend_api_key="k",
            image_model="flux",
        ),
        session,
    )
    assert isinstance(openai, OpenAIBackend)
    assert openai._api == "http://h:1337/v1" and openai.default_model() == "flux"
    a1111 = create_backend(
        Settings(image_backend="a1111", image_backend_url="http://h:7860/sdapi/v1"), session
    )
    assert isinstance(a1111, A1111Backend) and a1111._root == "http://h:7860"


def test_a1111_key_must_be_user_pass(session) -> None:
    settings = Settings(
        image_backend="a1111", image_backend_url="http://h:7860", image_backend_api_key="token"
    )
    with pytest.raises(SettingsError):
        create_backend(settings, session)


@pytest.mark.parametrize("name", ["openai", "a1111", "horde"])
async def test_each_backend_generates_against_its_fake(session, name: str) -> None:
    fake = {"openai": FakeOpenAI(), "a1111": FakeA1111(), "horde": FakeHorde(checks_until_done=1)}[name]
    async with fake:
        settings = Settings(image_backend=name, image_backend_url=fake.url)
        backend = create_backend(settings, session, sleep=RecordingSleep(), poll_interval_s=0.01)
        size = backend.capabilities.default_size
        images = await backend.generate(ImageRequest(prompt="a test", width=size[0], height=size[1]))
    assert len(images) == 1 and backend.name == name
