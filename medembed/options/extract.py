"""How `extract` (and `predict`, which extracts its inputs) runs the encoder: batch, workers, device, precision,
store dtype, and which manifest paths it accepts. Standard library only, so every command's --help starts fast."""

from __future__ import annotations

from dataclasses import dataclass

from medembed.errors import MedembedError
from medembed.options import check_choice, check_positive, option

AUTO = "auto"
PRECISIONS = ("bf16", "fp16", "fp32")  # autocast precisions a fingerprint records
DTYPES = ("float16", "float32")  # what a store holds
CUDA_BATCH, CPU_BATCH = 128, 4
PREPROCESS_PLACES = ("auto", "device", "workers")


def check_batch_size(value: object) -> None:
    """Refuse anything but None, "auto" or a positive integer, in one line."""
    if value is None or value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MedembedError(f"option batch_size must be a positive integer or 'auto'; got {value!r}")


@dataclass
class ExtractOptions:
    """How to run the encoder. Defaults suit both a CPU laptop and one GPU."""

    batch_size: int | str | None = option(None, f"Images per forward pass, or 'auto': the largest that fits the GPU with a margin (searched once, cached; on a CPU the CPU default). Default: {CUDA_BATCH} on CUDA, {CPU_BATCH} on CPU, where small batches stay in cache.", flag="-b")
    num_workers: int | None = option(None, "Decoding worker processes (default: every core but one on a GPU box; a quarter of the cores on a CPU, none on 2 cores).", flag="--workers -j")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    precision: str = option("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32; recorded in the store's fingerprint.")
    store_dtype: str = option("float16", "Store dtype: float16 | float32.", flag="--dtype")
    compile: bool = option(False, "torch.compile the encoder (GPU, long runs); on CUDA with CUDA graphs, every batch padded to one static shape.")
    preprocess_on: str = option("auto", "Where pad/resize/normalise run: device (the model's, from compact pixels the workers decode), workers (decoding workers, float32 tensors), or auto (the device, on CUDA and on a CPU alike: faster on both in tests/benchmarks/bench_extract.py; corrupted variants preprocess in the workers).")
    profile: bool = option(False, "Print the per-stage timing table (decode wait, H2D, preprocess, model, D2H, write) and write it beside the store as <out>.profile.json.")
    retry_failed: bool = option(False, "Try again the images an earlier run listed as failed.")
    limit: int | None = option(None, "Embed at most this many new images (smoke tests, benchmarks).")
    allow_absolute: bool = option(False, "Accept absolute paths in the manifest (kept as they are instead of joined to --root).")
    allow_outside_root: bool = option(False, "Accept relative manifest paths whose '..' lead outside --root.")

    def __post_init__(self) -> None:
        check_batch_size(self.batch_size)
        check_choice("preprocess_on", self.preprocess_on, PREPROCESS_PLACES)
        check_positive("num_workers", self.num_workers, minimum=0, allow_none=True)
        check_positive("limit", self.limit, minimum=0, allow_none=True)
        check_choice("precision", self.precision, ("auto", *PRECISIONS))
        check_choice("store_dtype", self.store_dtype, ("float16", "float32"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise MedembedError(f"option device must be auto, cpu, cuda or cuda:N; got {self.device!r}")


# ExtractOptions fields that `predict` and `evaluate --corrupt` get no flag for: they re-read images with a run's own
# encoder into a cache store, and the run fixes what its embeddings are (score_images sets precision and
# store_dtype from the run's fingerprint); --profile, --retry-failed and --limit are about writing a store.
RUN_FIXED = ("precision", "store_dtype")
STORE_WRITING = ("profile", "retry_failed", "limit")
# predict's inputs are re-expressed relative to their common folder (absolute paths are taken as given), so the
# path checks have nothing to refuse; evaluate --corrupt reads the run's own manifest under --root as extract did,
# and keeps --allow-absolute and --allow-outside-root for a manifest that needed them there.
PREDICT_EXTRACT_SKIPS = RUN_FIXED + STORE_WRITING + ("allow_absolute", "allow_outside_root")
EVALUATE_EXTRACT_SKIPS = RUN_FIXED + STORE_WRITING
