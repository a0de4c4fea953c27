"""How the conventional baselines train: the fine-tuned CNN and the convolutional autoencoder (both extend the
resources a baseline trains with). Stored in run.json / the store's encoder options, so a run is reproducible."""

from __future__ import annotations

from dataclasses import dataclass, field

from medembed.errors import MedembedError
from medembed.options import check_positive, from_dict, option
from medembed.options.protocol import ProtocolOptions

CNN_KIND = "cnn-efficientnet-lite0"  # the CNN baseline's scorer name in run.json


@dataclass
class TrainingResources:
    """Where and how a baseline trains; the CNN's and the autoencoder's options both extend it."""

    device: str = option("auto", "auto (CUDA when present, bf16), cpu, cuda or cuda:N.")
    num_workers: int | None = option(None, "Image-decoding worker processes (default: one per CPU core).", flag="--workers")
    threads: int | None = option(None, "CPU threads for training (default: torch's); 1 is often fastest on a busy machine.")
    seed: int = option(0, "Seed of weight initialisation, shuffling and augmentation.")


@dataclass
class CNNOptions(TrainingResources):
    """How the CNN is trained; stored in run.json (as the options' head_params) so a run is reproducible."""

    # EfficientNet-Lite0 was trained at 224 px; CPUs need smaller. An epoch takes ~2 min for FracAtlas on 2 cores at 128 px.
    size: int = option(128, "Input side in pixels.")
    epochs: int = option(5, "Most epochs; early stopping on val AUROC may end sooner.")
    patience: int = option(2, "Epochs without a better val AUROC before stopping.")
    batch_size: int = option(32, "Images per training step.")
    lr: float = option(3e-4, "AdamW learning rate.")
    weight_decay: float = option(1e-2, "AdamW's decoupled weight decay.")
    pos_weight: float | str = option(1.0, "BCE weight of abnormal images: a number, or 'balanced' (n_normal / n_abnormal of train).")
    augment: bool = option(True, "Random flip, rotation, zoom, shift, brightness and contrast while training.")

    def __post_init__(self) -> None:
        check_cnn_options(self)


def check_cnn_options(options: CNNOptions) -> None:
    """Refuse CNN options that cannot train, in one line."""
    for name in ("size", "epochs", "patience", "batch_size"):
        if getattr(options, name) < 1:
            raise MedembedError(f"CNN option {name} must be a positive integer, got {getattr(options, name)}")
    if options.size < 32:
        raise MedembedError(f"CNN input size {options.size} px is too small for EfficientNet's 32x downsampling; use 32 or more")
    if options.lr <= 0:
        raise MedembedError(f"CNN learning rate must be positive, got {options.lr}")
    if options.pos_weight != "balanced" and not (isinstance(options.pos_weight, (int, float)) and options.pos_weight > 0):
        raise MedembedError(f"pos_weight must be a positive number or 'balanced', got {options.pos_weight!r}")


@dataclass
class AutoencoderOptions(TrainingResources):
    """How the autoencoder is built and trained; stored in the store's `encoder_options` attribute."""

    # An epoch takes ~35 s for FracAtlas on a 2-core CPU at 128 px; width 32 is 2.5x slower than 16.
    size: int = option(128, "Input side in pixels (a multiple of 16).")
    width: int = option(16, "Channels after the first convolution (doubled per stage).")
    bottleneck: int = option(256, "Bottleneck channels = embedding dimension.")
    epochs: int = option(15, "Most epochs; early stopping on val loss may end sooner.")
    patience: int = option(3, "Epochs without a lower val loss before stopping.")
    batch_size: int = option(64, "Images per training step.")
    lr: float = option(1e-3, "AdamW learning rate.")
    weight_decay: float = option(1e-4, "AdamW's decoupled weight decay.")
    store_dtype: str = option("float32", "Store dtype of the embeddings: float16 | float32.", flag="--dtype")


@dataclass
class CNNRunOptions(ProtocolOptions):
    """What a CNN baseline run records as its options: the protocol's, and the CNN's own as `head_params` of the
    `head` it is (one seed), the shape every run kind's options share in run.json."""

    head: str = CNN_KIND
    head_params: dict = field(default_factory=dict)
    seeds: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head != CNN_KIND:
            raise MedembedError(f"option head of a CNN run must be {CNN_KIND!r}, got {self.head!r:.60}")
        check_positive("seeds", self.seeds)
        from_dict(CNNOptions, self.head_params, "option head_params")

    @property
    def cnn(self) -> CNNOptions:
        """The CNN's training options."""
        return CNNOptions(**self.head_params)
