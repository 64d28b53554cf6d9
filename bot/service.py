"""`emaki bot` as a service: the token checked before any model loads, start-up lines on the terminal,
and SIGTERM/SIGINT as a clean stop.

Importing this module imports neither discord.py nor torch: `emaki bot` refuses a missing or malformed
token before anything heavy is imported. The order of a start is: token shape (local) -> Discord accepts
the token (one HTTP request, discord.py only) -> the device line -> "loading models..." -> the models
load -> login, connect -> "ready". This module runs the client (bot/client.py); the client never
imports it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.endpoints import discord_endpoint, use_endpoints
from engine.errors import EmakiError, InvalidRequest

if TYPE_CHECKING:
    from bot.client import EmakiBot
    from engine.settings import Settings

log = logging.getLogger(__name__)

# A bot token is three base64url parts joined by dots: the bot's id, a timestamp and an HMAC. Anything
# else is refused locally, without asking Discord (the lengths are loose: Discord has changed them).
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{16,}")
DEVELOPER_PORTAL = "https://discord.com/developers/applications"
LOGIN_TIMEOUT_S = 20.0  # one GET /users/@me; discord.py retries 5xx answers a few times within it
STOP_GRACE_S = 8.0  # the running job stops at its next step; posts in flight get this long to land
# While connected and its event loop turns, the bot rewrites this file in the data dir; `emaki health`
# (the image's HEALTHCHECK) reads it without importing torch or touching Discord.
HEARTBEAT_FILE = "bot.heartbeat"
HEARTBEAT_S = 30.0
HEARTBEAT_STALE_S = 120.0  # four missed beats: the loop is wedged or Discord has been gone a while


class Stopped(Exception):
    """A stop signal arrived before the bot was connected (while the models loaded)."""


def say(line: str) -> None:
    """A start-up or stop line on the terminal, with or without -v (stdout: `docker logs` shows it)."""
    print(line, flush=True)


def check_token(token: str) -> str:
    """The token, stripped, when it is shaped like a bot token; else one line saying what to do. The
    token itself is never printed."""
    token = token.strip()
    if not token:
        raise InvalidRequest(f"DISCORD_TOKEN is not set: create a bot at {DEVELOPER_PORTAL} and export its token")
    if token.lower().startswith("bot "):
        raise InvalidRequest("DISCORD_TOKEN starts with 'Bot ': set the token alone, without the prefix")
    if not TOKEN_SHAPE.fullmatch(token):
        raise InvalidRequest(
            f"DISCORD_TOKEN is not a Discord bot token ({len(token)} characters; a bot token is three "
            f"dot-separated parts): copy it from the Bot page of your application at {DEVELOPER_PORTAL}"
        )
    return token


async def check_login(settings: Settings, token: str) -> dict[str, Any]:
    """Ask Discord whether it accepts the token (GET /users/@me), before any model loads. Returns the
    bot user; a refusal or an unreachable Discord is one line (EmakiError)."""
    import aiohttp
    import discord

    http = discord.http.HTTPClient(asyncio.get_running_loop())
    where = discord_endpoint(settings)
    try:
        return await asyncio.wait_for(http.static_login(token), LOGIN_TIMEOUT_S)
    except discord.LoginFailure:
        raise InvalidRequest(
            f"Discord refused DISCORD_TOKEN (401 Unauthorized): it was reset or mistyped; copy the current token "
            f"from the Bot page of your application at {DEVELOPER_PORTAL}"
        ) from None
    except discord.HTTPException as exc:
        raise EmakiError(f"Discord answered {exc.status} to the login at {where}: {exc.text or 'no reason'}") from None
    except TimeoutError:  # also Discord answering 5xx to every one of discord.py's retries
        raise EmakiError(f"no answer from Discord at {where} within {LOGIN_TIMEOUT_S:.0f} s; try again later") from None
    except (aiohttp.ClientError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        raise EmakiError(f"cannot reach Discord at {where}: {reason} (network, DNS or proxy)") from None
    finally:
        await http.close()


def heartbeat_path(settings: Settings) -> Path:
    return settings.data_dir / HEARTBEAT_FILE


async def beat(bot: EmakiBot, path: Path) -> None:
    """Rewrite the heartbeat every HEARTBEAT_S while the bot is connected (never while reconnecting)."""
    while True:
        if bot.is_ready() and not bot.is_closed():
            record = {"at": time.time(), "pid": os.getpid(), "user": str(bot.user), "guilds": len(bot.guilds)}
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        await asyncio.sleep(HEARTBEAT_S)


def health(settings: Settings, now: float | None = None) -> tuple[bool, str]:
    """Whether a bot is connected and alive on this data dir, and one line saying so."""
    path = heartbeat_path(settings)
    try:
        record = json.loads(path.read_text())
        age = (now if now is not None else time.time()) - float(record["at"])
    except FileNotFoundError:
        return False, f"unhealthy: no heartbeat in {path} (the bot is starting, stopped, or never connected)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"unhealthy: unreadable heartbeat {path}: {exc}"
    if age > HEARTBEAT_STALE_S:
        return False, f"unhealthy: last heartbeat {age:.0f} s ago (connected as {record.get('user')} then)"
    return True, f"healthy: connected as {record.get('user')} to {record.get('guilds')} server(s), {age:.0f} s ago"


def device_lines(bot: EmakiBot) -> tuple[str, list[str]]:
    """What the bot renders on, and warnings an operator must see (a CUDA build that found no GPU)."""
    import torch

    engine = bot.engine
    if engine.settings.ray_address:
        return f"rendering on cluster renderers at {engine.settings.ray_address}", []
    device, dtype = engine.models.device, engine.models.dtype
    warnings = []
    if device.type == "cpu":
        if torch.version.cuda and not torch.cuda.is_available():
            warnings.append(
                f"warning: torch is built with CUDA {torch.version.cuda} but sees no GPU (driver too old, or the "
                "container started without --gpus / a GPU reservation): rendering on the CPU is very slow"
            )
        return f"rendering on cpu ({str(dtype).removeprefix('torch.')})", warnings
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"rendering on {device} ({name}, {str(dtype).removeprefix('torch.')})", warnings


@contextlib.contextmanager
def stop_signals(bot: EmakiBot) -> Iterator[asyncio.Event]:
    """SIGTERM and SIGINT stop the bot cleanly: no new job starts, the running one stops at its next
    step and stays resumable (as after a crash), and the returned event is set for the caller to close
    the bot. A second signal ends the process at once. Must be entered on the bot's event loop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            say("second stop signal: exiting now (the running job resumes at the next start)")
            os._exit(128 + signum)
        say(f"{signal.Signals(signum).name}: stopping (the running job resumes at the next start)")
        bot.begin_stop()
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield stop
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _load(bot: EmakiBot, stop: asyncio.Event) -> None:
    """Load the models on a thread of their own, so a stop signal is still heard meanwhile. The thread
    is a daemon: a stop during the load exits without waiting for it (no job runs and the store is not
    written before the models are loaded)."""
    if bot.engine.settings.ray_address:
        bot.engine.warm()  # cluster mode: Ray starts its client on the main thread, as it always did here
        return
    from engine.coordinator import safety  # torch: the models are being loaded anyway

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def warm() -> None:
        try:
            bot.engine.warm()  # before connecting: the first job should not wait
            models = bot.engine.models
            # The checker screens every frame outside age-restricted channels: loaded now, so a broken one
            # stops the start (one line) instead of failing every job, and the first frame does not wait.
            safety.checker_for(bot.engine.settings, models.device, models.dtype)
        except BaseException as exc:  # noqa: BLE001 (handed to the event loop, raised there)
            failure = exc
            loop.call_soon_threadsafe(lambda: done.done() or done.set_exception(failure))
        else:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    threading.Thread(target=warm, name="emaki-load", daemon=True).start()
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({done, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not done.done():
        raise Stopped
    done.result()


def models_on_disk(settings: Settings) -> list[str]:
    """Before any job can be accepted: the safety checker, which screens every frame outside age-restricted
    channels, must be on disk (else one line naming `emaki models pull`, and the bot does not start); a
    missing model that only one feature needs turns that feature off, said in a line. Files only: nothing
    is loaded or downloaded here. (The base, ControlNet, depth estimator and story LLM are found, or refused
    in one line, as they load.)"""
    from engine.coordinator import safety
    from engine.errors import ModelLoadError
    from engine.render import model_files

    safety.require(settings)
    notes = []
    for spec in (model_files.captioner_spec(settings), model_files.clip_spec(settings)):
        try:
            model_files.resolve(spec)
        except ModelLoadError as exc:
            notes.append(f"note: {model_files.OPTIONAL_ROLES[spec.setting]} is off: {exc}")
    return notes


def gateway_failure(running: asyncio.Future[None]) -> None:
    """Raise why the connection ended: discord.py's own errors as they are (`run` turns each into one line),
    anything else (an unreachable gateway can end in an AttributeError inside discord.py's reconnect) as
    one EmakiError line."""
    import discord

    try:
        running.result()
    except (discord.DiscordException, EmakiError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever broke the first connection: one line, exit 2
        raise EmakiError(
            f"cannot connect to Discord's gateway ({type(exc).__name__}: {exc}): check that this machine reaches "
            "gateway.discord.gg (firewall, DNS, proxy; EMAKI_DISCORD_GATEWAY)"
        ) from None


async def serve(settings: Settings, token: str, quiet: Callable[[], None]) -> None:
    """Log in, load, connect, and run until a stop signal; then stop cleanly. `quiet` silences the model
    libraries' own output; it is called once the token is accepted, just before they are imported."""
    user = await check_login(settings, token)
    user = user if isinstance(user, dict) else {}
    say(f"Discord accepted the token: {user.get('username', '?')} (id {user.get('id', '?')})")
    for line in models_on_disk(settings):
        say(line)
    quiet()
    from bot.client import create_bot  # torch, diffusers, transformers: only now

    bot = create_bot(settings)
    where, warnings = device_lines(bot)
    say(where)
    for line in warnings:
        say(line)
    pulse = heartbeat_path(settings)
    pulse.unlink(missing_ok=True)  # a previous run's beat must not vouch for this start
    beating: asyncio.Future[None] | None = None
    with stop_signals(bot) as stop:
        try:
            say(
                f"loading models ({settings.profile} profile: base {settings.base_model}, "
                f"ControlNet {settings.controlnet_model}, depth {settings.depth_model}, "
                f"safety checker {settings.safety_model})…"
            )
            started = time.monotonic()
            try:
                await _load(bot, stop)
            except Stopped:
                say("stopped before the models finished loading")
                return
            say(f"models loaded in {time.monotonic() - started:.1f} s; connecting to Discord")
            await bot.login(token)
            running = asyncio.ensure_future(bot.connect(reconnect=True))
            ready = asyncio.ensure_future(bot.wait_until_ready())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({running, ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if ready.done() and not stopped.done():
                say(f"ready: connected as {bot.user} to {len(bot.guilds)} server(s)")
                beating = asyncio.ensure_future(beat(bot, pulse))
                await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            stopped.cancel()
            if running.done() and not stop.is_set():
                gateway_failure(running)  # the gateway gave up (a revoked token, a privileged intent): raise it
            await bot.shutdown(STOP_GRACE_S)
            running.cancel()
            say("stopped")
        finally:
            if beating is not None:
                beating.cancel()
            pulse.unlink(missing_ok=True)
            await bot.close()  # idempotent; also after an error


def run(settings: Settings, quiet: Callable[[], None]) -> None:
    """`emaki bot`. Every failure a person can act on is one line (EmakiError); a clean stop returns."""
    token = check_token(settings.discord_token or "")
    use_endpoints(settings)
    import discord

    try:
        asyncio.run(serve(settings, token, quiet))
    except discord.LoginFailure as exc:  # at the gateway: the token was revoked after the check
        raise EmakiError(f"Discord refused DISCORD_TOKEN: {exc}") from None
    except discord.PrivilegedIntentsRequired:
        raise EmakiError(
            f"Discord refused an intent this bot asks for; check the Bot page at {DEVELOPER_PORTAL}"
        ) from None
    except discord.ConnectionClosed as exc:  # 4004: the token was reset while the bot ran
        raise EmakiError(f"Discord closed the gateway connection ({exc.code}): {exc.reason or 'no reason'}") from None
    except discord.GatewayNotFound as exc:
        raise EmakiError(f"cannot reach Discord's gateway: {exc}") from None
    except discord.HTTPException as exc:  # the login's application info or the command sync
        raise EmakiError(f"Discord answered {exc.status} at start-up: {exc.text or 'no reason'}") from None
    except OSError as exc:  # TimeoutError included
        raise EmakiError(f"lost the connection to Discord at start-up: {exc or type(exc).__name__}") from None
    finally:
        sys.stdout.flush()
