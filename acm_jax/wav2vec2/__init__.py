"""The Wav2Vec2 family: model (`model`), Hugging Face import (`hf`), FLOPs per second
of audio (`flops`), CTC (`ctc`), speech data (`data`, `synth`, `commonvoice`) and the
speech task (`task`). Importing the package registers its parameter names with the
sharding rules."""

from acm_jax import sharding

sharding.register_param_rules((
    # feature encoder convs (width, in, out), projection, positional conv
    (r"(^|/)feature_encoder/conv_\d+/kernel$", (None, None, "conv_out")),
    (r"(^|/)feature_encoder/conv_\d+/bias$", ("conv_out",)),
    (r"(^|/)projection/kernel$", (None, "embed")),
    (r"(^|/)projection/bias$", ("embed",)),
    (r"(^|/)pos_conv/conv/kernel$", (None, None, "embed")),
    (r"(^|/)pos_conv/conv/bias$", ("embed",)),
    (r"(^|/)masked_spec_embed$", ("embed",)),
))
