"""The safety checker's verdicts on the tiny random-weight checker (loaded from its files in the tiny cache,
as a user's checker is), with thresholds the test places."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.coordinator.safety import SafetyChecker
from engine.settings import Settings


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(4)]


def _checker(threshold: float) -> SafetyChecker:
    return SafetyChecker.load(Settings(profile="tiny", safety_tiny_threshold=threshold))


@pytest.fixture(scope="module")
def checker() -> SafetyChecker:
    return _checker(0.0)


def test_verdicts_follow_the_thresholds_and_repeat(checker: SafetyChecker) -> None:
    images = _images()
    scores = checker.concept_scores(images)  # at threshold 0: raw best cosine per image
    assert checker.concept_scores(images) == scores  # deterministic
    # Put every concept's threshold between the two lowest-scoring images and the rest.
    ranked = sorted(scores)
    middle = (ranked[1] + ranked[2]) / 2
    placed = _checker(middle)
    verdicts = placed.flagged(images)
    assert verdicts == [s > middle for s in scores]
    assert sum(verdicts) == 2
    assert not any(_checker(2.0).flagged(images))
    assert all(_checker(-2.0).flagged(images))
