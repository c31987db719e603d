"""Discord-facing adapter: the discord.py client, the job message, interactions and cogs."""
