"""``python -m bot check`` with IMAGE_BACKEND=comfyui: the workflow is checked against the server, one line each."""

from __future__ import annotations

import json

from bot.backends.comfyui import BUILTIN_WORKFLOW
from bot.service.check import run_check
from bot.settings import load_settings
from tests.fakes.comfyui import FakeComfyUI


def lines_of(out: str, name: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"{name}:")]


async def test_check_reports_each_workflow_problem_on_its_own_line(tmp_path, capsys) -> None:
    graph = json.loads(json.dumps(BUILTIN_WORKFLOW))
    graph["10"] = {"class_type": "FaceDetailer", "inputs": {"image": ["8", 0]}}
    graph["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
    path = tmp_path / "workflow_api.json"
    path.write_text(json.dumps(graph))
    async with FakeComfyUI(argv=["main.py"]) as fake:
        settings = load_settings(
            env_file=None,
            image_backend="comfyui",
            image_backend_url=fake.url,
            comfyui_workflow=str(path),
            data_dir=tmp_path / "data",
        )
        status = await run_check(settings)
    out = capsys.readouterr().out
    assert status == 1
    assert lines_of(out, "workflow") == [
        "workflow: problem: workflow_api.json: node 4 (CheckpointLoaderSimple): ckpt_name 'missing.safetensors' "
        "is not among ComfyUI's choices",
        "workflow: problem: workflow_api.json: node 10 (FaceDetailer): ComfyUI has no node type 'FaceDetailer' "
        "(is its custom node pack installed?)",
        "workflow: note: ComfyUI runs without previews; start it with --preview-method auto for live previews",
    ]
    assert lines_of(out, "backend")[0].startswith("backend: ok (comfyui at http://127.0.0.1:")
    assert fake.state.prompts_submitted == 0  # a check never generates


async def test_check_passes_the_builtin_workflow(tmp_path, capsys) -> None:
    async with FakeComfyUI() as fake:
        settings = load_settings(
            env_file=None, image_backend="comfyui", image_backend_url=fake.url, data_dir=tmp_path / "data"
        )
        await run_check(settings)
    out = capsys.readouterr().out
    (line,) = lines_of(out, "workflow")
    assert line.startswith("workflow: ok (built-in workflow: every node exists; placeholders batch_size,")


async def test_an_unusable_workflow_file_is_one_backend_line(tmp_path, capsys) -> None:
    path = tmp_path / "ui.json"
    path.write_text('{"nodes": [], "links": []}')
    settings = load_settings(
        env_file=None, image_backend="comfyui", comfyui_workflow=str(path), data_dir=tmp_path / "data"
    )
    assert await run_check(settings) == 1
    (line,) = lines_of(capsys.readouterr().out, "backend")
    assert line.startswith("backend: problem: COMFYUI_WORKFLOW (ui.json): this is the UI format; save")
