"""The story's second LLM turn (the model checks its own list) against a scripted local server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from engine.coordinator.story import REFINE_CHECKLIST, StoryTeller
from engine.settings import load_settings

FIRST = ["a fox wakes", "the fox stretches", "the fox runs", "the fox leaps", "the fox lands"]
REVISED = ["a red fox wakes in a meadow", "it stretches", "it runs", "it leaps a brook", "it lands softly"]


class ScriptedLLM:
    """An OpenAI-compatible chat endpoint answering from a script: a string, or seconds to hang."""

    def __init__(self) -> None:
        self.script: list[str | float] = []
        self.requests: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        if isinstance(step, float):
            await asyncio.sleep(step)
            step = json.dumps(REVISED)
        message = {"role": "assistant", "content": step}
        return web.json_response(
            {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedLLM, str]]:
    fake = ScriptedLLM()
    app = web.Application()
    app.router.add_post("/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


async def test_a_good_second_answer_replaces_the_first_and_both_are_kept(scripted) -> None:
    fake, url = scripted
    fake.script = ["Sure:\n" + json.dumps(FIRST), "```json\n" + json.dumps(REVISED) + "\n```"]
    teller = StoryTeller(load_settings(profile="tiny", llm_base_url=url))
    story = await asyncio.to_thread(teller.tell, "a fox's morning", 5, "ghbli")
    assert story.refined and story.source == "openai"
    assert story.frames == [f"ghbli, {f}" for f in REVISED]
    assert story.answers == fake.script
    second = fake.requests[1]["messages"]
    assert second[2] == {"role": "assistant", "content": fake.script[0]}
    assert second[3]["content"] == REFINE_CHECKLIST.format(frames=5)
    assert json.loads(second[1]["content"]) == {"idea": "a fox's morning", "frames": 5}  # still quoted data


async def test_a_garbled_second_answer_keeps_the_first_list(scripted) -> None:
    fake, url = scripted
    fake.script = [json.dumps(FIRST), '["a fox", "the fo']
    story = await asyncio.to_thread(StoryTeller(load_settings(profile="tiny", llm_base_url=url)).tell, "a fox", 5)
    assert (story.frames, story.refined, story.source) == (FIRST, False, "openai")
    assert len(story.answers) == 2


async def test_a_second_turn_that_times_out_keeps_the_first_list(scripted) -> None:
    fake, url = scripted
    fake.script = [json.dumps(FIRST), 3.0]
    settings = load_settings(profile="tiny", llm_base_url=url, llm_timeout_s=0.5)
    story = await asyncio.to_thread(StoryTeller(settings).tell, "a fox", 5)
    assert (story.frames, story.refined) == (FIRST, False)
    assert story.answers == [json.dumps(FIRST)] and len(fake.requests) == 2


async def test_refine_off_asks_once(scripted) -> None:
    fake, url = scripted
    fake.script = [json.dumps(FIRST), json.dumps(REVISED)]
    settings = load_settings(profile="tiny", llm_base_url=url, story_refine=False)
    story = await asyncio.to_thread(StoryTeller(settings).tell, "a fox", 5)
    assert story.frames == FIRST and len(fake.requests) == 1 and not story.refined
