"""ComfyUIBackend against the wire-level fake ComfyUI (HTTP and websocket on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.backends.comfyui import BUILTIN_WORKFLOW, ComfyUIBackend, Workflow
from bot.backends.comfyui.events import RECHECK
from bot.engine.backend import backend_call
from bot.engine.errors import FailureReason, GenerationError
from bot.engine.models import ImageRequest, Progress
from bot.settings import SettingsError
from tests.backends.conftest import FAST_RETRY, RecordingSleep, eventually
from tests.fakes.comfyui import CHECKPOINTS, FakeComfyUI, preview_image

ROOT = Path(__file__).resolve().parents[2]
REQ = ImageRequest(prompt="a red fox", width=512, height=512, seed=42)


@contextlib.asynccontextmanager
async def comfy(
    session: aiohttp.ClientSession, fake: FakeComfyUI, **kwargs: Any
) -> AsyncIterator[ComfyUIBackend]:
    """A started backend (socket open), closed afterwards."""
    options: dict[str, Any] = {"retry": FAST_RETRY, "sleep": RecordingSleep(), "preview_interval_s": 0.0}
    options.update(kwargs)
    backend = ComfyUIBackend(session, fake.url, **options)
    try:
        await backend.start()
        await eventually(lambda: backend.connections >= 1)
        yield backend
    finally:
        await backend.aclose()


def write_workflow(tmp_path: Path, graph: dict[str, Any]) -> Path:
    path = tmp_path / "workflow_api.json"
    path.write_text(json.dumps(graph))
    return path


async def test_builtin_workflow_gets_numbers_where_nodes_want_them(session) -> None:
    async with FakeComfyUI() as fake, comfy(session, fake) as backend:
        images = await backend.generate(REQ.replace(count=2, negative_prompt="blurry"))
    assert len(images) == 2 and images[0].format == "PNG" and images[0].data != images[1].data
    body = fake.state.last_prompt
    assert body["client_id"] == backend.client_id == fake.state.ws_client_ids[0]
    graph = body["prompt"]
    sampler = graph["3"]["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (42, 25, 7.0)
    assert type(sampler["seed"]) is int and type(sampler["cfg"]) is float
    assert (sampler["sampler_name"], sampler["scheduler"]) == ("euler", "normal")
    assert graph["5"]["inputs"] == {"width": 512, "height": 512, "batch_size": 2}
    assert graph["6"]["inputs"]["text"] == "a red fox" and graph["7"]["inputs"]["text"] == "blurry"
    assert graph["4"]["inputs"]["ckpt_name"] == CHECKPOINTS[0]  # no model set: the first checkpoint
    assert fake.state.prompt_ids == [body["prompt_id"]]  # ours, honoured
    assert fake.state.views == 2


async def test_admin_workflow_defaults_and_placeholders_inside_text(session, tmp_path) -> None:
    graph = json.loads(json.dumps(BUILTIN_WORKFLOW))
    graph["6"]["inputs"]["text"] = "%prompt%, masterpiece"
    graph["9"]["inputs"]["filename_prefix"] = "%seed%"  # a STRING input: stays text
    del graph["5"]["inputs"]["batch_size"]
    graph["5"]["inputs"]["batch_size"] = 1
    graph["7"]["inputs"]["text"] = "lowres"
    workflow = Workflow.load(write_workflow(tmp_path, graph))
    defaults = {"steps": "30", "scale": "5.5", "sampler": "dpmpp_2m", "scheduler": "karras"}
    async with FakeComfyUI() as fake, comfy(session, fake, workflow=workflow, defaults=defaults) as backend:
        assert backend.capabilities.max_count == 1  # no %batch_size%: one image a prompt
        assert not backend.capabilities.negative_prompt  # no %negative_prompt%
        await backend.generate(REQ.replace(model=CHECKPOINTS[1]))
    sent = fake.state.last_prompt["prompt"]
    assert sent["6"]["inputs"]["text"] == "a red fox, masterpiece"
    assert sent["9"]["inputs"]["filename_prefix"] == "42"
    assert sent["3"]["inputs"]["steps"] == 30 and sent["3"]["inputs"]["cfg"] == 5.5
    assert sent["3"]["inputs"]["sampler_name"] == "dpmpp_2m"
    assert sent["4"]["inputs"]["ckpt_name"] == CHECKPOINTS[1]


async def test_old_server_own_prompt_id_is_the_one_followed(session) -> None:
    submitted: list[str] = []
    async with FakeComfyUI(honour_prompt_id=False, old_server=True) as fake, comfy(session, fake) as backend:
        images = await backend.generate(REQ, on_submitted=submitted.append)
    assert len(images) == 1 and images[0].seed == 42
    assert submitted == fake.state.prompt_ids  # the id ComfyUI returned, not ours
    assert submitted[0] != fake.state.last_prompt["prompt_id"]


async def test_node_errors_are_a_refusal_naming_the_node(session) -> None:
    async with FakeComfyUI() as fake, comfy(session, fake) as backend:
        with pytest.raises(GenerationError) as caught:
            await backend.generate(REQ.replace(model="no-such-model.safetensors"))
    assert caught.value.reason is FailureReason.BAD_REQUEST
    message = caught.value.message
    assert "node 4 (CheckpointLoaderSimple)" in message and "no-such-model" in message
    assert fake.state.prompts_refused == 1 and fake.state.prompts_submitted == 0


async def test_execution_error_ends_it_with_one_line(session) -> None:
    error = "CUDA out of memory. Tried to allocate 2.00 GiB\nTraceback (most recent call last):\n  File x"
    async with FakeComfyUI(fail_execution=error) as fake, comfy(session, fake) as backend:
        with pytest.raises(GenerationError) as caught:
            await backend.generate(REQ)
    assert (
        caught.value.message == "ComfyUI failed in KSampler: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert fake.state.views == 0


async def test_progress_and_previews_with_metadata_at_most_one_per_interval(session) -> None:
    seen: list[Progress] = []
    async with (
        FakeComfyUI(steps=6, step_delay=0.05) as fake,
        comfy(session, fake, preview_interval_s=3600) as backend,
    ):
        await backend.generate(REQ, seen.append)
    fractions = [p.fraction for p in seen if p.fraction is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    previews = [p.preview for p in seen if p.preview]
    assert previews == [preview_image(1)]  # six frames came; one every interval is shown
    assert fake.state.feature_flags == [{"supports_preview_metadata": True}]


async def test_type1_previews_belong_to_the_prompt_last_executing(session) -> None:
    first: list[Progress] = []
    second: list[Progress] = []
    async with FakeComfyUI(preview_metadata=False, steps=3) as fake, comfy(session, fake) as backend:
        await asyncio.gather(backend.generate(REQ, first.append), backend.generate(REQ, second.append))
    first_previews = {p.preview for p in first if p.preview}
    second_previews = {p.preview for p in second if p.preview}
    assert first_previews and second_previews
    assert len(first_previews | second_previews) == 2 and not first_previews & second_previews
    assert {*first_previews, *second_previews} == {preview_image(1), preview_image(2)}


async def test_restart_mid_generation_follows_the_same_prompt(session, tmp_path) -> None:
    id_file = tmp_path / "comfyui-client-id"
    async with FakeComfyUI(hold_running=True) as fake:
        # The first process: submits, is told the id, then dies (its session goes with it, so no cancel).
        dying = aiohttp.ClientSession()
        submitted: list[str] = []
        first = ComfyUIBackend(dying, fake.url, client_id_path=id_file, retry=FAST_RETRY)
        task = asyncio.create_task(first.generate(REQ, on_submitted=submitted.append))
        await eventually(lambda: fake.running is not None and bool(submitted))
        await dying.close()
        task.cancel()
        # Whatever the dead process's last calls met (a closed session) does not matter; that it sent none does.
        with contextlib.suppress(asyncio.CancelledError, GenerationError, RuntimeError):
            await task
        await first.aclose()
        # The restarted process: the same client id, the stored prompt id, nothing submitted again.
        async with comfy(session, fake, client_id_path=id_file) as second:
            assert second.client_id == first.client_id
            follow = asyncio.create_task(second.resume(submitted[0], count=1))
            await asyncio.sleep(0.1)
            fake.release()
            images = await asyncio.wait_for(follow, 10)
    assert len(images) == 1
    assert fake.state.prompts_submitted == 1
    assert fake.state.deletes == [] and fake.state.interrupts == []
    assert fake.state.ws_client_ids == [first.client_id, first.client_id]


async def test_resume_of_a_prompt_that_ended_while_down_fetches_it_from_history(session) -> None:
    async with FakeComfyUI() as fake:
        async with comfy(session, fake) as first:
            submitted: list[str] = []
            await first.generate(REQ, on_submitted=submitted.append)
        async with comfy(session, fake) as second:
            images = await second.resume(submitted[0], count=1)
    assert len(images) == 1 and fake.state.prompts_submitted == 1


async def test_resume_of_a_prompt_comfyui_forgot_fails_clearly(session) -> None:
    async with FakeComfyUI() as fake, comfy(session, fake) as backend:
        with pytest.raises(GenerationError) as caught:
            await asyncio.wait_for(backend.resume("0d6a7c1e-gone", count=1), 10)
    assert "no longer has this generation" in caught.value.message
    assert fake.state.prompts_submitted == 0


async def test_after_a_reconnect_history_is_rechecked(session) -> None:
    # The socket drops mid-run and stays down until after the prompt ended: only the re-check finds the end
    # (the fallback poll is an hour away).
    async with (
        FakeComfyUI(steps=4, step_delay=0.02, drop_sockets_at_step=2) as fake,
        comfy(session, fake, poll_interval_s=3600, reconnect_min_s=0.5) as backend,
    ):
        images = await asyncio.wait_for(backend.generate(REQ), 20)
        assert fake.state.completed and backend.connections == 2
    assert len(images) == 1


async def test_cancel_while_pending_deletes_it_from_the_queue(session) -> None:
    async with FakeComfyUI(hold_running=True) as fake, comfy(session, fake) as backend:
        other = asyncio.create_task(backend.generate(REQ.replace(prompt="someone else's")))
        await eventually(lambda: fake.running is not None)
        ours = asyncio.create_task(backend.generate(REQ))
        await eventually(lambda: len(fake.pending) == 1)
        our_id = fake.pending[0].prompt_id
        ours.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ours
        assert fake.state.deletes == [our_id] and fake.state.interrupts == []
        assert fake.pending == []
        fake.release()
        assert len(await other) == 1  # the running prompt was left alone


async def test_cancel_while_running_interrupts_only_our_prompt(session) -> None:
    async with FakeComfyUI(hold_running=True) as fake, comfy(session, fake) as backend:
        ours = asyncio.create_task(backend.generate(REQ))
        await eventually(lambda: fake.running is not None)
        our_id = fake.running.prompt_id
        ours.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ours
        assert fake.state.interrupts == [our_id] and fake.state.deletes == []
        await eventually(lambda: our_id in fake.history)
    assert fake.history[our_id]["status"]["status_str"] == "error"


async def test_a_handed_over_call_leaves_the_prompt_running_for_whoever_follows_it_up(session) -> None:
    async with FakeComfyUI(hold_running=True) as fake:
        submitted: list[str] = []
        async with comfy(session, fake) as first:

            async def generate() -> object:
                with backend_call() as call:
                    calls.append(call)
                    return await first.generate(REQ, on_submitted=submitted.append)

            calls: list[Any] = []
            ours = asyncio.create_task(generate())
            await eventually(lambda: fake.running is not None and bool(submitted))
            calls[0].hand_over()
            ours.cancel()
            with pytest.raises(asyncio.CancelledError):
                await ours
            assert fake.state.interrupts == [] and fake.state.deletes == []
        # Another process, another websocket client (ComfyUI tells it nothing): it polls /history.
        async with comfy(session, fake, poll_interval_s=0.1) as second:
            follow = asyncio.create_task(second.resume(submitted[0], count=1))
            await asyncio.sleep(0.1)
            fake.release()
            images = await asyncio.wait_for(follow, 10)
    assert len(images) == 1 and fake.state.prompts_submitted == 1
    assert fake.state.interrupts == [] and fake.state.deletes == []


async def test_a_cancel_that_arrives_with_an_event_is_not_lost(session) -> None:
    """Cancel pressed as an event reaches the prompt's queue (the recheck queued right after submitting):
    Python 3.11's wait_for returned the event and dropped the cancel, so the generation went on waiting
    until shutdown. The cancel must win and interrupt the prompt."""
    async with FakeComfyUI(hold_running=True) as fake, comfy(session, fake) as backend:
        ours = asyncio.create_task(backend.generate(REQ))
        await eventually(lambda: fake.running is not None)
        our_id = fake.running.prompt_id
        await asyncio.sleep(0.05)  # waiting on its events now
        backend._socket.watch(our_id).events.put_nowait(RECHECK)  # the race, made certain
        ours.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await ours
        assert fake.state.interrupts == [our_id]


async def test_cancel_after_it_finished_sends_neither(session) -> None:
    async with FakeComfyUI() as fake, comfy(session, fake) as backend:
        await backend.generate(REQ)
        await backend.cancel(fake.state.prompt_ids[0])
    assert fake.state.interrupts == [] and fake.state.deletes == []


async def test_interrupted_on_the_server_is_a_failure(session) -> None:
    async with FakeComfyUI(hold_running=True) as fake, comfy(session, fake) as backend:
        ours = asyncio.create_task(backend.generate(REQ))
        await eventually(lambda: fake.running is not None)
        async with session.post(fake.url + "/interrupt") as reply:  # someone pressed Cancel in ComfyUI
            assert reply.status == 200
        with pytest.raises(GenerationError) as caught:
            await ours
    assert caught.value.message == "The generation was stopped on the ComfyUI server."


async def test_models_are_the_checkpoints(session) -> None:
    async with FakeComfyUI(checkpoints=["a.safetensors", "b.ckpt"]) as fake:
        backend = ComfyUIBackend(session, fake.url, retry=FAST_RETRY)
        assert await backend.list_models() == ["a.safetensors", "b.ckpt"]
        await backend.aclose()


def test_workflow_problems_one_line_each() -> None:
    from tests.fakes.comfyui import object_info

    graph = json.loads(json.dumps(BUILTIN_WORKFLOW))
    graph["10"] = {"class_type": "UltimateSDUpscale", "inputs": {"image": ["8", 0]}}
    graph["6"]["inputs"]["prompt"] = graph["6"]["inputs"].pop("text")
    graph["3"]["inputs"]["sampler_name"] = "euler_nonsense"
    problems = Workflow(graph).problems(object_info(CHECKPOINTS))
    assert problems == [
        "node 3 (KSampler): sampler_name 'euler_nonsense' is not among ComfyUI's choices",
        "node 6 (CLIPTextEncode): %prompt% is in input 'prompt', which CLIPTextEncode does not have",
        "node 10 (UltimateSDUpscale): ComfyUI has no node type 'UltimateSDUpscale' "
        "(is its custom node pack installed?)",
    ]
    assert Workflow.builtin().problems(object_info(CHECKPOINTS)) == []


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("{not json", "not valid JSON"),
        ('{"nodes": [], "links": []}', "Export (API)"),
        ('{"1": {"inputs": {}}}', "node 1 has no class_type"),
        ('{"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}}}', "no %prompt%"),
    ],
)
def test_unusable_workflow_files_stop_start_up_with_one_line(tmp_path, content: str, said: str) -> None:
    path = tmp_path / "wf.json"
    path.write_text(content)
    with pytest.raises(SettingsError) as caught:
        Workflow.load(path)
    assert said in str(caught.value) and str(caught.value).startswith("COMFYUI_WORKFLOW")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("key", ["s3cret-token-value", "admin:hunter22"])
async def test_bearer_or_basic_auth_on_http_and_websocket(session, key: str) -> None:
    header = "Basic " + base64.b64encode(key.encode()).decode() if ":" in key else f"Bearer {key}"
    async with FakeComfyUI(require_auth=header) as fake, comfy(session, fake, api_key=key) as backend:
        images = await backend.generate(REQ)
    assert len(images) == 1 and fake.state.ws_connects == 1
    assert set(fake.state.authorizations) == {header}


async def test_wrong_credentials_are_an_auth_failure_without_the_key(session) -> None:
    async with FakeComfyUI(require_auth="Bearer right") as fake:
        backend = ComfyUIBackend(session, fake.url, api_key="wrong-key-123", retry=FAST_RETRY)
        with pytest.raises(GenerationError) as caught:
            await backend.list_models()
        await backend.aclose()
    assert caught.value.reason is FailureReason.AUTH and "wrong-key-123" not in caught.value.message


async def test_preview_hint_reads_the_servers_arguments(session) -> None:
    async with FakeComfyUI(argv=["main.py", "--listen"]) as fake:
        backend = ComfyUIBackend(session, fake.url, retry=FAST_RETRY)
        assert "--preview-method auto" in (await backend.preview_hint() or "")
        fake.configure(argv=["main.py", "--preview-method=taesd"])
        assert await backend.preview_hint() is None


async def test_api_prefix_in_the_url_is_accepted(session) -> None:
    async with FakeComfyUI() as fake:
        backend = ComfyUIBackend(session, fake.url + "/api/", retry=FAST_RETRY)
        assert await backend.list_models() == CHECKPOINTS


async def test_standalone_fake_serves_http_and_websocket(session) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.comfyui", "--port", "0", "--delay", "0.1",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, line
        url = match.group(1)
        async with session.post(url + "/_fake/config", json={"steps": 2}) as reply:
            assert reply.status == 200
        backend = ComfyUIBackend(session, url, retry=FAST_RETRY, preview_interval_s=0)
        try:
            await backend.start()
            images = await backend.generate(REQ)
        finally:
            await backend.aclose()
        assert len(images) == 1
        async with session.get(url + "/_fake/state") as reply:
            state = await reply.json()
        assert state["prompts_submitted"] == 1 and state["ws_connects"] == 1
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_without_a_websocket_the_poll_still_ends_the_generation(session) -> None:
    async with FakeComfyUI(refuse_websocket=True) as fake:
        backend = ComfyUIBackend(
            session, fake.url, retry=FAST_RETRY, poll_interval_s=0.1, connect_wait_s=0.1, reconnect_max_s=1
        )
        try:
            images = await asyncio.wait_for(backend.generate(REQ), 20)
        finally:
            await backend.aclose()
    assert len(images) == 1 and backend.connections == 0
    assert fake.state.prompts_submitted == 1


async def test_start_logs_each_workflow_problem(session, caplog) -> None:
    graph = json.loads(json.dumps(BUILTIN_WORKFLOW))
    graph["10"] = {"class_type": "FaceDetailer", "inputs": {"image": ["8", 0]}}
    async with FakeComfyUI() as fake:
        backend = ComfyUIBackend(session, fake.url, workflow=Workflow(graph, "mine.json"), retry=FAST_RETRY)
        try:
            with caplog.at_level("ERROR", logger="bot.backends.comfyui"):
                problems = await backend.start()
        finally:
            await backend.aclose()
    assert problems == [
        "node 10 (FaceDetailer): ComfyUI has no node type 'FaceDetailer' (is its custom node pack installed?)"
    ]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"ComfyUI mine.json: {problems[0]}"
    ]


async def test_start_with_comfyui_down_is_not_fatal(session) -> None:
    async with FakeComfyUI() as fake:
        url = fake.url
    backend = ComfyUIBackend(session, url, retry=FAST_RETRY, reconnect_min_s=0.05)
    try:
        assert await asyncio.wait_for(backend.start(), 10) == []
    finally:
        await backend.aclose()


def test_factory_builds_comfyui_from_the_settings(session, tmp_path) -> None:
    from bot.backends import create_backend
    from bot.settings import load_settings

    path = write_workflow(tmp_path, BUILTIN_WORKFLOW)
    settings = load_settings(
        env_file=None,
        image_backend="comfyui",
        comfyui_workflow=str(path),
        comfyui_defaults="steps=12",
        data_dir=tmp_path / "data",
        image_backend_api_key="tok-12345",
    )
    backend = create_backend(settings, session)
    assert isinstance(backend, ComfyUIBackend) and backend.name == "comfyui"
    assert backend.workflow.source == "workflow_api.json"
    assert backend.capabilities.max_count == 4 and backend.capabilities.preview


def test_fingerprint_changes_with_the_workflow_and_defaults() -> None:
    graph = json.loads(json.dumps(BUILTIN_WORKFLOW))
    base = ComfyUIBackend(None, "http://127.0.0.1:8188")  # type: ignore[arg-type]
    same = ComfyUIBackend(None, "http://127.0.0.2:8188", workflow=Workflow(graph, "copy.json"))  # type: ignore[arg-type]
    changed = json.loads(json.dumps(BUILTIN_WORKFLOW))
    changed["9"]["inputs"]["filename_prefix"] = "other"
    other = ComfyUIBackend(None, "http://127.0.0.1:8188", workflow=Workflow(changed))  # type: ignore[arg-type]
    steps = ComfyUIBackend(None, "http://127.0.0.1:8188", defaults={"steps": "40"})  # type: ignore[arg-type]
    assert base.fingerprint == same.fingerprint  # identical backends share results
    assert len({base.fingerprint, other.fingerprint, steps.fingerprint}) == 3


async def test_a_prompt_waiting_in_comfyuis_shared_queue_says_where_it_stands(session) -> None:
    second: list[Progress] = []
    third: list[Progress] = []
    async with FakeComfyUI(hold_running=True) as fake, comfy(session, fake) as backend:
        # Someone using ComfyUI's own web UI got there first.
        async with session.post(fake.url + "/prompt", json={"prompt": BUILTIN_FILLED, "client_id": "web-ui"}):
            pass
        await eventually(lambda: fake.running is not None)
        tasks = [asyncio.create_task(backend.generate(REQ, second.append))]
        await eventually(lambda: any(p.queue_position for p in second))
        tasks.append(asyncio.create_task(backend.generate(REQ, third.append)))
        await eventually(lambda: any(p.queue_position for p in third))
        fake.release()
        await asyncio.gather(*tasks)
    assert [p.queue_position for p in second if p.queue_position] == [1]
    assert [p.note for p in third if p.queue_position] == ["Waiting in ComfyUI's queue (position 2)"]


BUILTIN_FILLED = Workflow.builtin().fill(
    {"prompt": "x", "negative_prompt": "", "seed": 1, "width": 64, "height": 64, "steps": 2, "scale": 7,
     "model": CHECKPOINTS[0], "sampler": "euler", "scheduler": "normal", "batch_size": 1}
)  # fmt: skip
