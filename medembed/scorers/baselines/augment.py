"""Training-time augmentation of radiograph batches, in plain torch on tensors (no torchvision).

Per image: brightness/contrast jitter, then one random affine warp that combines a horizontal flip, a small
rotation, scaling and shift (`F.affine_grid` + `F.grid_sample`, bilinear). Jitter comes first so the border
the warp uncovers stays black, like the zero padding the preprocessing adds to make images square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random transforms; all zero (and `hflip` 0) is the identity."""

    hflip: float = 0.5  # probability of a horizontal flip
    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    scale: float = 0.1  # zoom factor uniform in [1 - scale, 1 + scale]
    shift: float = 0.05  # translation, fraction of the side, uniform in [-shift, shift] per axis
    brightness: float = 0.1  # added, in [0, 1] pixel units, uniform in [-brightness, brightness]
    contrast: float = 0.2  # deviation from the image mean scaled by uniform [1 - contrast, 1 + contrast]

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[B, C, S, S] float in [0, 1] -> a randomly transformed copy, same shape, clipped to [0, 1].

        Random draws come from `generator` (a CPU generator), so a seeded run augments identically on any device.
        """
        batch = images.shape[0]

        def uniform(width: float) -> torch.Tensor:
            return (torch.rand(batch, generator=generator) * 2 - 1) * width

        contrast = (1 + uniform(self.contrast)).to(images)[:, None, None, None]
        brightness = uniform(self.brightness).to(images)[:, None, None, None]
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - mean) * contrast + mean + brightness).clamp(0.0, 1.0)

        angle = uniform(math.radians(self.rotation))
        zoom = 1 + uniform(self.scale)
        flip = torch.where(torch.rand(batch, generator=generator) < self.hflip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # affine_grid maps output to input coordinates in [-1, 1]: dividing by the zoom enlarges the content;
        # the flip negates the input x axis, and shifts are in half-sides (hence x2).
        theta = torch.stack(
            [
                torch.stack([cos * flip, -sin, uniform(2 * self.shift)], dim=1),
                torch.stack([sin * flip, cos, uniform(2 * self.shift)], dim=1),
            ],
            dim=1,
        ).to(images)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0.0, 1.0)
