"""The safety checker's verdicts on the tiny random-weight checker, with thresholds the test places."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.safety import SafetyChecker, tiny_safety_checker


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(4)]


@pytest.fixture(scope="module")
def checker() -> SafetyChecker:
    return SafetyChecker.load("tiny")


def test_verdicts_follow_the_thresholds_and_repeat(checker: SafetyChecker) -> None:
    images = _images()
    scores = checker.concept_scores(images)  # at threshold 0: raw best cosine per image
    assert checker.concept_scores(images) == scores  # deterministic
    # Put every concept's threshold between the two lowest-scoring images and the rest.
    ranked = sorted(scores)
    middle = (ranked[1] + ranked[2]) / 2
    model, processor = tiny_safety_checker(threshold=middle)
    placed = SafetyChecker(model, processor)
    verdicts = placed.flagged(images)
    assert verdicts == [s > middle for s in scores]
    assert sum(verdicts) == 2
    assert not any(SafetyChecker(*tiny_safety_checker(threshold=2.0)).flagged(images))
    assert all(SafetyChecker(*tiny_safety_checker(threshold=-2.0)).flagged(images))
