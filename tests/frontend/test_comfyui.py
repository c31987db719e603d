"""/imagine with IMAGE_BACKEND=comfyui: the real bot, the fake Discord and the fake ComfyUI, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.discord import FakeDiscord
from tests.frontend.conftest import TOKEN, embed_author, image_attachments, is_done, running_bot
from tests.frontend.process import assert_clean, bot_process


def stored_refs(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        return [row[0] for row in db.execute("SELECT backend_ref FROM jobs WHERE backend_ref IS NOT NULL")]


async def wait_for(predicate, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_imagine_through_comfyui_shows_a_preview_then_the_image(fake_discord, tmp_path) -> None:
    async with FakeComfyUI(steps=8, step_delay=0.15) as comfy:
        async with running_bot(fake_discord, tmp_path, backend="comfyui", backend_url=comfy.url) as h:
            user = fake_discord.add_member(h.guild.id)
            inter = await h.imagine(user.id, "a lighthouse at dusk", count=2)
            message = await inter.wait_until(is_done, timeout=20)
            assert len(image_attachments(message)) == 2
            fields = {f["name"]: f["value"] for f in message.embeds[0]["fields"]}
            assert fields["Backend"] == "comfyui"
            previews = [
                r for r in message.history if any(a["filename"] == "preview.png" for a in r.attachments)
            ]
            assert previews, "no live preview was shown while ComfyUI worked"
        assert comfy.state.prompts_submitted == 1
        sent = comfy.state.last_prompt
        assert sent["prompt"]["6"]["inputs"]["text"] == "a lighthouse at dusk"
        assert sent["client_id"] == comfy.state.ws_client_ids[0]
        assert comfy.state.ws_connects == 1  # one socket for the bot, not one per job


async def test_cancel_button_takes_a_running_prompt_off_comfyui(fake_discord, tmp_path) -> None:
    async with FakeComfyUI(hold_running=True) as comfy:
        async with running_bot(fake_discord, tmp_path, backend="comfyui", backend_url=comfy.url) as h:
            owner = fake_discord.add_member(h.guild.id)
            inter = await h.imagine(owner.id, "long job")
            await wait_for(lambda: comfy.running is not None)
            message = await inter.wait_until(lambda m: bool(m.components))
            press = await fake_discord.click_button(
                message, fake_discord.find_component(message, label="Cancel"), owner.id
            )
            await press.wait_for_callback()
            await inter.wait_until(lambda m: "Cancelled by" in embed_author(m))
            await wait_for(lambda: comfy.state.interrupts == [comfy.state.prompt_ids[0]])
        assert comfy.state.deletes == []


async def test_sigkill_mid_generation_then_restart_follows_the_same_prompt(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeComfyUI(hold_running=True) as comfy:
        guild = fake.add_guild(name="G")
        settings = {"image_backend": "comfyui", "image_backend_url": comfy.url}
        user = fake.add_member(guild.id)
        async with bot_process(fake, tmp_path, **settings) as doomed:
            inter = await fake.invoke_command(
                guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "far away"}
            )
            await wait_for(lambda: comfy.running is not None)
            # Killed once the prompt id ComfyUI returned is in the store (it is stored before the wait begins).
            while await asyncio.to_thread(stored_refs, tmp_path / "bot.sqlite3") != comfy.state.prompt_ids:
                await asyncio.sleep(0.05)
            doomed.kill()
            await doomed.wait(10)
        assert comfy.state.prompts_submitted == 1
        async with bot_process(fake, tmp_path, **settings) as restarted:
            await wait_for(lambda: comfy.state.ws_connects == 2)
            comfy.release()
            message = await inter.wait_until(is_done, timeout=20)
            assert image_attachments(message)
            assert await restarted.terminate() == 0
        assert comfy.state.prompts_submitted == 1  # followed, never submitted again
        assert comfy.state.interrupts == [] and comfy.state.deletes == []
        first, second = comfy.state.ws_client_ids
        assert first == second  # the restarted bot is the same ComfyUI client
        assert_clean(restarted.text)
