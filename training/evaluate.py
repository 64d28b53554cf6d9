"""Style evaluation: FID and KID of generated images against the dataset (torchmetrics), and the
temporal coherence of an animation (mean SSIM between consecutive frames).

The papers' figure is FID of 100 generated vs 28 originals. With a few dozen real images FID's
covariance estimate is dominated by noise and biased upwards; KID is unbiased at small sample sizes,
so it is the figure to compare styles by. The report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.errors import InvalidRequest

KID_NOTE = (
    "KID is the figure to compare: it is unbiased with a few dozen images, while FID with so few real "
    "images is dominated by the noise of its covariance estimate (and reads high)."
)


def to_uint8_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """(N, 3, size, size) uint8, the input torchmetrics' Inception extractor expects. Each image is
    scaled (keeping its aspect ratio) so its shorter side is `size`, then centre-cropped: real
    images of any shape and square generated ones go through the same transform, none squashed."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        scale = size / min(image.size)
        resized = image.resize(
            (max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.Resampling.BICUBIC
        )
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        arrays.append(np.asarray(resized.crop((left, top, left + size, top + size))))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# What torch-fidelity (torchmetrics' Inception) would download on first use, into torch's hub folder.
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def inception_weights_on_disk() -> None:
    """Run time never downloads: the Inception weights must already be in torch's hub folder."""
    where = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not where.is_file():
        raise InvalidRequest(
            f'FID/KID with the standard Inception features needs torch-fidelity (pip install "emaki[eval]") and '
            f"its weights at {where}, which are not there; nothing is downloaded while the bot runs"
        )


def fid_kid(
    real: Sequence[Image.Image],
    generated: Sequence[Image.Image],
    feature: int | nn.Module = 2048,
    size: int = 299,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID (mean, std over subsets). `feature` is an Inception layer size (needs the
    torch-fidelity weights) or any module mapping uint8 (N,3,H,W) images to (N, d) features.
    KID's random subsets are drawn from `seed`, not the global RNG: same inputs, same figure."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(generated) < 2:
        raise InvalidRequest("FID and KID need at least 2 real and 2 generated images")
    if isinstance(feature, int):
        inception_weights_on_disk()
    try:
        fid = FrechetInceptionDistance(feature=feature)
        subset = min(len(real), len(generated))
        kid = KernelInceptionDistance(feature=feature, subsets=kid_subsets, subset_size=subset)
    except (ModuleNotFoundError, RuntimeError, OSError) as exc:
        raise InvalidRequest(
            "FID/KID with the standard Inception features needs torch-fidelity and its weights "
            f'(pip install "emaki[eval]"; the weights download on first use): {exc}'
        ) from exc
    real_batch, generated_batch = to_uint8_batch(real, size), to_uint8_batch(generated, size)
    with torch.inference_mode():
        for metric in (fid, kid):
            metric.update(real_batch, real=True)
            metric.update(generated_batch, real=False)
        with torch.random.fork_rng(devices=[]):  # torchmetrics draws KID subsets with torch.randperm
            torch.manual_seed(seed)
            kid_mean, kid_std = kid.compute()
        return {
            "fid": float(fid.compute()),
            "kid": float(kid_mean),
            "kid_std": float(kid_std),
            "n_real": len(real),
            "n_generated": len(generated),
        }


def clip_score(images: Sequence[Image.Image], captions: Sequence[str], model: Any, processor: Any) -> float:
    """Mean CLIP score of images against their captions: 100 x cosine of the image and text
    embeddings, floored at 0 (Hessel et al. 2021; torchmetrics' CLIPScore computes the same)."""
    with torch.inference_mode():
        inputs = processor(text=list(captions), images=list(images), return_tensors="pt", padding=True, truncation=True)
        image_embeds = model.get_image_features(pixel_values=inputs["pixel_values"])
        text_embeds = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
        text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
        cosine = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        return float((100 * cosine).clamp(min=0).mean())


def temporal_ssim(frames: Sequence[Image.Image]) -> float:
    """Mean SSIM between consecutive frames: 1 = a still image; a good animation moves but keeps
    its structure (the depth ControlNet's job), well above unrelated images (~0)."""
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    if len(frames) < 2:
        raise InvalidRequest("temporal coherence needs at least 2 frames")
    batch = torch.from_numpy(np.stack([np.asarray(f.convert("RGB")) for f in frames])).permute(0, 3, 1, 2)
    batch = batch.float() / 255
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    return float(ssim(batch[1:], batch[:-1]))


def report(metrics: dict[str, Any]) -> str:
    """Every figure with the feature space it was measured in, and the base model's beside it."""
    space = metrics.get("features", "?")
    base = metrics.get("baseline")
    lines = [
        f"FID  {metrics['fid']:.2f}   ({metrics['n_generated']} generated vs {metrics['n_real']} dataset images; "
        f"features: {space})",
        f"KID  {metrics['kid']:.4f} ± {metrics['kid_std']:.4f}   (features: {space}; seeded subsets)",
    ]
    if base:
        lines.append(
            f"without the style (base model, same prompts and seeds): FID {base['fid']:.2f}, "
            f"KID {base['kid']:.4f} ± {base['kid_std']:.4f}   (features: {space})"
        )
    if "heldout" in metrics and isinstance(metrics["heldout"], dict):
        held = metrics["heldout"]
        lines.append(
            f"against the {held['n_real']} held-out images (never trained on): FID {held['fid']:.2f}, "
            f"KID {held['kid']:.4f} ± {held['kid_std']:.4f}   (features: {space})"
        )
    if "clip_score" in metrics:
        model = metrics["clip_model"]
        lines.append(f"CLIP score  {metrics['clip_score']:.2f}   (samples vs their captions; model: {model})")
        if base and "clip_score" in base:
            lines.append(f"CLIP score without the style  {base['clip_score']:.2f}   (model: {metrics['clip_model']})")
    if "temporal_ssim" in metrics:
        lines.append(f"temporal SSIM  {metrics['temporal_ssim']:.3f}   (mean over consecutive frames)")
    lines.append(KID_NOTE)
    return "\n".join(lines)


class TinyFeatures(nn.Module):
    """A small seeded random conv net as feature extractor: for tests and the offline `tiny` profile,
    where the Inception weights cannot be downloaded. Its numbers are real FID/KID computations but
    in another feature space: they compare runs with each other, not with published figures."""

    num_features = 32

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.conv2 = nn.Conv2d(16, self.num_features, kernel_size=4, stride=4)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        x = torch.relu(self.conv1(x))
        return self.conv2(x).mean(dim=(2, 3))
