"""Trains a style adapter into the SD UNet (and optionally the text encoder) with peft: LoRA, LoHa,
LoKr or IA3 (the second paper's LyCORIS/IA3), AdamW or Prodigy (its optimizer).

What makes a run trustworthy:
- It cannot produce a broken style: gradients are clipped (max-norm 1 by default), and at every log
  step and before every save the losses and the adapter weights are checked to be finite. A run that
  diverges stops with `TrainingDiverged` (one line suggesting a lower learning rate) and saves nothing.
- It is reproducible: `seed` alone decides the adapter's initial weights, the data order, caption
  augmentation, flips, noise and timesteps (seeded generators, never the caller's global RNG), and
  every generator's state is in the checkpoint, so an interrupted run resumes bit for bit.
- Images keep their shape: aspect-ratio buckets (training/images.py); VAE latents are cached per
  bucket with the dataset.
- It shows its progress: every `save_every` steps the adapter is kept (not overwritten, at most
  `save_limit` saves) with a sample image from a fixed prompt and seed, so an earlier step can be
  registered instead of the last.

On CUDA the frozen weights run in bf16 (fp16 with a GradScaler where bf16 is missing) while the
adapter weights and their optimizer state stay fp32. No GPU was available where this was written:
that path is exercised only on CPU's fp32 route in the tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image

from engine.errors import InvalidRequest, JobCancelled
from engine.render.loading import pick_device
from engine.settings import Settings
from training.dataset import Dataset
from training.images import Bucket, bucket_resolutions, fit_to_bucket, load_upright_rgb, parse_colour, pick_bucket
from training.options import ADAPTERS, DEFAULT_LR, GRADIENT_CHECKPOINTING, LR_SCHEDULERS, OPTIMIZERS

log = logging.getLogger(__name__)

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # LoRA: the name diffusers' loader looks for
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # LoHa/LoKr/IA3: peft's own layout
TEXT_ENCODER_DIR = "text_encoder"  # LoHa/LoKr/IA3: the text encoder's half, in peft's layout too
FAMILY = "sd15"  # what this trainer trains on (training/sdxl.py: "sdxl")
KOHYA_WEIGHTS_NAME = "style.safetensors"  # SDXL (training/sdxl.py): one kohya-layout file, every kind
SAMPLE_NAME = "sample.png"
MAX_SEED = 2**32 - 1
LOG_EVERY = 10  # losses are read back from the device (one sync) every this many steps
DIVERGED_LOSS = 1e3  # targets have unit variance: a sane model's MSE is ~0.1-1
HOLDOUT_FROM = 20  # datasets this large keep 10% of their images out of training, for evaluation
SHORT_VRAM = 12 * 2**30  # below this free memory, gradient checkpointing turns on by itself


class TrainingDiverged(InvalidRequest):
    """The loss or the adapter weights stopped being finite numbers: nothing was saved."""


@dataclass
class TrainConfig:
    """Everything a run depends on. Stored with the dataset (as requested) and with the style (as
    resolved); a checkpoint only resumes under the same resolved values."""

    steps: int = 0  # 0: `epochs` passes, or chosen from the dataset size
    epochs: int = 0  # kohya's count: steps = epochs x ceil(images / batch size)
    rank: int = 16
    network_alpha: float = 0.0  # 0: = rank (scale 1); kohya's network_alpha
    network_dropout: float = 0.0  # LoRA: dropout on its input; LoHa/LoKr: rank dropout; IA3: none
    adapter: str = "lora"
    optimizer: str = "adamw"
    learning_rate: float = 0.0  # 0: DEFAULT_LR for the kind (AdamW), 1.0 (Prodigy)
    text_encoder_lr: float = 0.0  # 0: the UNet's
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0: no clipping
    scale_weight_norms: float = 0.0  # kohya's max-norm regularisation of each layer's update; 0: off
    prodigy_d_coef: float = 1.0
    prodigy_safeguard_warmup: bool = False
    prodigy_use_bias_correction: bool = False
    min_snr_gamma: float = 0.0  # 0: off; 5 is the Min-SNR paper's value
    noise_offset: float = 0.0
    adaptive_noise_scale: float = 0.0  # kohya: offset grows with |mean latent|
    caption_dropout: float = 0.0  # probability a caption is replaced by the empty one
    shuffle_caption: bool = False  # shuffle comma-separated tags...
    keep_tokens: int = 0  # ...keeping this many leading ones in place
    flip: bool = False  # random horizontal flips
    background: str = "white"  # what transparent pixels become
    resolution: int = 0  # 0: the profile's width
    batch_size: int = 1
    checkpoint_every: int = 100  # resumable state; also where a run may give way to animations
    save_every: int = 0  # kept adapter saves + a sample each; 0: none
    save_limit: int = 10  # the oldest kept saves beyond this are deleted
    seed: int = 0
    holdout: int = -1  # images kept out of training for evaluation; -1: 10% when there are >= 20
    train_text_encoder: bool = False
    gradient_checkpointing: str = "auto"  # auto: on when CUDA memory is short

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def resolved(self, n_images: int, settings: Settings) -> TrainConfig:
        """Defaults filled in, every value checked: raises InvalidRequest with one line."""
        if self.adapter not in ADAPTERS:
            raise InvalidRequest(f"unknown adapter '{self.adapter}': use {', '.join(ADAPTERS)}")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidRequest(f"unknown optimizer '{self.optimizer}': use {', '.join(OPTIMIZERS)}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise InvalidRequest(f"unknown LR schedule '{self.lr_scheduler}': use {', '.join(LR_SCHEDULERS)}")
        if self.gradient_checkpointing not in GRADIENT_CHECKPOINTING:
            raise InvalidRequest(f"gradient checkpointing must be one of {', '.join(GRADIENT_CHECKPOINTING)}")
        _int_range("steps", self.steps, 0, 1_000_000)
        _int_range("epochs", self.epochs, 0, 100_000)
        _int_range("rank", self.rank, 1, 4096)
        _int_range("batch size", self.batch_size, 1, 1024)
        _int_range("checkpoint interval", self.checkpoint_every, 1, 1_000_000)
        _int_range("save interval", self.save_every, 0, 1_000_000)
        _int_range("save limit", self.save_limit, 1, 10_000)
        _int_range("LR warmup steps", self.lr_warmup_steps, 0, 1_000_000)
        _int_range("kept tokens", self.keep_tokens, 0, 75)
        _int_range("seed", self.seed, 0, MAX_SEED)
        _int_range("resolution", self.resolution, 0, 4096)
        _number_range("learning rate", self.learning_rate, 0, 10, low_open=False)
        _number_range("text encoder learning rate", self.text_encoder_lr, 0, 10, low_open=False)
        _number_range("network alpha", self.network_alpha, 0, 1e6, low_open=False)
        _number_range("network dropout", self.network_dropout, 0, 1, high_open=True)
        _number_range("caption dropout", self.caption_dropout, 0, 1)
        _number_range("weight decay", self.weight_decay, 0, 10)
        _number_range("max gradient norm", self.max_grad_norm, 0, 1e6)
        _number_range("weight-norm scale", self.scale_weight_norms, 0, 1e6)
        _number_range("Prodigy d_coef", self.prodigy_d_coef, 0, 1e3, low_open=True)
        _number_range("min-SNR gamma", self.min_snr_gamma, 0, 1e3)
        _number_range("noise offset", self.noise_offset, 0, 1)
        _number_range("adaptive noise scale", self.adaptive_noise_scale, 0, 1)
        parse_colour(self.background)
        if (self.learning_rate and self.learning_rate <= 0) or (self.text_encoder_lr and self.text_encoder_lr <= 0):
            raise InvalidRequest("learning rates must be > 0")
        resolution = self.resolution or settings.width
        if resolution < 8 or resolution % 8:
            raise InvalidRequest(f"resolution must be a positive multiple of 8 (got {resolution})")
        if resolution > settings.max_size:  # past what the base renders: hours a step (a preset is clamped)
            raise InvalidRequest(
                f"resolution must be at most {settings.max_size} on the {settings.profile} profile (got {resolution})"
            )
        holdout = (n_images // 10 if n_images >= HOLDOUT_FROM else 0) if self.holdout == -1 else self.holdout
        if holdout < 0 or (holdout and holdout > n_images - 1):
            raise InvalidRequest(f"holdout must be -1 (auto) or 0 to {max(n_images - 1, 0)} images (got {holdout})")
        n_images -= holdout
        batches_per_epoch = math.ceil(max(n_images, 1) / self.batch_size)
        steps = self.steps or (self.epochs * batches_per_epoch) or int(np.clip(n_images * 100, 500, 3000))
        default_lr = 1.0 if self.optimizer == "prodigy" else DEFAULT_LR[self.adapter]
        lr = self.learning_rate or default_lr
        return replace(
            self,
            steps=steps,
            learning_rate=lr,
            text_encoder_lr=self.text_encoder_lr or lr,
            resolution=resolution,
            holdout=holdout,
        )

    def differences(self, other: TrainConfig) -> list[str]:
        """Names of the values that differ, for 'resumed with other arguments' refusals."""
        mine, theirs = asdict(self), asdict(other)
        return [name for name in mine if mine[name] != theirs.get(name)]


def _int_range(label: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{label} must be a whole number from {low} to {high} (got {value!r})")


def _number_range(
    label: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'above' if low_open else 'from'} {low:g} {'and below' if high_open else 'to'} {high:g}"
        raise InvalidRequest(f"{label} must be a number {bounds} (got {value!r})")


@dataclass
class TrainProgress:
    step: int
    total: int
    loss: float


@dataclass
class TrainResult:
    weights: Path | None  # None when the run yielded before finishing
    step: int
    losses: list[float] = field(default_factory=list)
    config: TrainConfig | None = None

    @property
    def finished(self) -> bool:
        return self.weights is not None


def adapter_config(kind: str, config: TrainConfig, text: bool = False) -> Any:
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig

    rank, alpha, dropout = config.rank, config.network_alpha or config.rank, config.network_dropout
    targets = TEXT_ATTENTION if text else ATTENTION
    if kind == "lora":
        return LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets
        )
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets)
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets)
    # IA3 rescales keys, values and the feed-forward output with learned vectors (peft's IA3 has no
    # dropout: network_dropout is recorded but has nothing to act on).
    if text:
        return IA3Config(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"])
    return IA3Config(target_modules=["to_k", "to_v", "ff.net.2"], feedforward_modules=["ff.net.2"])


def load_training_pipeline(settings: Settings, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A fresh copy of the base model's UNet, VAE and text encoder(s) only: the serving models keep their
    styles untouched, and the ControlNet and depth model, never used in training, are not loaded.

    The base loads exactly as the renderer loads it (engine/render/models.py `load_base_model`): a hub id from
    the cache, a diffusers folder, a single `.safetensors`/`.ckpt` with its config, or a tiny profile's
    repo in emaki's tiny cache; never a download. It is the txt2img pipeline of the family the files show
    (StableDiffusionPipeline, StableDiffusionXLPipeline for the SDXL trainer, training/sdxl.py)."""
    from engine.render.model_files import profile_models
    from engine.render.models import load_base_model

    base = profile_models(settings, half=dtype != torch.float32)[0]
    return load_base_model(base, settings.base_model_config, dtype)


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def frozen_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it (no loss scaling needed), else fp16 (with a GradScaler); fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def shuffled_caption(caption: str, keep: int, rng: np.random.Generator) -> str:
    """kohya's caption shuffle: comma-separated tags shuffled, the first `keep` left in place."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    return ", ".join(head + [tail[i] for i in rng.permutation(len(tail))])


def saves_dir(out_dir: Path) -> Path:
    return out_dir / "saves"


def save_name(step: int) -> str:
    return f"step-{step:06d}"


def kept_saves(out_dir: Path) -> dict[int, Path]:
    """The kept saves of a run, by step."""
    found: dict[int, Path] = {}
    for path in sorted(saves_dir(out_dir).glob("step-*")):
        weights = adapter_file(path)
        if path.is_dir() and weights is not None and path.name[5:].isdigit():
            found[int(path.name[5:])] = weights
    return found


def adapter_file(folder: Path) -> Path | None:
    for name in (WEIGHTS_NAME, PEFT_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


class Trainer:
    def __init__(
        self,
        settings: Settings,
        dataset: Dataset,
        trigger: str,
        config: TrainConfig,
        out_dir: Path,
        pipeline: StableDiffusionPipeline | None = None,
    ) -> None:
        self.settings = settings
        self.trigger = trigger.strip()
        self.config = config.resolved(len(dataset.items), settings)
        # The held-out images are drawn by the seed and never seen in training: evaluation can then
        # tell a style that generalises from one that memorised its dataset.
        held = set(np.random.default_rng([self.config.seed, 2]).permutation(len(dataset.items))[: self.config.holdout])
        self.heldout = [item.path for i, item in enumerate(dataset.items) if i in held]
        self.dataset = Dataset(dataset.root, [item for i, item in enumerate(dataset.items) if i not in held])
        self.out_dir = out_dir
        self.device = pick_device(settings.device)
        self.weight_dtype = frozen_dtype(self.device)
        self.pipeline = pipeline
        out_dir.mkdir(parents=True, exist_ok=True)

    def _load_pipeline(self) -> Any:
        return load_training_pipeline(self.settings, self.weight_dtype)

    def _text_model(self, pipe: Any) -> torch.nn.Module:
        """The text encoder(s) a run freezes, and adapts when `train_text_encoder` is on."""
        return pipe.text_encoder

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def prompts(self) -> list[str]:
        return [self.with_trigger(c) for c in self.dataset.captions]

    def with_trigger(self, caption: str) -> str:
        return f"{self.trigger}, {caption}" if self.trigger else caption

    # --- caches ---------------------------------------------------------------------------
    def _cache_key(self) -> str:
        cfg = self.config
        identity = {
            "version": 2,  # bucketed latents
            "base": self.settings.base_model,
            "resolution": cfg.resolution,
            "background": cfg.background,
            "flip": cfg.flip,
            "prompts": self.prompts(),
            "images": [_file_hash(item.path) for item in self.dataset.items],
        }
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

    def bucket_of(self, image: Image.Image) -> Bucket:
        return pick_bucket(image.width, image.height, bucket_resolutions(self.config.resolution))

    @torch.no_grad()
    def encode_dataset(self, pipe: StableDiffusionPipeline) -> dict[str, Any]:
        """VAE latent distributions per bucket (and of the flipped images when flips are on) and
        caption embeddings, once per dataset (cached on disk beside it)."""
        cache = self.dataset.root / f".emaki-cache-{self._cache_key()}.pt"
        if cache.exists():
            return torch.load(cache, map_location="cpu")
        vae = pipe.vae
        # SDXL's VAE overflows in fp16 (its config says `force_upcast`): it encodes in fp32, as diffusers'
        # pipelines and SDXL training scripts do, and goes back to the frozen dtype after (a GPU without bf16).
        frozen = vae.dtype
        if frozen == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(dtype=torch.float32)
        try:
            by_bucket = self._encode_images(vae)
        finally:
            vae.to(dtype=frozen)
        buckets = {}
        for key, entry in by_bucket.items():
            n_views = len(entry["views"][0])
            buckets[key] = {
                "items": entry["items"],
                "mean": torch.stack([torch.cat([e[v][0] for e in entry["views"]]) for v in range(n_views)]),
                "std": torch.stack([torch.cat([e[v][1] for e in entry["views"]]) for v in range(n_views)]),
                "sizes": torch.tensor(entry["sizes"]),
            }
        data = {"buckets": buckets, **self._encode_prompts(pipe)}
        save_atomic(data, cache)
        return data

    def _encode_images(self, vae: Any) -> dict[str, dict[str, Any]]:
        """Each image's latent distribution (and its flipped view's), grouped by bucket."""
        by_bucket: dict[str, dict[str, Any]] = {}
        for index, item in enumerate(self.dataset.items):
            image = load_upright_rgb(item.path, self.config.background)
            bucket = self.bucket_of(image)
            original_size = image.size
            image = fit_to_bucket(image, bucket)
            views = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if self.config.flip else [image]
            entry = by_bucket.setdefault(f"{bucket[0]}x{bucket[1]}", {"items": [], "views": [], "sizes": []})
            entry["items"].append(index)
            entry["sizes"].append(original_size)  # (width, height) before fitting: SDXL is conditioned on it
            encoded = []
            for view in views:
                pixels = torch.from_numpy(np.asarray(view, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
                dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
                encoded.append((dist.mean.float().cpu(), dist.std.float().cpu()))
            entry["views"].append(encoded)
        return by_bucket

    def _encode_prompts(self, pipe: Any) -> dict[str, torch.Tensor]:
        """The dataset's prompts (and the empty one, for caption dropout) through the frozen text encoder."""
        tokens = self._tokenize(pipe, self.prompts())
        return {
            "tokens": tokens,
            "text": pipe.text_encoder(tokens.to(self.device))[0].float().cpu(),
            "empty_text": pipe.text_encoder(self._tokenize(pipe, [""]).to(self.device))[0].float().cpu(),
        }

    @staticmethod
    def _tokenize(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
        return pipe.tokenizer(
            prompts,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    # --- training -------------------------------------------------------------------------
    def run(
        self,
        on_step: Callable[[TrainProgress], None] | None = None,
        should_yield: Callable[[], bool] = lambda: False,
        on_checkpoint: Callable[[int, Image.Image], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        on_save: Callable[[int, Path], None] | None = None,
        on_start: Callable[[int, int], None] | None = None,
    ) -> TrainResult:
        """Train to the end, or until `should_yield` says so at a checkpoint (the result is then
        unfinished and a later run resumes). `on_start` receives (step, total steps) once, before the
        first step: 0, or the step a checkpoint resumes from; `on_step` every step's loss (in bursts,
        at log steps: reading a loss back from the GPU every step would stall it); `on_checkpoint` a
        sample rendered with the adapter so far; `on_save` each kept save's folder; `should_stop`
        (checked every step) cancels with JobCancelled. Raises TrainingDiverged, saving nothing."""
        devices = [self.device] if self.device.type == "cuda" else []
        # The global RNG (adapter init, dropout) is seeded inside (see `_seed_global_rng`) and restored
        # after: the caller's random state is neither used nor disturbed.
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            return self._run(on_step, should_yield, on_checkpoint, should_stop, on_save, on_start)

    def _seed_global_rng(self) -> None:
        """Seed torch's global RNG, which peft's adapter init and dropout draw from, just before the adapters
        are made. Not earlier: loading the base model may reseed it (the tiny builders seed their weights) or
        draw from it (random init of weights the checkpoint then replaces), and either would make the initial
        adapter the same for every seed. Its own stream ([seed, 3]), apart from the noise generator's (seed):
        the same seed for both would draw the init and the first noise from one sequence."""
        seed = int(np.random.SeedSequence([self.config.seed, 3]).generate_state(1, dtype=np.uint64)[0])
        torch.manual_seed(seed)

    def _run(
        self,
        on_step: Callable[[TrainProgress], None] | None,
        should_yield: Callable[[], bool],
        on_checkpoint: Callable[[int, Image.Image], None] | None,
        should_stop: Callable[[], bool],
        on_save: Callable[[int, Path], None] | None,
        on_start: Callable[[int, int], None] | None = None,
    ) -> TrainResult:
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params
        from peft import inject_adapter_in_model
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        cfg = self.config
        pipe = self.pipeline or self._load_pipeline()
        pipe.to(self.device)
        if self.weight_dtype != torch.float32:
            pipe.to(dtype=self.weight_dtype)
        pipe.set_progress_bar_config(disable=True)
        data = self.encode_dataset(pipe)
        unet, text_encoder = pipe.unet, self._text_model(pipe)
        unet.requires_grad_(False)
        text_encoder.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        self._seed_global_rng()
        unet.add_adapter(adapter_config(cfg.adapter, cfg), adapter_name="style")
        trained_text = text_encoder if cfg.train_text_encoder else None
        if trained_text is not None:
            # peft directly, not transformers' `add_adapter`: that wrapper demands the newest peft
            # (transformers 5.24 wants peft >= 0.22, which the index does not have).
            inject_adapter_in_model(adapter_config(cfg.adapter, cfg, text=True), trained_text, adapter_name="style")
        trained = [unet] if trained_text is None else [unet, trained_text]
        cast_training_params(trained, dtype=torch.float32)  # adapters learn in fp32 over bf16/fp16 weights
        unet_params = [p for p in unet.parameters() if p.requires_grad]
        text_params = [p for p in trained_text.parameters() if p.requires_grad] if trained_text is not None else []
        params = unet_params + text_params
        if self._wants_checkpointing():
            unet.enable_gradient_checkpointing()
        optimizer = self._optimizer(unet_params, text_params)
        warmup_kind = "constant_with_warmup" if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps else None
        lr_schedule = get_scheduler(
            warmup_kind or cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.steps,
        )
        scaler = torch.amp.GradScaler("cuda") if self.weight_dtype == torch.float16 else None
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        # On the device once: add_noise and compute_snr would otherwise copy it there every step.
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(self.device)
        on_device = self._move_data(data)
        noise_gen = torch.Generator(self.device).manual_seed(cfg.seed)
        order_rng = np.random.default_rng(cfg.seed)
        augment_rng = np.random.default_rng([cfg.seed, 1])  # caption dropout/shuffle, flips
        step, losses = 0, []
        order: list[tuple[str, list[int]]] = []  # the batches left in the current epoch
        if self.checkpoint_path.exists():
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
            if state["config"] != asdict(cfg):
                raise InvalidRequest(
                    f"{self.checkpoint_path} belongs to a run with other settings "
                    f"({', '.join(cfg.differences(TrainConfig.from_dict(state['config'])))}); "
                    "delete it (or use --restart) to start over"
                )
            set_peft_model_state_dict(unet, state["adapter"], adapter_name="style")
            if trained_text is not None:
                set_peft_model_state_dict(trained_text, state["text_adapter"], adapter_name="style")
            optimizer.load_state_dict(state["optimizer"])
            lr_schedule.load_state_dict(state["lr_schedule"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            noise_gen.set_state(state["noise_rng"])
            order_rng.bit_generator.state = state["order_rng"]
            augment_rng.bit_generator.state = state["augment_rng"]
            torch.set_rng_state(state["torch_rng"])
            if self.device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            step, losses, order = state["step"], state["losses"], [tuple(b) for b in state["order"]]
            log.info("resuming from step %d", step)
        else:  # a fresh start: saves of an earlier, failed run of this name are not this run's
            shutil.rmtree(saves_dir(self.out_dir), ignore_errors=True)

        def checkpoint() -> None:
            save_atomic(
                {
                    "config": asdict(cfg),
                    "adapter": get_peft_model_state_dict(unet, adapter_name="style"),
                    "text_adapter": get_peft_model_state_dict(trained_text, adapter_name="style")
                    if trained_text is not None
                    else None,
                    "optimizer": optimizer.state_dict(),
                    "lr_schedule": lr_schedule.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "noise_rng": noise_gen.get_state(),
                    "order_rng": order_rng.bit_generator.state,
                    "augment_rng": augment_rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                    "step": step,
                    "order": order,
                    "losses": losses,
                },
                self.checkpoint_path,
            )

        pending: list[torch.Tensor] = []  # losses still on the device

        def flush() -> None:
            """One device->host read for all pending losses; a non-finite loss or weight stops."""
            if not pending:
                return
            values = torch.stack(pending).float().cpu().tolist()
            pending.clear()
            first = step - len(values) + 1
            for offset, value in enumerate(values):
                if not math.isfinite(value) or value > DIVERGED_LOSS:
                    self._diverged(first + offset, value)
            self._check_weights(params, step)
            for offset, value in enumerate(values):
                losses.append(value)
                if on_step is not None:
                    on_step(TrainProgress(first + offset, cfg.steps, value))

        unet.train()
        if trained_text is not None:
            trained_text.train()
        sample: tuple[int, Image.Image] | None = None
        if on_start is not None:
            on_start(step, cfg.steps)
        while step < cfg.steps:
            if should_stop():
                raise JobCancelled("cancelled")
            if not order:
                order = self._epoch(on_device, order_rng)
            bucket, batch = order.pop()
            with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=self.device.type == "cuda"):
                loss = self._step(pipe, trained_text, scheduler, on_device, bucket, batch, noise_gen, augment_rng)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.scale_weight_norms > 0:
                scale_weight_norms(trained, cfg.scale_weight_norms)
            step += 1
            pending.append(loss.detach())
            saving = cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps
            checkpointing = step % cfg.checkpoint_every == 0 and step < cfg.steps
            if step % LOG_EVERY == 0 or saving or checkpointing or step == cfg.steps:
                flush()
            if saving:
                sample = (step, self._sample(pipe))
                folder = self._keep_save(step, unet, trained_text, sample[1])
                if on_save is not None:
                    on_save(step, folder)
                self._train_mode(unet, trained_text)
            if checkpointing:
                checkpoint()
                if on_checkpoint is not None:
                    image = sample[1] if sample is not None and sample[0] == step else self._sample(pipe)
                    on_checkpoint(step, image)
                    self._train_mode(unet, trained_text)
                if should_yield():
                    return TrainResult(None, step, losses, cfg)
        unet.eval()
        weights = self._save(self.out_dir / "final", unet, trained_text)
        self.checkpoint_path.unlink(missing_ok=True)
        return TrainResult(weights, step, losses, cfg)

    # --- pieces of the loop -----------------------------------------------------------------
    def _wants_checkpointing(self) -> bool:
        if self.config.gradient_checkpointing != "auto":
            return self.config.gradient_checkpointing == "on"
        if self.device.type != "cuda":
            return False
        free, _total = torch.cuda.mem_get_info(self.device)
        return free < SHORT_VRAM

    def _move_data(self, data: dict[str, Any]) -> dict[str, Any]:
        """The cached latents and embeddings on the training device, once (not a copy per step)."""
        device = self.device

        def moved(values: dict[str, Any]) -> dict[str, Any]:
            return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}

        return {
            "buckets": {key: moved(entry) for key, entry in data["buckets"].items()},
            **moved({k: v for k, v in data.items() if k != "buckets"}),
        }

    def _epoch(self, data: dict[str, Any], rng: np.random.Generator) -> list[tuple[str, list[int]]]:
        """One pass: each bucket's images shuffled and cut into batches (a batch never mixes
        shapes), then the batches shuffled. Returned reversed, as a stack to pop."""
        batches: list[tuple[str, list[int]]] = []
        for key in sorted(data["buckets"]):
            count = len(data["buckets"][key]["items"])
            positions = [int(i) for i in rng.permutation(count)]
            size = self.config.batch_size
            batches += [(key, positions[i : i + size]) for i in range(0, count, size)]
        return [batches[int(i)] for i in rng.permutation(len(batches))]

    def _text(
        self,
        pipe: StableDiffusionPipeline,
        trained_text: Any,
        data: dict[str, Any],
        indices: list[int],
        rng: np.random.Generator,
    ) -> torch.Tensor:
        cfg = self.config
        augment = cfg.caption_dropout > 0 or cfg.shuffle_caption
        if not augment and trained_text is None:
            # Python-int indexing: views of device tensors (a list index would be copied to the GPU).
            return torch.stack([data["text"][i] for i in indices])
        prompts = []
        for index in indices:
            if cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
                prompts.append("")
            elif cfg.shuffle_caption:
                prompts.append(shuffled_caption(self.prompts()[index], cfg.keep_tokens, rng))
            else:
                prompts.append(self.prompts()[index])
        if trained_text is None:
            if all(p == "" for p in prompts):
                return data["empty_text"].expand(len(prompts), -1, -1)
            with torch.no_grad():
                return pipe.text_encoder(self._tokenize(pipe, prompts).to(self.device))[0]
        tokens = (
            torch.stack([data["tokens"][i] for i in indices])
            if not augment
            else self._tokenize(pipe, prompts).to(self.device)
        )
        return trained_text(tokens)[0]

    def _step(
        self,
        pipe: StableDiffusionPipeline,
        trained_text: Any,
        scheduler: DDPMScheduler,
        data: dict[str, Any],
        bucket: str,
        positions: list[int],
        noise_gen: torch.Generator,
        rng: np.random.Generator,
    ) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        cfg = self.config
        entry = data["buckets"][bucket]
        views = [int(rng.integers(2)) if cfg.flip else 0 for _ in positions]
        mean = torch.stack([entry["mean"][v, p] for v, p in zip(views, positions, strict=True)])
        std = torch.stack([entry["std"][v, p] for v, p in zip(views, positions, strict=True)])
        conditioning = self._conditioning(pipe, trained_text, data, entry, views, positions, rng)
        device = self.device
        latents = (mean + std * torch.randn(mean.shape, generator=noise_gen, device=device)) * float(
            pipe.vae.config.scaling_factor
        )
        noise = torch.randn(latents.shape, generator=noise_gen, device=device)
        if cfg.noise_offset > 0:  # lets the model learn overall brightness (darker/lighter scenes)
            offset: Any = cfg.noise_offset
            if cfg.adaptive_noise_scale > 0:
                offset = (offset + cfg.adaptive_noise_scale * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
            noise = noise + offset * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=noise_gen, device=device
            )
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(positions),), generator=noise_gen, device=device
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        v_prediction = scheduler.config.prediction_type == "v_prediction"
        target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
        prediction = pipe.unet(noisy.to(self.weight_dtype), timesteps, **conditioning).sample
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma > 0:  # Min-SNR weighting (Hang et al. 2023), as diffusers' script does it
            snr = compute_snr(scheduler, timesteps)
            clipped = torch.clamp(snr, max=cfg.min_snr_gamma)
            per_sample = per_sample * (clipped / (snr + 1) if v_prediction else clipped / snr)
        return per_sample.mean()

    def _conditioning(
        self,
        pipe: Any,
        trained_text: Any,
        data: dict[str, Any],
        entry: dict[str, Any],
        views: list[int],
        positions: list[int],
        rng: np.random.Generator,
    ) -> dict[str, Any]:
        """What the UNet is conditioned on for a batch (the keyword arguments of its call, in its dtype)."""
        indices = [entry["items"][p] for p in positions]
        text = self._text(pipe, trained_text, data, indices, rng)
        return {"encoder_hidden_states": text.to(self.weight_dtype)}

    def _fixed_conditioning(self, data: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
        """The conditioning of a whole bucket, unaugmented (for `fixed_draw_loss`)."""
        return {"encoder_hidden_states": data["text"][entry["items"]].to(self.weight_dtype)}

    @torch.no_grad()
    def fixed_draw_loss(self, pipe: StableDiffusionPipeline, draws: int = 8, seed: int = 1234) -> float:
        """The denoising loss of `pipe` (with whatever adapter it carries) on a fixed set of noise
        and timestep draws over the dataset, without augmentation: comparable between steps and
        runs, where the training loss is a new random draw every step."""
        pipe.to(self.device)
        data = self._move_data(self.encode_dataset(pipe))
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        generator = torch.Generator(self.device).manual_seed(seed)
        pipe.unet.eval()
        total, count = 0.0, 0
        for key in sorted(data["buckets"]):
            entry = data["buckets"][key]
            latents = entry["mean"][0] * float(pipe.vae.config.scaling_factor)
            conditioning = self._fixed_conditioning(data, entry)
            for _ in range(draws):
                noise = torch.randn(latents.shape, generator=generator, device=self.device)
                timesteps = torch.randint(
                    0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator, device=self.device
                )
                noisy = scheduler.add_noise(latents, noise, timesteps)
                target = (
                    scheduler.get_velocity(latents, noise, timesteps)
                    if scheduler.config.prediction_type == "v_prediction"
                    else noise
                )
                prediction = pipe.unet(noisy.to(self.weight_dtype), timesteps, **conditioning).sample
                total += float(F.mse_loss(prediction.float(), target.float(), reduction="sum"))
                count += target.numel()
        return total / count

    def _train_mode(self, unet: Any, trained_text: Any) -> None:
        unet.train()
        if trained_text is not None:
            trained_text.train()

    def _diverged(self, step: int, value: float) -> None:
        self.checkpoint_path.unlink(missing_ok=True)  # it would only diverge again
        lr = self.config.learning_rate
        raise TrainingDiverged(
            f"training diverged at step {step} (loss {value:.4g}); nothing was saved or registered: "
            f"try a lower learning rate than {lr:g} (e.g. --lr {lr / 10:g})"
        )

    def _check_weights(self, params: list[torch.nn.Parameter], step: int) -> None:
        finite = torch.stack([p.detach().isfinite().all() for p in params]).all()
        if not bool(finite):
            self._diverged(step, float("nan"))

    @torch.no_grad()
    def _sample(self, pipe: StableDiffusionPipeline) -> Image.Image:
        """What the style looks like so far: the first caption, a fixed seed (the run's), few steps."""
        pipe.unet.eval()
        self._text_model(pipe).eval()
        size = self.config.resolution
        generator = torch.Generator("cpu").manual_seed(self.config.seed)
        return pipe(
            self.prompts()[0],
            num_inference_steps=min(20, self.settings.steps),
            height=size,
            width=size,
            generator=generator,
        ).images[0]

    def _optimizer(self, unet_params: list[torch.nn.Parameter], text_params: list[torch.nn.Parameter]) -> Any:
        cfg = self.config
        groups = [{"params": unet_params, "lr": cfg.learning_rate}]
        if text_params:
            groups.append({"params": text_params, "lr": cfg.text_encoder_lr})
        if cfg.optimizer == "prodigy":
            from prodigyopt import Prodigy

            return Prodigy(
                groups,
                lr=cfg.learning_rate,
                weight_decay=cfg.weight_decay,
                d_coef=cfg.prodigy_d_coef,
                safeguard_warmup=cfg.prodigy_safeguard_warmup,
                use_bias_correction=cfg.prodigy_use_bias_correction,
            )
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=1e-8)

    def _keep_save(self, step: int, unet: Any, trained_text: Any, sample: Image.Image) -> Path:
        folder = saves_dir(self.out_dir) / save_name(step)
        self._save(folder, unet, trained_text, extra={SAMPLE_NAME: sample})
        saves = sorted(saves_dir(self.out_dir).glob("step-*"))
        for old in saves[: max(0, len(saves) - self.config.save_limit)]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def _save(
        self, dest: Path, unet: Any, trained_text: Any = None, extra: dict[str, Image.Image] | None = None
    ) -> Path:
        """LoRA: diffusers' format (load_lora_weights, and so other SD tools). Other kinds: peft's
        format (adapter_config.json beside the weights; the text encoder's half in a subfolder).
        Written to a temporary folder and renamed: a save is whole or absent. The weights are
        checked to be finite first."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors import safe_open

        from engine.render.style_files import FAMILY_METADATA_KEY
        from training.safetensors_file import save_file  # metadata in a fixed order: same content, same bytes

        state = get_peft_model_state_dict(unet, adapter_name="style")
        text_state = get_peft_model_state_dict(trained_text, adapter_name="style") if trained_text else None
        for tensor in [*state.values(), *(text_state or {}).values()]:
            if not torch.isfinite(tensor).all():
                self._diverged(-1, float("nan"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        # Every file says the family it was trained on: a tiny set's keys and widths cannot, and the renderer
        # refuses a style of another family by it in one line (engine/render/style_files.py `style_family`).
        family = {"format": "pt", FAMILY_METADATA_KEY: FAMILY}
        if self.config.adapter == "lora":
            StableDiffusionPipeline.save_lora_weights(
                str(tmp),
                unet_lora_layers=convert_state_dict_to_diffusers(state),
                text_encoder_lora_layers=convert_state_dict_to_diffusers(text_state) if text_state else None,
                safe_serialization=True,
            )
            name = WEIGHTS_NAME
            with safe_open(str(tmp / name), framework="pt") as written:  # diffusers' header kept, the family added
                header, tensors = written.metadata() or {}, {k: written.get_tensor(k) for k in written.keys()}  # noqa: SIM118
            save_file(tensors, str(tmp / name), metadata={**header, **family})
        else:
            unet.peft_config["style"].save_pretrained(str(tmp))
            unet_tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
            save_file(unet_tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata=family)
            if text_state:
                text_dir = tmp / TEXT_ENCODER_DIR
                text_dir.mkdir()
                trained_text.peft_config["style"].save_pretrained(str(text_dir))
                save_file(
                    {k: v.detach().float().contiguous().cpu() for k, v in text_state.items()},
                    str(text_dir / PEFT_WEIGHTS_NAME),
                    metadata=family,
                )
            name = PEFT_WEIGHTS_NAME
        heldout = [path.relative_to(self.dataset.root).as_posix() for path in self.heldout]
        (tmp / "training.json").write_text(json.dumps({**asdict(self.config), "heldout": heldout}, indent=2) + "\n")
        for filename, image in (extra or {}).items():
            image.save(tmp / filename)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return dest / name


def scale_weight_norms(models: list[torch.nn.Module], max_norm: float) -> None:
    """kohya's max-norm regularisation: each layer's weight update (its delta to the base weight) is
    scaled down to norm `max_norm` when it grows past it. The delta is multilinear in the layer's
    trained factors (LoRA: up·down; LoHa: (a·b)⊙(c·d); LoKr: w1⊗(a·b)), so each factor is scaled by
    the n-th root of the ratio; IA3's delta is its scale vector minus one."""
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.no_grad():
        for module in (m for model in models for m in model.modules()):
            if not isinstance(module, BaseTunerLayer):
                continue
            factors = [
                p
                for name in module.adapter_layer_names
                if "style" in getattr(module, name, {})
                for p in _parameters_of(getattr(module, name)["style"])
                if p.requires_grad
            ]
            if not factors:
                continue
            if isinstance(module, IA3Layer):
                vector = factors[0]
                norm = (vector - 1).norm().clamp(min=max_norm / 2)  # as kohya: small updates untouched
                ratio = norm.clamp(max=max_norm) / norm
                vector.copy_(1 + (vector - 1) * ratio)
                continue
            norm = module.get_delta_weight("style").float().norm().clamp(min=max_norm / 2)
            ratio = norm.clamp(max=max_norm) / norm
            root = ratio ** (1 / len(factors))
            for factor in factors:
                factor.mul_(root.to(factor.dtype))


def _parameters_of(holder: Any) -> list[torch.nn.Parameter]:
    return list(holder.parameters()) if isinstance(holder, torch.nn.Module) else [holder]
