"""ComfyUI workflows: an API-format graph with placeholders, checked for shape, checked against a server's
``/object_info``, and filled in for one request.

A placeholder is a string value holding ``%name%`` (:data:`PLACEHOLDERS`). A value that is exactly one
placeholder becomes the type the node's input wants (INT/FLOAT from ``/object_info``; without it, the
placeholder's natural type); a placeholder inside other text is replaced as text. Problems are sentences, one per
problem, naming the node; nothing here does I/O except :meth:`Workflow.load` (a small file, read once at start).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.settings import SettingsError

#: The placeholders a workflow may hold, the convention most ComfyUI front-ends share.
PLACEHOLDERS = (
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "scale",
    "model",
    "sampler",
    "scheduler",
    "batch_size",
)
#: The natural type of a placeholder standing alone, used when ``/object_info`` has not told us the input's type.
_NUMERIC: dict[str, type] = {
    "seed": int,
    "width": int,
    "height": int,
    "steps": int,
    "batch_size": int,
    "scale": float,
}
DEFAULTS: dict[str, str] = {"steps": "25", "scale": "7", "sampler": "euler", "scheduler": "normal"}
_TOKEN = re.compile(r"%(" + "|".join(PLACEHOLDERS) + r")%")

#: ComfyUI's default graph (checkpoint -> two CLIP encodes -> empty latent -> KSampler -> VAE decode -> save).
BUILTIN_WORKFLOW: dict[str, Any] = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": "%seed%",
            "steps": "%steps%",
            "cfg": "%scale%",
            "sampler_name": "%sampler%",
            "scheduler": "%scheduler%",
            "denoise": 1,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "%model%"}},
    "5": {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": "%width%", "height": "%height%", "batch_size": "%batch_size%"},
    },
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "%prompt%", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "%negative_prompt%", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "imagine", "images": ["8", 0]}},
}


# -- the workflow ------------------------------------------------------------------------------------------------
def _input_spec(object_info: Mapping[str, Any], class_type: str, name: str) -> Any:
    """The ``/object_info`` spec of one input (``["INT", {...}]``, ``[[choices]]``, ``["COMBO", {options}]``)."""
    node = object_info.get(class_type)
    inputs = node.get("input") if isinstance(node, dict) else None
    if not isinstance(inputs, dict):
        return None
    for section in ("required", "optional"):
        specs = inputs.get(section)
        if isinstance(specs, dict) and name in specs:
            return specs[name]
    return None


def _spec_type(spec: Any) -> str | list[Any] | None:
    """``"INT"``, ``"FLOAT"``, ``"STRING"``, a list of choices, or ``None`` when unknown."""
    if not isinstance(spec, list | tuple) or not spec:
        return None
    head = spec[0]
    if isinstance(head, list):
        return head
    if head == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        options = spec[1].get("options")
        return list(options) if isinstance(options, list) else None
    return head if isinstance(head, str) else None


def _class_inputs(object_info: Mapping[str, Any], class_type: str) -> set[str]:
    node = object_info.get(class_type)
    inputs = node.get("input") if isinstance(node, dict) else None
    names: set[str] = set()
    if isinstance(inputs, dict):
        for section in ("required", "optional"):
            if isinstance(inputs.get(section), dict):
                names.update(inputs[section])
    return names


def choices_of(object_info: Mapping[str, Any], class_type: str, name: str) -> list[str]:
    kind = _spec_type(_input_spec(object_info, class_type, name))
    return [str(c) for c in kind] if isinstance(kind, list) else []


@dataclass(frozen=True)
class Workflow:
    """An API-format graph with placeholders; ``source`` names it in messages (a file name or "built-in")."""

    graph: dict[str, Any]
    source: str = "built-in workflow"

    @classmethod
    def builtin(cls) -> Workflow:
        return cls(copy.deepcopy(BUILTIN_WORKFLOW))

    @classmethod
    def load(cls, path: Path) -> Workflow:
        """Read and shape-check a workflow file (blocking: call it off the event loop, or before it runs)."""
        name = f"COMFYUI_WORKFLOW ({path.name})"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
        try:
            graph = json.loads(text)
        except ValueError as exc:
            raise SettingsError(f"{name}: not valid JSON ({exc})") from None
        workflow = cls(graph, path.name) if isinstance(graph, dict) else None
        problems = workflow.shape_problems() if workflow else ["the file holds no JSON object"]
        if problems:
            raise SettingsError(f"{name}: {'; '.join(problems)}")
        assert workflow is not None
        return workflow

    def nodes(self) -> Iterable[tuple[str, dict[str, Any]]]:
        for node_id, node in self.graph.items():
            if isinstance(node, dict):
                yield str(node_id), node

    def shape_problems(self) -> list[str]:
        """What makes the graph unusable before any server is asked."""
        if "nodes" in self.graph and "links" in self.graph:
            return [
                "this is the UI format; save the workflow with Export (API) instead "
                "(enable the dev mode options in older ComfyUI settings to see it)"
            ]
        problems = []
        for node_id, node in self.graph.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
                problems.append(f"node {node_id} has no class_type (is this an API-format export?)")
            elif not isinstance(node.get("inputs", {}), dict):
                problems.append(f"node {node_id} ({node['class_type']}): inputs must be an object")
        if not self.graph:
            problems.append("the workflow has no nodes")
        elif not problems and "prompt" not in self.placeholders():
            problems.append("no %prompt% placeholder anywhere, so /imagine's prompt would be ignored")
        return problems

    def placeholders(self) -> set[str]:
        found: set[str] = set()
        for _, node in self.nodes():
            for value in (node.get("inputs") or {}).values():
                if isinstance(value, str):
                    found.update(_TOKEN.findall(value))
        return found

    def problems(self, object_info: Mapping[str, Any]) -> list[str]:
        """One line per problem against a server's ``/object_info``."""
        problems: list[str] = []
        for node_id, node in self.nodes():
            class_type = str(node.get("class_type"))
            where = f"node {node_id} ({class_type})"
            if class_type not in object_info:
                problems.append(
                    f"{where}: ComfyUI has no node type {class_type!r} (is its custom node pack installed?)"
                )
                continue
            known = _class_inputs(object_info, class_type)
            for name, value in (node.get("inputs") or {}).items():
                if not isinstance(value, str):
                    continue
                tokens = _TOKEN.findall(value)
                if tokens and name not in known:
                    problems.append(
                        f"{where}: %{tokens[0]}% is in input {name!r}, which {class_type} does not have"
                    )
                    continue
                options = choices_of(object_info, class_type, name)
                if not tokens and options and value not in options:
                    problems.append(f"{where}: {name} {value!r} is not among ComfyUI's choices")
        return problems

    def fill(self, values: Mapping[str, Any], object_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A copy of the graph with every placeholder replaced (``values`` holds one per placeholder name)."""
        graph = copy.deepcopy(self.graph)
        for _, node in Workflow(graph).nodes():
            inputs = node.get("inputs")
            if not isinstance(inputs, dict):
                continue
            for name, value in inputs.items():
                if not isinstance(value, str) or "%" not in value:
                    continue
                whole = _TOKEN.fullmatch(value)
                if whole:
                    kind = (
                        _spec_type(_input_spec(object_info, str(node.get("class_type")), name))
                        if object_info
                        else None
                    )
                    inputs[name] = _typed(whole.group(1), values[whole.group(1)], kind)
                else:
                    inputs[name] = _TOKEN.sub(lambda m: _text(values[m.group(1)]), value)
        return graph


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _typed(name: str, value: Any, kind: str | list[Any] | None) -> Any:
    """A lone placeholder's value in the type the node wants (a number for INT/FLOAT inputs)."""
    target: type | None
    if kind == "INT":
        target = int
    elif kind == "FLOAT":
        target = float
    elif kind is None:
        target = _NUMERIC.get(name)
    else:
        target = None  # STRING, a choice list, or a custom type: text
    if target is None:
        return _text(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _text(value)
    return int(number) if target is int else number
