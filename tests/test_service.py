"""`emaki bot` as a service: a bad token is one line and exit 2 before any model loads, trivial commands
never import torch, and SIGTERM mid-render stops cleanly with the job resumed (once) at the next start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import discord
import pytest
from aiohttp import web

from bot.client import EmakiBot, create_bot
from bot.service import HEARTBEAT_FILE, check_token, device_lines, health, stop_signals
from engine.coordinator.store import open_store
from engine.errors import InvalidRequest
from engine.events import FrameDone
from engine.render.models import Models
from engine.settings import Settings, load_settings
from tests import test_bot

ROOT = Path(__file__).resolve().parent.parent
# Shaped like a bot token (id.timestamp.hmac), but no Discord ever issued it.
WELL_SHAPED = "MTIzNDU2Nzg5MDEyMzQ1Njc4OTA.GAbCdE.abcdefghijklmnopqrstuvwxyz0123456789AB"

# Runs `emaki` in a fresh interpreter, then reports which heavy libraries it imported (on stderr's last line).
PROBE = """
import json, sys
from emaki.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
print(json.dumps({"rc": rc, "heavy": heavy}), file=sys.stderr)
"""


def emaki(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> SimpleNamespace:
    """`emaki ARGS` in a subprocess: its exit code, stdout, stderr lines (less the probe's) and the heavy
    libraries it imported."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("EMAKI_") and k != "DISCORD_TOKEN"}
    full |= {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"} | env
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], env=full, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    *err, last = done.stderr.strip().splitlines() or [""]
    report = json.loads(last)
    return SimpleNamespace(rc=report["rc"], heavy=report["heavy"], out=done.stdout, err=err)


# --- the token, checked before any model loads -------------------------------------------------------
@pytest.mark.parametrize("token", ["garbage", "Bot " + WELL_SHAPED, "a.b.c", WELL_SHAPED.replace(".", "")])
def test_malformed_token_is_refused_locally(token: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_token(token)
    assert token not in str(refused.value)  # a secret is never echoed back


def test_a_well_shaped_token_passes_the_local_check() -> None:
    assert check_token(f"  {WELL_SHAPED}\n") == WELL_SHAPED  # as pasted from a file or a shell


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("", "error: DISCORD_TOKEN is not set: create a bot at https://discord.com/developers/applications"),
        ("garbage", "error: DISCORD_TOKEN is not a Discord bot token (7 characters; a bot token is three"),
    ],
)
def test_missing_or_garbage_token_is_one_line_without_torch(tmp_path: Path, token: str, expected: str) -> None:
    run = emaki(["bot", "--profile", "tiny"], {"DISCORD_TOKEN": token, "EMAKI_DATA_DIR": str(tmp_path)}, tmp_path)
    assert run.rc == 2 and len(run.err) == 1 and run.err[0].startswith(expected), run.err
    assert run.heavy == [] and run.out == ""
    assert not (tmp_path / "emaki.db").exists()  # refused before the store was opened


def as_json(value: object, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(value).encode(), status=status, headers={"Content-Type": "application/json"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- a local stand-in for Discord, for a real `emaki bot` process ----------------------------------------
class FakeDiscord:
    """Discord's REST API and gateway, just enough for `emaki bot` to log in, connect (READY + one server
    with one channel), sync its commands and post status messages and results, on a local port. SimCord
    simulates Discord inside the test's own process; this one serves a separate `emaki bot` process."""

    BOT, GUILD, CHANNEL, MEMBER = 1001, 2001, 3001, 4001

    def __init__(self, token: str) -> None:
        self.token = token
        self.port = free_port()
        self.messages: dict[int, dict] = {}
        self.posts: list[dict] = []  # every POST of a message, with the names of the files it carried
        self.identifies = 0
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self._ids = 5000
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "DISCORD_TOKEN": self.token,
            "EMAKI_DISCORD_API_BASE": f"http://127.0.0.1:{self.port}/api/v10",
            "EMAKI_DISCORD_GATEWAY": f"ws://127.0.0.1:{self.port}/gateway",
        }

    def user(self) -> dict:
        return {"id": str(self.BOT), "username": "emaki", "discriminator": "0", "avatar": None, "bot": True}

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    # REST (Content-Type exactly application/json, as Discord sends it: discord.py compares it verbatim)
    async def rest(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.headers.get("Authorization")))
        if request.headers.get("Authorization") != f"Bot {self.token}":
            return as_json({"message": "401: Unauthorized", "code": 0}, status=401)
        path, method = request.path.removeprefix("/api/v10"), request.method
        channel = f"/channels/{self.CHANNEL}/messages"
        if method == "GET" and path == "/users/@me":
            return as_json(self.user())
        if method == "GET" and path == "/oauth2/applications/@me":
            return as_json(
                {"id": str(self.BOT), "name": "emaki", "description": "", "icon": None, "bot_public": True}
                | {"bot_require_code_grant": False, "owner": self.user(), "verify_key": "00", "flags": 0}
            )
        if method == "PUT" and path == f"/applications/{self.BOT}/commands":
            return as_json([])
        if method == "POST" and path == channel:
            return as_json(await self.post_message(request))
        if method == "GET" and path == channel:
            return as_json(list(reversed(self.messages.values())))
        if method == "PATCH" and path.startswith(channel + "/"):
            message = self.messages[int(path.rsplit("/", 1)[1])]
            body, _ = await self.body(request)
            message.update({k: v for k, v in body.items() if k in ("content", "components")})
            return as_json(message)
        if method == "PUT" and "/reactions/" in path:
            return web.Response(status=204)
        return as_json({"message": f"not faked: {method} {path}", "code": 0}, status=404)

    async def body(self, request: web.Request) -> tuple[dict, list[str]]:
        if not request.content_type.startswith("multipart/"):
            return (await request.json() if request.can_read_body else {}), []
        payload, files = {}, []
        async for part in await request.multipart():
            if part.name == "payload_json":
                payload = json.loads(await part.text())
            else:
                files.append(part.filename)
                await part.read()
        return payload, files

    async def post_message(self, request: web.Request) -> dict:
        body, files = await self.body(request)
        message_id = self.next_id()
        message = {
            "id": str(message_id),
            "channel_id": str(self.CHANNEL),
            "guild_id": str(self.GUILD),
            "author": self.user(),
            "content": body.get("content", ""),
            "timestamp": "2026-01-01T00:00:00+00:00",
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [
                {"id": str(self.next_id()), "filename": name, "size": 1, "url": f"http://x/{name}"}
                | {"proxy_url": f"http://x/{name}"}
                for name in files
            ],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
            "components": [],
            "nonce": body.get("nonce"),
        }
        self.messages[message_id] = message
        self.posts.append({"id": message_id, "files": files, "nonce": body.get("nonce")})
        return message

    # gateway
    async def gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        # Discord asks for a beat every ~41 s; 10 min here keeps a slow test from timing heartbeats at all.
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 600_000}})
        async for frame in ws:
            message = json.loads(frame.data)
            if message["op"] == 1:
                await asyncio.sleep(0.1)  # as over a network: the client records its send before the ack
                await ws.send_json({"op": 11})
            elif message["op"] == 2:
                self.identifies += 1
                await ws.send_json({"op": 0, "s": 1, "t": "READY", "d": self.ready_payload()})
                await ws.send_json({"op": 0, "s": 2, "t": "GUILD_CREATE", "d": self.guild()})
        return ws

    def ready_payload(self) -> dict:
        return {
            "v": 10,
            "user": self.user(),
            "guilds": [{"id": str(self.GUILD), "unavailable": True}],
            "session_id": "fake-session",
            "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway",
            "application": {"id": str(self.BOT), "flags": 0},
        }

    def guild(self) -> dict:
        everyone = {"id": str(self.GUILD), "name": "@everyone", "permissions": str((1 << 50) - 1), "position": 0}
        return {
            "id": str(self.GUILD),
            "name": "ghibli fans",
            "owner_id": str(self.MEMBER),
            "roles": [everyone | {"color": 0, "hoist": False, "managed": False, "mentionable": False}],
            "channels": [
                {"id": str(self.CHANNEL), "type": 0, "name": "animations", "position": 0}
                | {"permission_overwrites": [], "guild_id": str(self.GUILD)}
            ],
            "members": [{"user": self.user(), "roles": [], "joined_at": "2026-01-01T00:00:00+00:00", "flags": 0}],
            "member_count": 2,
            "emojis": [],
            "stickers": [],
            "features": [],
            "threads": [],
            "premium_tier": 0,
            "unavailable": False,
        }

    def serve(self) -> None:
        async def main() -> None:
            app = web.Application()
            app.router.add_get("/gateway", self.gateway)
            app.router.add_route("*", "/api/v10/{tail:.*}", self.rest)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        asyncio.run(main())

    def __enter__(self) -> FakeDiscord:
        self._thread = threading.Thread(target=self.serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def results(self) -> list[dict]:
        return [post for post in self.posts if any(name.endswith(".gif") for name in post["files"])]


def test_token_discord_rejects_is_one_line_and_exit_2_before_any_model_loads(tmp_path: Path) -> None:
    with FakeDiscord(token="another bot's token") as discord_api:  # answers 401 to any other, as Discord does
        env = discord_api.env | {"DISCORD_TOKEN": WELL_SHAPED, "EMAKI_DATA_DIR": str(tmp_path)}
        run = emaki(["bot", "--profile", "tiny"], env, tmp_path)
    assert run.rc == 2, run.err
    assert run.err == [
        "error: Discord refused DISCORD_TOKEN (401 Unauthorized): it was reset or mistyped; copy the current "
        "token from the Bot page of your application at https://discord.com/developers/applications"
    ]
    assert discord_api.requests == [("GET", "/api/v10/users/@me", f"Bot {WELL_SHAPED}")]  # asked once, really
    assert run.heavy == [] and WELL_SHAPED not in run.out + "".join(run.err)
    assert not (tmp_path / "emaki.db").exists()


def test_unreachable_discord_is_one_line_and_exit_2(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/api/v10"  # nothing listens there: connection refused
    env = {"DISCORD_TOKEN": WELL_SHAPED, "EMAKI_DATA_DIR": str(tmp_path), "EMAKI_DISCORD_API_BASE": closed}
    run = emaki(["bot", "--profile", "tiny"], env, tmp_path)
    assert run.rc == 2 and len(run.err) == 1, run.err
    assert run.err[0].startswith(f"error: cannot reach Discord at {closed}: Cannot connect to host 127.0.0.1")
    assert run.heavy == []


# --- trivial commands never import torch ----------------------------------------------------------------
def test_trivial_commands_do_not_import_torch(tmp_path: Path, settings: Settings) -> None:
    from engine.coordinator.worker import holding_job_lock

    store = open_store(settings.data_dir)  # jobs to list: one done, one left running by a crash
    for idea in ("a fox runs", "an owl sleeps"):
        store.add_job(kind="animate", idea=idea, params={"frames": 1})
    store.update_job(1, status="done")
    store.update_job(2, status="running")
    with holding_job_lock(settings.data_dir, 2):
        pass  # its lock file exists and is free: `emaki jobs` must look at it to say "interrupted"
    env = {"EMAKI_DATA_DIR": str(settings.data_dir), "EMAKI_PROFILE": "tiny"}
    jobs = emaki(["jobs"], env, tmp_path)
    assert jobs.rc == 0 and jobs.heavy == [], jobs.err
    assert [line.split("\t")[:2] for line in jobs.out.splitlines()[1:]] == [["2", "interrupted"], ["1", "done"]]
    for args in (["styles"], ["--help"], ["jobs", "--help"]):
        run = emaki(args, env, tmp_path)
        assert run.rc == 0 and run.heavy == [] and run.out, (args, run.err)


# --- SIGTERM mid-render ---------------------------------------------------------------------------------
@pytest.fixture
def bot_settings(tmp_path: Path) -> Settings:
    return load_settings(
        profile="tiny",
        data_dir=tmp_path / "data",
        steps=4,
        strength=0.5,
        progress_edit_interval_s=0.0,
        position_edit_interval_s=0.0,
    )


simcord_bot = test_bot.simcord_bot  # the same bot over the shared tiny models, with these settings


def results(channel) -> list[discord.Message]:
    return [m for m in channel.history() if m.attachments and m.attachments[0].filename.endswith(".gif")]


def signal_after_first_frame(bot: EmakiBot, signum: int) -> None:
    """The process gets a real `signum` right after the job's first frame is stored; the render thread
    then waits until the bot's handler has run, so the stop lands mid-render, never after the last frame."""
    real_run = bot.engine.run

    def run(job_id: int, *args: object, **kwargs: object) -> Iterator[object]:
        for event in real_run(job_id, *args, **kwargs):
            yield event
            if isinstance(event, FrameDone) and event.index == 0:
                os.kill(os.getpid(), signum)
                assert bot.engine.stopping.wait(30), "the stop signal never reached the bot"

    bot.engine.run = run  # type: ignore[method-assign]


@pytest.mark.simcord(settle_timeout=120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_mid_render_stops_cleanly_and_the_job_resumes_exactly_once(
    simcord_env, bot_settings: Settings, shared_tiny_models: Models, signum: int
) -> None:
    env = simcord_env
    guild = env.create_guild("ghibli fans")
    channel = guild.create_text_channel("animations")
    alice = guild.add_member(env.create_user("alice"))
    bot: EmakiBot = env.bot
    signal_after_first_frame(bot, signum)
    with stop_signals(bot) as stop:
        await alice.slash(channel, "animate", prompt="a lantern floats up", frames=3, seed=6)
        assert stop.is_set()
        await bot.shutdown(grace_s=5)
    assert bot.is_closed()

    job = bot.store.job(1)
    assert job["status"] == "running" and job["error"] is None  # not cancelled, not failed: as after a crash
    frames = bot.store.frames(1)
    assert [bool(f["path"]) for f in frames] == [True, False, False]  # stopped at the step after frame 1
    first = Path(frames[0]["path"]).read_bytes()
    assert results(channel) == []

    await env.restart_bot(create_bot(bot_settings, models=shared_tiny_models))  # the next start
    restarted: EmakiBot = env.bot
    job = restarted.store.job(1)
    assert job["status"] == "done" and job["post_state"] == "posted"
    [posted] = results(channel)  # 0 lost, 0 doubled
    assert posted.attachments[0].filename == "emaki-1.gif" and posted.id == job["result_message_id"]
    assert Path(restarted.store.frames(1)[0]["path"]).read_bytes() == first  # resumed, not redone
    assert len(restarted.store.recent_jobs(10)) == 1


# --- `emaki jobs` says where each result stands in Discord ------------------------------------------
@pytest.mark.simcord(settle_timeout=120)
async def test_jobs_shows_a_result_discord_refused(
    simcord_env, bot_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from emaki.cli import main

    env = simcord_env
    guild = env.create_guild("ghibli fans")
    channel = guild.create_text_channel("animations")
    alice = guild.add_member(env.create_user("alice"))
    await alice.slash(channel, "animate", prompt="a windmill turns", frames=1, seed=2)
    env.inject_error("POST", "/channels/*/messages", status=403, code=50013, message="Missing Permissions", times=None)
    await alice.slash(channel, "animate", prompt="rain on a pond", frames=1, seed=3)
    assert results(channel) != [] and env.bot.store.job(2)["post_state"] == "refused"

    monkeypatch.setenv("EMAKI_DATA_DIR", str(bot_settings.data_dir))
    capsys.readouterr()
    assert main(["jobs", "--profile", "tiny"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows[0][:3] == ["id", "status", "post"]
    assert [row[:3] for row in rows[1:]] == [
        ["2", "done", "refused: 403 Missing Permissions"],  # stranded: not a plain `done`
        ["1", "done", "posted"],
    ]


# --- the real process ---------------------------------------------------------------------------------------
def start_bot(data_dir: Path, discord_env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMAKI_") and k != "DISCORD_TOKEN"}
    env |= {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "EMAKI_DATA_DIR": str(data_dir)} | discord_env
    command = [sys.executable, "-m", "emaki", "bot", "--profile", "tiny", *extra]
    return subprocess.Popen(
        command, env=env, cwd=data_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, what: str, child: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if child.poll() is not None:
            raise AssertionError(f"the bot exited ({child.returncode}) before {what}: {child.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def post_state_of(data_dir: Path, job_id: int) -> str | None:
    """Read-only, without the store's migrations: polling must not take locks the running bot needs."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'emaki.db'}?mode=ro", uri=True)) as db:
        row = db.execute("select post_state from jobs where id = ?", [job_id]).fetchone()
    return row[0] if row else None


def test_the_real_process_starts_tells_where_it_renders_and_stops_on_sigterm_mid_job(tmp_path: Path) -> None:
    from engine.coordinator.requests import build_params

    data_dir = tmp_path / "data"
    settings = load_settings(profile="tiny", data_dir=data_dir)
    store = open_store(data_dir)
    params = build_params(
        settings, store, "a lantern floats up", frames=3, steps=8, strength=1.0, seed=6, width=32, height=32
    )
    job_id = store.add_job(  # as /animate leaves it (bot/commands.py): waiting in the queue when the bot stops
        kind="animate",
        idea=params.idea,
        params=params.to_dict(),
        owner_id=FakeDiscord.MEMBER,
        owner_name="alice",
        guild_id=FakeDiscord.GUILD,
        channel_id=FakeDiscord.CHANNEL,
        screen=0,
    )
    first_frame = data_dir / "jobs" / str(job_id) / "frame_01.png"
    with FakeDiscord(WELL_SHAPED) as discord_api:
        child = start_bot(data_dir, discord_api.env, "-v")
        wait_for(first_frame.exists, "the first frame", child)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        lines = out.splitlines()
        assert lines[0] == "Discord accepted the token: emaki (id 1001)"
        assert lines[1] == "rendering on cpu (float32)"  # this machine: no GPU, a CPU torch build
        loading = "loading models (tiny profile: base tiny, ControlNet tiny, depth tiny, safety checker tiny)…"
        assert lines[2] == loading and lines[3].startswith("models loaded in ")
        assert lines[4] == "ready: connected as emaki to 1 server(s)"
        assert lines[5:] == ["SIGTERM: stopping (the running job resumes at the next start)", "stopped"]
        assert err.count("logging in using static token") == 1  # our one log handler, not discord.py's too
        assert "voice will NOT be supported" not in err and "Traceback" not in err
        assert WELL_SHAPED not in out + err
        job = open_store(data_dir).job(job_id)
        assert job["status"] == "running" and job["error"] is None  # as a crash leaves it: resumable
        assert discord_api.results() == []
        kept = first_frame.read_bytes()

        child = start_bot(data_dir, discord_api.env)  # the next start, without -v
        wait_for(lambda: post_state_of(data_dir, job_id) == "posted", "the result posted", child)
        healthy, line = health(settings)  # what the image's HEALTHCHECK (`emaki health`) reads
        assert healthy and line.startswith("healthy: connected as emaki to 1 server(s)"), line
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0 and err == "", err  # without -v: nothing but emaki's own lines
        assert out.splitlines()[-2:] == ["SIGINT: stopping (the running job resumes at the next start)", "stopped"]

    assert health(settings) == (
        False,
        f"unhealthy: no heartbeat in {data_dir / HEARTBEAT_FILE} (the bot is starting, stopped, or never connected)",
    )  # a stopped bot is not healthy
    [posted] = discord_api.results()  # 0 lost, 0 doubled
    assert posted["files"] == [f"emaki-{job_id}.gif"]
    job = open_store(data_dir).job(job_id)
    assert job["status"] == "done" and job["result_message_id"] == posted["id"]
    assert first_frame.read_bytes() == kept  # resumed at frame 2, frame 1 kept byte for byte
    assert discord_api.identifies == 2


def test_a_cuda_build_that_sees_no_gpu_is_said_plainly(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """A CUDA torch in a container started without a GPU falls back to the CPU: the operator must see it."""
    import torch

    models = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    bot = SimpleNamespace(engine=SimpleNamespace(settings=settings, models=models))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    where, warnings = device_lines(bot)  # type: ignore[arg-type]
    assert where == "rendering on cpu (float32)"
    assert warnings == [
        "warning: torch is built with CUDA 13.0 but sees no GPU (driver too old, or the container started "
        "without --gpus / a GPU reservation): rendering on the CPU is very slow"
    ]
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build on a CPU machine: nothing to warn about
    assert device_lines(bot) == ("rendering on cpu (float32)", [])  # type: ignore[arg-type]


def test_a_gateway_that_cannot_be_reached_is_one_line() -> None:
    """discord.py's first connect to an unreachable gateway can end in an AttributeError of its own."""
    from bot.service import gateway_failure
    from engine.errors import EmakiError

    async def failing() -> None:
        raise AttributeError("'NoneType' object has no attribute 'sequence'")

    async def run() -> None:
        task = asyncio.ensure_future(failing())
        await asyncio.wait({task})
        with pytest.raises(EmakiError, match=r"cannot connect to Discord's gateway .* gateway\.discord\.gg"):
            gateway_failure(task)

    asyncio.run(run())
