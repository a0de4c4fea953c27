"""Stage 0, the images: manifests (one row per image, the builders for MURA, FracAtlas and your own folders or CSVs,
validation), decoding radiographs of every format to grey pixels, and the corruptions that simulate another site."""
