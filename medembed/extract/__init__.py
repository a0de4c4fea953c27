"""Stage 1 on the GPU box: a manifest's images through the frozen encoder into the embedding store (decoding
workers, device-side preprocessing, the overlapped loop, the batch size search, sharding and resume)."""
