"""acm-jax: Adaptive Computation Modules in JAX/Flax.

Library entry points: `acm_jax.acm` (the ACM as pure functions and a Flax shell),
`acm_jax.acmize` (dense parameters -> ACM parameters, for any Flax model through
`acmize.acmize_model`), `acm_jax.losses`, `acm_jax.train.steps` (one pure step per
phase), `acm_jax.inference` (the sorted kernel path). Model families: `acm_jax.vit`,
`acm_jax.wav2vec2`.
"""

__version__ = "0.1.0"
