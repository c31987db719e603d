"""Which models members may choose, end to end: the real bot, the fake Discord and each backend's fake.

With IMAGE_MODELS empty (the shipped default) the choice is the backend's own list (AI Horde, A1111), shown by
autocomplete; a model nobody allowed is refused privately, naming the allowed ones, and never reaches the
backend. The OpenAI kind offers only IMAGE_MODEL.
"""

from __future__ import annotations

from typing import Any

import pytest

from bot.frontend.interactions import model_choices
from tests.fakes.a1111 import DEFAULT_MODELS, FakeA1111
from tests.fakes.discord import FakeDiscord
from tests.fakes.horde import FakeHorde
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import Harness, is_done, running_bot


async def choices(fake: FakeDiscord, h: Harness, user_id: Any, typed: str) -> list[str]:
    inter = await fake.autocomplete(
        h.guild.id, h.channel_id, user_id, "imagine", {"prompt": "x", "model": typed}, "model"
    )
    callback = await inter.wait_for_callback()
    assert callback.type == 8
    return [c["value"] for c in callback.data["choices"]]


async def refusal(h: Harness, user_id: Any, model: str) -> str:
    inter = await h.imagine(user_id, "a lighthouse", model=model)
    answer = await inter.wait_for_callback()
    assert answer.ephemeral, answer
    content = answer.data["content"]
    assert "Traceback" not in content and "IMAGE_MODELS" not in content  # no operator advice to members
    return content


async def test_a1111_members_choose_among_the_checkpoints_it_lists(
    fake_discord: FakeDiscord, fake_a1111: FakeA1111, tmp_path
) -> None:
    async with running_bot(fake_discord, tmp_path, backend="a1111", backend_url=fake_a1111.url) as h:
        user = fake_discord.add_member(h.guild.id)
        assert await choices(fake_discord, h, user.id, "") == DEFAULT_MODELS
        assert await choices(fake_discord, h, user.id, "XL") == [DEFAULT_MODELS[1]]

        content = await refusal(h, user.id, "some-checkpoint-nobody-installed.ckpt")
        assert "some-checkpoint-nobody-installed.ckpt" in content
        assert all(title in content for title in DEFAULT_MODELS), content
        assert fake_a1111.state.txt2img_calls == 0  # it never reached the backend

        inter = await h.imagine(user.id, "a lighthouse", model=DEFAULT_MODELS[1])
        await inter.wait_until(is_done, timeout=10)
        assert fake_a1111.state.txt2img_calls == 1
        assert fake_a1111.state.last_payload["override_settings"] == {
            "sd_model_checkpoint": DEFAULT_MODELS[1]
        }


async def test_the_list_follows_the_backend_and_a_failed_refresh_keeps_it(
    fake_discord: FakeDiscord, fake_a1111: FakeA1111, tmp_path
) -> None:
    async with running_bot(fake_discord, tmp_path, backend="a1111", backend_url=fake_a1111.url) as h:
        user = fake_discord.add_member(h.guild.id)
        catalog = h.bot.manager.catalog
        assert fake_a1111.state.model_list_calls == 1  # fetched at start
        fake_a1111.configure(models=["dreamshaper_8.safetensors [879db523c3]"])
        assert await catalog.refresh()  # what the 10-minute task does
        assert await choices(fake_discord, h, user.id, "") == ["dreamshaper_8.safetensors [879db523c3]"]
        assert "dreamshaper_8" in await refusal(h, user.id, DEFAULT_MODELS[0])  # no longer installed

        fake_a1111.configure(fail_model_list=10)
        assert not await catalog.refresh()
        assert await choices(fake_discord, h, user.id, "") == ["dreamshaper_8.safetensors [879db523c3]"]
        assert fake_a1111.state.txt2img_calls == 0


async def test_horde_members_choose_among_the_image_models_it_lists(
    fake_discord: FakeDiscord, tmp_path
) -> None:
    async with FakeHorde() as horde:
        async with running_bot(fake_discord, tmp_path, backend="horde", backend_url=horde.url) as h:
            user = fake_discord.add_member(h.guild.id)
            assert await choices(fake_discord, h, user.id, "") == [
                "Deliberate",
                "stable_diffusion",
            ]  # busiest first
            content = await refusal(h, user.id, "koboldcpp/LLaMA2-13B-Tiefighter")  # a text model
            assert "Deliberate" in content and "stable_diffusion" in content
            assert horde.state.submits == 0


@pytest.mark.parametrize("image_model", [None, "flux"])
async def test_openai_offers_only_image_model(
    fake_discord: FakeDiscord, tmp_path, image_model: str | None
) -> None:
    # /v1/models lists chat models and the priciest image models: none of them is a menu.
    async with FakeOpenAI(known_models=["flux", "gpt-image-1", "gpt-4o"]) as openai:
        async with running_bot(fake_discord, tmp_path, backend_url=openai.url, image_model=image_model) as h:
            user = fake_discord.add_member(h.guild.id)
            assert await choices(fake_discord, h, user.id, "") == ([image_model] if image_model else [])
            content = await refusal(h, user.id, "gpt-image-1")
            assert "gpt-image-1" in content
            assert openai.state.generations == 0


def test_autocomplete_puts_names_starting_with_the_text_first_and_skips_names_too_long_to_send() -> None:
    too_long = "flux-" + "x" * 100  # a choice value holds 100 characters: cut short it would name no model
    models = ["sdxl-flux-mix", too_long, "Flux-dev", "other", *[f"flux-{i}" for i in range(30)]]
    offered = [c.value for c in model_choices(models, "flux")]
    assert offered[:2] == ["Flux-dev", "flux-0"] and "sdxl-flux-mix" not in offered  # 25 starting with it
    assert too_long not in offered and len(offered) == 25
    assert [c.value for c in model_choices(models[:4], "FLUX")] == ["Flux-dev", "sdxl-flux-mix"]
