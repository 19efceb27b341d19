"""The Vision Transformer family: model, FLOP count, checkpoint formats, image task, baselines."""
