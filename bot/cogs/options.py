"""Option helpers shared by the cogs."""

from __future__ import annotations

from collections.abc import Iterable

from discord import app_commands

MAX_CHOICES = 25  # Discord's limit for choices and autocomplete answers


def model_choices(models: Iterable[str], current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete for a model option: the operator's IMAGE_MODELS containing what was typed."""
    needle = current.casefold()
    return [app_commands.Choice(name=m[:100], value=m[:100]) for m in models if needle in m.casefold()][
        :MAX_CHOICES
    ]
