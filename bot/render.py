"""Message texts: what members read. Kept apart from discord.py plumbing so it reads as copy."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

REROLL = "🔁"
DELETE = "❌"
DIGITS = ["1️⃣", "2️⃣", "3️⃣", "4️⃣", "5️⃣", "6️⃣", "7️⃣", "8️⃣", "9️⃣", "🔟"]
MAX_CONTENT = 2000


def clip(text: str, limit: int = MAX_CONTENT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def eta(seconds: float) -> str:
    if seconds < 90:
        return f"~{max(1, round(seconds))} s"
    return f"~{round(seconds / 60)} min"


def queued(job: dict[str, Any], position: int, eta_s: float) -> str:
    head = _head(job)
    if position <= 1:
        return f"🕒 {head}\nQueued: next up ({eta(eta_s)})."
    return f"🕒 {head}\nQueued: position {position} ({eta(eta_s)})."


def position_changes(
    pending: list[dict[str, Any]],
    shown: dict[int, str],
    eta_seconds: Callable[[int], float],
    skip: Collection[int] = (),
) -> tuple[list[int], list[tuple[dict[str, Any], str]]]:
    """What a position refresh sends, given the waiting jobs in queue order and the texts last shown (updated
    here): the jobs no longer waiting (their texts dropped), and each waiting job whose text changed, with the
    text. Jobs in `skip` (their first answer still on its way) are left alone."""
    waiting = {job["id"] for job in pending}
    gone = [job_id for job_id in shown if job_id not in waiting]
    for job_id in gone:
        del shown[job_id]
    changed = []
    for position, job in enumerate(pending, start=1):
        if job["id"] in skip:
            continue
        text = queued(job, position, eta_seconds(position))
        if shown.get(job["id"]) != text:
            shown[job["id"]] = text
            changed.append((job, text))
    return gone, changed


def _head(job: dict[str, Any]) -> str:
    params = job["params"]
    if job.get("kind") == "train":
        return f"<@{job['owner_id']}> training the style **{params['style']}**"
    style = f" · style **{params['style']}**" if params.get("style") else ""
    if params.get("motion") == "video":
        style += f" · video {params.get('video_seconds', 0):g} s at {params.get('video_fps', 0)} fps"
    regen = ""
    if job.get("parent_job_id") is not None:
        regen = f" · regenerating from frame {job['regen_from'] + 1}" if job["regen_from"] else " · reroll"
    return clip(f"<@{job['owner_id']}> **{params['idea']}** · {params['frames']} frames{style}{regen}", 600)


def frame_list(prompts: list[str]) -> str:
    return "\n".join(f"{i}. {p}" for i, p in enumerate(prompts, 1))


def progress(job: dict[str, Any], prompts: list[str], done: int, clip_step: tuple[int, int] | None = None) -> str:
    """The status while a job renders. Video mode names its frames keyframes, and once they are all
    rendered the video model's steps (`clip_step`: step, total) are the clip's own stage."""
    params = job["params"]
    total = params["frames"]
    video = params.get("motion") == "video"
    if clip_step is not None:
        state = f"🎞️ Keyframes done; the video model renders the clip: step {clip_step[0]}/{clip_step[1]}"
    elif not prompts:
        state = "✍️ Writing the story…"
    else:
        state = f"🎨 Rendering: {done}/{total} {'keyframes' if video else 'frames'} done"
        if video:
            state += ", then the clip"
    return clip(f"{_head(job)}\n{state}\n{frame_list(prompts)}")


def finished(job: dict[str, Any], result_url: str | None) -> str:
    where = f" → {result_url}" if result_url else " (posting the result…)"
    return clip(f"✅ {_head(job)}\nDone{where}")


def post_waiting(job: dict[str, Any], reason: str, state: str) -> str:
    """Rendered, but Discord did not take the result: what happened and what happens next."""
    if state == "refused":
        why = (
            f"Discord refused to post the result here ({reason}): the bot may lack Send Messages or Attach "
            "Files in this channel. It is posted as soon as the channel accepts it; an admin can also "
            f"`/repost job:{job['id']}`."
        )
    else:
        why = f"Discord is not answering ({reason}); the result is posted when it does."
    return clip(f"⏳ {_head(job)}\nRendered, not posted yet: {why}")


def failed(job: dict[str, Any], reason: str) -> str:
    if reason == "cancelled":
        return clip(f"🛑 {_head(job)}\nCancelled.")
    return clip(f"⚠️ {_head(job)}\nFailed: {reason}")


def result(job: dict[str, Any], frames: list[dict[str, Any]], fitted: dict[str, float]) -> str:
    params = job["params"]
    n = len(frames)
    last_digit = DIGITS[min(n, 10) - 1]
    react = f"React {REROLL} to reroll, {DIGITS[0]}–{last_digit} to redo from that frame, {DELETE} to delete."
    shrunk = ""
    if params.get("motion") == "video":
        react = (
            f"React {REROLL} to reroll, {DIGITS[0]}–{last_digit} to redo from that keyframe (earlier keyframes "
            f"kept, the clip rendered again through them), {DELETE} to delete."
        )
        if fitted.get("kbps"):  # fit_mp4: a bitrate (and maybe a smaller size) instead of CRF 18
            shrunk = f"\n(fitted to the upload limit: {int(fitted['kbps'])} kbps, {fitted.get('scale', 1):.0%} size)"
        if fitted.get("gif_left_out"):
            shrunk += "\n(the GIF is left out: with it the post would be over the upload limit)"
    elif fitted.get("scale", 1) < 1 or fitted.get("colors", 256) < 256:
        shrunk = f"\n(shrunk to fit the upload limit: {int(fitted['colors'])} colours, {fitted['scale']:.0%} size)"
    lines = [
        _head(job),
        f"seed `{params['seed']}` · {params['width']}x{params['height']} · {params['steps']} steps · "
        f"guidance {params['guidance']} · strength {params['strength']}",
        frame_list([f["prompt"] for f in frames]),
        react + shrunk,
    ]
    return clip("\n".join(lines))


HELP = f"""**emaki** turns one idea into a short Ghibli-style animation.
`/animate prompt:<idea>` (options: frames, style, seed, strength, steps, guidance)
`/queue` your jobs and their place in line · `/cancel` your latest job · `/styles` the styles you can use
On a result: {REROLL} reroll with new seeds · {DIGITS[0]}…{DIGITS[9]} redo from that frame (earlier frames kept) \
· {DELETE} delete (the requester or someone with Manage Messages). Rerolls by others are queued as their own jobs.
The buttons under a result do the same (**Reroll**, **Redo from frame…**, **Delete**) and more: **Details** shows \
each frame's prompt and seed (only to you), **MP4** sends you the clip as a video.
With `motion:animatediff` the clip is rendered at once and the frames listed are its story beats: \
{DIGITS[0]}…{DIGITS[9]} redo that beat (new noise for its stretch of the clip, the other beats keep theirs; \
the whole clip is re-rendered) · {REROLL} new noise everywhere.
With `motion:video` (options `seconds`, `fps`) the frames are keyframes and a video model renders an MP4 through \
them: {DIGITS[0]}…{DIGITS[9]} redo from that keyframe (earlier keyframes kept, the clip rendered again).
Admins (Manage Server): `/pause` and `/resume` the queue · `/stats` queue, jobs today, disk and GPU."""


# --- buttons on a result, /stats -----------------------------------------------------------------
def details(job: dict[str, Any], frames: list[dict[str, Any]], metrics: dict[str, Any], tiny: bool) -> str:
    """Everything needed to understand (or reproduce) a result, for its Details button."""
    params = job["params"]
    style = f"style **{params['style']}**" if params.get("style") else "no style"
    lines = [
        f"**Job #{job['id']}** · {clip(params['idea'], 300)}",
        f"{style} · {params['width']}x{params['height']} · {params['steps']} steps · strength {params['strength']} · "
        f"guidance {params['guidance']} · seed `{params['seed']}`"
        + (f" · {params['interpolate']} in-betweens per pair" if params.get("interpolate") else ""),
    ]
    if job.get("parent_job_id") is not None:
        lines.append(f"Regenerated from job #{job['parent_job_id']}, frame {(job.get('regen_from') or 0) + 1} on.")
    error = metrics.get("warping_error")
    if isinstance(error, float):
        note = " (random-weight tiny models: this figure only tests the tooling)" if tiny else ""
        frames_n = metrics.get("clip_frames", "?")
        lines.append(f"Warping error {error:.4f} over {frames_n} clip frames (lower is smoother){note}.")
    elif job.get("purged_at"):
        lines.append(f"Files deleted after {job.get('purged_days') or '?'} days; the recipe below remains.")
    for row in frames:
        extra = ""
        if row["steps"] != params["steps"] or row["strength"] != params["strength"]:
            extra = f" · {row['steps']} steps, strength {row['strength']}"
        lines.append(f"{row['idx'] + 1}. seed `{row['seed']}`{extra} · {clip(row['prompt'] or '', 300)}")
    return clip("\n".join(lines))


def stats(
    queued: int,
    running: int,
    today: int,
    today_here: int,
    median_s: float | None,
    timed: int,
    disk_bytes: int,
    gpu: str,
    keep_days: int,
    workers: list[dict[str, Any]] | None = None,
) -> str:
    median = f"{median_s:.1f} s (last {timed} finished jobs)" if median_s is not None else "no finished job yet"
    keep = f"files kept {keep_days} days" if keep_days else "files kept forever"
    return "\n".join(
        [
            f"**Queue** {queued} waiting · {running} running",
            f"**Jobs today** (UTC) {today} · {today_here} from this server",
            f"**Median job time** {median}",
            f"**Disk used by emaki** {disk_bytes / 2**20:.1f} MiB ({keep})",
            f"**GPU** {gpu}",
            *worker_lines(workers or []),
        ]
    )


def worker_lines(workers: list[dict[str, Any]]) -> list[str]:
    """Cluster mode's renderers, one line each (none in-process)."""
    lines = [f"**Workers** {len(workers)}"] if workers else []
    for worker in workers:
        job = f" · job #{worker['job_id']}" if worker.get("job_id") is not None else ""
        where = f"{worker.get('node') or '?'} GPU {worker.get('gpu') or '?'}"
        lines.append(f"`{worker['name']}` {where} · {worker['state']}{job}")
    return lines


COMMUNITY_HELP = """Server rules: admins (Manage Server) see and change this server's settings with `/settings show` \
and `/settings set` (channels, frame/step/size limits, the moderator role, the age-restricted policy, styles \
from other servers) and its blocklist with `/settings blocklist`. Moderators `/style remove` or `/style share` \
this server's styles. Frames are checked by a content safety checker outside age-restricted channels."""

# --- community styles -------------------------------------------------------------------------
APPROVE = "✅"


def dataset_preview(row: dict[str, Any], captions: list[str], steps: int) -> str:
    trigger = f" · trigger `{row['trigger']}`" if row.get("trigger") else ""
    shown = "\n".join(f"• {clip(c, 150)}" for c in captions[:3])
    return clip(
        f"📦 <@{row['owner_id']}> submitted a dataset for the style **{row['style_name']}**{trigger}: "
        f"{row['n_images']} images, {steps} training steps.\nSample captions:\n{shown}\n"
        f"Moderators: {APPROVE} approve and queue the training · {DELETE} reject."
    )


def dataset_decided(preview: str, approved: bool, moderator_id: int) -> str:
    """The preview with its last line (the call to moderators) replaced by the decision."""
    verdict = f"{APPROVE} approved by <@{moderator_id}>" if approved else f"{DELETE} rejected by <@{moderator_id}>"
    return clip(preview.rsplit("\n", 1)[0] + f"\n{verdict}")


def training(job: dict[str, Any], state: str) -> str:
    return clip(f"🧪 <@{job['owner_id']}> style **{job['params']['style']}**\n{state}")


def style_ready(job: dict[str, Any], metrics: dict[str, Any] | None, note: str = "") -> str:
    name = job["params"]["style"]
    lines = [f"🎨 <@{job['owner_id']}> the style **{name}** is ready: try `/animate style:{name}`."]
    if metrics:
        lines.append(
            f"KID {metrics['kid']:.4f} ± {metrics['kid_std']:.4f} · FID {metrics['fid']:.1f} "
            f"({metrics['n_generated']} generated vs {metrics['n_real']} dataset images) · "
            f"temporal SSIM {metrics.get('temporal_ssim', float('nan')):.3f}"
        )
        lines.append("KID is the figure to compare with a few dozen images; FID reads high at this size.")
    if note:
        lines.append(note)
    return clip("\n".join(lines))
