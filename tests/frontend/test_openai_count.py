"""``/imagine count:4`` against OpenAI-compatible servers as they are: gpt4free ignores n, DALL-E 3 refuses n>1."""

from __future__ import annotations

import pytest

from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import embed_author, image_attachments, is_done, running_bot


@pytest.mark.parametrize(
    ("knobs", "calls"),
    [({"ignore_n": True}, [4, 3, 2, 1]), ({"max_n": 1}, [4, 1, 1, 1, 1])],
    ids=["ignores-n", "refuses-n-above-1"],
)
async def test_count_4_yields_4_images(fake_discord, tmp_path, knobs, calls) -> None:
    async with FakeOpenAI(**knobs) as server:
        async with running_bot(fake_discord, tmp_path, backend_url=server.url) as h:
            user = fake_discord.add_member(h.guild.id)
            inter = await h.imagine(user.id, "four foxes", count=4)
            message = await inter.wait_until(is_done, timeout=20)
            assert len(image_attachments(message)) == 4
            assert embed_author(message).startswith("Done — 4 images"), embed_author(message)
        assert [p["n"] for p in server.state.payloads] == calls


async def test_image_sizes_are_what_imagine_offers(fake_discord, tmp_path) -> None:
    async with FakeOpenAI() as server:
        async with running_bot(
            fake_discord, tmp_path, backend_url=server.url, image_sizes="768x512,512x512"
        ) as h:
            user = fake_discord.add_member(h.guild.id)
            inter = await h.imagine(user.id, "a wide harbour", size="768x512")
            await inter.wait_until(is_done, timeout=20)
            command = next(
                c for scope in fake_discord.commands.values() for n, c in scope.items() if n == "imagine"
            )
            size = next(o for o in command["options"] if o["name"] == "size")
            assert [c["value"] for c in size["choices"]] == ["768x512", "512x512"]
        assert server.state.payloads[0]["size"] == "768x512"
        assert len(server.state.payloads) == 1
