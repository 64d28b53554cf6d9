"""Typed progress events. The engine yields them; the CLI draws bars, the bot edits messages.

A job's place in the queue is not among them: the engine only sees a job once it runs, so the
position comes from the queue itself (engine.coordinator.jobs.JobQueue.position)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class Started:
    job_id: int


@dataclass(frozen=True)
class StoryReady:
    job_id: int
    frames: list[str]
    backend: str  # which story backend produced them (or "fallback")


@dataclass(frozen=True)
class StepProgress:
    job_id: int
    frame_index: int  # 0-based
    step: int
    total_steps: int


@dataclass(frozen=True)
class FrameDone:
    job_id: int
    index: int  # 0-based
    total: int
    image: Image.Image
    path: Path


@dataclass(frozen=True)
class Finished:
    job_id: int
    gif_path: Path
    frame_paths: list[Path]


@dataclass(frozen=True)
class Failed:
    job_id: int
    reason: str


@dataclass(frozen=True)
class Requeued:
    """The job's renderer went away mid-job (cluster mode): the job is queued again, in front, and
    resumes at its first missing frame. Not an end: no result is posted for this run."""

    job_id: int
    reason: str


Event = Started | StoryReady | StepProgress | FrameDone | Finished | Failed | Requeued
