"""The convolutional autoencoder baseline as an encoder: its trained bottleneck, globally averaged.

`medembed baseline autoencoder` trains the network (`medembed.scorers.baselines.autoencoder`) and saves it as
model.safetensors + model.json; this encoder loads that directory, so `extract` writes the autoencoder's store
like any other (resume, failed table, shards) and `predict` can rebuild it for a run fitted on that store.

Grey `size` x `size` pixels in [0, 1] go through four stride-2 convolutions (`width`, 2x, 4x channels, then
`bottleneck`; each with batch norm and ReLU) to a `[bottleneck, size/16, size/16]` map; the decoder mirrors it.
Pixels are rounded to 8 bits first, exactly as the training cache holds them.
"""

from __future__ import annotations

from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file
from torch import nn

from medembed._files import read_json
from medembed.encoders.base import Encoder, EncoderError, freeze
from medembed.data.images import PreprocessSpec
from medembed.encoders.levels import FINAL

KIND = "autoencoder"
LEVELS = 4  # stride-2 stages: the bottleneck map is size / 16 on a side
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"


class ConvAutoencoder(nn.Module):
    """Grey images [B, 1, S, S] in [0, 1] -> reconstructions [B, 1, S, S]; `embed` gives [B, bottleneck]."""

    def __init__(self, width: int = 16, bottleneck: int = 256) -> None:
        super().__init__()
        channels = [1] + [width * 2**level for level in range(LEVELS - 1)] + [bottleneck]
        down, up = [], []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            down += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(channels[:0:-1], channels[-2:0:-1]):
            up += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        up += [nn.ConvTranspose2d(channels[1], 1, 4, stride=2, padding=1), nn.Sigmoid()]
        self.encoder, self.decoder = nn.Sequential(*down), nn.Sequential(*up)

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] -> reconstruction [B, 1, S, S] in [0, 1]."""
        return self.decoder(self.encoder(grey))

    def embed(self, grey: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] -> [B, bottleneck]: the global average of the bottleneck map."""
        return self.encoder(grey).mean(dim=(2, 3))


def autoencoder_spec(size: int) -> PreprocessSpec:
    """Zero-pad to a square, resize (bilinear, antialiased) to `size`, one grey channel in [0, 1]."""
    return PreprocessSpec(size=size, pad_to_square=True, resize="bilinear", antialias=True, mean=(0.0,), std=(1.0,), channels=1)


def model_id(width: int, bottleneck: int) -> str:
    return f"medembed-conv-autoencoder-{width}w-{bottleneck}d"


class AutoencoderEncoder(Encoder):
    """A trained autoencoder saved in `weights` (a directory with model.json and model.safetensors)."""

    name = KIND

    def __init__(self, weights: str) -> None:
        self.weights = Path(weights)
        config = read_json(self.weights / CONFIG_FILE, "autoencoder model.json")
        try:
            if config["kind"] != KIND:
                raise EncoderError(f"{self.weights / CONFIG_FILE}: a saved {config['kind']!r} model, not an autoencoder")
            self.width, self.dim = int(config["options"]["width"]), int(config["options"]["bottleneck"])
            self.preprocess = PreprocessSpec.from_dict(config["preprocess"])
            self.revision = str(config["revision"])
        except (KeyError, TypeError, ValueError) as error:
            raise EncoderError(f"{self.weights / CONFIG_FILE}: not an autoencoder's model.json ({error!r})") from None
        self.model_id = model_id(self.width, self.dim)
        self.embedding_kind = "bottleneck_global_avg_pool"
        self._model: ConvAutoencoder | None = None

    def load(self, device: torch.device) -> None:
        network = ConvAutoencoder(self.width, self.dim)
        try:
            network.load_state_dict(load_file(str(self.weight_files()[0])), strict=True)
        except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise EncoderError(f"{self.weight_files()[0]}: not this autoencoder's weights ({error})") from None
        self._model = freeze(network, device)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 1, S, S]` grey pixels in [0, 1] -> `[B, bottleneck]` float32."""
        eight_bit = pixels.float().mul(255).round().div(255)  # what the training cache fed the network
        return self._require_loaded(self._model).embed(eight_bit).float()

    @classmethod
    def levels_help(cls) -> str:
        return "stage1..stage3 (the first three stride-2 stages), final (the bottleneck map, size/16 on a side)"

    def level_names(self) -> list[str]:
        return [*(f"stage{stage}" for stage in range(1, LEVELS)), FINAL]

    def level_map_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(channels, side, side) after each stride-2 stage."""
        channels = [self.width * 2**stage for stage in range(LEVELS - 1)] + [self.dim]
        size = self.preprocess.size
        return {name: (c, size // 2 ** (stage + 1), size // 2 ** (stage + 1)) for stage, (name, c) in enumerate(zip(self.level_names(), channels))}

    def level_maps(self, pixels: torch.Tensor, names: set[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The embedding and the maps after the stages `names` asks for (each stage: conv, batch norm, ReLU)."""
        x = pixels.float().mul(255).round().div(255)
        layers = list(self._require_loaded(self._model).encoder)
        maps = {}
        for stage, name in enumerate(self.level_names()):
            for layer in layers[3 * stage : 3 * stage + 3]:
                x = layer(x)
            if name in names:
                maps[name] = x
        return x.mean(dim=(2, 3)).float(), maps

    def weight_files(self) -> list[Path]:
        return [self.weights / WEIGHTS_FILE]
