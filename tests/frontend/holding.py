"""A fake Discord that gets in the way of a job's *final* edit (the one that shows "Done"), once.

``mode="429"`` answers it with a rate limit of ``retry_after`` seconds (discord.py waits, then retries);
``mode="hold"`` holds it unanswered until ``release`` is set (the process is killed meanwhile). Later final
edits, from a retry or a restarted process, go through.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

from tests.fakes.discord import FakeDiscord
from tests.fakes.discord.wire import BODY_KEY, json_response


class FinalEditTrouble(FakeDiscord):
    def __init__(self, *, mode: str, retry_after: float = 4.0, **options: Any) -> None:
        super().__init__(**options)
        self.mode = mode
        self.retry_after = retry_after
        self.troubled = asyncio.Event()  # the final edit arrived and was got in the way of
        self.release = asyncio.Event()
        # The webhook-message route is bound when the server starts: put ourselves in front of it now.
        self._answer_webhook_message = self.interaction_api.h_webhook_message
        self.interaction_api.h_webhook_message = self._h_webhook_message  # type: ignore[method-assign]

    @staticmethod
    def _is_final(request: web.Request) -> bool:
        body = request.get(BODY_KEY)
        embeds = (body.json or {}).get("embeds") if body is not None else None
        author = ((embeds or [{}])[0].get("author") or {}).get("name", "")
        return request.method == "PATCH" and author.startswith("Done")

    async def _h_webhook_message(self, request: web.Request) -> web.Response:
        if self.troubled.is_set() or not self._is_final(request):
            return await self._answer_webhook_message(request)
        self.troubled.set()
        if self.mode == "429":
            body = {
                "message": "You are being rate limited.",
                "retry_after": self.retry_after,
                "global": False,
            }
            return json_response(body, 429, {"Via": "1.1 google"})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                await self.release.wait()
        return json_response({"message": "held", "code": 0}, 503)
