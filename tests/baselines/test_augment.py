"""The tensor-only augmentation: identity at zero strength, exact flips, seeded, values kept in [0, 1]."""

import torch

from medembed.scorers.baselines.augment import Augmentation

NONE = Augmentation(hflip=0.0, rotation=0.0, scale=0.0, shift=0.0, brightness=0.0, contrast=0.0)


def _images() -> torch.Tensor:
    return torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_zero_strength_is_the_identity() -> None:
    images = _images()
    torch.testing.assert_close(NONE(images, torch.Generator().manual_seed(0)), images, atol=1e-5, rtol=0)


def test_a_certain_flip_mirrors_every_image_left_to_right() -> None:
    images = _images()
    flipped = Augmentation(hflip=1.0, rotation=0.0, scale=0.0, shift=0.0, brightness=0.0, contrast=0.0)(images, torch.Generator())
    torch.testing.assert_close(flipped, images.flip(-1), atol=1e-5, rtol=0)


def test_default_augmentation_is_seeded_changes_images_and_stays_in_range() -> None:
    images = _images()
    first = Augmentation()(images, torch.Generator().manual_seed(3))
    again = Augmentation()(images, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert first.shape == images.shape
    assert first.min() >= 0 and first.max() <= 1
    assert (first - images).abs().mean() > 0.01
