"""The Vision Transformer family: model (`model`), FLOP count (`flops`), checkpoint
formats (`checkpoints`, `formats`, `export`), the image task (`task`) and the
baselines. Importing the package registers its parameter names with the sharding rules."""

from acm_jax import sharding

sharding.register_param_rules((
    # patch embedding (p, p, 3, dim), class token, position table
    (r"(^|/)embedding/kernel$", (None, None, None, "embed")),
    (r"(^|/)embedding/bias$", ("embed",)),
    (r"(^|/)cls$", (None, None, "embed")),
    (r"(^|/)pos_embedding$", (None, None, "embed")),
))
