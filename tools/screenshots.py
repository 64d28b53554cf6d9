"""Draw the docs' pictures of what members see: a real bot session on the tiny profile, against SimCord's
simulated Discord, shown by SimCord's preview page and photographed by headless Chromium.

    python -m tools.screenshots                 # writes docs/images/{queued,progress,result,settings}.png
    python -m tools.screenshots --out DIR --chromium /usr/bin/chromium

Needs Chromium (Debian: `apt-get install chromium`) and the dev extra (SimCord). Nothing is mocked: the
bot is emaki's own, with tiny random-weight models (so the frames are noise). The status message is
edited as a job moves on; to show its earlier states, the edits the bot sent then (recorded as they
went out) are sent again before that picture is taken.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 820, 620
# The message pane only (not SimCord's toolbar and sidebar), cut below its last visible element.
MESSAGE_BOX = """(() => {
  const app = document.querySelector('#preview-app');
  const r = app.getBoundingClientRect();
  let bottom = r.top;
  for (const el of app.querySelectorAll('*')) {
    const b = el.getBoundingClientRect();
    if (b.width && b.height && getComputedStyle(el).visibility !== 'hidden') bottom = Math.max(bottom, b.bottom);
  }
  return {x: r.left, y: r.top, width: r.width, height: Math.max(40, Math.min(r.height, bottom - r.top + 16))};
})()"""
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)


class Browser:
    """One headless Chromium, driven over the DevTools protocol (aiohttp's websocket client)."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self.profile = Path(tempfile.mkdtemp(prefix="emaki-chromium-"))
        self.process: asyncio.subprocess.Process | None = None
        self.ws: Any = None
        self.session: Any = None
        self._id = 0

    async def __aenter__(self) -> Browser:
        import aiohttp

        self.process = await asyncio.create_subprocess_exec(
            self.executable,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self.profile}",
            f"--window-size={WIDTH},{HEIGHT}",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        port_file = self.profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.1)
        else:
            raise SystemExit("error: Chromium did not start (no DevToolsActivePort after 30 s)")
        port = port_file.read_text().split()[0]
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as answer:
            pages = [t for t in await answer.json() if t["type"] == "page"]
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        await self.ws.send_str(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == self._id:
                if "error" in message:
                    raise SystemExit(f"error: Chromium: {method}: {message['error'].get('message')}")
                return message.get("result", {})

    async def photograph(self, url: str, path: Path) -> None:
        await self.call(
            "Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False
        )
        await self.call("Page.navigate", url="about:blank")  # a fresh load: the page takes the focused message then
        await self.call("Page.navigate", url=url)
        ready = "Boolean(window.simcordPreview && window.simcordPreview.ready === true)"
        for _ in range(300):
            answer = await self.call("Runtime.evaluate", expression=ready, returnByValue=True)
            if answer.get("result", {}).get("value") is True:
                break
            await asyncio.sleep(0.1)
        else:
            raise SystemExit(f"error: the preview page was not ready after 30 s ({url.split('#')[0]})")
        await asyncio.sleep(0.5)  # images decoded and laid out
        box = (await self.call("Runtime.evaluate", expression=MESSAGE_BOX, returnByValue=True))["result"]["value"]
        shot = await self.call("Page.captureScreenshot", format="png", clip={**box, "scale": 1})
        path.write_bytes(_small_png(base64.b64decode(shot["data"])))
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def _small_png(data: bytes) -> bytes:
    """A palette PNG: these pictures are mostly flat colour, so they stay small enough for git."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


async def session(out: Path, chromium: str) -> None:
    import discord
    import simcord

    from bot.client import create_bot
    from engine.settings import load_settings

    data = Path(tempfile.mkdtemp(prefix="emaki-screens-"))
    settings = load_settings(
        profile="tiny",
        data_dir=data,
        steps=4,
        strength=0.5,
        progress_edit_interval_s=0.0,
        position_edit_interval_s=0.0,
    )
    bot = create_bot(settings)
    sent: dict[int, list[dict[str, Any]]] = {}  # job -> every status edit, as it went out
    write_status = bot.write_status

    async def recording(job: dict[str, Any], fields: dict[str, Any]) -> None:
        files = [(f.filename, f.fp.getvalue()) for f in fields.get("attachments") or [] if hasattr(f.fp, "getvalue")]
        sent.setdefault(job["id"], []).append({"content": fields["content"], "files": files})
        await write_status(job, fields)

    bot.write_status = recording  # type: ignore[method-assign]

    async def replay(job_id: int, wanted: str) -> None:
        """Send the job's status message back to the edit whose text holds `wanted`."""
        edit = next(e for e in sent[job_id] if wanted in e["content"])
        files = [discord.File(io.BytesIO(blob), filename=name) for name, blob in edit["files"]]
        await write_status(bot.store.job(job_id), {"content": edit["content"], "attachments": files})

    async with simcord.run(bot, settle_timeout=300) as env:
        guild = env.create_guild("ghibli fans")
        channel = guild.create_text_channel("animations")
        admins = guild.create_role("admins", permissions=discord.Permissions(manage_guild=True))
        alice = guild.add_member(env.create_user("alice"))
        admin = guild.add_member(env.create_user("mika"), roles=[admins])
        idea = "a paper boat drifts down a stream, then sails into the sunset"

        await alice.slash(channel, "animate", prompt=idea, frames=3, seed=7)
        job = bot.store.recent_jobs(1)[0]
        status = next(m for m in channel.history() if m.id == job["status_message_id"])
        result = next(m for m in channel.history() if m.id == job["result_message_id"])
        answer = await admin.slash(channel, "settings show")

        async with (
            env.preview(channel, viewers=[alice, admin], layout="message", width=WIDTH, height=HEIGHT) as preview,
            Browser(chromium) as browser,
        ):
            await preview.show(result)
            await preview.refresh()
            await browser.photograph(preview.url, out / "result.png")
            await replay(job["id"], "Rendering: 2/3")
            await preview.show(status)
            await preview.refresh()
            await browser.photograph(preview.url, out / "progress.png")
            # The first answer is the interaction's; the bot's own queued wording is in its first edit.
            queued = next((e for e in sent[job["id"]] if "Queued" in e["content"]), None)
            if queued is None:
                first = next(r.json for r in env.http_requests if r.path.endswith("/callback"))
                await write_status(bot.store.job(job["id"]), {"content": first["data"]["content"], "attachments": []})
            else:
                await replay(job["id"], "Queued")
            await preview.refresh()
            await browser.photograph(preview.url, out / "queued.png")
        async with (
            env.preview(channel, viewers=[admin], layout="message", width=WIDTH, height=HEIGHT) as preview,
            Browser(chromium) as browser,
        ):
            await preview.show(answer)
            await preview.refresh()
            await browser.photograph(preview.url, out / "settings.png")
    shutil.rmtree(data, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.screenshots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="folder for the PNGs")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args(argv)
    if not args.chromium:
        print("error: Chromium not found: apt-get install chromium, or pass --chromium PATH", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(session(args.out, args.chromium))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
