"""One settings object for CLI, bot and trainer: env vars `EMAKI_*` over an optional TOML file.

Precedence (highest first): explicit keyword overrides, environment, TOML file, profile defaults.
Secrets (Discord token, HF token, LLM API key) are read from the environment only and never printed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequest

PROFILES: dict[str, dict[str, Any]] = {
    "sd15": {
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "controlnet_model": "lllyasviel/sd-controlnet-depth",
        "depth_model": "Intel/dpt-hybrid-midas",
        "llm_model": "mistralai/Mistral-7B-Instruct-v0.3",
        "captioner_model": "Salesforce/blip-image-captioning-large",
        "safety_model": "CompVis/stable-diffusion-safety-checker",
        "clip_model": "openai/clip-vit-large-patch14",
        "width": 512,
        "height": 512,
        "min_size": 256,
        "max_size": 1024,
    },
    # SDXL-class base (engine/render/families/sdxl.py): stabilityai's base (no refiner) and diffusers' small SDXL
    # depth ControlNet (a fraction of the full one's size, the same depth conditioning); 1024 px frames.
    "sdxl": {
        "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
        "controlnet_model": "diffusers/controlnet-depth-sdxl-1.0-small",
        "depth_model": "Intel/dpt-hybrid-midas",
        "llm_model": "mistralai/Mistral-7B-Instruct-v0.3",
        "captioner_model": "Salesforce/blip-image-captioning-large",
        "safety_model": "CompVis/stable-diffusion-safety-checker",
        "clip_model": "openai/clip-vit-large-patch14",
        "width": 1024,
        "height": 1024,
        "min_size": 512,
        "max_size": 2048,
    },
    # Random-weight models with the real classes (engine/render/tiny.py), saved once as hub repos in emaki's own
    # cache and loaded like a user's models (engine/render/tiny_hub.py): no download, seconds on a CPU.
    "tiny": {
        "base_model": "tiny",
        "controlnet_model": "tiny",
        "depth_model": "tiny",
        "llm_model": "tiny",
        "captioner_model": "tiny",
        "safety_model": "tiny",
        "clip_model": "tiny",
        "video_model": "tiny",
        "width": 64,
        "height": 64,
        "min_size": 32,
        "max_size": 256,
    },
}
# The tiny SDXL set: the tiny profile with an SDXL base and SDXL depth ControlNet (engine/render/tiny.py).
PROFILES["tiny-sdxl"] = {
    **PROFILES["tiny"],
    "base_model": "emaki-tiny/sdxl",
    "controlnet_model": "emaki-tiny/controlnet-depth-sdxl",
}
TINY_PROFILES = ("tiny", "tiny-sdxl")
# The model family each profile's ControlNet and frame sizes are made for (engine/render/families/): a base model
# of the other family is refused at load in one line naming the profile to use.
PROFILE_FAMILIES = {"sd15": "sd15", "sdxl": "sdxl", "tiny": "sd15", "tiny-sdxl": "sdxl"}

MEMORY_MODES = ("auto", "high", "medium", "low")
COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead")  # torch.compile modes (engine/render/compiled.py)

SECRET_FIELDS = ("discord_token", "hf_token", "llm_api_key")
SECRET_ENV = {"discord_token": "DISCORD_TOKEN", "hf_token": "HF_TOKEN", "llm_api_key": "EMAKI_LLM_API_KEY"}

# Choices, declared once: the CLI's --help, the checks below and engine/render/models.py's scheduler table
# (tests/test_settings.py keeps the two in step) all read these.
STORY_BACKENDS = ("auto", "hf", "openai", "transformers", "fallback")
SCHEDULER_NAMES = ("default", "dpm++", "euler_a", "unipc")
DTYPES = ("auto", "fp16", "bf16", "fp32")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MAX_SEED = 2**32 - 1
RAY_ADDRESS = re.compile(r"^(local|auto|ray://[A-Za-z0-9.\-\[\]:]+:\d+)$")


@dataclass(frozen=True)
class Rule:
    """What a setting may hold. `low_open`: the minimum itself is not allowed (strength > 0)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    url: bool = False

    def describe(self) -> str:
        if self.choices:
            return ", ".join(self.choices)
        if self.low is not None and self.high is not None:
            return f"{self.low:g}..{self.high:g}" if not self.low_open else f"above {self.low:g}, at most {self.high:g}"
        if self.low is not None:
            return f"above {self.low:g}" if self.low_open else f"at least {self.low:g}"
        return ""


def setting(default: Any, rule: Rule | None = None, *, help: str, secret: bool = False) -> Any:
    """A dataclass field carrying its rule (read by `check_value` and the CLI's help) and its description
    (`help`, the one sentence the settings reference in docs/reference/settings.md is generated from)."""
    return field(default=default, repr=not secret, metadata={"rule": rule or Rule(), "help": help})


@dataclass
class Settings:
    profile: str = setting(
        "sd15",
        Rule(choices=tuple(PROFILES)),
        help="The model set and size range: `sd15` or `sdxl` (the real models of that family, 512 or 1024 px), "
        "`tiny` or `tiny-sdxl` (random-weight models of that family, offline).",
    )
    base_model: str = setting(
        "",
        help="The base model, SD1.5 or SDXL-class (its family is read from its files): a hub id, a diffusers "
        "folder, or one `.safetensors`/`.ckpt` file in the original SD/SDXL layout. Empty: the profile's.",
    )
    controlnet_model: str = setting("", help="The depth ControlNet: a hub id or a folder. Empty: the profile's.")
    depth_model: str = setting(
        "", help="The depth estimator whose maps guide every next frame: a hub id or a folder. Empty: the profile's."
    )
    llm_model: str = setting(
        "",
        help="The story LLM: the model the `hf` backend asks, or the chat model the `transformers` backend loads. "
        "Empty: the profile's.",
    )
    captioner_model: str = setting(
        "",
        help="The captioner `--autocaption` writes dataset captions with (BLIP, as the Ghibli paper captioned its "
        "dataset). Empty: the profile's.",
    )
    story_backend: str = setting(
        "auto",
        Rule(choices=STORY_BACKENDS),
        help="What writes the frame descriptions. `auto`: the HF Inference API when an HF token is set, else an "
        "OpenAI-compatible server when `llm_base_url` is set, else the deterministic fallback.",
    )
    llm_base_url: str = setting(
        "",
        Rule(url=True),
        help="An OpenAI-compatible server for the `openai` backend (vLLM, llama.cpp, Ollama: "
        "`http://localhost:11434/v1`).",
    )
    hf_inference_url: str = setting(
        "",
        Rule(url=True),
        help="A dedicated endpoint (or a proxy) for the `hf` backend instead of the Inference API's default.",
    )
    llm_timeout_s: float = setting(
        60.0, Rule(0, 3600, low_open=True), help="Seconds each LLM turn may take before the story falls back."
    )
    story_refine: bool = setting(
        True,
        help="A second LLM turn: the model checks its own frame list against a checklist and revises it "
        "(a failed second answer keeps the first list).",
    )
    device: str = setting(
        "auto", help="`auto`, `cpu`, `mps`, `cuda` or `cuda:N` (checked against what this machine has)."
    )
    dtype: str = setting("auto", Rule(choices=DTYPES), help="Model precision. `auto`: fp16 on CUDA, fp32 elsewhere.")
    memory: str = setting(
        "auto",
        Rule(choices=MEMORY_MODES),
        help="How much of the model set stays on the GPU: `high` (all resident), `medium` (model CPU offload), "
        "`low` (sequential offload, VAE tiling); `auto` picks the first that fits the free VRAM.",
    )
    compile: str = setting(
        "off",
        Rule(choices=COMPILE_MODES),
        help="torch.compile of the UNet, warmed up at start-up; LoRA styles are hot-swapped without recompiling.",
    )
    compile_max_rank: int = setting(
        64, Rule(1, 1024), help="The highest LoRA rank a compiled UNet accepts (the hot-swap slot's size)."
    )
    base_model_config: str = setting(
        "",
        help="The diffusers folder or hub id whose configs (and tokenizer) describe a single-file base model "
        "(`.safetensors`/`.ckpt` in the original LDM layout). Empty: the profile's base model repo.",
    )
    scheduler: str = setting(
        "default", Rule(choices=SCHEDULER_NAMES), help="The sampler. `default`: the base model's own scheduler."
    )
    data_dir: Path = setting(  # noqa: RUF009 (setting() returns a dataclasses.field, as for every field)
        Path("data"),
        help="The folder holding the database (SQLite), every job's frames and results, styles and datasets.",
    )
    frames: int = setting(
        5,
        Rule(1, 64),
        help="Keyframes per animation when none are asked for (the Ghibli paper's 5); at most max_frames.",
    )
    width: int = setting(
        0,
        Rule(0, 4096),
        help="Frame width: 0 takes the profile's (512 on sd15), else a multiple of 8 in min_size..max_size.",
    )
    height: int = setting(
        0,
        Rule(0, 4096),
        help="Frame height: 0 takes the profile's (512 on sd15), else a multiple of 8 in min_size..max_size.",
    )
    min_size: int = setting(0, Rule(0, 4096), help="The smallest width or height accepted. 0: the profile's.")
    max_size: int = setting(
        0, Rule(0, 4096), help="The largest width or height accepted (a server may lower it). 0: the profile's."
    )
    steps: int = setting(50, Rule(1, 150), help="Denoising steps per frame when none are asked for.")
    guidance: float = setting(8.5, Rule(0, 30), help="Classifier-free guidance scale when none is asked for.")
    strength: float = setting(
        0.15,
        Rule(0, 1, low_open=True),
        help="How far each img2img frame may move from the previous one (higher: more change, less coherence).",
    )
    controlnet_scale: float = setting(
        1.0, Rule(0, 2), help="How strongly the previous frame's depth map guides the next frame (0: not at all)."
    )
    negative_prompt: str = setting(
        "lowres, blurry, deformed, watermark, text, jpeg artifacts", help="What every frame is steered away from."
    )
    frame_duration_ms: int = setting(100, Rule(20, 5000), help="How long each keyframe shows in the clip.")
    color_coherence: bool = setting(
        True,
        help="Match every frame's colour histogram to frame 1 (as Deforum does), so the chain does not drift in hue.",
    )
    interpolate: int = setting(
        0,
        Rule(0, 8),
        help="Optical-flow in-between frames per pair of keyframes (engine/render/interpolate.py); 0: keyframes only.",
    )
    max_clip_frames: int = setting(
        128, Rule(1, 1000), help="The most frames (keyframes + in-betweens) one clip may have; more is refused."
    )
    max_frames: int = setting(16, Rule(1, 64), help="The most keyframes a request may ask for (a server may lower it).")
    max_idea_chars: int = setting(500, Rule(1, 10000), help="The longest idea accepted, in characters.")
    min_free_bytes: int = setting(
        200 * 1024 * 1024,
        Rule(0),
        help="Free disk space the data dir (and an output folder) must have before a job starts.",
    )
    upload_limit_bytes: int = setting(
        10 * 1024 * 1024,
        Rule(1),
        help="The largest result the bot posts; the GIF is shrunk (palette, then size) to fit this and the "
        "server's own upload limit, whichever is lower.",
    )
    discord_api_base: str = setting(
        "",
        Rule(url=True),
        help="A Discord REST proxy (nirn-proxy, twilight-http-proxy), e.g. `http://proxy:8080/api/v10`. "
        "Empty: Discord itself.",
    )
    discord_gateway: str = setting(
        "", Rule(url=True), help="A proxied Discord gateway address. Empty: the one Discord gives."
    )
    max_pending_per_member: int = setting(
        3, Rule(1, 1000), help="Queued and running jobs one member may have at once (a server may lower it)."
    )
    moderator_role: str = setting(
        "",
        help="A role whose members approve /train datasets and remove styles, besides Manage Server "
        "(a server may set its own). Empty: Manage Server only.",
    )
    progress_edit_interval_s: float = setting(
        1.5, Rule(0, 60), help="The least time between two progress edits of a job's status message."
    )
    position_edit_interval_s: float = setting(
        5.0, Rule(0, 600), help="The least time between two edits of a waiting member's queue-position message."
    )
    min_dataset_images: int = setting(5, Rule(1, 100000), help="The fewest images a training dataset may have.")
    max_dataset_bytes: int = setting(
        200 * 1024 * 1024,
        Rule(1),
        help="The largest training dataset: the /train upload, and a zip's declared uncompressed size.",
    )
    max_dataset_files: int = setting(2000, Rule(1), help="The most files a training dataset's zip may hold.")
    max_image_pixels: int = setting(
        4096 * 4096, Rule(1), help="The most pixels one dataset image may decode to (decompression bombs are refused)."
    )
    eval_samples: int = setting(
        100,
        Rule(2, 10000),
        help="Images `emaki evaluate` generates per style (the anime paper's 100); the bot's evaluation takes "
        "at most 100.",
    )
    train_checkpoint_every: int = setting(
        100,
        Rule(1, 1000000),
        help="Training steps between checkpoints; also where a training gives way to waiting animations.",
    )
    discord_token: str = setting(
        "", secret=True, help="The bot's token (environment only, never in a file, never logged)."
    )
    hf_token: str = setting(
        "",
        secret=True,
        help="A Hugging Face token: gated downloads and the `hf` story backend (environment only, never logged).",
    )
    llm_api_key: str = setting(
        "", secret=True, help="The key the `openai` story backend sends (environment only, never logged)."
    )
    keep_days: int = setting(
        30,
        Rule(0, 36500),
        help="Days a finished job's files (frames, GIF, MP4, in-betweens) are kept; its rows stay. 0: forever.",
    )
    max_steps: int = setting(
        150, Rule(1, 150), help="The most denoising steps a member may ask for (a server may lower it)."
    )
    nsfw_policy: str = setting(
        "screen",
        Rule(choices=("screen", "allow")),
        help="Age-restricted channels: `screen` runs the safety checker there too, `allow` does not (a server may "
        "change it). Outside them every frame a bot job renders is always screened.",
    )
    safety_cli: bool = setting(False, help="Screen frames of jobs started from the command line too.")
    safety_model: str = setting(
        "",
        help="The safety checker that screens bot jobs (diffusers' StableDiffusionSafetyChecker with its CLIP image "
        "processor): a hub id or a folder. Empty: the profile's.",
    )
    clip_model: str = setting(
        "",
        help="The CLIP model of the CLIP score a trained style is evaluated with: a hub id or a folder (optional: "
        "without it the score is left out). Empty: the profile's.",
    )
    safety_tiny_threshold: float = setting(
        2.0,
        Rule(-2, 2),
        help="`tiny` only: the random-weight checker's concept threshold (cosine scores lie in -1..1, so 2 never "
        "flags and -2 flags every frame; tests set it).",
    )
    motion_adapter: str = setting(
        "",
        help="The AnimateDiff SD1.5 motion adapter `--motion animatediff` renders with: a diffusers folder, a hub "
        "id in the local cache (e.g. guoyww/animatediff-motion-adapter-v1-5-3; `emaki models pull` fetches it), or "
        "`tiny` (random weights, saved in emaki's tiny cache; tiny profile only). Empty: motion mode is refused.",
    )
    motion_fewstep: str = setting(
        "none",
        Rule(choices=("none", "lcm", "lightning")),
        help="Few-step sampling with the scheduler its model card names: `none` (the base scheduler), `lcm` "
        "(AnimateLCM) or `lightning` (AnimateDiff-Lightning). The adapter must be the matching distilled one.",
    )
    motion_inbetweens: int = setting(
        3,
        Rule(0, 8),
        help="Frames the motion model renders between two beats when --interpolate is not given (5 beats make 17 "
        "frames, just over the adapter's 16-frame context).",
    )
    motion_depth: bool = setting(
        False,
        help="Depth guidance in motion mode: every frame conditioned on the depth map of beat 1's still.",
    )
    video_model: str = setting(
        "",
        help="The LTX-Video model `--motion video` renders the clip with (diffusers' LTXConditionPipeline: the "
        "keyframes are image conditions at their beats' frames): a hub id in the local cache (`emaki models pull` "
        "fetches it), a diffusers folder, or `tiny` (random weights; tiny profile only). The one to use: "
        "`Lightricks/LTX-Video-0.9.5` (the 2B model, its `main` revision, bf16 on a GPU; 0.9.5 is the first "
        "release trained for conditions at any frame). Empty (sd15, sdxl): video mode is refused and nothing "
        "is downloaded for it (its T5 text encoder alone is many GB).",
    )
    video_seconds: float = setting(
        5.0, Rule(0, 30, low_open=True), help="`--motion video`: the clip's length in seconds when none is asked for."
    )
    video_fps: int = setting(
        24,
        Rule(4, 50),
        help="`--motion video`: the clip's frames per second (LTX-Video was trained at 24-30). The frame count "
        "seconds x fps is rounded to the nearest 8k+1 (LTX's VAE packs 8 frames into one latent frame).",
    )
    video_fewstep: str = setting(
        "none",
        Rule(choices=("none", "distilled")),
        help="`--motion video` few-step sampling: `distilled` runs the timestep schedule and guidance 1 that the "
        "distilled LTX-Video checkpoints are made for (set video_model to one, e.g. "
        "Lightricks/LTX-Video-0.9.7-distilled); `none`: the model's own schedule and the asked steps.",
    )
    video_offload: str = setting(
        "model",
        Rule(choices=("none", "model", "group")),
        help="Where the video model waits between its parts on a GPU: `none` (all resident), `model` (model CPU "
        "offload: one part on the GPU at a time) or `group` (group offload by leaf layer: least VRAM, slowest). "
        "Ignored on the CPU.",
    )
    video_vae_tiling: bool = setting(
        True,
        help="`--motion video`: decode the clip in tiles (much less VRAM at 512 px and up; the tiny profile's clips "
        "are smaller than one tile). Changes the clip's pixels slightly: a sidecar records it.",
    )
    ray_address: str = setting(
        "",
        help="Cluster mode: `local` (Ray over this machine's GPUs), `auto` or `ray://host:port` (join a running Ray "
        "cluster); one renderer per GPU. Empty: one in-process renderer, and Ray is never imported.",
    )
    gpu_workers: int = setting(0, Rule(0, 1024), help="Renderer actors in cluster mode. 0: one per GPU in the cluster.")

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise InvalidRequest(f"unknown profile '{self.profile}': choose one of {', '.join(PROFILES)}")
        for key, value in PROFILES[self.profile].items():
            if not getattr(self, key):
                setattr(self, key, value)
        if not self.base_model_config:
            self.base_model_config = PROFILES[self.profile]["base_model"]
        self.validate()

    def validate(self) -> None:
        """Type and range of every field, then what fields mean together and what this machine has.
        Runs on every construction, so the CLI, the bot and the trainer all refuse the same things
        before any model loads or any row is written."""
        for fld in dataclasses.fields(self):
            setattr(self, fld.name, check_value(fld.name, getattr(self, fld.name)))
        self.data_dir = self.data_dir.expanduser()
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise InvalidRequest(f"data_dir {self.data_dir} is a file, not a folder: choose another data dir")
        if self.frames > self.max_frames:
            raise InvalidRequest(f"frames must be between 1 and max_frames ({self.max_frames}) (got {self.frames})")
        if self.min_size % 8 or self.max_size % 8 or not 8 <= self.min_size <= self.max_size:
            raise InvalidRequest(
                f"min_size and max_size must be multiples of 8 with 8 <= min_size <= max_size "
                f"(got {self.min_size} and {self.max_size})"
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if value % 8 or not self.min_size <= value <= self.max_size:
                raise InvalidRequest(
                    f"{name} must be a multiple of 8 between {self.min_size} and {self.max_size} "
                    f"for the {self.profile} profile (got {value})"
                )
        check_device(self.device)
        if self.ray_address and not RAY_ADDRESS.match(self.ray_address):
            raise InvalidRequest(
                f"ray_address must be local, auto or ray://host:port (got {self.ray_address!r}); "
                "leave it empty for one in-process renderer"
            )
        if self.gpu_workers > 1 and not self.ray_address:
            raise InvalidRequest(
                f"gpu_workers={self.gpu_workers} needs ray_address (several renderers run as Ray actors): "
                "set EMAKI_RAY_ADDRESS=local on a multi-GPU box"
            )

    @property
    def is_tiny(self) -> bool:
        return self.profile in TINY_PROFILES

    def public_dict(self) -> dict[str, Any]:
        """Settings without secrets, for logs and sidecars."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in SECRET_FIELDS:
            out.pop(name)
        out["data_dir"] = str(self.data_dir)
        return out


FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(Settings)}
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def rule_of(name: str) -> Rule:
    return next(f for f in dataclasses.fields(Settings) if f.name == name).metadata.get("rule", Rule())


def check_value(name: str, value: Any) -> Any:
    """`value` as field `name` holds it (an int is a fine float, a str a fine path), or
    InvalidRequest naming the field, what it may hold and what it got."""
    kind = FIELD_TYPES[name]
    rule = rule_of(name)
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidRequest(f"{name} must be true or false (got {value!r})")
        return value
    if kind in ("int", "float"):
        whole = isinstance(value, int) and not isinstance(value, bool)
        if kind == "int" and not whole:
            raise InvalidRequest(f"{name} must be a whole number (got {value!r})")
        if kind == "float" and not (whole or isinstance(value, float)):
            raise InvalidRequest(f"{name} must be a number (got {value!r})")
        if kind == "float":
            value = float(value)
            if not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number (got {value})")
        too_low = rule.low is not None and (value <= rule.low if rule.low_open else value < rule.low)
        too_high = rule.high is not None and value > rule.high
        if too_low or too_high:
            raise InvalidRequest(f"{name} must be {_range_words(rule)} (got {value})")
        return value
    if kind == "Path":
        if isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequest(f"{name} must be a folder path (got {value!r})")
        return Path(value)
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string (got {value!r})")
    if rule.choices and value not in rule.choices:
        raise InvalidRequest(f"unknown {name} '{value}': use {', '.join(rule.choices)}")
    if rule.url and value and not re.match(r"^(https?|wss?)://\S+$", value):
        raise InvalidRequest(f"{name} must be an http(s):// or ws(s):// address (got {value!r})")
    return value


def _range_words(rule: Rule) -> str:
    if rule.low is not None and rule.high is not None:
        if rule.low_open:
            return f"above {rule.low:g} and at most {rule.high:g}"
        return f"between {rule.low:g} and {rule.high:g}"
    return rule.describe()


def check_device(device: str) -> None:
    """The device names a kind torch knows and this machine has (torch is imported only to look)."""
    if not DEVICE_PATTERN.match(device):
        raise InvalidRequest(f"unknown device '{device}': use auto, cpu, mps, cuda or cuda:N")
    if device in ("auto", "cpu"):
        return
    import torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidRequest("device mps is not available on this machine: use --device auto or cpu")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        seen = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise InvalidRequest(f"device {device} is not available: torch sees {seen}; use --device auto or cpu")


def _from_env(name: str, raw: str) -> Any:
    kind = FIELD_TYPES[name]
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        return raw  # check_value names the field and the bad value
    if kind == "bool":
        word = raw.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise InvalidRequest(
            f"EMAKI_{name.upper()}={raw!r}: {name} must be true or false ({'/'.join(TRUE_WORDS + FALSE_WORDS)})"
        )
    return raw


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from TOML (EMAKI_CONFIG or `config_file`), `EMAKI_*` env and overrides.

    Every value is checked where it comes from, so an error names the file key, the variable or the
    option to fix; nothing is silently coerced or ignored."""
    values: dict[str, Any] = {}
    path = config_file or os.environ.get("EMAKI_CONFIG")
    if path:
        try:
            from_file = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidRequest(f"cannot read config file {path}: {exc}") from exc
        secrets_found = sorted(set(from_file) & set(SECRET_FIELDS))
        if secrets_found:
            env_names = ", ".join(SECRET_ENV[k] for k in secrets_found)
            raise InvalidRequest(
                f"config file {path} holds {', '.join(secrets_found)}: secrets belong in the environment "
                f"({env_names}), never in a file; remove them from it"
            )
        unknown = set(from_file) - set(FIELD_TYPES)
        if unknown:
            raise InvalidRequest(f"unknown keys in config file {path}: {', '.join(sorted(unknown))}")
        for name, value in from_file.items():
            values[name] = _checked(name, value, f"config file {path}")
    for name in FIELD_TYPES:
        if name in SECRET_FIELDS:
            continue
        env = os.environ.get(f"EMAKI_{name.upper()}")
        if env is not None and env != "":
            values[name] = _checked(name, _from_env(name, env), f"EMAKI_{name.upper()}={env!r}")
    values["discord_token"] = os.environ.get("DISCORD_TOKEN", "")
    values["hf_token"] = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN", "")
    values["llm_api_key"] = os.environ.get("EMAKI_LLM_API_KEY", "")
    for name, value in overrides.items():
        if value is not None:
            values[name] = _checked(name, value, f"--{name.replace('_', '-')}")
    return Settings(**values)


def _checked(name: str, value: Any, source: str) -> Any:
    try:
        return check_value(name, value)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{source}: {exc}") from None
