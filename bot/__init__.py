"""imagine-bot: a self-hostable Discord bot that generates images with ``/imagine``."""

#: The one version string: ``python -m bot --version`` prints it, and it must equal pyproject.toml's
#: ``[project] version`` (a test holds them together).
__version__ = "0.1.0"
