"""The conventional baselines foundation-model embeddings are compared with, under `medembed fit`'s protocol.

- `cnn`: EfficientNet-Lite0 (ImageNet weights) fine-tuned end to end; writes a run directory like a fit run's
  (`run_cnn_baseline`, `load_cnn`).
- `autoencoder`: a convolutional autoencoder trained on the train images; its bottleneck features go to a
  regular embedding store that `medembed fit` takes like any other (`run_autoencoder_baseline`,
  `load_autoencoder`).
- `augment`: training-time augmentation in plain torch; `_data` (checked manifest, decode-once image cache)
  and `_training` (seeding, early stopping, weights on disk) are shared by both.

Submodules are imported explicitly (`from medembed.scorers.baselines.cnn import run_cnn_baseline`), so importing one
baseline does not load the other.
"""
