"""Trains a style adapter into the SD UNet with peft: LoRA, LoHa, LoKr or IA3 (the second paper's
LyCORIS/IA3), AdamW or Prodigy (its optimizer).

VAE latents and caption embeddings are computed once per dataset and cached; the noise, timesteps
and image order come from seeded generators saved in every checkpoint, so an interrupted run resumes
exactly where it stopped. Mixed precision and gradient checkpointing are used on CUDA. The loop can
stop at a checkpoint boundary when asked (`should_yield`), so a long training gives way to waiting
animation jobs and continues later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image

from engine import tiny
from engine.errors import InvalidRequest, JobCancelled
from engine.models import Components, load_components, pick_device, pick_dtype
from engine.settings import Settings
from training.dataset import Dataset

log = logging.getLogger(__name__)

ADAPTERS = ("lora", "loha", "lokr", "ia3")
OPTIMIZERS = ("adamw", "prodigy")
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # LoRA: the name diffusers' loader looks for
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # LoHa/LoKr/IA3: peft's own layout


@dataclass
class TrainConfig:
    steps: int = 0  # 0: chosen from the dataset size
    rank: int = 16
    adapter: str = "lora"
    optimizer: str = "adamw"
    learning_rate: float = 0.0  # 0: 1e-4 for AdamW, 1.0 for Prodigy (it finds its own step size)
    resolution: int = 0  # 0: the profile's width
    batch_size: int = 1
    checkpoint_every: int = 100
    seed: int = 0
    train_text_encoder: bool = False  # LoRA on CLIP's attention too; captions are then encoded each step

    def resolved(self, n_images: int, settings: Settings) -> TrainConfig:
        if self.adapter not in ADAPTERS:
            raise InvalidRequest(f"unknown adapter '{self.adapter}': use {', '.join(ADAPTERS)}")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidRequest(f"unknown optimizer '{self.optimizer}': use {', '.join(OPTIMIZERS)}")
        if self.steps < 0 or self.rank < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise InvalidRequest("steps, rank, batch size and checkpoint interval must be positive")
        steps = self.steps or int(np.clip(n_images * 100, 500, 3000))  # ~100 passes over each image
        lr = self.learning_rate or (1.0 if self.optimizer == "prodigy" else 1e-4)
        resolution = self.resolution or settings.width
        if resolution % 8:
            raise InvalidRequest(f"resolution must be a multiple of 8 (got {resolution})")
        if self.train_text_encoder and self.adapter != "lora":
            raise InvalidRequest("training the text encoder works with the lora adapter only")
        return replace(self, steps=steps, learning_rate=lr, resolution=resolution)


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

    @property
    def finished(self) -> bool:
        return self.weights is not None


def adapter_config(kind: str, rank: int) -> Any:
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig

    if kind == "lora":
        return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=ATTENTION)
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=rank, target_modules=ATTENTION)
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=rank, target_modules=ATTENTION)
    # IA3 rescales keys, values and the feed-forward output with learned vectors.
    return IA3Config(target_modules=["to_k", "to_v", "ff.net.2"], feedforward_modules=["ff.net.2"])


def base_components(settings: Settings) -> Components:
    """A fresh copy of the base model to train on: the serving models keep their styles untouched."""
    if settings.is_tiny:
        return tiny.tiny_components()
    return load_components(settings, torch.float32)


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    def __init__(
        self,
        settings: Settings,
        dataset: Dataset,
        trigger: str,
        config: TrainConfig,
        out_dir: Path,
        components: Components | None = None,
    ) -> None:
        self.settings = settings
        self.dataset = dataset
        self.trigger = trigger.strip()
        self.config = config.resolved(len(dataset.items), settings)
        self.out_dir = out_dir
        self.device = pick_device(settings.device)
        self.amp_dtype = pick_dtype(settings.dtype, self.device) if self.device.type == "cuda" else None
        self.components = components
        out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def prompts(self) -> list[str]:
        return [f"{self.trigger}, {c}" if self.trigger else c for c in self.dataset.captions]

    # --- caches ---------------------------------------------------------------------------
    def _cache_key(self) -> str:
        identity = {
            "base": self.settings.base_model,
            "resolution": self.config.resolution,
            "prompts": self.prompts(),
            "images": [_file_hash(item.path) for item in self.dataset.items],
        }
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

    @torch.no_grad()
    def encode_dataset(self, pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
        """VAE latent distributions and caption embeddings, once per dataset (cached on disk)."""
        cache = self.dataset.root / f".emaki-cache-{self._cache_key()}.pt"
        if cache.exists():
            return torch.load(cache, map_location="cpu")
        size = self.config.resolution
        means, stds, embeddings, token_ids = [], [], [], []
        for item, prompt in zip(self.dataset.items, self.prompts(), strict=True):
            with Image.open(item.path) as image:
                image = image.convert("RGB")
                scale = size / min(image.size)  # cover, then centre-crop
                image = image.resize(
                    (max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                    Image.Resampling.BICUBIC,
                )
                left, top = (image.width - size) // 2, (image.height - size) // 2
                image = image.crop((left, top, left + size, top + size))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
            dist = pipe.vae.encode(pixels.to(self.device)).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
            tokens = pipe.tokenizer(
                prompt,
                padding="max_length",
                max_length=pipe.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            embeddings.append(pipe.text_encoder(tokens.to(self.device))[0].cpu())
            token_ids.append(tokens)
        data = {
            "mean": torch.cat(means),
            "std": torch.cat(stds),
            "text": torch.cat(embeddings),
            "tokens": torch.cat(token_ids),
        }
        save_atomic(data, cache)
        return data

    # --- training -------------------------------------------------------------------------
    def run(
        self,
        on_step: Callable[[TrainProgress], None] | None = None,
        should_yield: Callable[[], bool] = lambda: False,
        on_checkpoint: Callable[[int, Image.Image], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> TrainResult:
        """Train to the end, or until `should_yield` says so at a checkpoint (the result is then
        unfinished and a later run resumes). `on_checkpoint` receives a sample image rendered with
        the adapter so far; `should_stop` (checked every step) cancels with JobCancelled."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        cfg = self.config
        parts = self.components or base_components(self.settings)
        pipe = parts.txt2img
        pipe.to(self.device)
        data = self.encode_dataset(pipe)
        unet = pipe.unet
        unet.requires_grad_(False)
        unet.add_adapter(adapter_config(cfg.adapter, cfg.rank), adapter_name="style")
        text_encoder = pipe.text_encoder if cfg.train_text_encoder else None
        if text_encoder is not None:
            from peft import LoraConfig, inject_adapter_in_model

            text_encoder.requires_grad_(False)
            # peft directly, not transformers' `add_adapter`: that wrapper demands the newest peft
            # (transformers 5.24 wants peft >= 0.22, which the index does not have), while the
            # injection itself is peft's own and works on every peft the lock allows.
            inject_adapter_in_model(
                LoraConfig(
                    r=cfg.rank,
                    lora_alpha=cfg.rank,
                    init_lora_weights="gaussian",
                    target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                ),
                text_encoder,
                adapter_name="style",
            )
            text_encoder.train()
        trained = [unet] if text_encoder is None else [unet, text_encoder]
        params = [p for model in trained for p in model.parameters() if p.requires_grad]
        if self.device.type == "cuda":
            unet.enable_gradient_checkpointing()
        optimizer = self._optimizer(params)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        scaling = float(pipe.vae.config.scaling_factor)
        noise_gen = torch.Generator("cpu").manual_seed(cfg.seed)
        order_rng = np.random.default_rng(cfg.seed)
        step, losses = 0, []
        order: list[int] = []  # what is left of the current pass over the images
        if self.checkpoint_path.exists():
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
            if state["config"] != asdict(cfg):
                raise InvalidRequest(
                    f"{self.checkpoint_path} belongs to a run with other settings; delete it to start over"
                )
            set_peft_model_state_dict(unet, state["adapter"], adapter_name="style")
            if text_encoder is not None:
                set_peft_model_state_dict(text_encoder, state["text_adapter"], adapter_name="style")
            optimizer.load_state_dict(state["optimizer"])
            noise_gen.set_state(state["noise_rng"])
            order_rng.bit_generator.state = state["order_rng"]
            step, losses, order = state["step"], state["losses"], state["order"]
            log.info("resuming from step %d", step)

        def checkpoint() -> None:
            save_atomic(
                {
                    "config": asdict(cfg),
                    "adapter": get_peft_model_state_dict(unet, adapter_name="style"),
                    "text_adapter": get_peft_model_state_dict(text_encoder, adapter_name="style")
                    if text_encoder is not None
                    else None,
                    "optimizer": optimizer.state_dict(),
                    "noise_rng": noise_gen.get_state(),
                    "order_rng": order_rng.bit_generator.state,
                    "step": step,
                    "order": order,
                    "losses": losses,
                },
                self.checkpoint_path,
            )

        unet.train()
        n = len(self.dataset.items)
        while step < cfg.steps:
            if should_stop():
                raise JobCancelled("cancelled")
            if not order:
                order = [int(i) for i in order_rng.permutation(n)]
            batch = [order.pop() for _ in range(min(cfg.batch_size, len(order)))]
            loss = self._step(unet, scheduler, data, batch, noise_gen, scaling, text_encoder)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(TrainProgress(step, cfg.steps, losses[-1]))
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint()
                if on_checkpoint is not None:
                    on_checkpoint(step, self._sample(pipe))
                    unet.train()
                if should_yield():
                    return TrainResult(None, step, losses)
        unet.eval()
        weights = self._save(unet, text_encoder)
        self.checkpoint_path.unlink(missing_ok=True)
        return TrainResult(weights, step, losses)

    @torch.no_grad()
    def _sample(self, pipe: StableDiffusionPipeline) -> Image.Image:
        """What the style looks like so far: the first caption, a fixed seed, a few steps."""
        pipe.unet.eval()
        pipe.set_progress_bar_config(disable=True)
        size = self.config.resolution
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe(
            self.prompts()[0],
            num_inference_steps=min(20, self.settings.steps),
            height=size,
            width=size,
            generator=generator,
        ).images[0]

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.config.optimizer == "prodigy":
            from prodigyopt import Prodigy

            return Prodigy(params, lr=self.config.learning_rate, weight_decay=0.01, safeguard_warmup=True)
        return torch.optim.AdamW(params, lr=self.config.learning_rate, weight_decay=1e-2)

    def _step(
        self,
        unet: Any,
        scheduler: DDPMScheduler,
        data: dict[str, torch.Tensor],
        batch: list[int],
        noise_gen: torch.Generator,
        scaling: float,
        text_encoder: Any = None,
    ) -> torch.Tensor:
        mean, std, text = data["mean"][batch], data["std"][batch], data["text"][batch]
        if text_encoder is not None:  # its adapter is learning: the cached embeddings would be stale
            text = text_encoder(data["tokens"][batch].to(self.device))[0]
        latents = (mean + std * torch.randn(mean.shape, generator=noise_gen)) * scaling
        noise = torch.randn(latents.shape, generator=noise_gen)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=noise_gen)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        device = self.device
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            prediction = unet(noisy.to(device), timesteps.to(device), encoder_hidden_states=text.to(device)).sample
        return F.mse_loss(prediction.float(), target.to(device).float())

    def _save(self, unet: Any, text_encoder: Any = None) -> Path:
        """LoRA: diffusers' format (load_lora_weights, and so other SD tools). Other kinds: peft's
        format (adapter_config.json beside the weights), which diffusers' LoRA loader cannot read."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        final = self.out_dir / "final"
        tmp = self.out_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        state = get_peft_model_state_dict(unet, adapter_name="style")
        if self.config.adapter == "lora":
            layers = convert_state_dict_to_diffusers(state)
            text_layers = None
            if text_encoder is not None:
                text_layers = convert_state_dict_to_diffusers(
                    get_peft_model_state_dict(text_encoder, adapter_name="style")
                )
            StableDiffusionPipeline.save_lora_weights(
                str(tmp), unet_lora_layers=layers, text_encoder_lora_layers=text_layers, safe_serialization=True
            )
            name = WEIGHTS_NAME
        else:
            unet.peft_config["style"].save_pretrained(str(tmp))
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / PEFT_WEIGHTS_NAME))
            name = PEFT_WEIGHTS_NAME
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final / name
