"""Where discord.py talks to: Discord itself, or a REST proxy / gateway the settings name.

Below both the client (`create_bot` applies it) and the service (`emaki bot` applies it before the
login check); imports discord.py only when called."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.settings import Settings


def use_endpoints(settings: Settings) -> None:
    """Point discord.py at a REST proxy / gateway in front of Discord when the settings name one, and
    keep it from warning at every start about voice libraries this bot never uses."""
    import discord
    import yarl

    if settings.discord_api_base:
        discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    if settings.discord_gateway:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway)
    # discord.py warns once per process that PyNaCl/davey are missing; the flags are its own switch.
    discord.VoiceClient.warn_nacl = False
    discord.VoiceClient.warn_dave = False


def discord_endpoint(settings: Settings) -> str:
    return settings.discord_api_base.rstrip("/") if settings.discord_api_base else "https://discord.com/api"
