"""A group of ACMs reading one input, gate included, in three or four launches.

A *group* is G ACMs that read the same tokens x (the q, k and v projections of an
attention layer: G = 3; an MLP: G = 1). For each ACM g of the group and token t:

    k_g(t)   = argmax_{min_choice <= j <= N} (gate_g(x_t)[j] - shift * j * h / d)
    out_g(t) = sum_{n < k_g(t)} act(x_t @ w1_g[:, n] + b1_g[n]) @ w2_g[n] + sum_{j <= k_g(t)} b2_g[j]

which is `acm.acm_apply` at the gate's argmax (`acm.ACM` in mode "argmax").
The whole path is these launches, each with the ACM index in its grid, so a
group of three costs what one ACM costs in launches:

  route    one program per (ACM, chunk of 128 tokens; 32 up to
           ROUTE_SMALL_MAX_TOKENS, 64 up to ROUTE_MEDIUM_MAX_TOKENS, see
           ROUTE_SMALL and ROUTE_MEDIUM), or, above 8,192 tokens, per chunk
           for a whole group (ROUTE_SHARED_MIN_TOKENS): the gate logits (a
           linear gate is a matmul inside the kernel; deeper gates come as
           precomputed logits), k, and for the sorted path each chunk's count
           of every k and each token's rank among the chunk's tokens with the
           same k (a triangular 0/1 matmul).
  scatter  (sorted path only) one program per (ACM, chunk): a token's place in
           the descending order is (tokens with a larger k) + (same k in earlier
           chunks) + its rank; writes the permutation and the sorted k. Up to
           INLINE_SORT_MAX_TOKENS (2,048: batches 2-8 of ViT-B/16) there is no
           scatter launch: each route program reserves its tokens' places with
           one atomic add on its ACM's counters of every k and files them there
           (INLINE_SORT_PLACE "atomic"), and every up program reads its rows'
           tokens from those places and the totals.
  up       one program per (ACM, row block, hidden tile): act(x @ w1 + b1) on the
           rows (gathered through the permutation), masked to each row's k; a
           tile past its row block's largest k returns at once.
  down     one program per (ACM, row block, output tile): a reduction loop that
           stops at the row block's largest k, the cumulative output bias of
           each row's k, and the rows scattered back to their tokens.

Sorting pays when blocks of tokens would otherwise all run to their largest k;
below `SORT_MIN_TOKENS` tokens the heuristic takes the unsorted path (route, up,
down: the row blocks in token order). On Hopper the tuned table `TUNED` overrides it:
sorted from two images on (the whole ViT-B/16 ran faster sorted at 8 images: H200,
2026-12-02; unsorted lost 7.4-7.6% there on an H100), unsorted at one image, whose row
blocks fit in one wave of programs, so that sorting only added the scatter launch (H100,
2026-12-07 (xix); sorted had won at one image too before the split down launch).
Either way the result is the same function.

The one-launch path (`onepass`, at most `ONEPASS_MAX_TOKENS` tokens; off by default
until a GPU run shows where it pays) does everything in one program per (ACM, row
block, hidden tile): the gate and k of its rows, its hidden tile (never written to
memory), that tile's share of the down projection, added in float32 with atomic
adds into zeroed outputs, and (for hidden tile 0) the output bias. One launch and no
hidden buffer per group, at the price of summation order: the float32 sums are not
bit-reproducible from run to run.

The two-launch path (`twolaunch`, at most `TWOLAUNCH_MAX_TOKENS` tokens; off by default
until a GPU run shows where it pays) is the unsorted path without the route launch: every
up program computes the gate and k of its row block itself (a (rows, d) x (d, 16) matmul
beside its (rows, d) x (d, block_hidden) one), and the programs of hidden tile 0 store k
for the down launch. At batch 1-8 a launch costs about what the kernels' work does. Its down
launch splits its reduction as the routed paths' does (below), so at one image a group costs three
launches (gated up, split down, the sum's XLA fusion) where the sorted path takes five.

The dense XLA path (`xla`, picked per token bucket and shape by the tuned table) is the
same function without kernels: one cuBLAS matmul for the gates of the whole group, one
for the up projections of all its learners, the hidden units past each token's k masked
to zero, one matmul per ACM for the down projection. It saves no arithmetic; it is there
for the shapes where the learner kernels lose to cuBLAS by more than the skipped
learners gain (the low-rank q/k/v projections, whose learners of 96 make short kernels),
and it runs every group whose d or total learner width is not a multiple of 16 (no Triton
tile fits) unless a kernel path or tiles are asked for by name.

The merged path (`merged=True`, or groups that carry `merge_linear_learners` tables) serves
linear learners (identity activation, the attention projections): h(x, k) = x @ M_k + c_k, so
the up and down launches become one select launch, one (d, d) product per choice present in a
row block, sorted or not, or with the gate inside it (one launch in all). It does the dense
projection's arithmetic whatever k is; on an H200 it beat the factored kernels only at a few
hundred to ~1,600 tokens, and lost from 6,304 on (benchmarks/RESULTS.md, 2026-12-03 (f)), so
nothing in the model passes the tables yet.

A group that reads LayerNorm(x) (the MLP and the q/k/v projections of a pre-LN block) can take
x and the LayerNorm's parameters instead (`acm_group(..., norm=...)`): on the routed paths the
normalised activations then never exist in memory. The route launch computes each token's mean
and inverse standard deviation, feeds its gate the normalised rows (rounded to x's dtype, as the
LayerNorm's output is), and stores the two statistics. The up launch then takes one of two forms
(`NORM_MODE`): "fold" multiplies raw x by w1 with the scale folded in, and its epilogue finishes
the normalisation per row,

    LN(x) @ w1 + b1 = rstd * (x @ (scale * w1)) - mean * rstd * colsum(scale * w1) + (b1 + bias @ w1),

which leaves the matmul loop as it is but costs two small XLA fusions over w1 per call (`fold_norm`);
"prologue" normalises each (rows, block_k) block of x in registers before its matmul, as the
route launch does, which adds work inside the loop and nothing outside it. Either saves XLA's
passes that write the normalised copy of x (read x, write LN(x)) per group. Likewise a group whose
output feeds a skip connection can take the residual (`residual`), which the down launch adds
before its one rounding (`RESIDUAL_MIN_TOKENS`), so that XLA's add never reads the ACM's output.

At few tokens the down launch splits its reduction (`DOWN_SPLIT_MAX_TOKENS`, 1,600 by default): per learner
up to `DOWN_SPLIT_PER_LEARNER_MAX_TOKENS` (1,024) tokens, in pairs of consecutive learners above. N (or N / 2)
times as many programs, each looping over its part's hidden units only, write float32 partial outputs that
one XLA fusion sums per token up to its k, with the output bias and the residual (or, with `DOWN_SPLIT_SUM`
"atomic", add them into one float32 buffer per ACM, which that fusion finishes). `DOWN_SPLIT_PARTS` fixes the
number of parts at every token count.

The regions path (`mgpu_regions=True`, one ACM per group, Hopper; off by default until timed,
`MGPU_REGIONS_MIN_TOKENS`) lets the up launch read contiguous rows by TMA, which Hopper cannot do
for rows gathered by index. The route places the tokens by atomic counters (as the inline sort's
"atomic" placement) and also copies each token's row of x to its k's region of a ((N + 1) * padded,
d) buffer, at row (N - k) * padded + its place: regions, not one sorted order, because a route program
knows a token's place inside its category but not where the category starts. The up launch is
`acm_mgpu.up_regions` (warp-specialised, TMA and wgmma, a persistent walk over each region's row
blocks up to its k, derived from the counts inside the kernel, so no tile list and no masking: every
row of a block has the same k), and the Triton down launch walks the same row blocks and scatters
each row to its token (`_region_block`). Per call it saves the scatter launch, the sort's gathers
of x and the Triton up launch's row gathers, for one more pass of x (the route's copy, read from L2).

The gate logits inside the route kernel are rounded where a Flax Dense gate of
the same dtypes rounds (after the matmul and after the bias), so the argmax
agrees with the XLA gate except where float32 accumulation order moves a logit
across a rounding boundary. The output always equals `acm.acm_apply` at the k
this path returns (which it also returns).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.acm_mlp import (ACTIVATIONS, _activation_reference, _compiler_params, _kernel_activation,
                                    _largest_divisor, _precision, acm_mlp_reference, gpu_family)

GATE_COLS = 16  # gate logits padded to the smallest width of a Triton matmul
ROUTE_CHUNK = 128  # tokens per route / scatter program; every path pads the tokens to a multiple of it
# Most columns of x per step of a linear gate's matmul: the route's above ROUTE_MEDIUM_MAX_TOKENS, and the gate
# computed inside the up launch (the one- and two-launch paths).
GATE_BLOCK_K = 64
# Up to this many tokens (None: never) the route and scatter launches take ROUTE_SMALL["chunk"] tokens per
# program (a power of two from 16 to ROUTE_CHUNK), the gate's matmul ROUTE_SMALL["block_k"] columns of x per step
# (the largest power of two up to it dividing d) and ROUTE_SMALL["num_stages"] pipeline stages; above it,
# ROUTE_CHUNK, GATE_BLOCK_K and the up launch's stages. The padding stays a multiple of ROUTE_CHUNK, so the other
# launches are the same programs either way. At few tokens a route program is a chain of dependent loads: on an H100
# (2026-12-05 (vii), the route launch alone, profiler kernel time) chunks of 32 with 256-column steps and one
# stage took 4.4 us at 197 tokens and 5.1 us at 1,576, against 9.2-9.9 us with 128-token chunks, 64-column
# steps and 1 or 3 stages; 32 or 64 tokens per program with 64-column steps gained nothing (8.0-10.4 us).
ROUTE_SMALL_MAX_TOKENS: int | None = 2048
ROUTE_SMALL = {"chunk": 32, "block_k": 256, "num_stages": 1}
# Above ROUTE_SMALL_MAX_TOKENS and up to this many tokens (None: never), the route takes ROUTE_MEDIUM's settings
# (same keys and rules as ROUTE_SMALL). On an H100 (2026-12-05 (ix), whole ViT-B/16 with MLP ACMs, r = 0.5, batch
# 32 = 6,304 tokens, same-process A/B `benchmarks.switch_ab`) chunks of 64 with 256-column steps and one stage made
# the forward 1.035x faster than the large-token settings (128-token chunks, 64-column steps, 3 stages), and 1.014x
# faster than chunks of 32 (197 programs there, more than one wave on 132 SMs; 64-token chunks make 99).
ROUTE_MEDIUM_MAX_TOKENS: int | None = 8192
ROUTE_MEDIUM = {"chunk": 64, "block_k": 256, "num_stages": 1}
# From this many tokens on (None: never), a group of several ACMs with linear gates (the q/k/v group) routes in one
# program per chunk that computes every ACM's gate from one pass over the chunk's x (and, with the LayerNorm fused,
# one set of row statistics), instead of one program per (ACM, chunk) that each read the chunk again
# (`route_shared`). Same outputs. On an H100 (2026-12-05 (ix), whole ViT-B/16 with MLP + q/k/v/o ACMs, r = 0.5,
# same-process A/B `benchmarks.switch_ab`) it made the forward 1.019x faster at batch 256 (50,432 tokens, where the
# route takes its large-token settings), but lost 1.1% at batch 32 (6,304 tokens, ROUTE_MEDIUM) and 3.8% at batch
# 8: at few tokens a program's three chained gates take about twice one gate's time (route launch alone, a group
# of 3: 9.9 against 4.9 us at 197 tokens, 10.3 against 6.4 us at 1,576; `benchmarks.route_bench --groups 3
# --shared 0,1`). So it starts just above ROUTE_MEDIUM_MAX_TOKENS.
ROUTE_SHARED_MIN_TOKENS: int | None = 8193
SORT_MIN_TOKENS = 1024  # below this many tokens the unsorted path runs (see module docstring)
# Up to this many tokens (None: never) the sorted path runs without its scatter launch: the route launch also
# writes each token to a slot of its (category, chunk, rank), and every up program derives the sorted order of its
# rows from the route's per-chunk category counts (`_inline_rows`); the programs of hidden tile 0 store the order
# and the rows' k for the down launch. One launch fewer per group (four at one image with the split down launch:
# route, up, down, the sum), for a few dependent loads and a small matmul per up program. Placed that way
# ("chunks" below) it lost on an H100 (2026-12-06 (xi), `benchmarks.switch_ab --variant
# "inline:INLINE_SORT_MAX_TOKENS=2048"`, r = 0.5): 0.972x / 0.975x the default at batch 1 / 8 with MLP ACMs,
# 1.020x / 0.968x with MLP + q/k/v/o. Placed by atomic counters it won at batch 8 (H100, 2026-12-07 (xx), 9
# alternating rounds, r = 0.5): 1.014x the scatter launch's path with MLP ACMs, 1.024x with MLP + q/k/v/o. At batch
# 32 it was 1.018x and 0.999x, so it stops at 2,048 tokens. The device time is the same (`serve_profile`, MLP ACMs,
# batch 8: 1.352 against 1.353 ms per forward; the up launch takes 1.8 us longer per layer, its rows no longer in
# token order inside a category, which is what the scatter launch's 2.5 us bought), so the gain is the launches:
# 188 against 199 per forward.
INLINE_SORT_MAX_TOKENS: int | None = 2048
# ... and from this many tokens on. At batch 2 (394 tokens) the scatter launch's path was 1.010x and 1.014x as fast
# as the atomic placement with MLP ACMs and 1.014x with MLP + q/k/v/o; at batch 4 (788 tokens) 1.003-1.005x, a tie
# (H100, 2026-12-07 (xxi), `benchmarks.switch_ab --batches 2,4`, 9-15 alternating rounds). So the inline sort covers
# the 2,048-token bucket alone (batches 3-8).
INLINE_SORT_MIN_TOKENS = 513
# For the shape kinds listed (`shape_kind`), the inline sort runs up to INLINE_SORT_WIDE_MAX_TOKENS tokens instead
# of INLINE_SORT_MAX_TOKENS (the larger bound wins). Kinds can differ here: at batch 32 (6,304 tokens) the atomic
# placement made the MLP ACMs' forward 1.018x faster and the q/k/v/o one 0.999x (H100, 2026-12-07 (xx), above).
# None listed: for the MLP ACMs alone at batch 32 it tied (H100, 2026-12-07 (xxiii), switch_ab, 9 rounds, r = 0.5:
# 1.002x), and per launch the group took 101.1 against 97.9 us (`group_profile`; the up launch 47.8 against 43.0).
INLINE_SORT_WIDE_KINDS: tuple[str, ...] = ()
INLINE_SORT_WIDE_MAX_TOKENS: int | None = 8192
# How the inline sort finds each token's place: "chunks" (above: the route files each token by (category, chunk,
# rank) and every up program searches the per-chunk counts for its rows, `_inline_rows`) or "atomic": each route
# program reserves its chunk's places in every category with one atomic add on that ACM's N + 1 counters (zeroed
# for each call), files its tokens there, and an up program reads the totals alone (`_atomic_rows`): no search,
# no per-chunk table. Inside a category the chunks' order is the atomics', so the sorted order changes from call
# to call; no output does (a row's products never depend on the other rows of its block; the test
# `test_group_matches_reference` runs both). `acm_group(..., inline_sort="atomic")` picks it per call; the
# default since 2026-12-07 (xx), timed above. The counters are float32 (exact up to 2^24 tokens): jax's Pallas
# Triton lowering (0.10-0.11) picks the atomic's op from the value's type and takes any tensor for a float, so an
# int32 vector add became `fadd` on the integers' bits (no count ever rose, and the up launch then read out of
# bounds: an illegal address on an H100, 2026-12-07 (xx)); a float add of small integers is exact.
INLINE_SORT_PLACES = ("chunks", "atomic")
INLINE_SORT_PLACE = "atomic"
# At most this many tokens take the one-launch path (see module docstring). Off: on an H200 (2026-12-01,
# `benchmarks.fused_tune --onepass`) it took 2.0-5.2x the dense block at 197 and 1,576 tokens for every tile
# choice (its float32 atomic adds of the hidden tiles' partial outputs), against 0.84-1.22x for the unsorted path.
ONEPASS_MAX_TOKENS = 0
# At most this many tokens take the two-launch path (the unsorted path with the gate computed
# inside the up kernel, see module docstring). Off: on an H100 (2026-12-06 (xi), `benchmarks.switch_ab --variant
# "twolaunch:TWOLAUNCH_MAX_TOKENS=2048"`, r = 0.5, with the split down launch) the whole model ran 0.955x / 0.878x
# the default at batch 1 / 8 with MLP ACMs, 0.996x / 0.881x with MLP + q/k/v/o: its row blocks in token order each
# run to their largest k.
TWOLAUNCH_MAX_TOKENS = 0
MAX_GROUP = 4
# With `residual` (the group's output goes into a skip connection, out = residual + ACM(x)), the down
# launch of the routed paths adds the residual rows in its epilogue from this many tokens on (None:
# never), saving XLA's separate add (read both, write the sum); elsewhere XLA adds them. None: on an
# H200 (2026-12-05, whole ViT-B/16, `benchmarks.vit_bench --residual-min-tokens 0`) it stayed within
# the run-to-run spread at batches 32 and 256 (benchmarks/RESULTS.md).
RESIDUAL_MIN_TOKENS: int | None = None
# Up to this many tokens (None: never), the routed paths' whole down launch adds the output bias from b2 itself, a
# loop over the choices (`_choice_bias`), instead of gathering from the cumulative table b2[0] + ... + b2[j] that XLA
# computes before the launch. The table costs one small kernel per ACM per forward (48 `loop_reduce_window`
# fusions in a ViT-B/16 with q/k/v/o ACMs; the MLP ACMs' split launch folds it into its sum), which may matter
# where a forward is mostly launches. At 50,432 tokens the loop made the launch 0.27 instead of 0.21 ms (H200,
# 2026-12-03). 512 (a ViT-B/16 batch of 1): on an H100 (2026-12-06 (xv), switch_ab, whole model, MLP + q/k/v/o ACMs,
# r = 0.5, one process per pair) the loop made the forward 1.070x and 1.027x as fast at batch 1 (197 tokens) and
# 0.932x at batch 8 (1,576 tokens), where the loop's cost outweighs one kernel less (benchmarks/RESULTS.md).
DOWN_BIAS_LOOP_MAX_TOKENS: int | None = 512
# With `norm` (the group reads LayerNorm(x), a pre-LN block), the routed kernel paths fuse the
# LayerNorm from this many tokens on (None: never): the route launch computes each token's mean and
# inverse standard deviation (and normalises x for the gate itself), the up launch normalises in the
# form NORM_MODE names ("fold" or "prologue", module docstring). Below it, and on every other path,
# the LayerNorm runs as XLA fusions first. None: on an H200 (2026-12-05, `benchmarks.vit_bench
# --norm-min-tokens 0`) it lost at batches 8 and 32 in both forms and was neutral at 256; the route's
# float32 statistics cost more than XLA's LayerNorm passes they replace (benchmarks/RESULTS.md).
NORM_MIN_TOKENS: int | None = None
# ... and up to this many tokens (None: no bound), for the shape kinds (`shape_kind`) listed. On an H100
# (2026-12-06, `benchmarks.switch_ab`, r = 0.5) the prologue form for every group lost with MLP ACMs at
# batches 1 and 8 (0.957x, 0.974x the default); for the q/k/v groups alone it tied at batches 1 and 8
# (1.040x, 1.013x: inside the rounds' spread) and lost at 32 (0.939x); the fold form lost everywhere.
NORM_MAX_TOKENS: int | None = None
NORM_KINDS = ("mlp", "proj")
NORM_MODES = ("fold", "prologue")
NORM_MODE = "fold"
# The sorted path's down launch as the warp-specialised Mosaic GPU kernel of `acm_mgpu` (bf16 on
# Hopper) from this many tokens on, for the shape kinds listed; None: never unless asked for
# (`acm_group(..., mgpu_down=True)`). Off: on an H200 (benchmarks/RESULTS.md, 2026-12-03) the kernel
# itself beats the Triton down launch (0.169 against 0.210 ms at 50,432 tokens, k/N 0.5), but the XLA
# gather of its sorted rows back to token order costs 0.058 ms more, which the Triton launch's own
# scatter does not.
MGPU_DOWN_MIN_TOKENS: int | None = None
MGPU_DOWN_KINDS = ("mlp",)
# At most this many tokens, the routed paths' down launch splits its reduction into parts (None: never): with one part
# per learner, one program per (row block, output tile, learner) instead of one per (row block, output tile) looping
# over every learner, so few tokens still fill the SMs and each loop is N times shorter. The programs write float32
# partial outputs (N x tokens x d), which one XLA fusion sums per token up to its k, with the output bias and the skip
# connection, before one rounding (`_down_split`). Per learner up to 1,024 tokens (batches 1-5 of a ViT-B/16): on an
# H100 (2026-12-05, `benchmarks.switch_ab`, whole model, each A/B in one process) it made the forward 1.07-1.14x
# faster in all six comparisons at batches 1 and 2 (MLP and MLP + q/k/v/o ACMs, r = 0.25 and 0.5), 1.06x at batch 4
# (788 tokens; 1.05x on an H200), 1.02x at batch 5 (985 tokens); it tied at batch 6 (1,182 tokens, 0.997x) and 8
# (0.96-1.00x) and lost at batch 32 (0.87x): there the float32 partials' traffic costs more than the longer loops
# (benchmarks/RESULTS.md, 2026-12-05 (iv) and (vi)).
# From 1,025 tokens on the launch takes pairs of learners (`DOWN_SPLIT_PER_LEARNER_MAX_TOKENS`), which is what raised
# this bound to 1,600 (batches 6-8): on an H100 (2026-12-05 (vii), switch_ab, whole model, MLP ACMs, r = 0.5) pairs
# beat the whole launch at batch 8 (1,576 tokens) in three runs (1.020x, 1.013x, 1.043x), tied at batches 6 and 7
# (1.014x and 0.996x; 0.956x and 1.007x), and lost at batch 9 (1,773 tokens, 0.979x) and 12 (2,364 tokens, 0.982x).
# Per learner at 1,576 tokens lost to the whole launch (0.973x H100, 0.956x H200).
DOWN_SPLIT_MAX_TOKENS: int | None = 1600
# Up to this many tokens (None: at every count up to DOWN_SPLIT_MAX_TOKENS) the split launch gives each learner
# its own part; above it, pairs of consecutive learners, where N is even (`split_parts`; half the programs and
# half the float32 partials: 9.7 instead of 19 MB per ViT-B/16 MLP layer at batch 8). Ignored where
# DOWN_SPLIT_PARTS is set.
DOWN_SPLIT_PER_LEARNER_MAX_TOKENS: int | None = 1024
# How the split launch's learners meet: "parts", float32 partial outputs per learner that XLA sums per token up to
# its k; or "atomic", float32 atomic adds of every learner's rows into one zeroed (padded rows, d) buffer that XLA
# then finishes (bias, skip connection, one rounding). At 1,576 tokens the parts are 19 MB written and read back
# per MLP layer; the buffer is 4.8 MB. A learner past a row's k adds zeros (the up launch masks those hidden
# units), so no per-token mask is needed; the float32 sums are not bit-reproducible from run to run, as the
# one-launch path's. "parts": on an H200 (2026-12-05 (vi), whole model, MLP ACMs, one process) the atomic form was
# slower than the parts at batch 8 (0.924 against 0.956 of the whole launch) and at batch 4 (1.010 against 1.054):
# the atomics contend where the parts' traffic does not.
DOWN_SPLIT_SUMS = ("parts", "atomic")
DOWN_SPLIT_SUM = "parts"
# Where that sum is rounded to x's dtype in memory: "sum", in the fusion that computes it (an optimization barrier
# keeps the rounded output as the value its readers load); "consumers", where XLA puts it. Left to itself, XLA
# writes the float32 sum (with the skip connection, the next block's residual stream) and moves the rounding into
# each reader: the next LayerNorm's statistics, its normalisation and the attention's skip connection, three
# reads of 4.8 instead of 2.4 MB per ViT-B/16 MLP layer at batch 8 and a write twice the size (optimised HLO,
# H100, 2026-12-06 (xiv)). "sum": with it the 11 float32 (1,576, 768) outputs of those fusions became bfloat16 ones,
# and on an H100 (switch_ab, whole model, one process per pair, 2026-12-06 (xiv)) the forward ran 1.019x / 1.016x
# (MLP ACMs, r = 0.5, batch 8 / 1), 1.010x / 0.992x (r = 0.25) and 1.034x (MLP + q/k/v/o, r = 0.5, batch 8), 1.002x /
# 1.040x (r = 0.25) as fast as with XLA's placement. Logits differ: XLA's readers skip the rounding where they convert
# back to float32 (its excess-precision simplification), so "consumers" is the one that departs from the model's dtype.
DOWN_SPLIT_ROUNDINGS = ("sum", "consumers")
DOWN_SPLIT_ROUNDING = "sum"
# Into how many parts the split launch cuts each row's reduction: None, by token count
# (`DOWN_SPLIT_PER_LEARNER_MAX_TOKENS`); an integer dividing N, parts of N / parts consecutive learners each at
# every token count. Fewer parts trade the split's shorter loops for less partial traffic.
DOWN_SPLIT_PARTS: int | None = None
# Who brings that launch's rows (in sorted order) back to token order: "xla", a gather fusion (then XLA adds
# the skip connection), or "kernel", one Triton launch (`_unsort_kernel`) that also adds the output bias and,
# when the group has one, the residual before a single rounding, so that the gather and the skip connection's
# add are one pass over the rows. "xla" until a GPU run (`benchmarks.vit_bench --mgpu-down-unsort kernel`)
# shows whether XLA already fuses the two (2026-12-04 (i) suggested it does not).
MGPU_DOWN_UNSORTS = ("xla", "kernel")
MGPU_DOWN_UNSORT = "xla"
# Overrides of `acm_mgpu.DownConfig` fields for that launch (tile_m: 128 where the up launch's row
# blocks allow, else 64).
MGPU_DOWN_TILES: dict = {}
# The sorted path's up launch as the warp-specialised Mosaic GPU kernel `acm_mgpu.up_projection` (x
# gathered into sorted order by XLA first) from this many tokens on, for the shape kinds listed; None:
# never unless asked for (`acm_group(..., mgpu_up=True)`). Its tiles: `acm_mgpu.DownConfig` with
# tile_m 128 and these overrides. None: on an H200 (2026-12-05) the kernel beat the Triton up launch
# (207 against 253 us at 50,432 tokens, r = 0.5) but the gather of x it needs cost 54 us; the whole
# ViT-B/16 tied at batch 256 and lost at 32 (benchmarks/RESULTS.md, 2026-12-05 (ii)).
MGPU_UP_MIN_TOKENS: int | None = None
MGPU_UP_KINDS = ("mlp",)
MGPU_UP_TILES: dict = {}
# The sorted path with the tokens filed by k in regions (`acm_group(..., mgpu_regions=True)`), from MIN to MAX
# tokens (None: never / no upper bound) for the shape kinds listed: the route places each token by atomic
# counters (`INLINE_SORT_PLACE` "atomic") and also copies its row of x to its category's region, (N - k) * padded +
# place; the up launch is `acm_mgpu.up_regions` (TMA reads of contiguous rows, wgmma, warp specialisation; every
# row block one k, its tiles derived from the counts inside the kernel, `MGPU_UP_TILES` as its tiles); the Triton
# down launch walks the regions' row blocks and writes each row to its token (`_region_block`). No scatter
# launch, no gather of x, no tile list. One ACM per group (the MLP's). Off until timed on a GPU.
MGPU_REGIONS_MIN_TOKENS: int | None = None
MGPU_REGIONS_MAX_TOKENS: int | None = None
MGPU_REGIONS_KINDS = ("mlp",)


@dataclasses.dataclass(frozen=True)
class FusedConfig:
  """Tile sizes. block_hidden must divide N*h (tiles may straddle learners),
  block_k_down must divide block_hidden, block_k_up and block_out must divide d. The down launch takes
  its own row blocks and warps (block_rows_down, num_warps_down; None: the up launch's): its row blocks
  must divide the up launch's, so that each reads only hidden tiles its rows' up block wrote."""
  block_rows: int
  block_hidden: int
  block_out: int
  block_k_up: int
  block_k_down: int
  num_warps: int
  num_stages: int
  block_rows_down: int | None = None
  num_warps_down: int | None = None

  @property
  def down_rows(self) -> int:
    return self.block_rows_down or self.block_rows

  @property
  def down_warps(self) -> int:
    return self.num_warps_down or self.num_warps


# Token counts are bucketed by these upper bounds (a ViT-B/16 batch of 1, 2, 8, 32, and more).
TOKEN_BUCKETS = (256, 512, 2048, 8192, None)
# (token bucket, "mlp" | "proj") -> settings that differ from the heuristic below, for bf16 on
# Hopper; measured by `python3 -m benchmarks.fused_tune` (see benchmarks/RESULTS.md). "sort"
# picks the sorted or the unsorted path, "xla" the dense XLA path (`_acm_group_xla`).
_SERVING_MLP = dict(block_rows=64, block_out=128, block_hidden=128, num_warps=4, sort=True)  # 1-2 images
_SERVING_PROJ = dict(block_rows=64, block_out=64, block_hidden=128, num_warps=4, sort=True)
TUNED: dict[tuple[int | None, str], dict] = {
    # H200, jax 0.11.2, 2026-12-01. Batch 1 (<= 512 tokens): the queued-call tuning run
    # (benchmarks/results/fused_tune_h200.json); 2048 and 8192: the earlier run's choices, which
    # the whole model ran faster with at batch 8 and 32 (benchmarks/RESULTS.md, "tile tables").
    # 2026-12-02: the MLP ACMs sorted at batch 1 and 8 as well (whole model, paired with dense:
    # batch 8 0.946 -> 1.024x dense, batch 1 0.77 -> 0.83x; RESULTS.md, "the MLP ACMs sorted at serving batches").
    (512, "mlp"): _SERVING_MLP,
    (512, "proj"): _SERVING_PROJ,
    # 2026-12-07 (xviii), H100: up to 256 tokens (one image) the MLP ACM's up launch is a chain of 12 dependent
    # 64-column steps in about 60 programs, fewer than the SMs, so a deeper pipeline hides more of each load: 6
    # stages took the up launch from 9.3 to 7.8 us at 197 tokens, r = 0.5, and from 10.0 to 9.2 us at r = 1
    # (`benchmarks.group_profile`, profiler device time; the group from 24.6 to 23.2 and 25.9 to 25.5 us). They
    # need 144 KiB of shared memory, one program per SM, and lose where the programs outnumber the SMs: 394 tokens
    # at r = 1, 13.2 -> 15.0 us; 512 tokens at r = 1, 9.7 -> 12.7 us; 1,576 tokens (5 stages) 15.3 -> 18.2 us.
    # Hence a bucket of its own. The whole model at batch 1 cannot resolve ~1% (switch_ab, 21 rounds: 1.030x of
    # the 3-stage table; the same A/B's spread between calls is 5-8%). Those per-launch figures gave every token
    # one k (the pmf's mode; `fused_tune`'s gates until (xix)), the real case only at r = 1.
    # 2026-12-07 (xix), H100: one image unsorted, both kinds. Its few row blocks fit in one wave of programs, so
    # the launch lasts as long as its largest-k block either way, and sorting only adds the scatter launch and the
    # route's ranks. Whole model, MLP ACMs at r = 0.5 (`serve_profile`, device time per forward): 0.737 -> 0.727 ms
    # (scatter -19 us, route -5, up +15). `switch_ab` at batch 1: MLP + q/k/v/o 1.030x and 1.040x of sorted (9 and
    # 21 rounds), MLP ACMs 0.988x, 1.026x and 1.007x. At batch 8 unsorted lost 7.4-7.6% (up 15 -> 26 us per layer).
    (256, "mlp"): dict(_SERVING_MLP, num_stages=6, sort=False),
    (256, "proj"): dict(_SERVING_PROJ, sort=False),
    (2048, "mlp"): dict(block_rows=64, block_out=64, block_hidden=128, num_warps=4, sort=True),
    # 2026-12-07 (xxii), H200: the projections at 2,049-8,192 tokens (batch 32) on 256 columns out instead of
    # 128. At 6,304 tokens the q/k/v group's down launch went from 40.7 to 36.7 us (the group 87.5 -> 83.5 us,
    # `group_profile --kind proj`), and the whole model, MLP + q/k/v/o, ran 1.020x (r = 0.5) and 1.021x
    # (r = 0.25) as fast (switch_ab, 11 rounds). Above 8,192 tokens the same tiles lost (down 237 -> 346 us).
    # 2026-12-07 (xxiii), H100: and 32-unit reduction steps in the down launch instead of 64, so that a row block's
    # loop ends nearer its k x 96 columns: the down launch 37.8 -> 35.3 us, the group 86.6 -> 83.9 us at 6,304 tokens
    # (`group_profile --kind proj`); whole model, MLP + q/k/v/o, r = 0.5: 1.028x (switch_ab, 9 rounds). At 50,432
    # tokens the same steps lost (down 249.6 -> 268.2 us), so the (None, "proj") entry keeps 64.
    (8192, "proj"): dict(block_rows=128, block_out=256, block_hidden=128, block_k_down=32, num_warps=8, sort=True),
    # 2026-12-06 (xv), H100: the MLP ACMs at 2,049-8,192 tokens (batch 32) on 128-row blocks and 8 warps instead of
    # the heuristic's 64 and 4: whole model 1.024x and 1.020x as fast at r = 0.5, 0.990x and 1.007x at r = 0.25
    # (switch_ab, one process per pair; benchmarks/RESULTS.md). Other tiles at batches 1 and 8 lost or were noise.
    # 2026-12-07 (xxii): and 128-unit reduction steps in the down launch instead of 64. At 6,304 tokens the down
    # launch went from 41.7 to 39.1 us on an H100 and from 41.1 to 39.0 us on an H200 (`group_profile --kind mlp`);
    # whole model on the H100, MLP ACMs at batch 32: 1.019x as fast at r = 0.5 and at r = 0.25 (switch_ab, 9 rounds).
    # 2026-12-07 (xxiii), H100: the down launch on row blocks of its own, 64 rows on 4 warps with 64-unit steps,
    # under the up launch's 128 rows: down 39.2 -> 37.0 us at 6,304 tokens, the group 97.9 -> 96.3 us (64 rows
    # with 128-unit steps lost: 46.4 us); whole model, MLP ACMs, r = 0.5: 1.017x (switch_ab, 9 rounds).
    (8192, "mlp"): dict(block_rows=128, block_out=128, block_hidden=128, block_k_down=64, num_warps=8,
                        block_rows_down=64, num_warps_down=4, sort=True),
    # 2026-12-04 (ii): more than 8,192 tokens, the q/k/v group retuned with the kernels of today (bias table
    # gather, shared helpers): 64-row blocks on 4 warps take the group from 0.545 to 0.481 ms at 50,432 tokens
    # (benchmarks/results/fused_combo_h200.json), and the whole model, MLP + q/k/v/o at batch 256, from
    # 1.081 to 1.142x dense (r = 0.5) and 1.261 to 1.362x (r = 0.25) (RESULTS.md, 2026-12-04 (ii)).
    (None, "proj"): dict(block_rows=64, block_out=128, block_hidden=128, num_warps=4, sort=True),
}


def token_bucket(tokens: int) -> int | None:
  return next(b for b in TOKEN_BUCKETS if b is None or tokens <= b)


def shape_kind(dim: int, total_hidden: int) -> str:
  """"mlp" for learners wider than the model (an MLP), "proj" for the low-rank projections."""
  return "mlp" if total_hidden > dim else "proj"


def default_settings(dtype, dim: int, total_hidden: int, tokens: int) -> dict:
  """Tile settings and the sort decision before user overrides: the tuned table for bf16
  on Hopper, else a heuristic (row blocks and output tiles shrink with the token count,
  so that few tokens still spread over the SMs)."""
  bf16 = jnp.dtype(dtype) != jnp.float32
  rows = 128 if (bf16 and tokens >= 8192) else 64 if tokens >= 1024 else 32
  settings = dict(block_rows=rows, block_hidden=_largest_divisor(total_hidden, 128),
                  block_out=_largest_divisor(dim, 256 if (bf16 and tokens >= 8192) else 64 if tokens < 1024 else 128),
                  block_k_up=_largest_divisor(dim, 64 if bf16 else 32), num_warps=8 if rows == 128 else 4,
                  num_stages=3, sort=tokens >= SORT_MIN_TOKENS, onepass=tokens <= ONEPASS_MAX_TOKENS, xla=False,
                  twolaunch=tokens <= TWOLAUNCH_MAX_TOKENS)
  if bf16 and gpu_family() == "hopper":
    # the table was tuned at ViT-B/16's shapes: a tile that does not divide this model's d or N*h
    # (block_out=128 at d=64) keeps the heuristic's value instead of making the call fail
    wholes = {"block_out": dim, "block_k_up": dim, "block_hidden": total_hidden}
    tuned = TUNED.get((token_bucket(tokens), shape_kind(dim, total_hidden)), {})
    settings.update({name: value for name, value in tuned.items() if name not in wholes or wholes[name] % value == 0})
  return settings


PATHS = ("xla", "onepass", "twolaunch", "sorted", "unsorted")
PATH_SWITCHES = ("xla", "onepass", "twolaunch", "sort")  # settings that pick the path, in this precedence


def resolve_config(dtype, dim: int, total_hidden: int, tokens: int, **overrides) -> tuple[FusedConfig, str]:
  """(tile sizes, path: one of `PATHS`) for these shapes: defaults with user overrides, validated.

  Shapes the kernels cannot tile (d or the learners' total width N*h not a multiple of 16)
  take the dense XLA path when nothing was asked for; asked-for tiles or kernel paths on
  such shapes raise."""
  names = [f.name for f in dataclasses.fields(FusedConfig)]
  unknown = set(overrides) - set(names) - set(PATH_SWITCHES)
  if unknown:
    raise ValueError(f"unknown kernel settings {sorted(unknown)}; expected some of {names + list(PATH_SWITCHES)}")
  asked = {key: value for key, value in overrides.items() if value is not None}
  if (dim % 16 or total_hidden % 16) and not asked:
    return FusedConfig(16, 16, 16, 16, 16, 4, 3), "xla"  # tiles unused on this path
  settings = default_settings(dtype, dim, total_hidden, tokens)
  if any(overrides.get(name) is not None for name in PATH_SWITCHES):
    # a path asked for by name: the switches not given are off, whatever the table says
    settings.update({name: bool(overrides.get(name)) for name in PATH_SWITCHES})
  settings.update({key: value for key, value in overrides.items() if value is not None})
  bf16 = jnp.dtype(dtype) != jnp.float32
  for name, tile in (("block_k_down", "block_hidden"), ("block_rows_down", "block_rows")):
    # the table's down-launch tile was tuned beside its own up-launch tile; where that one did not fit this
    # model's sizes (N*h), or the caller asked for another, the down launch follows the tile in use
    if name not in asked and settings[tile] % (settings.get(name) or 1):
      del settings[name]
  settings.setdefault("block_k_down", _largest_divisor(settings["block_hidden"], 64 if bf16 else 32))
  switches = {name: bool(settings.pop(name, False)) for name in PATH_SWITCHES}
  path = next((name for name in ("xla", "onepass", "twolaunch") if switches[name]),
              "sorted" if switches["sort"] else "unsorted")
  cfg = FusedConfig(**settings)
  for name in ("block_rows", "block_hidden", "block_out", "block_k_up", "block_k_down", "block_rows_down"):
    v = getattr(cfg, name)
    if v is not None and (v < 16 or v & (v - 1)):
      raise ValueError(f"{name}={v} must be a power of two >= 16 (Triton tiles)")
  for name in ("num_warps", "num_warps_down"):
    v = getattr(cfg, name)
    if v is not None and v not in (1, 2, 4, 8, 16):
      raise ValueError(f"{name}={v} must be one of 1, 2, 4, 8, 16")
  checks = [(total_hidden, cfg.block_hidden, "block_hidden", "the learners' total width N*h"),
            (cfg.block_hidden, cfg.block_k_down, "block_k_down", "block_hidden"),
            (cfg.block_rows, cfg.down_rows, "block_rows_down", "the up launch's block_rows"),
            (dim, cfg.block_k_up, "block_k_up", "d"), (dim, cfg.block_out, "block_out", "d")]
  for whole, part, name, what in checks:
    if whole % part:
      raise ValueError(f"{name}={part} does not divide {what}={whole}")
  return cfg, path


# ----------------------------------------------------------------------------
# Kernels. Every kernel takes the refs of all G ACMs and runs the body of ACM g
# under `pl.when(g == gg)`: Pallas cannot pick a ref by a traced index.


def _for_group(g, num_groups, body):
  for gg in range(num_groups):
    pl.when(g == gg)(functools.partial(body, gg))


def _gate_choice(shift_ref, x_ref, gate_refs, src, valid, **kwargs):
  """k of the given rows (0 where not valid) under one gate: `_gate_choices` of that gate alone."""
  return _gate_choices(shift_ref, x_ref, [gate_refs], src, valid, **kwargs)[0]


def _gate_choices(shift_ref, x_ref, gates, src, valid, *, rows, dim, block_k, num_learners, min_choice,
                  relative_cost, gate_dtype, normalize=None):
  """k of the given rows (0 where not valid) under each of `gates` (ref tuples, all linear or all
  precomputed): the gate's logits (a linear gate's matmul here, or rows of precomputed logits), the
  cost shift, min_choice, and the first argmax. Linear gates share each reduction step's block of x
  (one load, and one normalisation, for all of them).
  normalize: None, or f(x block, column indices) -> the block as the gate reads it (LayerNorm)."""
  f32 = jnp.float32
  cols = jnp.arange(GATE_COLS, dtype=jnp.int32)
  gate_cols = jnp.minimum(cols, num_learners)  # padding columns repeat the last choice, masked below
  if len(gates[0]) == 2:  # linear gates: x @ wg + bg inside the kernel

    def step(s, accs):
      red = s * block_k + jnp.arange(block_k, dtype=jnp.int32)
      xs = x_ref[src[:, None], red[None, :]]
      xs = (xs if normalize is None else normalize(xs, red)).astype(gate_dtype)
      return tuple(acc + jnp.dot(xs, wg_ref[red[:, None], gate_cols[None, :]].astype(gate_dtype),
                                 precision=_precision(gate_dtype), preferred_element_type=f32)
                   for acc, (wg_ref, _) in zip(accs, gates))

    zeros = tuple(jnp.zeros((rows, GATE_COLS), f32) for _ in gates)
    sums = jax.lax.fori_loop(0, dim // block_k, step, zeros)
    # rounded where a Flax Dense of this dtype rounds: after the matmul and after the bias
    all_logits = [(acc.astype(gate_dtype).astype(f32) + bg_ref[gate_cols].astype(f32)[None, :]
                   ).astype(gate_dtype).astype(f32) for acc, (_, bg_ref) in zip(sums, gates)]
  else:  # precomputed (T, N+1) logits
    all_logits = [logits_ref[src[:, None], gate_cols[None, :]].astype(f32) for (logits_ref,) in gates]
  ks = []
  for logits in all_logits:
    logits = logits - shift_ref[0] * (cols.astype(f32) * relative_cost)[None, :]
    allowed = (cols >= min_choice) & (cols <= num_learners)
    logits = jnp.where(allowed[None, :], logits, -jnp.inf)
    best = jnp.max(logits, axis=1)
    # first index of the maximum, as jnp.argmax; a NaN row (no index equals the max) gets N
    k = jnp.min(jnp.where(logits == best[:, None], cols[None, :], num_learners), axis=1)
    ks.append(jnp.where(valid, k, 0).astype(jnp.int32))
  return ks


def _row_stats(x_ref, src, *, dim, block_k, eps):
  """(mean, 1 / sqrt(var + eps)) in float32 of the given rows of x, the variance as E[x^2] - E[x]^2
  clipped at 0, as Flax's LayerNorm computes it (`use_fast_variance`)."""
  f32 = jnp.float32

  def step(s, sums):
    red = s * block_k + jnp.arange(block_k, dtype=jnp.int32)
    xs = x_ref[src[:, None], red[None, :]].astype(f32)
    return sums[0] + jnp.sum(xs, axis=1), sums[1] + jnp.sum(xs * xs, axis=1)

  zeros = jnp.zeros(src.shape, f32)
  total, squares = jax.lax.fori_loop(0, dim // block_k, step, (zeros, zeros))
  mean = total / dim
  var = jnp.maximum(squares / dim - mean * mean, 0.0)
  return mean, jax.lax.rsqrt(var + eps)


def _normalizer(mean, rstd, scale_ref, bias_ref):
  """f(x block (rows, cols), column indices) -> the block after the LayerNorm of rows with these
  statistics, in Flax's order of operations and rounded to x's dtype, as its output is."""
  f32 = jnp.float32

  def normalize(xs, red):
    mul = rstd[:, None] * scale_ref[red].astype(f32)[None, :]
    return ((xs.astype(f32) - mean[:, None]) * mul + bias_ref[red].astype(f32)[None, :]).astype(xs.dtype)

  return normalize


def _route_kernel(shift_ref, x_ref, *refs, num_groups, gate_refs_per_group, tokens, padded, chunk, dim,
                  block_k, num_learners, min_choice, relative_cost, sort, gate_dtype, norm_eps=None, shared=False,
                  inline=False, atomic=False, write_x=False):
  """With norm_eps: refs scale, bias (the LayerNorm's) come first, and the last two outputs take
  each token's mean and inverse standard deviation. shared: one program per chunk computes every
  ACM's gate (`_gate_choices`, one pass over the chunk's x) instead of one program per (ACM, chunk);
  the outputs are the same either way. inline (sorted, `INLINE_SORT_MAX_TOKENS`): in place of the ranks, the
  slots ((G * GATE_COLS + 1) * padded,) int32 after the counts: token t of chunk c, category n = N - k and rank r in its
  chunk goes to slot (ACM * GATE_COLS + n) * padded + c * chunk + r, which `_inline_rows` reads in place of
  the scatter launch's permutation (the last padded slots are never written). atomic (with inline,
  `INLINE_SORT_PLACE` "atomic"): a zeroed (G * GATE_COLS,) float32 input follows the gate refs, aliased to the
  counts output, which then holds each category's total (float32: see `INLINE_SORT_PLACE`): a chunk's tokens of
  category n take the places from an atomic add of their count on counter n onwards, slot (ACM * GATE_COLS + n) *
  padded + place (`_atomic_rows`). write_x (with atomic, one ACM): a last output x_regions ((N + 1) * padded, d)
  takes each token with k >= 1 at row (N - k) * padded + place, its slot, for `acm_mgpu.up_regions` (region N,
  k = 0, is never written: the masked lanes address it)."""
  if norm_eps is not None:
    scale_ref, bias_ref, *refs = refs
  gates = [refs[g * gate_refs_per_group:(g + 1) * gate_refs_per_group] for g in range(num_groups)]
  k_ref, *sort_refs = refs[num_groups * gate_refs_per_group + atomic:]  # atomic: the zeroed input, read as output
  if norm_eps is not None:
    *sort_refs, mean_ref, rstd_ref = sort_refs
  p = pl.program_id(0)
  num_chunks = padded // chunk
  g, c = (0, p) if shared else (p // num_chunks, p % num_chunks)
  f32 = jnp.float32
  rows = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
  valid = rows < tokens
  src = jnp.minimum(rows, tokens - 1)
  cols = jnp.arange(GATE_COLS, dtype=jnp.int32)
  normalize = None
  if norm_eps is not None:
    mean, rstd = _row_stats(x_ref, src, dim=dim, block_k=block_k, eps=norm_eps)
    normalize = _normalizer(mean, rstd, scale_ref, bias_ref)
  choose = functools.partial(_gate_choices, shift_ref, x_ref, src=src, valid=valid, rows=chunk, dim=dim,
                             block_k=block_k, num_learners=num_learners, min_choice=min_choice,
                             relative_cost=relative_cost, gate_dtype=gate_dtype, normalize=normalize)

  def emit(gg, k):
    k_ref[pl.ds(gg * padded + c * chunk, chunk)] = k
    if norm_eps is not None and gg == 0:  # one copy of the statistics for the whole group
      mean_ref[pl.ds(c * chunk, chunk)] = mean
      rstd_ref[pl.ds(c * chunk, chunk)] = rstd
    if sort:
      from jax.experimental.pallas import triton as plgpu
      if inline:
        counts_ref, slot_ref, *xs_ref = sort_refs
      else:
        rank_ref, counts_ref = sort_refs
      onehot = ((num_learners - k)[:, None] == cols[None, :]) & valid[:, None]  # category 0 = k N
      earlier = (rows[:, None] > rows[None, :]).astype(jnp.bfloat16)
      # earlier tokens of the chunk in each category: 0/1 products summed in float32 (exact)
      same_before = jnp.dot(earlier, onehot.astype(jnp.bfloat16), preferred_element_type=f32)
      rank = jnp.sum(jnp.where(onehot, same_before, 0.0), axis=1).astype(jnp.int32)
      if not inline:  # the inline sort files the tokens by rank below instead
        rank_ref[pl.ds(gg * padded + c * chunk, chunk)] = rank
      chunk_counts = jnp.sum(onehot.astype(jnp.int32), axis=0)
      if atomic:  # this chunk's first place in each category: the counter before its count is added
        first = plgpu.atomic_add(counts_ref, gg * GATE_COLS + cols, chunk_counts.astype(f32)).astype(jnp.int32)
        place = jnp.sum(jnp.where(onehot, first[None, :], 0), axis=1) + rank
      else:
        counts_ref[pl.ds((gg * num_chunks + c) * GATE_COLS, GATE_COLS)] = chunk_counts
        place = c * chunk + rank
      if inline:  # rows past the end are masked, and address a spare range past every ACM's slots
        slot = jnp.where(valid, (gg * GATE_COLS + num_learners - k) * padded + place,
                         num_groups * GATE_COLS * padded + rows)
        plgpu.store(slot_ref.at[slot], rows, mask=valid)
      if write_x:  # the chunk's rows again (from L2: the gate just read them), each to its region's slot
        keep = valid & (k > 0)  # the rest are masked, addressing their own rows of the spare region N
        dest = jnp.where(keep, (num_learners - k) * padded + place, num_learners * padded + rows)
        for s in range(0, dim, block_k):
          cols_x = s + jnp.arange(block_k, dtype=jnp.int32)
          rows_x = plgpu.load(x_ref.at[src[:, None], cols_x[None, :]])
          plgpu.store(xs_ref[0].at[dest[:, None], cols_x[None, :]], rows_x, mask=keep[:, None])

  if shared:
    for gg, k in enumerate(choose(gates)):
      emit(gg, k)
  else:
    _for_group(g, num_groups, lambda gg: emit(gg, choose([gates[gg]])[0]))


def _scatter_kernel(k_ref, rank_ref, counts_ref, order_ref, sorted_k_ref, *pos_ref, num_groups, tokens, padded,
                    chunk, num_learners):
  """Writes the permutation (order) and the sorted k; with a third output, each token's place in
  the sorted order (the inverse permutation, for the Mosaic GPU down kernel's gather back)."""
  from jax.experimental.pallas import triton as plgpu
  p = pl.program_id(0)
  num_chunks = padded // chunk
  g, c = p // num_chunks, p % num_chunks
  cols = jnp.arange(GATE_COLS, dtype=jnp.int32)
  table_rows = 16
  tr = jnp.arange(table_rows, dtype=jnp.int32)

  def body(gg):
    def step(s, carry):  # sums the counts table of ACM gg, 16 chunks at a time
      before, totals = carry
      chunk_ids = s * table_rows + tr
      idx = (gg * num_chunks + jnp.minimum(chunk_ids, num_chunks - 1))[:, None] * GATE_COLS + cols[None, :]
      counts = jnp.where((chunk_ids < num_chunks)[:, None], counts_ref[idx], 0)
      before = before + jnp.sum(jnp.where((chunk_ids < c)[:, None], counts, 0), axis=0)
      return before, totals + jnp.sum(counts, axis=0)

    zeros = jnp.zeros((GATE_COLS,), jnp.int32)
    before, totals = jax.lax.fori_loop(0, -(-num_chunks // table_rows), step, (zeros, zeros))
    starts = jnp.sum(jnp.where(cols[:, None] < cols[None, :], totals[:, None], 0), axis=0)
    base = starts + before  # first place of each category in this chunk
    flat = pl.ds(gg * padded + c * chunk, chunk)
    k, rank = k_ref[flat], rank_ref[flat]
    rows = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    valid = rows < tokens
    onehot = (num_learners - k)[:, None] == cols[None, :]
    dest = jnp.sum(jnp.where(onehot, base[None, :], 0), axis=1) + rank
    # rows past the end go to their own (unused) places: masked lanes never alias a real one
    dest = gg * padded + jnp.where(valid, dest, rows)
    plgpu.store(order_ref.at[dest], rows, mask=valid)
    plgpu.store(sorted_k_ref.at[dest], k, mask=valid)
    if pos_ref:
      plgpu.store(pos_ref[0].at[flat], dest - gg * padded, mask=valid)

  _for_group(g, num_groups, body)


def _choice_bias(b2_ref, k_rows, cols, num_learners):
  """(rows, len(cols)) float32 output bias of each row's choice k: b2[0] + ... + b2[k]."""
  acc = jnp.zeros((k_rows.shape[0], cols.size), jnp.float32)
  for choice in range(num_learners + 1):
    acc = acc + jnp.where((k_rows >= choice)[:, None], b2_ref[choice, cols].astype(jnp.float32)[None, :], 0.0)
  return acc


def _row_block(order_ref, k_ref, gg, i, *, block_rows, tokens, padded, sort):
  """Positions, validity, token and k of the rows of block i. Rows past the end
  keep their own position (>= T) as token: masked stores then never alias a real row."""
  from jax.experimental.pallas import triton as plgpu
  pos = i * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
  valid = pos < tokens
  flat = pl.ds(gg * padded + i * block_rows, block_rows)
  k_rows = jnp.where(valid, plgpu.load(k_ref.at[flat], mask=valid, other=0), 0)
  token = jnp.where(valid, plgpu.load(order_ref.at[flat], mask=valid, other=0), pos) if sort else pos
  return valid, token, k_rows, jnp.max(k_rows)


def _place_in_category(pos, totals):
  """(category n, index j inside it) of each sorted place in `pos`, where categories n = 0, 1, ... (k = N - n)
  fill the places in turn, `totals` (GATE_COLS,) of each: place p is in category n when start[n] <= p < start[n] +
  total[n] (starts: the exclusive prefix of the totals), at index j = p - start[n]."""
  cols = jnp.arange(GATE_COLS, dtype=jnp.int32)
  starts = jnp.sum(jnp.where(cols[:, None] < cols[None, :], totals[:, None], 0), axis=0)
  inside = (pos[:, None] >= starts[None, :]) & (pos[:, None] < (starts + totals)[None, :])  # (rows, categories)
  category = jnp.sum(jnp.where(inside, cols[None, :], 0), axis=1)
  return category, pos - jnp.sum(jnp.where(inside, starts[None, :], 0), axis=1)


def _inline_rows(slot_ref, counts_ref, gg, i, *, block_rows, tokens, padded, chunk, num_learners):
  """`_row_block` of the sorted path without the scatter launch's permutation: (valid, token, k, largest k)
  of the rows at sorted places i * block_rows ... from the route launch's per-chunk category counts and
  slots (`_route_kernel` with inline). The sorted order is the scatter launch's: categories n = N - k in
  increasing order, within one the chunks in order, within a chunk the rank. Place p is in category n when
  start[n] <= p < start[n] + total[n] (totals over chunks, starts their exclusive prefix); its index
  j = p - start[n] in that category falls in the first chunk whose inclusive count of category n exceeds j,
  at rank j - (the counts of the chunks before). The inclusive counts are a bf16 matmul of the counts
  (each at most `chunk` <= 128, exact in bf16) with a triangle of ones, summed exactly in float32."""
  from jax.experimental.pallas import triton as plgpu
  num_chunks = padded // chunk
  lanes = max(16, pl.next_power_of_2(num_chunks))  # a Triton tile: a power of two, 16 at least
  cols = jnp.arange(GATE_COLS, dtype=jnp.int32)
  chunks = jnp.arange(lanes, dtype=jnp.int32)
  live = chunks < num_chunks
  table = gg * num_chunks * GATE_COLS + jnp.minimum(chunks, num_chunks - 1) * GATE_COLS  # chunk c's counts
  counts = plgpu.load(counts_ref.at[table[:, None] + cols[None, :]], mask=live[:, None], other=0)
  pos = i * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
  valid = pos < tokens
  category, j = _place_in_category(pos, jnp.sum(counts, axis=0))
  mine = plgpu.load(counts_ref.at[table[None, :] + category[:, None]], mask=live[None, :], other=0)  # (rows, chunks)
  triangle = (chunks[:, None] <= chunks[None, :]).astype(jnp.bfloat16)
  upto = jnp.dot(mine.astype(jnp.bfloat16), triangle, preferred_element_type=jnp.float32)
  chunk_of = jnp.sum((upto <= j.astype(jnp.float32)[:, None]).astype(jnp.int32), axis=1)
  rank = j - jnp.sum(jnp.where(chunks[None, :] < chunk_of[:, None], mine, 0), axis=1)
  slot = jnp.where(valid, (gg * GATE_COLS + category) * padded + chunk_of * chunk + rank, 0)
  token = jnp.where(valid, plgpu.load(slot_ref.at[slot], mask=valid, other=0), pos)
  k_rows = jnp.where(valid, num_learners - category, 0)
  return valid, token, k_rows, jnp.max(k_rows)


def _atomic_rows(slot_ref, totals_ref, gg, i, *, block_rows, tokens, padded, num_learners):
  """`_inline_rows` where the route placed the tokens by atomic counters (`INLINE_SORT_PLACE` "atomic"):
  category n = N - k fills places start[n] ... start[n] + total[n] - 1 (starts: the exclusive prefix of the
  totals), and place p's index j = p - start[n] in it is the slot the route filed its token in."""
  from jax.experimental.pallas import triton as plgpu
  pos = i * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
  valid = pos < tokens
  category, j = _place_in_category(pos, totals_ref[pl.ds(gg * GATE_COLS, GATE_COLS)].astype(jnp.int32))
  slot = jnp.where(valid, (gg * GATE_COLS + category) * padded + j, 0)
  token = jnp.where(valid, plgpu.load(slot_ref.at[slot], mask=valid, other=0), pos)
  k_rows = jnp.where(valid, num_learners - category, 0)
  return valid, token, k_rows, jnp.max(k_rows)


def _grid_position(padded, block_rows, tiles):
  """(ACM, row block, tile) of this program on a grid of G x row blocks x tiles programs."""
  p = pl.program_id(0)
  row_blocks = padded // block_rows
  g, rest = p // (row_blocks * tiles), p % (row_blocks * tiles)
  return g, rest // tiles, rest % tiles


def _split_row_refs(refs, gate, num_groups):
  """A launch's leading refs: routed (gate None) order, k, x, or with the sorted order inline
  (`_inline_rows`) slots, counts, x; gated (the one- and two-launch paths: `gate` holds `_gate_choice`
  settings and gate_refs_per_group) shift, x and every ACM's gate refs. Returns (the refs `_rows` reads,
  x, the remaining refs)."""
  if gate is None:
    order_ref, k_ref, x_ref, *rest = refs
    return (order_ref, k_ref, None, ()), x_ref, rest
  per_group = gate["gate_refs_per_group"]
  shift_ref, x_ref, *rest = refs
  return (None, None, shift_ref, rest[:num_groups * per_group]), x_ref, rest[num_groups * per_group:]


def _rows(row_refs, x_ref, gg, i, first, k_out, *, gate, block_rows, tokens, padded, sort, dim, inline=None,
          order_out=None):
  """(valid, token, k, largest k) of row block i of ACM gg: read from the route launch's outputs,
  or (gated) computed from the rows' gate, rows in token order; then the programs where `first`
  store the block's k to k_out. inline ({"chunk", "num_learners", "atomic"}): the sorted order derived from
  the route launch's slots and counts (`_inline_rows`) or totals (atomic, `_atomic_rows`); the programs where
  `first` also store the rows' tokens to order_out, for the down launch."""
  order_ref, k_ref, shift_ref, gate_refs = row_refs
  if inline is not None:
    kwargs = dict(block_rows=block_rows, tokens=tokens, padded=padded, num_learners=inline["num_learners"])
    if inline["atomic"]:
      valid, token, k_rows, max_k = _atomic_rows(order_ref, k_ref, gg, i, **kwargs)
    else:
      valid, token, k_rows, max_k = _inline_rows(order_ref, k_ref, gg, i, chunk=inline["chunk"], **kwargs)

    @pl.when(first)
    def _():
      k_out[pl.ds(gg * padded + i * block_rows, block_rows)] = k_rows
      order_out[pl.ds(gg * padded + i * block_rows, block_rows)] = token

    return valid, token, k_rows, max_k
  if gate is None:
    return _row_block(order_ref, k_ref, gg, i, block_rows=block_rows, tokens=tokens, padded=padded, sort=sort)
  per_group = gate["gate_refs_per_group"]
  settings = {name: value for name, value in gate.items() if name != "gate_refs_per_group"}
  token = i * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
  valid = token < tokens
  k_rows = _gate_choice(shift_ref, x_ref, gate_refs[gg * per_group:(gg + 1) * per_group],
                        jnp.minimum(token, tokens - 1), valid, rows=block_rows, dim=dim, **settings)

  @pl.when(first)
  def _():
    k_out[pl.ds(gg * padded + i * block_rows, block_rows)] = k_rows

  return valid, token, k_rows, jnp.max(k_rows)


def _up_kernel(*refs, num_groups, tiles, block_rows, block_hidden, block_k, dim, width, tokens, padded, sort,
               activation, fast_math, gate=None, norm=None, inline=None):
  """Refs: order, k, x, (w1, b1) per ACM, hidden per ACM. With `gate` (the two-launch path: a
  dict of `_gate_choice` settings plus gate_refs_per_group) the rows' k is computed here
  instead: refs shift, x, the gate refs per ACM, (w1, b1) per ACM, hidden per ACM, k out
  (written by the programs of hidden tile 0). With `inline` (the sorted path without its scatter
  launch, `_inline_rows`): order and k are the route's slots and counts, and two outputs follow the
  hidden ones, the sorted order and the rows' k (written by the programs of hidden tile 0). With `norm`
  (routed paths; x un-normalised; see the module docstring) "fold": refs order, k, x, mean, rstd,
  (w1 scaled, b1 folded, column sums of w1 scaled) per ACM, hidden per ACM; "prologue": order, k, x,
  mean, rstd, scale, bias, (w1, b1) per ACM, hidden per ACM."""
  row_refs, x_ref, refs = _split_row_refs(refs, gate, num_groups)
  if norm is not None:
    mean_ref, rstd_ref, *refs = refs
  if norm == "prologue":
    scale_ref, bias_ref, *refs = refs
  per = 3 if norm == "fold" else 2
  w_refs, h_refs = refs[:per * num_groups], refs[per * num_groups:(per + 1) * num_groups]
  order_out, k_out = None, None
  if inline is not None:
    order_out, k_out = refs[(per + 1) * num_groups:]
  elif gate is not None:
    k_out = refs[(per + 1) * num_groups]
  g, i, j = _grid_position(padded, block_rows, tiles)

  def body(gg):
    w1_ref, b1_ref, *colsum = w_refs[per * gg:per * (gg + 1)]
    # gated or inline: every program of the row block computes its rows, hidden tile 0 stores them
    valid, token, k_rows, max_k = _rows(row_refs, x_ref, gg, i, j == 0, k_out, gate=gate, block_rows=block_rows,
                                        tokens=tokens, padded=padded, sort=sort, dim=dim, inline=inline,
                                        order_out=order_out)

    @pl.when(j * block_hidden < max_k * width)
    def _():
      src = jnp.clip(token, 0, tokens - 1)
      cols = pl.ds(j * block_hidden, block_hidden)
      if norm is not None:
        mean, rstd = mean_ref[src], rstd_ref[src]
      normalize = _normalizer(mean, rstd, scale_ref, bias_ref) if norm == "prologue" else None

      def step(s, acc):
        red = s * block_k + jnp.arange(block_k, dtype=jnp.int32)
        xs = x_ref[src[:, None], red[None, :]]
        if normalize is not None:
          xs = normalize(xs, red)
        ws = w1_ref[pl.ds(s * block_k, block_k), cols]
        return acc + jnp.dot(xs, ws, precision=_precision(xs.dtype), preferred_element_type=jnp.float32)

      acc = jax.lax.fori_loop(0, dim // block_k, step, jnp.zeros((block_rows, block_hidden), jnp.float32))
      if norm == "fold":  # the rest of the LayerNorm: rstd * (x @ w1s) - mean * rstd * colsum(w1s)
        acc = acc * rstd[:, None] - (mean * rstd)[:, None] * colsum[0][cols][None, :]
      acc = _kernel_activation(activation, fast_math)(acc + b1_ref[cols].astype(jnp.float32)[None, :])
      learner = (j * block_hidden + jnp.arange(block_hidden, dtype=jnp.int32)) // width
      keep = (learner[None, :] < k_rows[:, None]) & valid[:, None]
      h_refs[gg][pl.ds(i * block_rows, block_rows), cols] = jnp.where(keep, acc, 0.0).astype(h_refs[gg].dtype)

  _for_group(g, num_groups, body)


def _bias_table(group) -> jax.Array | None:
  """An ACM's cumulative output bias b2[0] + ... + b2[j] for every choice j, (N+1, d) float32; None
  without b2."""
  return jnp.cumsum(group["b2"].astype(jnp.float32), axis=0) if "b2" in group else None


def _down_step(h_ref, w2_ref, i, cb, *, block_rows, block_out, block_k):
  """The down launch's reduction step s over row block i and output tile cb: acc + hidden chunk @ w2 chunk."""
  cols = pl.ds(cb * block_out, block_out)

  def step(s, acc):
    hs = h_ref[pl.ds(i * block_rows, block_rows), pl.ds(s * block_k, block_k)]
    ws = w2_ref[pl.ds(s * block_k, block_k), cols]
    return acc + jnp.dot(hs, ws, precision=_precision(hs.dtype), preferred_element_type=jnp.float32)

  return step


def _region_block(slot_ref, totals_ref, i, *, block_rows, padded, num_learners):
  """(valid, token, k, largest k, hidden row block) of down program i over tokens filed by k in regions
  (`acm_mgpu.up_regions`): categories n = 0 .. N (k = N - n) in turn, ceil(total[n] / block_rows) blocks each, a
  block's rows at slots n * padded + b * block_rows ... (the route's, `_route_kernel` with write_x). Programs past
  the last block have no valid row; category N (k = 0) has no hidden rows and only takes its output bias."""
  from jax.experimental.pallas import triton as plgpu
  cols = jnp.arange(GATE_COLS, dtype=jnp.int32)
  totals = jnp.where(cols <= num_learners, totals_ref[pl.ds(0, GATE_COLS)].astype(jnp.int32), 0)
  blocks = (totals + block_rows - 1) // block_rows
  ends = jnp.sum(jnp.where(cols[:, None] <= cols[None, :], blocks[:, None], 0), axis=0)  # inclusive prefix
  n = jnp.sum((ends <= i).astype(jnp.int32))  # this program's category (N + 1: past the last block)
  start = jnp.sum(jnp.where(cols < n, blocks, 0))
  count = jnp.sum(jnp.where(cols == n, totals, 0))
  j = (i - start) * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
  valid = (j < count) & (n <= num_learners)
  slot = jnp.where(valid, n * padded + j, 0)
  token = jnp.where(valid, plgpu.load(slot_ref.at[slot], mask=valid, other=0), padded + j)
  k = jnp.where(n <= num_learners, num_learners - n, 0)
  k_rows = jnp.where(valid, k, 0)
  return valid, token, k_rows, k, jnp.minimum(n, num_learners - 1) * (padded // block_rows) + i - start


def _down_kernel(order_ref, k_ref, *refs, num_groups, col_blocks, block_rows, block_out, block_k, width,
                 tokens, padded, sort, num_learners, has_bias, has_residual=False, bias_loop=False, regions=False):
  """Refs: order, k, (hidden, w2[, bias table, or b2 with bias_loop]) per ACM[, residual], outputs per ACM.
  regions (one ACM): order and k are the route's slots and category totals, hidden holds the rows by region
  (`acm_mgpu.up_regions`), and the grid has padded / block_rows + N + 1 row programs (`_region_block`)."""
  from jax.experimental.pallas import triton as plgpu
  per = 3 if has_bias else 2
  in_refs, out_refs = refs[:per * num_groups], refs[per * num_groups:]
  if has_residual:
    res_ref, *out_refs = out_refs
  row_programs = padded // block_rows + (num_learners + 1 if regions else 0)
  g, i, cb = _grid_position(row_programs * block_rows, block_rows, col_blocks)

  def body(gg):
    h_ref, w2_ref, *bias = in_refs[per * gg:per * (gg + 1)]
    if regions:
      valid, token, k_rows, max_k, h_block = _region_block(order_ref, k_ref, i, block_rows=block_rows,
                                                           padded=padded, num_learners=num_learners)
    else:
      valid, token, k_rows, max_k = _row_block(order_ref, k_ref, gg, i, block_rows=block_rows, tokens=tokens,
                                               padded=padded, sort=sort)
      h_block = i
    step = _down_step(h_ref, w2_ref, h_block, cb, block_rows=block_rows, block_out=block_out, block_k=block_k)
    trips = (max_k * width + block_k - 1) // block_k
    acc = jax.lax.fori_loop(0, trips, step, jnp.zeros((block_rows, block_out), jnp.float32))
    col_ids = cb * block_out + jnp.arange(block_out, dtype=jnp.int32)
    if has_bias and bias_loop:  # b2 itself, summed over the choices up to each row's k (`DOWN_BIAS_LOOP_MAX_TOKENS`)
      (b2_ref,) = bias
      acc = acc + _choice_bias(b2_ref, k_rows, pl.ds(cb * block_out, block_out), num_learners)
    elif has_bias:
      # the float32 cumulative table b2[0] + ... + b2[j], one gather; a loop over the choices
      # (`_choice_bias`) made this launch 0.27 instead of 0.21 ms at 50,432 tokens (RESULTS 2026-12-03)
      (table_ref,) = bias
      acc = acc + table_ref[k_rows[:, None], col_ids[None, :]]
    if has_residual:  # the skip connection's rows, added before the one rounding to the output dtype
      acc = acc + plgpu.load(res_ref.at[token[:, None], col_ids[None, :]], mask=valid[:, None],
                             other=0.0).astype(jnp.float32)
    plgpu.store(out_refs[gg].at[token[:, None], col_ids[None, :]], acc.astype(out_refs[gg].dtype),
                mask=valid[:, None])

  _for_group(g, num_groups, body)


def _unsort_kernel(pos_ref, k_ref, y_ref, *refs, block_rows, block_out, col_blocks, tokens, padded, has_bias,
                   has_residual):
  """Rows back to token order after a down launch that wrote them sorted: out[t] = y[pos[t]] (zero where
  k[t] = 0) + bias table[k[t]] + residual[t], summed in float32 and rounded once. Refs: each token's
  sorted place and its k (token order), y (padded, d), [the cumulative bias table (N+1, d) float32,]
  [the residual (T, d),] the output (T, d). One program per (block of tokens, block of columns)."""
  from jax.experimental.pallas import triton as plgpu
  refs = list(refs)
  table_ref = refs.pop(0) if has_bias else None
  res_ref = refs.pop(0) if has_residual else None
  (out_ref,) = refs
  p = pl.program_id(0)
  rows = (p // col_blocks) * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
  cols = (p % col_blocks) * block_out + jnp.arange(block_out, dtype=jnp.int32)
  valid = rows < tokens
  pos = jnp.clip(plgpu.load(pos_ref.at[rows], mask=valid, other=0), 0, padded - 1)
  k = plgpu.load(k_ref.at[rows], mask=valid, other=0)
  acc = plgpu.load(y_ref.at[pos[:, None], cols[None, :]], mask=(valid & (k > 0))[:, None],
                   other=0.0).astype(jnp.float32)
  if has_bias:
    acc = acc + table_ref[k[:, None], cols[None, :]]
  if has_residual:
    acc = acc + plgpu.load(res_ref.at[rows[:, None], cols[None, :]], mask=valid[:, None],
                           other=0.0).astype(jnp.float32)
  plgpu.store(out_ref.at[rows[:, None], cols[None, :]], acc.astype(out_ref.dtype), mask=valid[:, None])


def _down_split_kernel(order_ref, k_ref, *refs, num_groups, col_blocks, block_rows, block_out, block_k, width,
                       tokens, padded, sort, num_parts, per_part, atomic=False):
  """The down launch with its reduction split into parts of `per_part` consecutive learners
  (`DOWN_SPLIT_MAX_TOKENS`, `DOWN_SPLIT_PARTS`): the program of (ACM, row block, output tile, part n) writes
  hidden[:, its learners below the block's largest k] @ w2[the same] of its rows in float32 to rows
  n * padded + token of that ACM's parts, when some row of the block has k > n * per_part; with `atomic` it adds
  them to row token of that ACM's sum instead (`DOWN_SPLIT_SUM`). A row's hidden units past its own k are zero
  (the up launch masks them), so a part holds exactly that row's learners below k.
  Refs: order, k, (hidden, w2) per ACM, then parts (num_parts * padded, d) float32 per ACM, or (atomic) zeroed
  sums (padded, d) float32 per ACM as inputs and the same buffers as outputs."""
  from jax.experimental.pallas import triton as plgpu
  in_refs, part_refs = refs[:2 * num_groups], refs[(3 if atomic else 2) * num_groups:]
  g, i, tile = _grid_position(padded, block_rows, col_blocks * num_parts)
  cb, n = tile // num_parts, tile % num_parts
  steps = width // block_k  # reduction steps per learner
  first = n if per_part == 1 else n * per_part  # the part's first learner

  def body(gg):
    h_ref, w2_ref = in_refs[2 * gg:2 * gg + 2]
    valid, token, _, max_k = _row_block(order_ref, k_ref, gg, i, block_rows=block_rows, tokens=tokens,
                                        padded=padded, sort=sort)

    @pl.when(first < max_k)
    def _():
      step = _down_step(h_ref, w2_ref, i, cb, block_rows=block_rows, block_out=block_out, block_k=block_k)
      start = first * steps
      # hidden tiles past the block's largest k are never written: a part of several learners stops there
      stop = (first + 1 if per_part == 1 else jnp.minimum(first + per_part, max_k)) * steps
      acc = jax.lax.fori_loop(start, stop, step, jnp.zeros((block_rows, block_out), jnp.float32))
      col_ids = cb * block_out + jnp.arange(block_out, dtype=jnp.int32)
      if atomic:  # rows past the end add their zeros to the padding rows (token = place >= tokens there)
        plgpu.atomic_add(part_refs[gg], (token[:, None], col_ids[None, :]), acc)
      else:
        plgpu.store(part_refs[gg].at[(n * padded + token)[:, None], col_ids[None, :]], acc, mask=valid[:, None])

  _for_group(g, num_groups, body)


def split_parts(num_learners: int, tokens: int) -> int:
  """The number of parts the split down launch cuts a reduction of `tokens` rows into: `DOWN_SPLIT_PARTS` where set;
  else one per learner up to `DOWN_SPLIT_PER_LEARNER_MAX_TOKENS` tokens and pairs of learners above (one per
  learner where N is odd). ValueError naming the setting where it does not divide the learners."""
  if DOWN_SPLIT_PARTS is not None:
    parts = DOWN_SPLIT_PARTS
  elif DOWN_SPLIT_PER_LEARNER_MAX_TOKENS is None or tokens <= DOWN_SPLIT_PER_LEARNER_MAX_TOKENS or num_learners % 2:
    parts = num_learners
  else:
    parts = num_learners // 2
  if not isinstance(parts, int) or parts < 1 or num_learners % parts:
    raise ValueError(f"acm_fused.DOWN_SPLIT_PARTS must be None or a positive divisor of the number of learners "
                     f"({num_learners}), got {DOWN_SPLIT_PARTS!r}")
  return parts


def _down_split(hidden, groups, order, k_rows, k_tokens, residual, *, cfg, tokens, padded, width, sort,
                num_learners, dtype, compiler_params, interpret):
  """The split down launch and the XLA fusion that sums each token's parts n < k with the cumulative
  output bias (and the residual, when given) before one rounding. Returns the outputs, token order."""
  if DOWN_SPLIT_SUM not in DOWN_SPLIT_SUMS:
    raise ValueError(f"acm_fused.DOWN_SPLIT_SUM must be one of {DOWN_SPLIT_SUMS}, got {DOWN_SPLIT_SUM!r}")
  if DOWN_SPLIT_ROUNDING not in DOWN_SPLIT_ROUNDINGS:
    raise ValueError(f"acm_fused.DOWN_SPLIT_ROUNDING must be one of {DOWN_SPLIT_ROUNDINGS}, "
                     f"got {DOWN_SPLIT_ROUNDING!r}")
  atomic = DOWN_SPLIT_SUM == "atomic"
  num_parts = split_parts(num_learners, tokens)
  per_part = num_learners // num_parts
  num_groups, dim = len(groups), groups[0]["w2"].shape[1]
  col_blocks = dim // cfg.block_out
  inputs = [order, k_rows, *[a for h, grp in zip(hidden, groups) for a in (h, grp["w2"])]]
  rows = padded if atomic else num_parts * padded
  if atomic:
    inputs += [jnp.zeros((rows, dim), jnp.float32) for _ in groups]
  parts = pl.pallas_call(
      functools.partial(_down_split_kernel, num_groups=num_groups, col_blocks=col_blocks, block_rows=cfg.down_rows,
                        block_out=cfg.block_out, block_k=cfg.block_k_down, width=width, tokens=tokens, padded=padded,
                        sort=sort, num_parts=num_parts, per_part=per_part, atomic=atomic),
      out_shape=(jax.ShapeDtypeStruct((rows, dim), jnp.float32),) * num_groups,
      grid=(num_groups * (padded // cfg.down_rows) * col_blocks * num_parts,), compiler_params=compiler_params,
      input_output_aliases={2 + 2 * num_groups + g: g for g in range(num_groups)} if atomic else {},
      interpret=interpret, name="acm_group_down_split",
  )(*inputs)
  outs = []
  for gg, (part, grp) in enumerate(zip(parts, groups)):
    k = k_tokens[gg * padded:gg * padded + tokens]
    if atomic:
      out = part[:tokens]
    else:
      part = part.reshape(num_parts, padded, dim)[:, :tokens]
      # a part whose first learner lies past a token's k may be unwritten (its block stopped earlier): `where`,
      # not a product
      first = jnp.arange(num_parts)[:, None, None]
      first = first if per_part == 1 else first * per_part
      out = jnp.sum(jnp.where(first < k[None, :, None], part, 0.0), axis=0)
    if "b2" in grp:
      out = out + _bias_table(grp)[k]
    if residual is not None:
      out = out + residual.astype(jnp.float32)
    out = out.astype(dtype)
    outs.append(jax.lax.optimization_barrier(out) if DOWN_SPLIT_ROUNDING == "sum" else out)
  return tuple(outs)


UNSORT_ROWS = 32  # tokens per `_unsort_kernel` program


def _unsort(y, positions, k, table, residual, *, tokens, padded, dtype, interpret):
  """`_unsort_kernel` over one ACM's rows: positions and k (tokens,) int32, table (N+1, d) float32 or None,
  residual (tokens, d) or None. Returns (tokens, d) in dtype."""
  dim = y.shape[1]
  block_out = _largest_divisor(dim, 256)
  col_blocks = dim // block_out
  inputs = [a for a in (table, residual) if a is not None]
  return pl.pallas_call(
      functools.partial(_unsort_kernel, block_rows=UNSORT_ROWS, block_out=block_out, col_blocks=col_blocks,
                        tokens=tokens, padded=padded, has_bias=table is not None, has_residual=residual is not None),
      out_shape=jax.ShapeDtypeStruct((tokens, dim), dtype), grid=(-(-tokens // UNSORT_ROWS) * col_blocks,),
      compiler_params=None if interpret else _compiler_params(4, 1), interpret=interpret, name="acm_unsort",
  )(positions, k, y, *inputs)


def _onepass_kernel(shift_ref, x_ref, *refs, num_groups, gate_refs_per_group, tiles, block_rows, block_hidden,
                    block_out, block_k, dim, width, tokens, padded, num_learners, min_choice, relative_cost,
                    gate_dtype, activation, fast_math, has_bias):
  """Gate, k, both projections and the output bias of one (ACM, row block, hidden tile) in
  one program. Partial outputs of the hidden tiles meet in float32 through atomic adds
  into zeroed outputs of `padded` rows (rows past the end land in the padding, so no add
  needs a mask); the hidden tile never leaves the program."""
  from jax.experimental.pallas import triton as plgpu
  per = 4 if has_bias else 3
  n_gate = num_groups * gate_refs_per_group
  gates = [refs[g * gate_refs_per_group:(g + 1) * gate_refs_per_group] for g in range(num_groups)]
  w_refs = refs[n_gate:n_gate + per * num_groups]
  k_ref, *out_refs = refs[n_gate + per * num_groups + num_groups:]  # the zeroed inputs are aliased outputs
  g, i, j = _grid_position(padded, block_rows, tiles)
  rows = i * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
  valid = rows < tokens
  src = jnp.minimum(rows, tokens - 1)
  f32 = jnp.float32

  def body(gg):
    w1_ref, b1_ref, w2_ref, *bias = w_refs[per * gg:per * (gg + 1)]
    out_ref = out_refs[gg]
    k_rows = _gate_choice(shift_ref, x_ref, gates[gg], src, valid, rows=block_rows, dim=dim, block_k=block_k,
                          num_learners=num_learners, min_choice=min_choice, relative_cost=relative_cost,
                          gate_dtype=gate_dtype)

    def add(cb, part):
      plgpu.atomic_add(out_ref, (pl.ds(i * block_rows, block_rows), pl.ds(cb * block_out, block_out)), part)

    @pl.when(j == 0)
    def _():
      k_ref[pl.ds(gg * padded + i * block_rows, block_rows)] = k_rows
      if has_bias:
        (b2_ref,) = bias
        for cb in range(dim // block_out):
          add(cb, _choice_bias(b2_ref, k_rows, pl.ds(cb * block_out, block_out), num_learners))

    @pl.when(j * block_hidden < jnp.max(k_rows) * width)
    def _():
      cols = pl.ds(j * block_hidden, block_hidden)

      def step(s, acc):
        red = s * block_k + jnp.arange(block_k, dtype=jnp.int32)
        xs = x_ref[src[:, None], red[None, :]]
        ws = w1_ref[pl.ds(s * block_k, block_k), cols]
        return acc + jnp.dot(xs, ws, precision=_precision(xs.dtype), preferred_element_type=f32)

      acc = jax.lax.fori_loop(0, dim // block_k, step, jnp.zeros((block_rows, block_hidden), f32))
      acc = _kernel_activation(activation, fast_math)(acc + b1_ref[cols].astype(f32)[None, :])
      learner = (j * block_hidden + jnp.arange(block_hidden, dtype=jnp.int32)) // width
      keep = (learner[None, :] < k_rows[:, None]) & valid[:, None]
      h = jnp.where(keep, acc, 0.0).astype(x_ref.dtype)  # rounded as the two-launch path stores it
      for cb in range(dim // block_out):
        ws = w2_ref[cols, pl.ds(cb * block_out, block_out)]
        add(cb, jnp.dot(h, ws, precision=_precision(h.dtype), preferred_element_type=f32))

  _for_group(g, num_groups, body)


def _select_kernel(*refs, num_groups, col_blocks, block_rows, block_out, block_k, dim, tokens, padded, sort,
                   num_learners, gate=None):
  """The merged path's launch: out = x @ merged[k] + table[k] for each row's k, one program per
  (ACM, row block, output tile). Refs: order, k, x, (merged, table) per ACM, outputs per ACM; with
  `gate` (the one-launch variant, rows in token order) shift, x, the gate refs per ACM, (merged,
  table) per ACM, outputs per ACM, k out (written by the programs of output tile 0).

  A row block's rows hold choices between their smallest and largest k (one value for most row
  blocks on the sorted path); the program runs one (rows, d) x (d, block_out) product per value
  present and keeps each row's own."""
  from jax.experimental.pallas import triton as plgpu
  row_refs, x_ref, refs = _split_row_refs(refs, gate, num_groups)
  in_refs, out_refs = refs[:2 * num_groups], refs[2 * num_groups:]
  k_out = out_refs[num_groups] if gate is not None else None
  g, i, cb = _grid_position(padded, block_rows, col_blocks)

  def body(gg):
    merged_ref, table_ref = in_refs[2 * gg:2 * gg + 2]
    valid, token, k_rows, max_k = _rows(row_refs, x_ref, gg, i, cb == 0, k_out, gate=gate, block_rows=block_rows,
                                        tokens=tokens, padded=padded, sort=sort, dim=dim)
    min_k = jnp.maximum(jnp.min(jnp.where(valid, k_rows, num_learners)), 1)  # choice 0 is the bias alone
    src = jnp.clip(token, 0, tokens - 1)
    cols = pl.ds(cb * block_out, block_out)

    def choice(j, acc):
      def step(s, part):
        red = s * block_k + jnp.arange(block_k, dtype=jnp.int32)
        xs = x_ref[src[:, None], red[None, :]]
        ws = merged_ref[pl.ds(j * dim + s * block_k, block_k), cols]
        return part + jnp.dot(xs, ws, precision=_precision(xs.dtype), preferred_element_type=jnp.float32)

      part = jax.lax.fori_loop(0, dim // block_k, step, jnp.zeros((block_rows, block_out), jnp.float32))
      return jnp.where((k_rows == j)[:, None], part, acc)

    acc = jax.lax.fori_loop(min_k, max_k + 1, choice, jnp.zeros((block_rows, block_out), jnp.float32))
    col_ids = cb * block_out + jnp.arange(block_out, dtype=jnp.int32)
    acc = acc + table_ref[k_rows[:, None], col_ids[None, :]]
    plgpu.store(out_refs[gg].at[token[:, None], col_ids[None, :]], acc.astype(out_refs[gg].dtype),
                mask=valid[:, None])

  _for_group(g, num_groups, body)


# ----------------------------------------------------------------------------
# Wrapper and reference


def _check_group(x, groups, num_learners, activation, min_choice):
  if activation not in ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
  if x.ndim != 2 or x.shape[0] < 1:
    raise ValueError(f"x must be (tokens, d) with at least one token, got shape {x.shape}")
  if x.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}")
  if not 1 <= len(groups) <= MAX_GROUP:
    raise ValueError(f"a group holds 1..{MAX_GROUP} ACMs, got {len(groups)}")
  if not isinstance(num_learners, int) or not 1 <= num_learners < GATE_COLS:
    raise ValueError(f"num_learners must be an int in 1..{GATE_COLS - 1} (gate width {GATE_COLS}), got {num_learners!r}")
  if not 0 <= min_choice <= num_learners:
    raise ValueError(f"min_choice must lie in 0..{num_learners}, got {min_choice}")
  tokens, dim = x.shape
  first = groups[0]
  for idx, params in enumerate(groups):
    if ("gate" in params) == ("logits" in params):
      raise ValueError(f"ACM {idx} of the group needs exactly one of 'gate' (wg, bg) or 'logits'")
    if ("gate" in params) != ("gate" in first) or ("b2" in params) != ("b2" in first):
      raise ValueError("every ACM of a group must have the same kind of gate and output bias")
    w1 = params["w1"]
    if w1.ndim != 2 or w1.shape[0] != dim or w1.shape[1] % num_learners:
      raise ValueError(f"ACM {idx}: w1 must be (d={dim}, num_learners*h) with num_learners={num_learners}, "
                       f"got {w1.shape}")
    total = w1.shape[1]
    shapes = {"b1": (total,), "w2": (total, dim), "b2": (num_learners + 1, dim)}
    if "gate" in params:
      wg, bg = params["gate"]
      shapes_gate = {"gate kernel": (wg, (dim, num_learners + 1)), "gate bias": (bg, (num_learners + 1,))}
    else:
      shapes_gate = {"logits": (params["logits"], (tokens, num_learners + 1))}
    for name, shape in shapes.items():
      if name in params and params[name].shape != shape:
        raise ValueError(f"ACM {idx}: {name} must have shape {shape}, got {params[name].shape}")
    for name, (arr, shape) in shapes_gate.items():
      if arr.shape != shape:
        raise ValueError(f"ACM {idx}: {name} must have shape {shape}, got {arr.shape}")
    for name in ("w1", "b1", "w2", "b2"):
      if name in params and params[name].dtype != x.dtype:
        raise ValueError(f"ACM {idx}: {name} has dtype {params[name].dtype} but x has {x.dtype}")
    if w1.shape != first["w1"].shape:
      raise ValueError(f"the ACMs of a group must have equal shapes: w1 {w1.shape} vs {first['w1'].shape}")
  return tokens, dim, first["w1"].shape[1] // num_learners


def acm_group(x: jax.Array, groups: Sequence[Mapping[str, jax.Array]], *, num_learners: int,
              activation: str = "gelu", min_choice: int = 0, cost_shift: float | jax.Array = 0.0,
              sort: bool | None = None, onepass: bool | None = None, twolaunch: bool | None = None,
              xla: bool | None = None, fast_math: bool | None = None, interpret: bool | None = None,
              mgpu_down: bool | None = None, merged: bool | None = None, norm: tuple | None = None,
              norm_mode: str | None = None, residual: jax.Array | None = None, mgpu_up: bool | None = None,
              split_down: bool | None = None, inline_sort: bool | None = None, mgpu_regions: bool | None = None,
              **tiles) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """Hard-choice outputs of G ACMs that read the same tokens.

  x: (T, d) bfloat16 or float32. groups: G dicts with w1 (d, N*h), b1 (N*h,),
  w2 (N*h, d), optionally b2 (N+1, d) (per-choice increments, as `acm.ACM`'s
  parameter), all in x.dtype, and either gate = (wg (d, N+1), bg (N+1,)) for a
  linear gate or logits (T, N+1) from a deeper one. cost_shift: a scalar (see
  `acm.ACM`). sort, onepass, twolaunch, xla: the path (module docstring); None picks by token count
  and shape (`default_settings`). tiles: overrides of `FusedConfig`. interpret: None means
  "when the backend is not a GPU" (the xla path runs on any backend). mgpu_down: the sorted
  path's down launch as `acm_mgpu.down_projection` (None: from `MGPU_DOWN_MIN_TOKENS` tokens on,
  where it fits); asking for it where it cannot run raises. mgpu_up: likewise the sorted path's
  up launch as `acm_mgpu.up_projection` (`MGPU_UP_MIN_TOKENS`). merged: linear learners (identity
  activation) through their merged matrices (`merge_linear_learners`, entries "merged" and
  "table" of every ACM of the group; see `_select_kernel`); None: wherever the groups carry them.
  norm: (scale (d,), bias (d,), eps) of a LayerNorm that the group reads through: the ACMs then
  compute on `layer_norm(x, *norm)`, x being the un-normalised input. The routed kernel paths fuse
  it from `NORM_MIN_TOKENS` to `NORM_MAX_TOKENS` tokens for the shape kinds `NORM_KINDS`, in the form
  `norm_mode` names (None: `NORM_MODE`; module docstring); elsewhere it runs first, in XLA.
  residual: (T, d) in x.dtype, added to every output (a block's skip connection): by the down launch of the
  routed paths from `RESIDUAL_MIN_TOKENS` tokens on, or by the launch that returns the Mosaic down launch's
  rows to token order (`MGPU_DOWN_UNSORT` "kernel") or by the split down launch's sum, rounded once with the
  sum; elsewhere by XLA after the kernels.
  split_down: the Triton down launch of the routed and two-launch paths
  (`SPLIT_PATHS`) with its reduction split into parts (`split_parts`; None: up to `DOWN_SPLIT_MAX_TOKENS`
  tokens, where the learner width is a multiple of block_k_down; True raises where it cannot run).
  inline_sort: the sorted path without its scatter launch, the up launch deriving the sorted order from
  the route's counts (`_inline_rows`; None: up to `INLINE_SORT_MAX_TOKENS` tokens; True raises where it
  cannot run). True and None place the tokens as `INLINE_SORT_PLACE` says; "chunks" or "atomic" (one of
  `INLINE_SORT_PLACES`) asks for the inline sort placed that way.
  mgpu_regions: the sorted path with the tokens filed by k in regions and the up launch as
  `acm_mgpu.up_regions` (None: from `MGPU_REGIONS_MIN_TOKENS` to `MGPU_REGIONS_MAX_TOKENS` tokens, where it
  fits; True raises where it cannot run). It takes its own route (atomic placement), up and down launches, so
  inline_sort, split_down, mgpu_up and mgpu_down do not apply to it.

  Returns (outputs: G arrays (T, d) in x.dtype, k: (G, T) int32 in token order).
  """
  tokens, dim, width = _check_group(x, groups, num_learners, activation, min_choice)
  norm = _check_norm(norm, dim)
  if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
    raise ValueError(f"residual must match x: shape {x.shape} and dtype {x.dtype}, got {residual.shape} "
                     f"{residual.dtype}")
  norm_mode = NORM_MODE if norm_mode is None else norm_mode
  if norm_mode not in NORM_MODES:
    raise ValueError(f"norm_mode must be one of {NORM_MODES}, got {norm_mode!r}")
  num_groups = len(groups)
  total = num_learners * width
  cfg, path = resolve_config(x.dtype, dim, total, tokens, sort=sort, onepass=onepass, twolaunch=twolaunch,
                             xla=xla, **tiles)
  if split_down and path not in SPLIT_PATHS:
    _split_down(split_down, tokens, width, cfg, path)  # raises, naming the path
  place = inline_sort if isinstance(inline_sort, str) else INLINE_SORT_PLACE
  if place not in INLINE_SORT_PLACES:
    where = "inline_sort" if isinstance(inline_sort, str) else "acm_fused.INLINE_SORT_PLACE"
    raise ValueError(f"{where} must be one of {INLINE_SORT_PLACES}, got {place!r}")
  if inline_sort and path != "sorted":
    _inline_sort(inline_sort, tokens, path, shape_kind(dim, total))  # raises, naming the path
  if path == "xla":
    return _plus(_acm_group_xla(x if norm is None else layer_norm(x, *norm), groups, num_learners=num_learners,
                                activation=activation, min_choice=min_choice, cost_shift=cost_shift), residual)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if not interpret and jax.default_backend() != "gpu":
    raise ValueError(f"the fused ACM kernels compile for GPUs only; on backend {jax.default_backend()!r} "
                     "pass interpret=True (slow, for tests), xla=True, or use impl='xla'")
  sort = path == "sorted"
  if fast_math is None:
    fast_math = x.dtype == jnp.bfloat16
  fast_math = fast_math and not interpret  # the interpreter cannot run PTX
  use_merged = _merged_tables(groups, activation, merged)
  fuse_norm = (norm is not None and path in ("sorted", "unsorted") and not use_merged
               and NORM_MIN_TOKENS is not None and tokens >= NORM_MIN_TOKENS
               and (NORM_MAX_TOKENS is None or tokens <= NORM_MAX_TOKENS) and shape_kind(dim, total) in NORM_KINDS)
  if norm is not None and not fuse_norm:
    x = layer_norm(x, *norm)
  if path == "onepass" and not use_merged:
    result = _acm_group_onepass(x, groups, cfg, num_learners=num_learners, activation=activation,
                                min_choice=min_choice, cost_shift=cost_shift, fast_math=fast_math, interpret=interpret)
    return _plus(result, residual)
  padded = -(-tokens // max(ROUTE_CHUNK, cfg.block_rows)) * max(ROUTE_CHUNK, cfg.block_rows)
  regions_cfg = _mgpu_regions_config(mgpu_regions, x.dtype, tokens, dim, total, width, activation, path, interpret,
                                     padded=padded, num_groups=len(groups), fused_norm=fuse_norm, merged=use_merged)
  others = [(name, value) for name, value in (("mgpu_up", mgpu_up), ("mgpu_down", mgpu_down),
                                              ("split_down", split_down), ("inline_sort", inline_sort)) if value]
  if regions_cfg and others:  # asked for by name: refuse the mix; picked by default: yield to what was asked
    if mgpu_regions:
      raise ValueError(f"mgpu_regions=True takes its own route, up and down launches; it cannot run with "
                       f"{', '.join(f'{name}={value!r}' for name, value in others)}")
    regions_cfg = None
  down_cfg = None if regions_cfg else _mgpu_down_config(mgpu_down, x.dtype, tokens, dim, total, cfg, path, interpret)
  up_cfg = None if regions_cfg else _mgpu_up_config(mgpu_up, x.dtype, tokens, dim, total, width, activation, cfg,
                                                    path, interpret, down_cfg, fused_norm=fuse_norm)
  split = not regions_cfg and _split_down(split_down, tokens, width, cfg, path, merged=use_merged,
                                          mosaic=bool(down_cfg))
  linear_gate = "gate" in groups[0]
  params = lambda warps: None if interpret else _compiler_params(warps, cfg.num_stages)
  shift = jnp.reshape(jnp.asarray(cost_shift, jnp.float32), (1,))

  gate_inputs = [a for grp in groups for a in (grp["gate"] if linear_gate else (grp["logits"],))]
  gate_settings = dict(block_k=_largest_divisor(dim, GATE_BLOCK_K), num_learners=num_learners, min_choice=min_choice,
                       relative_cost=width / dim, gate_dtype=gate_dtype(x, groups[0]))
  row_blocks = padded // cfg.block_rows
  if use_merged:
    return _plus(_acm_group_merged(shift, x, groups, gate_inputs, cfg=cfg, path=path, padded=padded,
                                   linear_gate=linear_gate, gate_settings=gate_settings, interpret=interpret),
                 residual)
  tiles_per_block = total // cfg.block_hidden
  up = functools.partial(_up_kernel, num_groups=num_groups, tiles=tiles_per_block, block_rows=cfg.block_rows,
                         block_hidden=cfg.block_hidden, block_k=cfg.block_k_up, dim=dim, width=width,
                         tokens=tokens, padded=padded, sort=sort, activation=activation, fast_math=fast_math)
  hidden_shapes = (jax.ShapeDtypeStruct((padded, total), x.dtype),) * num_groups
  up_call = functools.partial(pl.pallas_call, grid=(num_groups * row_blocks * tiles_per_block,),
                              compiler_params=params(cfg.num_warps), interpret=interpret)
  weights_up = [a for grp in groups for a in (grp["w1"], grp["b1"])]
  if path == "twolaunch":  # the gate inside the up kernel: no route launch
    *hidden, k_tokens = up_call(
        functools.partial(up, gate=dict(gate_settings, gate_refs_per_group=2 if linear_gate else 1)),
        out_shape=hidden_shapes + (jax.ShapeDtypeStruct((num_groups * padded,), jnp.int32),),
        name="acm_group_gated_up")(shift, x, *gate_inputs, *weights_up)
    order = k_rows = k_tokens  # order is not read on the unsorted paths
  elif regions_cfg:  # order and k_rows: the route's slots and category totals, which the down launch reads
    (k_tokens, order, k_rows, x_regions), _ = _route(
        shift, x, gate_inputs, num_groups=1, padded=padded, linear_gate=linear_gate, sort=True, positions=False,
        gate_settings=gate_settings, num_stages=cfg.num_stages, interpret=interpret, inline=True, atomic=True,
        write_x=True)
    from pallas_kernels import acm_mgpu
    hidden = (acm_mgpu.up_regions(x_regions, groups[0]["w1"], groups[0]["b1"], k_rows, width=width,
                                  activation=activation, cfg=regions_cfg, interpret=interpret),)
  else:
    inline = _inline_sort(inline_sort, tokens, path, shape_kind(dim, total), mosaic=bool(down_cfg or up_cfg))
    atomic = inline and place == "atomic"
    (k_tokens, order, k_rows, *positions), stats = _route(
        shift, x, gate_inputs, num_groups=num_groups, padded=padded, linear_gate=linear_gate, sort=sort,
        positions=bool(down_cfg), gate_settings=gate_settings, num_stages=cfg.num_stages, interpret=interpret,
        norm=norm if fuse_norm else None, inline=inline, atomic=atomic)
    if inline:  # the up launch also returns the sorted order and the rows' k, for the down launch
      chunk = route_settings(tokens, dim, cfg.num_stages)[0]
      up = functools.partial(up, inline=dict(chunk=chunk, num_learners=num_learners, atomic=atomic))
      hidden_shapes += (jax.ShapeDtypeStruct((num_groups * padded,), jnp.int32),) * 2
    if fuse_norm and norm_mode == "fold":
      weights_up = [a for grp in groups for a in fold_norm(grp["w1"], grp["b1"], *norm[:2])]
      hidden = up_call(functools.partial(up, norm="fold"), out_shape=hidden_shapes, name="acm_group_up")(
          order, k_rows, x, *stats, *weights_up)
    elif fuse_norm:
      hidden = up_call(functools.partial(up, norm="prologue"), out_shape=hidden_shapes, name="acm_group_up")(
          order, k_rows, x, *stats, *norm[:2], *weights_up)
    elif up_cfg:
      hidden = _mgpu_up(x, groups, order, k_rows, cfg=up_cfg, tokens=tokens, padded=padded, width=width,
                        activation=activation, num_learners=num_learners, interpret=interpret)
    else:
      hidden = up_call(up, out_shape=hidden_shapes, name="acm_group_up")(order, k_rows, x, *weights_up)
    if inline:
      *hidden, order, k_rows = hidden
  k = k_tokens.reshape(num_groups, padded)[:, :tokens]
  if down_cfg:
    outs, added = _mgpu_down(hidden, groups, k_rows, positions[0], k_tokens, residual, cfg=down_cfg, tokens=tokens,
                             padded=padded, width=width, interpret=interpret)
    return _plus((outs, k), None if added else residual)
  if split:
    outs = _down_split(hidden, groups, order, k_rows, k_tokens, residual, cfg=cfg, tokens=tokens, padded=padded,
                       width=width, sort=sort, num_learners=num_learners, dtype=x.dtype,
                       compiler_params=params(cfg.down_warps), interpret=interpret)
    return outs, k
  has_bias = "b2" in groups[0]
  col_blocks = dim // cfg.block_out
  bias_loop = has_bias and DOWN_BIAS_LOOP_MAX_TOKENS is not None and tokens <= DOWN_BIAS_LOOP_MAX_TOKENS
  bias = lambda grp: (grp["b2"] if bias_loop else _bias_table(grp),) if has_bias else ()
  down_inputs = [a for h, grp in zip(hidden, groups) for a in (h, grp["w2"]) + bias(grp)]
  fuse_residual = residual is not None and RESIDUAL_MIN_TOKENS is not None and tokens >= RESIDUAL_MIN_TOKENS
  outs = pl.pallas_call(
      functools.partial(_down_kernel, num_groups=num_groups, col_blocks=col_blocks, block_rows=cfg.down_rows,
                        block_out=cfg.block_out, block_k=cfg.block_k_down, width=width, tokens=tokens,
                        padded=padded, sort=sort, num_learners=num_learners, has_bias=has_bias,
                        has_residual=fuse_residual, bias_loop=bias_loop, regions=bool(regions_cfg)),
      out_shape=(jax.ShapeDtypeStruct((tokens, dim), x.dtype),) * num_groups,
      grid=(num_groups * (padded // cfg.down_rows + (num_learners + 1 if regions_cfg else 0)) * col_blocks,),
      compiler_params=params(cfg.down_warps),
      interpret=interpret, name="acm_group_down",
  )(order, k_rows, *down_inputs, *((residual,) if fuse_residual else ()))
  return _plus((tuple(outs), k), None if fuse_residual else residual)


# the paths whose down launch can split its reduction: the routed ones, and the two-launch path (unsorted, its k
# from the up launch), where the split makes batch 1 three launches per group (gated up, split down, XLA's sum)
SPLIT_PATHS = ("sorted", "unsorted", "twolaunch")


def _split_down(asked, tokens, width, cfg, path, *, merged=False, mosaic=False) -> bool:
  """Whether the down launch splits its reduction into parts (`DOWN_SPLIT_MAX_TOKENS`, or `asked`:
  True raises where it cannot run)."""
  why = None
  if path not in SPLIT_PATHS:
    why = f"it runs on the {', '.join(SPLIT_PATHS)} paths only (this call takes the {path!r} path)"
  elif merged:
    why = "linear learners through their merged tables have no down launch"
  elif mosaic:
    why = "the Mosaic GPU down launch (mgpu_down) replaces the down launch it splits"
  elif width % cfg.block_k_down:
    why = f"the learner width {width} must be a multiple of block_k_down={cfg.block_k_down}"
  return _switch("split_down", asked, why, DOWN_SPLIT_MAX_TOKENS is not None and tokens <= DOWN_SPLIT_MAX_TOKENS)


def _switch(name: str, asked: bool | None, why: str | None, default: bool) -> bool:
  """An `acm_group` switch: None takes `default` where the option can run (`why` None: nothing stops it); True
  raises `why` where it cannot; False is off."""
  if asked is None:
    return why is None and default
  if asked and why:
    raise ValueError(f"{name}={asked!r}: {why}")
  return bool(asked)


def _inline_sort(asked, tokens, path, kind, *, mosaic=False) -> bool:
  """Whether the sorted path skips its scatter launch (`INLINE_SORT_MIN_TOKENS` to `INLINE_SORT_MAX_TOKENS`, or to
  `INLINE_SORT_WIDE_MAX_TOKENS` for the shape kinds `INLINE_SORT_WIDE_KINDS`; or `asked`: True raises where it
  cannot run)."""
  why = None
  if path != "sorted":
    why = f"it runs on the sorted path only (this call takes the {path!r} path)"
  elif mosaic:
    why = "the Mosaic GPU launches (mgpu_up, mgpu_down) read the scatter launch's permutation"
  bounds = [INLINE_SORT_MAX_TOKENS] + ([INLINE_SORT_WIDE_MAX_TOKENS] if kind in INLINE_SORT_WIDE_KINDS else [])
  bounds = [b for b in bounds if b is not None]
  return _switch("inline_sort", asked, why, bool(bounds) and INLINE_SORT_MIN_TOKENS <= tokens <= max(bounds))


def _plus(result, residual):
  """(outputs, k) with the residual added to every output by XLA (nothing when it is None)."""
  if residual is None:
    return result
  outs, k = result
  return tuple(residual + out for out in outs), k


def route_settings(tokens: int, dim: int, num_stages: int) -> tuple[int, int, int]:
  """(tokens per program, gate reduction columns per step, pipeline stages) of the route launch at `tokens`
  tokens of width `dim`: ROUTE_SMALL up to ROUTE_SMALL_MAX_TOKENS, ROUTE_MEDIUM above it up to
  ROUTE_MEDIUM_MAX_TOKENS, else ROUTE_CHUNK, GATE_BLOCK_K and `num_stages` (the up launch's). ValueError naming
  the setting where the one that applies is not usable."""
  regimes = (("ROUTE_SMALL", ROUTE_SMALL_MAX_TOKENS, ROUTE_SMALL),
             ("ROUTE_MEDIUM", ROUTE_MEDIUM_MAX_TOKENS, ROUTE_MEDIUM))
  for name, limit, table in regimes:
    if limit is not None and tokens <= limit:
      chunk, block_k, stages = _route_table(name, table)
      return chunk, _largest_divisor(dim, block_k), stages
  return ROUTE_CHUNK, _largest_divisor(dim, GATE_BLOCK_K), num_stages


def _route_table(name: str, table) -> tuple[int, int, int]:
  """(chunk, block_k, num_stages) of the route setting `name` (ROUTE_SMALL or ROUTE_MEDIUM); ValueError naming
  it unless chunk is a power of two from 16 to ROUTE_CHUNK, block_k a power of two >= 16 and num_stages >= 1."""
  keys = ("chunk", "block_k", "num_stages")
  chunk, block_k, stages = (table.get(key) if isinstance(table, dict) else None for key in keys)
  ok = lambda v, lo, hi: isinstance(v, int) and lo <= v <= hi and v & (v - 1) == 0
  if set(table or ()) != set(keys) or not (
      ok(chunk, 16, ROUTE_CHUNK) and ok(block_k, 16, 1 << 20) and isinstance(stages, int) and stages >= 1):
    raise ValueError(f"acm_fused.{name} must be {{'chunk': a power of two from 16 to {ROUTE_CHUNK}, "
                     f"'block_k': a power of two >= 16, 'num_stages': an integer >= 1}}, got {table!r}")
  return chunk, block_k, stages


def route_shared(num_groups: int, linear_gate: bool, tokens: int) -> bool:
  """Whether the route launch computes a group's gates in one program per chunk (`ROUTE_SHARED_MIN_TOKENS`):
  groups of several ACMs with linear gates (precomputed logits read no x) from that many tokens on."""
  return (num_groups > 1 and linear_gate and ROUTE_SHARED_MIN_TOKENS is not None
          and tokens >= ROUTE_SHARED_MIN_TOKENS)


def _route(shift, x, gate_inputs, *, num_groups, padded, linear_gate, sort, positions, gate_settings, num_stages,
           interpret, norm=None, inline=False, atomic=False, write_x=False):
  """The route launch, and on the sorted path the scatter launch: ((k in token order, order, k of
  the rows) each (G * padded,) int32, plus each token's sorted place when `positions`; with
  `norm` (scale, bias, eps), x is un-normalised and the second item is (mean, rstd) of every token,
  (padded,) float32 each, else None). Unsorted, order and the rows' k are k itself (order is not
  read there). inline (sorted): no scatter launch; order and the rows' k are replaced by the route's
  slots and per-chunk counts, from which the up launch derives both (`_inline_rows`; atomic: the
  counts are each category's total, `_atomic_rows`; write_x: and x_regions after them, `_route_kernel`). Tokens per
  program, gate steps and stages follow `route_settings`; a group's gates share one program per chunk
  where `route_shared` says so."""
  chunk, block_k, num_stages = route_settings(x.shape[0], x.shape[1], num_stages)
  gate_settings = dict(gate_settings, block_k=block_k)
  num_chunks = padded // chunk
  params = None if interpret else _compiler_params(4, num_stages)
  route_out = [jax.ShapeDtypeStruct((num_groups * padded,), jnp.int32)]
  if sort:  # ranks (for the scatter launch) or, inline, slots, beside the per-chunk counts
    route_out += [jax.ShapeDtypeStruct((num_groups * padded,), jnp.int32)] * (not inline)
    route_out += [jax.ShapeDtypeStruct(((1 if atomic else num_chunks) * num_groups * GATE_COLS,),
                                       jnp.float32 if atomic else jnp.int32)]
    route_out += [jax.ShapeDtypeStruct(((num_groups * GATE_COLS + 1) * padded,), jnp.int32)] * inline
    route_out += [jax.ShapeDtypeStruct(((gate_settings["num_learners"] + 1) * padded, x.shape[1]), x.dtype)] * write_x
  norm_inputs = ()
  if norm is not None:
    route_out += [jax.ShapeDtypeStruct((padded,), jnp.float32)] * 2
    norm_inputs = norm[:2]
  shared = route_shared(num_groups, linear_gate, x.shape[0])
  counters = (jnp.zeros((num_groups * GATE_COLS,), jnp.float32),) if atomic else ()  # aliased to the counts out
  routed = pl.pallas_call(
      functools.partial(_route_kernel, num_groups=num_groups, gate_refs_per_group=2 if linear_gate else 1,
                        tokens=x.shape[0], padded=padded, chunk=chunk, dim=x.shape[1], sort=sort,
                        norm_eps=None if norm is None else norm[2], shared=shared, inline=sort and inline,
                        atomic=atomic, write_x=write_x, **gate_settings),
      out_shape=tuple(route_out), grid=((1 if shared else num_groups) * num_chunks,), compiler_params=params,
      input_output_aliases={2 + len(norm_inputs) + len(gate_inputs): 1} if atomic else {},
      interpret=interpret, name="acm_route",
  )(shift, x, *norm_inputs, *gate_inputs, *counters)
  stats = None
  if norm is not None:
    *routed, mean, rstd = routed
    stats = (mean, rstd)
  k_tokens = routed[0]
  if not sort:
    return (k_tokens, k_tokens, k_tokens), stats
  if inline:
    _, counts, slots, *x_regions = routed
    return (k_tokens, slots, counts, *x_regions), stats
  sorted_out = pl.pallas_call(
      functools.partial(_scatter_kernel, num_groups=num_groups, tokens=x.shape[0], padded=padded,
                        chunk=chunk, num_learners=gate_settings["num_learners"]),
      out_shape=(jax.ShapeDtypeStruct((num_groups * padded,), jnp.int32),) * (3 if positions else 2),
      grid=(num_groups * num_chunks,), compiler_params=params, interpret=interpret, name="acm_scatter",
  )(*routed)
  return (k_tokens, *sorted_out), stats


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """Flax's `nn.LayerNorm(epsilon=eps, dtype=x.dtype)` over the last axis of x: statistics in
  float32, the variance as E[x^2] - E[x]^2 clipped at 0, the result in x.dtype."""
  f32 = jnp.float32
  x32 = x.astype(f32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(x32 * x32, axis=-1, keepdims=True) - mean * mean, 0.0)
  mul = jax.lax.rsqrt(var + eps) * scale.astype(f32)
  return ((x32 - mean) * mul + bias.astype(f32)).astype(x.dtype)


def fold_norm(w1: jax.Array, b1: jax.Array, scale: jax.Array, bias: jax.Array) -> tuple[jax.Array, ...]:
  """A LayerNorm's scale and bias folded into the up projection that reads its output:
  (scale * w1 in w1's dtype, b1 + bias @ w1 in float32, the column sums of the first in float32),
  so that LN(x) @ w1 + b1 = rstd * (x @ w1s) - mean * rstd * colsum + b1f (module docstring)."""
  f32 = jnp.float32
  scaled = (scale.astype(f32)[:, None] * w1.astype(f32)).astype(w1.dtype)
  folded = b1.astype(f32) + jnp.dot(bias.astype(f32), w1.astype(f32), precision=jax.lax.Precision.HIGHEST)
  return scaled, folded, jnp.sum(scaled.astype(f32), axis=0)


def _check_norm(norm, dim: int):
  """norm as (scale (d,), bias (d,), eps float > 0), or None."""
  if norm is None:
    return None
  if not isinstance(norm, (tuple, list)) or len(norm) != 3:
    raise ValueError(f"norm must be (scale, bias, eps) of a LayerNorm, got {type(norm).__name__}")
  scale, bias, eps = norm
  for name, arr in (("scale", scale), ("bias", bias)):
    if getattr(arr, "shape", None) != (dim,):
      raise ValueError(f"norm {name} must have shape ({dim},) to match x's d, got {getattr(arr, 'shape', arr)}")
  if isinstance(eps, jax.core.Tracer) or not float(eps) > 0:
    raise ValueError(f"norm eps must be a positive Python float, got {eps!r}")
  return scale, bias, float(eps)


def _mgpu_down_config(asked, dtype, tokens, dim, total, cfg, path, interpret):
  """The `acm_mgpu.DownConfig` of the sorted path's down launch, or None for the Triton kernel."""
  from pallas_kernels import acm_mgpu
  if asked is None:
    asked = (MGPU_DOWN_MIN_TOKENS is not None and tokens >= MGPU_DOWN_MIN_TOKENS and not interpret
             and shape_kind(dim, total) in MGPU_DOWN_KINDS and jnp.dtype(dtype) == jnp.bfloat16
             and gpu_family() == "hopper")
    quiet = True
  else:
    quiet = False
  if not asked:
    return None
  rows = 128 if cfg.block_rows % 128 == 0 else 64
  down = dataclasses.replace(acm_mgpu.DownConfig(), **{"tile_m": rows, **MGPU_DOWN_TILES})
  why = None
  if path != "sorted":
    why = f"it runs on the sorted path only (this call takes the {path!r} path)"
  elif cfg.block_rows % down.rows:
    why = f"its row blocks of {down.rows} must divide the up launch's block_rows={cfg.block_rows}"
  else:
    padded = -(-tokens // max(ROUTE_CHUNK, cfg.block_rows)) * max(ROUTE_CHUNK, cfg.block_rows)
    try:
      acm_mgpu.check((padded, total), (total, dim), dtype, down)
    except ValueError as err:
      why = str(err)
  return _mosaic_verdict("mgpu_down", down, why, quiet=quiet, interpret=interpret)


def _mosaic_verdict(switch: str, tiles, why: str | None, *, quiet: bool, interpret: bool):
  """The tiles of a Mosaic GPU launch, or None (quiet: the default picked it) or a ValueError naming why
  (asked for by name) when it cannot run here."""
  if why is None and not interpret and gpu_family() != "hopper":
    why = "it needs a Hopper GPU (wgmma and TMA); pass interpret=True to simulate it"
  if why is None:
    return tiles
  if quiet:
    return None
  raise ValueError(f"{switch}=True: {why}")


def _mgpu_up_config(asked, dtype, tokens, dim, total, width, activation, cfg, path, interpret, down_cfg, *,
                    fused_norm):
  """The `acm_mgpu.DownConfig` tiles of the sorted path's up launch as the Mosaic GPU kernel, or None
  for the Triton kernel."""
  from pallas_kernels import acm_mgpu
  quiet = asked is None
  if quiet:
    asked = (MGPU_UP_MIN_TOKENS is not None and tokens >= MGPU_UP_MIN_TOKENS and not interpret
             and shape_kind(dim, total) in MGPU_UP_KINDS and jnp.dtype(dtype) == jnp.bfloat16
             and gpu_family() == "hopper")
  if not asked:
    return None
  up = dataclasses.replace(acm_mgpu.DownConfig(tile_m=128), **MGPU_UP_TILES)
  padded = -(-tokens // max(ROUTE_CHUNK, cfg.block_rows)) * max(ROUTE_CHUNK, cfg.block_rows)
  why = None
  if path != "sorted":
    why = f"it runs on the sorted path only (this call takes the {path!r} path)"
  elif fused_norm:
    why = "the LayerNorm fusion (NORM_MIN_TOKENS) has its own up launch"
  elif activation not in acm_mgpu.UP_ACTIVATIONS:
    why = f"activation {activation!r} is not one of {acm_mgpu.UP_ACTIVATIONS}"
  elif bad := [rows for rows in (cfg.block_rows, down_cfg.rows if down_cfg else 1) if up.rows % rows]:
    # the down launch reduces a row block up to its first row's k; the up launch's block holding that
    # row must have written that far, so its row blocks must start where the down launch's do
    why = f"its row blocks of {up.rows} must be a multiple of the down launch's row blocks of {bad[0]}"
  else:
    try:
      acm_mgpu.check_up((padded, dim), (dim, total), dtype, up, width)
    except ValueError as err:
      why = str(err)
  return _mosaic_verdict("mgpu_up", up, why, quiet=quiet, interpret=interpret)


def _mgpu_regions_config(asked, dtype, tokens, dim, total, width, activation, path, interpret, *, padded, num_groups,
                         fused_norm, merged):
  """The `acm_mgpu.DownConfig` tiles of the regions path's up launch (`MGPU_REGIONS_MIN_TOKENS`; its tiles
  `MGPU_UP_TILES`), or None for the other paths."""
  from pallas_kernels import acm_mgpu
  quiet = asked is None
  if quiet:
    asked = (MGPU_REGIONS_MIN_TOKENS is not None and tokens >= MGPU_REGIONS_MIN_TOKENS
             and (MGPU_REGIONS_MAX_TOKENS is None or tokens <= MGPU_REGIONS_MAX_TOKENS) and not interpret
             and shape_kind(dim, total) in MGPU_REGIONS_KINDS and jnp.dtype(dtype) == jnp.bfloat16
             and gpu_family() == "hopper")
  if not asked:
    return None
  up = dataclasses.replace(acm_mgpu.DownConfig(tile_m=128), **MGPU_UP_TILES)
  why = None
  if path != "sorted":
    why = f"it runs on the sorted path only (this call takes the {path!r} path)"
  elif num_groups != 1:
    why = f"it files the tokens of one ACM (this group has {num_groups})"
  elif fused_norm:
    why = "the LayerNorm fusion (NORM_MIN_TOKENS) reads x un-normalised"
  elif merged:
    why = "linear learners through their merged tables have no up launch"
  elif activation not in acm_mgpu.UP_ACTIVATIONS:
    why = f"activation {activation!r} is not one of {acm_mgpu.UP_ACTIVATIONS}"
  elif padded % up.rows:
    why = f"its row blocks of {up.rows} must divide the {padded} padded rows of each region"
  else:
    try:
      acm_mgpu.check_up(((total // width + 1) * padded, dim), (dim, total), dtype, up, width)
    except ValueError as err:
      why = str(err)
  return _mosaic_verdict("mgpu_regions", up, why, quiet=quiet, interpret=interpret)


def _mgpu_up(x, groups, order, sorted_k, *, cfg, tokens, padded, width, activation, num_learners, interpret):
  """Hidden buffers of the sorted path by `acm_mgpu.up_projection`: each ACM's rows gathered into its
  sorted order, its row blocks' largest k and each learner's count of rows (#tokens with k > n)."""
  from pallas_kernels import acm_mgpu
  valid = jnp.arange(padded) < tokens
  hidden = []
  for gg, grp in enumerate(groups):
    k = jnp.where(valid, sorted_k[gg * padded:(gg + 1) * padded], 0)
    rows = x[jnp.clip(order[gg * padded:(gg + 1) * padded], 0, tokens - 1)]
    thresholds = jnp.sum((k[:, None] > jnp.arange(num_learners)[None, :]).astype(jnp.int32), axis=0)
    hidden.append(acm_mgpu.up_projection(rows, grp["w1"], grp["b1"], k[::cfg.rows], thresholds, width=width,
                                         activation=activation, cfg=cfg, interpret=interpret))
  return tuple(hidden)


def _mgpu_down(hidden, groups, sorted_k, positions, k_tokens, residual, *, cfg, tokens, padded, width, interpret):
  """Down projections of the sorted path by `acm_mgpu.down_projection`, then each token's row
  gathered back from the sorted order with its choice's cumulative output bias: one XLA fusion, or
  with `MGPU_DOWN_UNSORT` "kernel" one `_unsort_kernel` launch that adds `residual` (when given) too.
  Returns (outputs, whether they include the residual)."""
  from pallas_kernels import acm_mgpu
  if MGPU_DOWN_UNSORT not in MGPU_DOWN_UNSORTS:
    raise ValueError(f"acm_fused.MGPU_DOWN_UNSORT must be one of {MGPU_DOWN_UNSORTS}, got {MGPU_DOWN_UNSORT!r}")
  kernel = MGPU_DOWN_UNSORT == "kernel"
  outs = []
  for gg, (h, grp) in enumerate(zip(hidden, groups)):
    steps = acm_mgpu.block_steps(sorted_k[gg * padded:(gg + 1) * padded], rows=padded, block_rows=cfg.rows,
                                 width=width, block_k=cfg.block_k, tokens=tokens)
    steps = jnp.clip(steps, 1, h.shape[1] // cfg.block_k)
    y = acm_mgpu.down_projection(h, grp["w2"], steps, cfg=cfg, interpret=interpret)
    pos = positions[gg * padded:gg * padded + tokens]
    k = k_tokens[gg * padded:gg * padded + tokens]
    table = _bias_table(grp)
    if kernel:
      outs.append(_unsort(y, pos, k, table, residual, tokens=tokens, padded=padded, dtype=h.dtype,
                          interpret=interpret))
      continue
    out = jnp.where((k > 0)[:, None], y[jnp.clip(pos, 0, padded - 1)].astype(jnp.float32), 0.0)
    if table is not None:
      out = out + table[k]
    outs.append(out.astype(h.dtype))
  return tuple(outs), kernel and residual is not None


def merge_linear_learners(params: Mapping[str, jax.Array], num_learners: int) -> dict[str, jax.Array]:
  """The merged form of an ACM whose learners are linear (identity activation):

      h(x, k) = sum_{n < k} (x @ w1[:, n] + b1[n]) @ w2[n] + b2[0] + ... + b2[k]
              = x @ M_k + c_k,   M_k = sum_{n < k} w1[:, n] @ w2[n]

  so a token of choice k costs one (d, d) product whatever k is, in one launch and with no
  hidden buffer. Returns {"merged": ((N+1) d, d_out) in w1's dtype, the M_k stacked (M_0 = 0),
  "table": (N+1, d_out) float32, the c_k}, both computed in float32. (N+1) d^2 entries per ACM,
  so a server would compute them once; nothing in acm_jax passes them to the model yet (see the
  module docstring)."""
  f32 = jnp.float32
  w1, b1, w2 = (params[name].astype(f32) for name in ("w1", "b1", "w2"))
  dim, total = w1.shape
  if total % num_learners or w2.shape[0] != total or b1.shape != (total,):
    raise ValueError(f"w1 {w1.shape}, b1 {b1.shape}, w2 {w2.shape} do not hold {num_learners} learners of equal width")
  width, out = total // num_learners, w2.shape[1]
  w1_n = w1.reshape(dim, num_learners, width)
  w2_n = w2.reshape(num_learners, width, out)
  per_learner = jnp.einsum("dnw,nwe->nde", w1_n, w2_n, precision=jax.lax.Precision.HIGHEST)
  merged = jnp.concatenate([jnp.zeros((1, dim, out), f32), jnp.cumsum(per_learner, axis=0)])
  hidden_bias = jnp.einsum("nw,nwe->ne", b1.reshape(num_learners, width), w2_n, precision=jax.lax.Precision.HIGHEST)
  table = jnp.concatenate([jnp.zeros((1, out), f32), jnp.cumsum(hidden_bias, axis=0)])
  if "b2" in params:
    table = table + jnp.cumsum(params["b2"].astype(f32), axis=0)
  return {"merged": merged.reshape((num_learners + 1) * dim, out).astype(params["w1"].dtype), "table": table}


def _merged_tables(groups, activation, asked) -> bool:
  """Whether this call takes the merged path (see `acm_group`'s `merged`); checks the tables."""
  have = ["merged" in grp for grp in groups]
  if asked is False or (asked is None and not all(have)):
    return False
  if not all(have):
    raise ValueError("merged=True needs every ACM of the group to carry 'merged' and 'table' "
                     "(pallas_kernels.acm_fused.merge_linear_learners)")
  if activation != "identity":
    raise ValueError(f"merged matrices stand for linear learners (activation 'identity'), got {activation!r}")
  return True


def _check_merged(x, groups, num_learners):
  dim = x.shape[1]
  for idx, grp in enumerate(groups):
    shapes = {"merged": ((num_learners + 1) * dim, dim), "table": (num_learners + 1, dim)}
    for name, shape in shapes.items():
      if name not in grp or grp[name].shape != shape:
        raise ValueError(f"ACM {idx}: {name} must have shape {shape}, got "
                         f"{grp[name].shape if name in grp else 'nothing'}")
    if grp["merged"].dtype != x.dtype:
      raise ValueError(f"ACM {idx}: merged has dtype {grp['merged'].dtype} but x has {x.dtype}")


def _acm_group_merged(shift, x, groups, gate_inputs, *, cfg, path, padded, linear_gate, gate_settings, interpret):
  """`acm_group` for linear learners through their merged matrices: route (+ scatter when sorted)
  and one select launch, or on the one-launch paths (onepass, twolaunch) the select launch alone,
  computing each row block's gate itself, rows in token order."""
  num_learners = gate_settings["num_learners"]
  _check_merged(x, groups, num_learners)
  tokens, dim = x.shape
  num_groups = len(groups)
  col_blocks = dim // cfg.block_out
  block_k = _largest_divisor(dim, cfg.block_k_up)
  row_blocks = padded // cfg.block_rows
  kernel = functools.partial(_select_kernel, num_groups=num_groups, col_blocks=col_blocks, block_rows=cfg.block_rows,
                             block_out=cfg.block_out, block_k=block_k, dim=dim, tokens=tokens, padded=padded,
                             sort=path == "sorted", num_learners=num_learners)
  call = functools.partial(pl.pallas_call, grid=(num_groups * row_blocks * col_blocks,), interpret=interpret,
                           compiler_params=None if interpret else _compiler_params(cfg.num_warps, cfg.num_stages))
  tables = [a for grp in groups for a in (grp["merged"], grp["table"].astype(jnp.float32))]
  out_shapes = (jax.ShapeDtypeStruct((tokens, dim), x.dtype),) * num_groups
  if path in ("onepass", "twolaunch"):
    *outs, k_tokens = call(
        functools.partial(kernel, gate=dict(gate_settings, gate_refs_per_group=2 if linear_gate else 1)),
        out_shape=out_shapes + (jax.ShapeDtypeStruct((num_groups * padded,), jnp.int32),),
        name="acm_group_gated_select")(shift, x, *gate_inputs, *tables)
  else:
    (k_tokens, order, k_rows), _ = _route(shift, x, gate_inputs, num_groups=num_groups, padded=padded,
                                          linear_gate=linear_gate, sort=path == "sorted", positions=False,
                                          gate_settings=gate_settings, num_stages=cfg.num_stages,
                                          interpret=interpret)
    outs = call(kernel, out_shape=out_shapes, name="acm_group_select")(order, k_rows, x, *tables)
  return tuple(outs), k_tokens.reshape(num_groups, padded)[:, :tokens]


def _acm_group_onepass(x, groups, cfg, *, num_learners, activation, min_choice, cost_shift, fast_math, interpret):
  """`acm_group` in one launch (`_onepass_kernel`); the outputs are summed in float32 and
  rounded to x.dtype once, at the end."""
  tokens, dim = x.shape
  num_groups = len(groups)
  width = groups[0]["w1"].shape[1] // num_learners
  total = num_learners * width
  padded = -(-tokens // cfg.block_rows) * cfg.block_rows
  tiles = total // cfg.block_hidden
  linear_gate = "gate" in groups[0]
  has_bias = "b2" in groups[0]
  gate_inputs = [a for grp in groups for a in (grp["gate"] if linear_gate else (grp["logits"],))]
  weights = [a for grp in groups for a in (grp["w1"], grp["b1"], grp["w2"]) + ((grp["b2"],) if has_bias else ())]
  zeros = [jnp.zeros((padded, dim), jnp.float32) for _ in groups]
  inputs = [jnp.reshape(jnp.asarray(cost_shift, jnp.float32), (1,)), x, *gate_inputs, *weights, *zeros]
  first_zero = len(inputs) - num_groups
  k_flat, *outs = pl.pallas_call(
      functools.partial(_onepass_kernel, num_groups=num_groups, gate_refs_per_group=2 if linear_gate else 1,
                        tiles=tiles, block_rows=cfg.block_rows, block_hidden=cfg.block_hidden,
                        block_out=cfg.block_out, block_k=cfg.block_k_up, dim=dim, width=width, tokens=tokens,
                        padded=padded, num_learners=num_learners, min_choice=min_choice,
                        relative_cost=width / dim, gate_dtype=gate_dtype(x, groups[0]), activation=activation,
                        fast_math=fast_math, has_bias=has_bias),
      out_shape=(jax.ShapeDtypeStruct((num_groups * padded,), jnp.int32),)
      + (jax.ShapeDtypeStruct((padded, dim), jnp.float32),) * num_groups,
      grid=(num_groups * (padded // cfg.block_rows) * tiles,),
      input_output_aliases={first_zero + g: 1 + g for g in range(num_groups)},
      compiler_params=None if interpret else _compiler_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret, name="acm_group_onepass",
  )(*inputs)
  k = k_flat.reshape(num_groups, padded)[:, :tokens]
  return tuple(o[:tokens].astype(x.dtype) for o in outs), k


def _acm_group_xla(x, groups, *, num_learners, activation, min_choice, cost_shift):
  """`acm_group` as dense XLA matmuls in x.dtype with float32 accumulation: the gates and the
  up projections of the whole group as one matmul each, hidden units past k set to zero."""
  f32 = jnp.float32
  n, dim = num_learners, x.shape[1]
  total = groups[0]["w1"].shape[1]
  width = total // n
  if "gate" in groups[0]:
    dtype = gate_dtype(x, groups[0])
    wg = jnp.concatenate([g["gate"][0].astype(dtype) for g in groups], axis=1)
    bg = jnp.concatenate([g["gate"][1].astype(dtype) for g in groups])
    # rounded where a Flax Dense of this dtype rounds: after the matmul and after the bias
    raw = (jnp.dot(x.astype(dtype), wg, preferred_element_type=f32).astype(dtype) + bg).astype(f32)
    raw = raw.reshape(x.shape[0], len(groups), n + 1)
  else:
    raw = jnp.stack([g["logits"].astype(f32) for g in groups], axis=1)
  k = jnp.argmax(_shifted(raw, n, width / dim, cost_shift, min_choice), axis=-1).astype(jnp.int32)  # (T, G)
  w1 = jnp.concatenate([g["w1"] for g in groups], axis=1)
  b1 = jnp.concatenate([g["b1"] for g in groups])
  pre = jnp.dot(x, w1, preferred_element_type=f32) + b1.astype(f32)
  hidden = _activation_reference(activation)(pre).reshape(x.shape[0], len(groups), total)
  learner = jnp.arange(total) // width
  hidden = jnp.where(learner < k[..., None], hidden, 0.0).astype(x.dtype)
  outs = []
  for g, grp in enumerate(groups):
    out = jnp.dot(hidden[:, g], grp["w2"], preferred_element_type=f32)
    if "b2" in grp:
      out = out + _bias_table(grp)[k[:, g]]
    outs.append(out.astype(x.dtype))
  return tuple(outs), k.T


def gate_dtype(x, params):
  """The dtype a Flax Dense gate computes in: that of x, kernel and bias together."""
  if "gate" not in params:
    return jnp.dtype(jnp.float32)
  return jnp.dtype(jnp.result_type(x.dtype, *params["gate"]))


def gate_logits_reference(x, params, *, num_learners: int, min_choice: int = 0, cost_shift=0.0) -> jax.Array:
  """Float32 logits of one ACM of a group, shifted and masked as the route kernel does: (T, N+1)."""
  f32 = jnp.float32
  if "gate" in params:
    wg, bg = params["gate"]
    dtype = gate_dtype(x, params)
    logits = jnp.dot(x.astype(dtype), wg.astype(dtype), preferred_element_type=f32, precision="highest")
    logits = (logits.astype(dtype) + bg.astype(dtype)).astype(f32)
  else:
    logits = params["logits"].astype(f32)
  width = params["w1"].shape[1] // num_learners
  return _shifted(logits, num_learners, width / x.shape[1], cost_shift, min_choice)


def _shifted(logits, num_learners, relative_cost, cost_shift, min_choice):
  """Float32 logits (..., N+1) with choice j lowered by cost_shift * j * h / d and the
  choices below min_choice removed (-inf), as the route kernel does."""
  choices = jnp.arange(num_learners + 1, dtype=jnp.float32)
  logits = logits - jnp.asarray(cost_shift, jnp.float32) * choices * relative_cost
  return jnp.where(choices >= min_choice, logits, -jnp.inf)


def acm_group_reference(x, groups, *, num_learners: int, activation: str = "gelu", min_choice: int = 0,
                        cost_shift=0.0, k=None, norm=None, residual=None):
  """Plain-jnp semantics in float32: (outputs, k) as `acm_group` returns them; k (G, T)
  given, or the argmax of `gate_logits_reference`. norm, residual: as `acm_group`'s (`layer_norm`
  first; the residual added in float32 before the outputs' one rounding)."""
  if norm is not None:
    x = layer_norm(x, *norm)
  if k is None:
    k = jnp.stack([jnp.argmax(gate_logits_reference(x, grp, num_learners=num_learners, min_choice=min_choice,
                                                     cost_shift=cost_shift), -1) for grp in groups])
  f32 = jnp.float32
  outs = []
  for grp, kg in zip(groups, k):
    b2 = grp.get("b2", jnp.zeros((num_learners + 1, x.shape[1]), x.dtype))
    table = jnp.cumsum(b2.astype(f32), axis=0)
    out = acm_mlp_reference(x.astype(f32), kg, grp["w1"].astype(f32), grp["b1"].astype(f32), grp["w2"].astype(f32),
                            table, num_learners=num_learners, activation=activation)
    outs.append((out if residual is None else out + residual.astype(f32)).astype(x.dtype))
  return tuple(outs), k.astype(jnp.int32)
