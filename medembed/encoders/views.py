"""Test-time views: extra deterministic versions of each preprocessed image an encoder embeds beside the original.

A view is `hflip` (mirrored left to right), `vflip` (upside down) or `zoom:F` (the central fraction F of the
image, 0 < F < 1, resized back to the input size bilinearly: a second scale at the encoder's own resolution).
The pooled embedding of a store with views is the mean over the original and its views; with
`view_reduce=all` every view's embedding is kept too, as the token level `views` (token 0 the mean, then
the original, then the views in the order asked).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from medembed.errors import MedembedError
from medembed.encoders.levels import split_list

VIEWS_LEVEL = "views"
VIEW_REDUCTIONS = ("mean", "all")
_ZOOM = re.compile(r"^zoom:?(?P<fraction>0?\.\d+)$")


class ViewError(MedembedError):
    """A test-time view option that names no view."""


def parse_views(text: str | list[str] | None) -> tuple[str, ...]:
    """Canonical view names of a comma-separated option: "hflip", "vflip", "zoom0.875"; duplicates refused."""
    views = tuple(_canonical_view(item) for item in split_list(text))
    if len(set(views)) != len(views):
        raise ViewError(f"views {text!r}: a view is named twice")
    return views


def _canonical_view(text: str) -> str:
    name = text.strip().lower()
    if name in ("hflip", "vflip"):
        return name
    match = _ZOOM.match(name)
    if match and 0.0 < float(match["fraction"]) < 1.0:
        return f"zoom{float(match['fraction']):g}"
    raise ViewError(f"view {text!r} is not hflip, vflip or zoom:F with 0 < F < 1 (e.g. zoom:0.875)")


def apply_view(pixels: torch.Tensor, view: str) -> torch.Tensor:
    """`[B, C, S, S]` preprocessed pixels seen through `view` (a canonical name), same shape."""
    if view == "hflip":
        return pixels.flip(-1)
    if view == "vflip":
        return pixels.flip(-2)
    fraction = float(view.removeprefix("zoom"))
    size = pixels.shape[-1]
    side = max(1, round(size * fraction))
    start = (size - side) // 2
    crop = pixels[..., start : start + side, start : start + side]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
