"""medembed: abnormality detection in musculoskeletal radiographs with frozen foundation-model embeddings.

The library is importable without the CLI's dependencies (typer, tqdm). Data flows one way:
manifest -> images -> encoders -> store -> extract -> heads -> calibrate -> evaluate -> report -> fit -> predict;
zeroshot, robustness, baselines and sweep build on that chain.
"""

__version__ = "0.1.0"
