"""The conventional baselines foundation-model embeddings are compared with, under `medembed fit`'s protocol.

- `cnn`: EfficientNet-Lite0 (ImageNet weights) fine-tuned end to end (`CNNScorer`, `load_cnn`); the workflow
  that trains it under the protocol and writes its run directory is `medembed.baseline.run_cnn_baseline`.
- `autoencoder`: a convolutional autoencoder trained on the train images; its bottleneck features go to a
  regular embedding store that `medembed fit` takes like any other (`run_autoencoder_baseline`,
  `load_autoencoder`).
- `augment`: training-time augmentation in plain torch; `_data` (checked manifest, decode-once image cache)
  and `_training` (seeding, early stopping, weights on disk) are shared by both.

Submodules are imported explicitly (`from medembed.scorers.baselines.cnn import CNNScorer`), so importing one
baseline does not load the other.
"""
