"""Wiring and serving: opens the engine, runs the bot, /healthz and /metrics, check and the CLI."""
