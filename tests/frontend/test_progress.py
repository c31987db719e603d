"""Progress a backend reports, shown through the fake Discord: hostile values never stop the edits."""

from __future__ import annotations

import json

from tests.fakes.a1111 import FakeA1111
from tests.fakes.discord import FakeDiscord
from tests.frontend.conftest import is_done, running_bot


async def test_nan_and_infinite_progress_do_not_stop_later_progress_edits(
    fake_discord: FakeDiscord, fake_a1111: FakeA1111, tmp_path
) -> None:
    # A1111 answers /internal/progress with NaN/Infinity (Python's json writes them; so does A1111's).
    fake_a1111.configure(delay=6, progress_override={"progress": float("nan"), "eta": float("inf")})
    async with running_bot(fake_discord, tmp_path, backend="a1111", backend_url=fake_a1111.url) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "a painting with a broken progress bar")
        await fake_discord.wait_for_state(
            lambda: fake_a1111.state.progress_polls >= 2, 10, "the bot polled the hostile progress"
        )
        # Then a real fraction, but the ETA still infinite: the fraction must be shown all the same.
        fake_a1111.configure(progress_override={"progress": 0.5, "eta": float("inf")})
        await inter.wait_until(lambda m: "50%" in json.dumps(m.embeds), timeout=10)
        message = await inter.wait_until(is_done, timeout=15)
        assert message.attachments  # the result arrived too
        shown = [json.dumps(r.embeds) for r in inter.original.history]
        assert not any("nan" in s.casefold() or "inf" in s.casefold() for s in shown), shown
