"""Transformer encoder pieces shared by the ViT and Wav2Vec2 models.

Each replaceable block (the MLP, and the q/k/v/o projections) is either a dense
layer or an `acm.ACM`, chosen by the `acm` config. Dense replaceable blocks sow
their (input, output) pair into the "record" collection when it is mutable: that
is what module-wise distillation and gate labelling train on.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from acm_jax import acm as acm_lib
from acm_jax import inference

PROJECTIONS = ("query", "key", "value", "out")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
_HALF = (jnp.bfloat16, jnp.float16)
# cuDNN's fused attention refuses odd lengths when differentiated (jax 0.11: "Unsupported
# sequence length Q 197, KV 197" in a ViT-B/16 training step), so under differentiation
# `attend` pads to a multiple of this
CUDNN_LENGTH_MULTIPLE = 2


def check_attention_impl(impl: str) -> str:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ATTENTION_IMPLS}")
  return impl


def resolve_attention_impl(impl: str, dtype, head_dim: int, masked: bool) -> str:
  """"auto": cuDNN's fused (flash) attention where it applies (a GPU, bfloat16 or
  float16, head_dim a multiple of 8 up to 128, no mask), else XLA's softmax(q k^T) v."""
  check_attention_impl(impl)
  if impl != "auto":
    return impl
  fits = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in _HALF and head_dim % 8 == 0
          and head_dim <= 128 and not masked)
  return "cudnn" if fits else "xla"


def _cudnn_padded(q, k, v):
  """cuDNN attention on lengths padded to CUDNN_LENGTH_MULTIPLE: padded keys are cut off
  by the sequence lengths, padded queries sliced away."""
  tokens = q.shape[1]
  pad = -tokens % CUDNN_LENGTH_MULTIPLE
  q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
  lengths = jnp.full((q.shape[0],), tokens, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths)
  return out[:, :tokens]


@jax.custom_vjp
def _cudnn_odd_length(q, k, v):
  # not differentiated (inference): cuDNN runs odd lengths as they are, which measured
  # ~10% faster for a whole ViT-B/16 than the padded, length-masked call
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def _cudnn_odd_length_fwd(q, k, v):
  return jax.vjp(_cudnn_padded, q, k, v)


def _cudnn_odd_length_bwd(vjp, grad):
  return vjp(grad)


_cudnn_odd_length.defvjp(_cudnn_odd_length_fwd, _cudnn_odd_length_bwd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
           impl: str = "auto") -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v over (batch, length, heads, head_dim) arrays."""
  impl = resolve_attention_impl(impl, q.dtype, q.shape[-1], mask is not None)
  if impl == "cudnn":
    if jnp.dtype(q.dtype) not in _HALF:
      raise ValueError(f"attention 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")
    if q.shape[1] % CUDNN_LENGTH_MULTIPLE == 0:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    if mask is not None:
      raise ValueError(f"attention 'cudnn' with a mask needs a length divisible by {CUDNN_LENGTH_MULTIPLE}, "
                       f"got {q.shape[1]}; use 'xla'")
    return _cudnn_odd_length(q, k, v)
  return nn.dot_product_attention(q, k, v, mask=mask)


def _record(module: nn.Module, x: jax.Array, y: jax.Array) -> None:
  module.sow("record", "io", (x, y), init_fn=tuple, reduce_fn=lambda _, new: new)


class Linear(nn.Module):
  """A dense projection that records its input/output for distillation."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, **_) -> jax.Array:
    y = nn.Dense(self.features, name="dense", dtype=x.dtype)(x)
    _record(self, x, y)
    return y


class Mlp(nn.Module):
  """The dense block an ACM replaces: fc2(act(fc1(x)))."""
  mlp_dim: int
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array, **_) -> jax.Array:
    hidden = nn.Dense(self.mlp_dim, name="fc1", dtype=x.dtype)(x)
    y = nn.Dense(x.shape[-1], name="fc2", dtype=x.dtype)(acm_lib.get_activation(self.activation)(hidden))
    _record(self, x, y)
    return y


def make_mlp(dim: int, mlp_dim: int, activation: str, acm: acm_lib.ACMConfig | None,
             name: str) -> nn.Module:
  if acm is None:
    return Mlp(mlp_dim, activation, name=name)
  return acm_lib.ACM(dim, acm.num_learners, acm.mlp_learner_width(mlp_dim), activation,
                     acm.output_bias, acm.gate_depth, acm.gate_hidden, 0, acm.impl, name=name)


def make_projection(dim: int, acm: acm_lib.ACMConfig | None, name: str) -> nn.Module:
  if acm is None or not acm.attention:
    return Linear(dim, name=name)
  # attention projections are linear: identity learners, and they never skip (min choice 1)
  return acm_lib.ACM(dim, acm.num_learners, acm.attention_learner_width(dim), "identity",
                     acm.output_bias, acm.gate_depth, acm.gate_hidden, 1, acm.impl, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with separate (dim, dim) q, k, v, o projections."""
  num_heads: int
  acm: acm_lib.ACMConfig | None = None
  impl: str = "auto"  # see `attend`

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, **acm_args) -> jax.Array:
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f"dim {dim} is not divisible by num_heads {self.num_heads}")
    qkv = [make_projection(dim, self.acm, name) for name in PROJECTIONS[:3]]
    if self._grouped(qkv, acm_args):
      # one fused launch sequence for the three ACMs that read x (see `inference.acm_group_apply`)
      specs = [proj(x, **{**acm_args, "mode": acm_lib.GROUP_INPUTS}) for proj in qkv]
      (q, k, v), choices = inference.acm_group_apply(
          x, specs, num_learners=self.acm.num_learners, activation="identity", min_choice=qkv[0].min_choice,
          cost_shift=acm_args.get("cost_shift", 0.0))
      for proj, choice in zip(qkv, choices):  # each ACM's statistics, as its own call would sow them
        proj.sow("acm", "choice", jax.nn.one_hot(choice, self.acm.num_learners + 1, dtype=jnp.float32))
    else:
      q, k, v = (proj(x, **acm_args) for proj in qkv)
    split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, dim // self.num_heads)
    context = attend(split(q), split(k), split(v), mask, self.impl)
    context = context.reshape(*x.shape[:-1], dim)
    return make_projection(dim, self.acm, "out")(context, **acm_args)

  def _grouped(self, projections: list[nn.Module], acm_args: dict) -> bool:
    """q/k/v run as one group at inference: ACMs on the fused path, gate argmax, no forced k."""
    return (all(isinstance(p, acm_lib.ACM) for p in projections) and acm_lib.fused_impl(self.acm.impl)
            and acm_args.get("mode", "argmax") == "argmax" and not acm_lib.forcing() and not self.is_initializing())


class EncoderBlock(nn.Module):
  """Pre-LN (x + f(LN(x))) or post-LN (LN(x + f(x))) transformer block."""
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  pre_norm: bool = True
  acm: acm_lib.ACMConfig | None = None
  attention: str = "auto"  # attention implementation, see `attend`

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, **acm_args) -> jax.Array:
    norm = lambda name: nn.LayerNorm(self.layer_norm_eps, name=name, dtype=x.dtype)
    attn = Attention(self.num_heads, self.acm, self.attention, name="attn")
    mlp = make_mlp(x.shape[-1], self.mlp_dim, self.activation, self.acm, "mlp")
    if self.pre_norm:
      x = x + attn(norm("ln1")(x), mask, **acm_args)
      return x + mlp(norm("ln2")(x), **acm_args)
    x = norm("ln1")(x + attn(x, mask, **acm_args))
    return norm("ln2")(x + mlp(x, **acm_args))


def replaceable_paths(depth: int, acm: acm_lib.ACMConfig | None, with_attention: bool | None = None,
                      prefix: str = "") -> list[str]:
  """'/'-joined parameter paths of the blocks that are (or become) ACMs."""
  if acm is None:
    return []
  attention = acm.attention if with_attention is None else with_attention
  paths = []
  for b in acm.block_indices(depth):
    paths.append(f"{prefix}block_{b}/mlp")
    if attention:
      paths.extend(f"{prefix}block_{b}/attn/{p}" for p in PROJECTIONS)
  return paths
