"""The encoder's preprocessing on the model's device, fed by workers that only decode.

A decoding worker turns each file into `CompactPixels` (uint8, uint16 or a DICOM LUT index, at the decoded
size: 0.2-0.5 MB for a 1024 px radiograph instead of the 2.4 MB float32 `[3, 448, 448]` tensor it used to
preprocess and ship) and `pack` lays a batch of them into one flat byte buffer: one pinned host copy and one
host-to-device transfer per batch. On the device `preprocess_packed` converts each image to float32 in
[0, 1] (`to_unit_float`, the division or table lookup `decode_image` does) and runs `PreprocessSpec.transform`
on buckets of same-sized images: the very tensor ops `PreprocessSpec.__call__` runs on the CPU, so the
embeddings and the spec hash (hence the store fingerprint) are those of the CPU path.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from medembed.data.images import CompactPixels, PreprocessSpec

_ALIGN = 8  # every array starts at a multiple of 8 bytes, so any dtype can be viewed in place
_TORCH_DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "float32": torch.float32}


@dataclass(frozen=True)
class PackedImage:
    """Where one image lies in a `PackedBatch` buffer: its values, and its LUT when it has one."""

    offset: int
    dtype: str
    shape: tuple[int, ...]
    scale: float
    lut_offset: int = -1
    lut_size: int = 0


class PackedBatch:
    """The compact images of one batch in a single uint8 buffer (DataLoader pins it via `pin_memory`)."""

    def __init__(self, buffer: torch.Tensor, images: list[PackedImage]) -> None:
        self.buffer, self.images = buffer, images

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(self.buffer.pin_memory(), self.images)

    def to(self, device: torch.device, non_blocking: bool = False) -> PackedBatch:
        return PackedBatch(self.buffer.to(device, non_blocking=non_blocking), self.images)


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def pack(images: list[CompactPixels]) -> PackedBatch:
    """Lay the images' values (and LUTs) end to end, each 8-byte aligned, in one uint8 tensor."""
    layout, arrays, offset = [], [], 0
    for image in images:
        values = np.ascontiguousarray(image.values)
        if values.dtype.name not in _TORCH_DTYPES:
            raise ValueError(f"cannot pack pixels of dtype {values.dtype}; expected one of {', '.join(_TORCH_DTYPES)}")
        start, offset = offset, offset + _aligned(values.nbytes)
        arrays.append((start, values))
        lut_offset, lut_size = -1, 0
        if image.lut is not None:
            lut = np.ascontiguousarray(image.lut, dtype=np.float32)
            lut_offset, lut_size, offset = offset, len(lut), offset + _aligned(lut.nbytes)
            arrays.append((lut_offset, lut))
        layout.append(PackedImage(start, values.dtype.name, tuple(values.shape), float(image.scale), lut_offset, lut_size))
    buffer = np.zeros(offset, dtype=np.uint8)
    for start, array in arrays:
        buffer[start : start + array.nbytes] = array.reshape(-1).view(np.uint8)
    return PackedBatch(torch.from_numpy(buffer), layout)


def _view(buffer: torch.Tensor, offset: int, dtype: torch.dtype, count: int) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    return buffer[offset : offset + count * size].view(dtype)


def to_unit_float(values: torch.Tensor, scale: float, lut: torch.Tensor | None = None) -> torch.Tensor:
    """Compact pixels -> float32 in [0, 1], as `CompactPixels.to_float` does in numpy: `lut[values]` with a
    LUT, float32 as they are, integers divided by `scale` in float32."""
    if lut is not None:
        return lut[values.long()]
    if values.dtype == torch.float32:
        return values
    return values.float() / scale


def unpack(batch: PackedBatch) -> list[torch.Tensor]:
    """Each image of `batch` as float32 `[C, H, W]` in [0, 1] (C = 1 or 3), on the buffer's device."""
    out = []
    for image in batch.images:
        dtype = _TORCH_DTYPES[image.dtype]
        values = _view(batch.buffer, image.offset, dtype, int(np.prod(image.shape))).reshape(image.shape)
        lut = _view(batch.buffer, image.lut_offset, torch.float32, image.lut_size) if image.lut_size else None
        pixels = to_unit_float(values, image.scale, lut)
        out.append(pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1))
    return out


def preprocess_images(spec: PreprocessSpec, images: list[torch.Tensor]) -> torch.Tensor:
    """`[C, H, W]` float images -> `[N, channels, size, size]`. On a GPU the images of one size are transformed
    together (fewer kernel launches); on a CPU one by one, which measured 2-4x faster there (stacking full-size
    float images costs more memory traffic than the per-image calls save)."""
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    buckets: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        buckets[tuple(image.shape) if images[0].device.type != "cpu" else (index,)].append(index)
    out = torch.empty((len(images), spec.channels, spec.size, spec.size), dtype=torch.float32, device=images[0].device)
    for indices in buckets.values():
        if len(indices) == 1:
            spec.transform(images[indices[0]][None], out=out[indices[0] : indices[0] + 1])
        else:
            out.index_copy_(0, torch.tensor(indices, device=out.device), spec.transform(torch.stack([images[i] for i in indices])))
    return out


def preprocess_packed(spec: PreprocessSpec, batch: PackedBatch) -> torch.Tensor:
    """A packed batch (on the model's device) -> the encoder's `[N, channels, size, size]` input."""
    return preprocess_images(spec, unpack(batch))
