"""tinytpu: train a small GPT from scratch with pure JAX, on a TPU, a GPU or a laptop CPU.

Part I is the GPT, and it is the program: config -> model -> loss -> AdamW/Muon -> train step ->
data -> checkpoints -> the training loop -> sampling. Read it top to bottom to see how pretraining
works in JAX; cut at its end, it trains on one device. Part II runs the same functions for real:
flags, several chips and hosts, memory, runs that survive failures, buckets, costs; then the tools
(bench, TPU estimates, plan, sweep, eval, plot, export). To follow one step, read train_step, then
batch_grads, loss_fn, hidden, block, attention, cross_entropy, optimizer_step and adamw_update.

    python prepare.py shakespeare --tokenizer=byte    # 1.1 MB of Shakespeare as byte tokens
    python tinytpu.py --preset=cpu                    # train a 0.8M-parameter model (~75 s)
    python tinytpu.py sample --prompt="ROMEO:"        # continue a prompt with it
    python tinytpu.py bench --preset=tpu --topology=v6e:1x1  # a TPU's memory and speed, compiled here

Dimensions in einsum strings and comments (as in picodo): B batch, T time (query positions), S key
positions, D d_model, N query heads, K key/value heads, J = N + 2K, H head dim, F MLP hidden, V padded
vocabulary, L layers.
"""

import os
import signal
import sys

if __name__ == '__main__':  # first of all: a Ctrl-C while the rest loads (JAX: a second) ends in one line
    signal.signal(signal.SIGINT, lambda *_: (print('\ninterrupted', file=sys.stderr), os._exit(130)))

import ast
import base64
import contextlib
import dataclasses
import errno
import fcntl
import functools
import glob
import itertools
import json
import math
import queue
import random
import re
import shutil
import socket
import threading
import time
import zipfile
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

if __name__ == '__main__' and {'-h', '--help', 'help'} & set(sys.argv[1:]):  # at once, before JAX loads:
    tree = ast.parse(source := open(__file__, encoding='utf-8').read())  # usage(), near the end, compiled alone
    code = compile(ast.Module([f for f in tree.body if getattr(f, 'name', '') == 'usage'], []), __file__, 'exec')
    exec(code, names := dict(globals()))
    sys.exit(names['usage'](source))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
from prepare import (BUILT_IN, HEADER_BYTES, TOKENIZER_FILE, PrepareError, file_sha256, load_encoding,  # noqa: E402
                     shard_header, written)

# ==============================================================================================
# Part I: the GPT. The model, its loss, AdamW and Muon, the train step, the data, checkpoints,
# the training loop and sampling, in the order a step needs them. It is the program: alone, on one
# device, train(GPTConfig(data=..., out=...)) trains a model. Part II runs these same functions on
# many chips and hosts, placing them from outside; the training loop meets it only as a Run.
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Config: one frozen dataclass (a static argument of the jit-compiled functions).


def setting(default, doc):
    """A config field: its default, and the line of --help that says what it does."""
    return field(default=default, metadata={'help': doc})


@dataclass(frozen=True)
class GPTConfig:
    """The settings of the model and its training, each a flag `--name=value`; Part II's Config
    adds those of running it (devices, costs, tools)."""
    data: str = setting('data/shakespeare_byte', 'directory with train_*.bin, val_*.bin, meta.json')
    out: str = setting('out/shakespeare_byte', 'directory for checkpoints and log.jsonl (with --data=D: out/ and D\'s name)')
    # model shape
    n_layer: int = setting(4, 'transformer blocks')
    d_model: int = setting(128, 'residual stream width')
    n_head: int = setting(4, 'query heads')
    n_kv_head: int = setting(4, 'key/value heads (1 = multi-query, n_head = multi-head)')
    d_head: int = setting(0, 'per-head width; 0 = d_model // n_head')
    d_ff: int = setting(0, 'MLP hidden width; 0 = 4*d_model for relu2, 3*d_model for swiglu')
    mlp: str = setting('relu2', 'MLP type: relu2 (2 matrices, squared ReLU) or swiglu (3, gated)')
    vocab_size: int = setting(257, "tokens in the vocabulary (taken from the data's meta.json)")
    context: int = setting(64, 'longest sequence the model attends over (sampling slides a window past it)')
    tie_embed: bool = setting(True, 'share the input embedding with the output projection')
    logit_softcap: float = setting(0.0, 'cap logits smoothly at +-this value (0 = off)')
    rope_theta: float = setting(10000.0, 'RoPE base frequency')
    scan_layers: bool = setting(False, 'run the blocks with lax.scan (fast compile) instead of unrolled')
    remat: str = setting('none', 'recompute in the backward pass what the forward would store: none, full '
                                 '(keep only each block\'s input), dots (keep matmul outputs)')
    attention: str = setting('auto', 'attention kernel: auto (splash on TPU, cudnn on GPU, xla on CPU), xla, splash, cudnn')
    # training
    steps: int = setting(2000, 'optimizer steps in the whole run')
    batch_size: int = setting(12, 'sequences per optimizer step')
    grad_accum: int = setting(0, 'microbatches per step (batch_size must divide evenly); 0 = the fewest that fit '
                                 "the device's memory, of at most 16K tokens per device (1 where the device reports "
                                 'no memory, as a CPU)')
    seq_len: int = setting(64, 'tokens per training sequence (at most context)')
    lr: float = setting(1e-3, "AdamW's peak learning rate at d_model = lr_width; any d_model: lr * lr_width / d_model")
    lr_width: int = setting(128, 'the width --lr and --matrix_lr are for: the best rates halve as the width doubles')
    min_lr_frac: float = setting(0.1, 'learning rate at the end of the warmdown, as a fraction of lr')
    warmup_steps: int = setting(100, 'linear warmup steps from 0 to lr')
    warmdown_frac: float = setting(0.5, 'fraction of steps at the end that decay lr to min_lr')
    warmdown: str = setting('cosine', 'warmdown shape: linear or cosine')
    optimizer: str = setting('adamw', "adamw, or muon: Muon for the blocks' matrices, AdamW for the embedding and output")
    matrix_lr: float = setting(0.005, "muon: the blocks' matrices' peak learning rate at d_model = lr_width, scaled as --lr")
    embed_lr: float = setting(2e-3, "muon: AdamW's peak learning rate for the embedding and output, at any width")
    momentum: float = setting(0.95, "muon: momentum of the matrices' updates (Nesterov)")
    weight_decay: float = setting(0.1, 'decoupled weight decay (lr * weight_decay * weight each step), every weight')
    beta1: float = setting(0.9, 'AdamW beta1')
    beta2: float = setting(0.99, 'AdamW beta2')
    eps: float = setting(1e-8, 'AdamW epsilon')
    grad_clip: float = setting(1.0, 'clip gradients to this global norm (0 = off)')
    dtype: str = setting('auto', 'matmul dtype: auto (bfloat16 on TPU/GPU, float32 on CPU), float32, bfloat16; '
                                 'float64 for the tests\' oracles (needs JAX_ENABLE_X64=1)')
    seed: int = setting(1337, 'seed for initialization, data order and sampling')
    # logging, eval, checkpoints
    log_every: int = setting(100, 'print and log a progress line every this many steps')
    eval_every: int = setting(500, 'validation loss every this many steps (and at the end)')
    eval_batches: int = setting(40, 'batches in the fixed validation set')
    ckpt_every: int = setting(1000, 'write a checkpoint every this many steps (and at the end)')
    keep_ckpts: int = setting(2, 'checkpoints to keep; older ones are deleted')
    # sampling (python tinytpu.py sample)
    prompt: str = setting('\n', 'text to continue (sample)')
    max_new_tokens: int = setting(500, 'tokens to generate (sample)')
    temperature: float = setting(0.8, 'sampling temperature; 0 = greedy (sample)')
    top_k: int = setting(0, 'sample from the k most likely tokens; 0 = all (sample)')
    top_p: float = setting(1.0, 'sample from the smallest set with this much probability (sample)')


class UserError(Exception):
    """A mistake the user can fix (a setting, a missing file): printed as one line, exit code 2."""
    code = 2


def head_dim(c):
    return c.d_head or c.d_model // c.n_head


def ff_dim(c):
    return c.d_ff or (4 if c.mlp == 'relu2' else 3) * c.d_model


def padded_vocab(c):
    # A multiple of 128 keeps the output matmul on full matrix-unit tiles; extra logits are -inf.
    return -(-c.vocab_size // 128) * 128


def wide_dtype(dtype):
    """The dtype for softmax, norms and the loss: fp32, or fp64 when computing in fp64 (tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def compute_dtype(c):
    if c.dtype == 'auto':  # bf16 matmuls are native on TPU/GPU, emulated (slow) on CPU
        return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
    return jnp.dtype(c.dtype)


# ----------------------------------------------------------------------------------------------
# Model: a decoder-only transformer, params as a nested dict of fp32 arrays. Block weights are
# stacked on a leading L axis, so one layer's weights are `layers[name][l]`.
#   - RMSNorm without a learned gain (modded-nanogpt): the matmul after it learns any scale.
#   - RoPE: relative positions by rotating q and k; no learned position table, any length.
#   - QK-norm: RMSNorm on q and k keeps attention logits bounded, so higher lrs stay stable.
#   - Grouped-query attention: K <= N key/value heads shrink the KV cache N/K times.
#   - ReLU^2 MLP (Primer, modded-nanogpt) or SwiGLU (Llama): both beat GELU at equal FLOPs.
#   - Logit soft-cap (Gemma 2): tanh keeps logits in +-cap, avoiding loss spikes.
#   - Tied embeddings (GPT-2): for small models the embedding is a large share of params.


class Weight(NamedTuple):
    """One weight: its shape, its init, and (beside the shape, as picodo writes it) the axis FSDP splits."""
    shape: tuple    # block weights are stacked on a leading L axis
    std: float      # initialized from Normal(0, std)
    fsdp_axis: int  # the large axis along which the weight is split over devices (FSDP)


def param_specs(c):
    """Every weight of the model, as a Weight: GPT-2's init, Normal(0, 0.02), with the
    residual-output projections (o, down) scaled by 1/sqrt(2L)."""
    L, D, N, K, H, F, V = c.n_layer, c.d_model, c.n_head, c.n_kv_head, head_dim(c), ff_dim(c), padded_vocab(c)
    out_std = 0.02 / math.sqrt(2 * L)
    layers = {'qkv': Weight((L, D, N + 2 * K, H), 0.02, 1),  # q, k and v heads side by side: one matmul
              'o': Weight((L, N, H, D), out_std, 3), 'up': Weight((L, D, F), 0.02, 2), 'down': Weight((L, F, D), out_std, 1)}
    if c.mlp == 'swiglu':
        layers['gate'] = Weight((L, D, F), 0.02, 2)
    specs = {'layers': layers, 'embed': Weight((V, D), 0.02, 0)}
    if not c.tie_embed:
        specs['unembed'] = Weight((D, V), 0.02, 1)
    return specs


def spec_map(fn, specs):
    """Apply fn(weight) to every Weight of param_specs, keeping the nested-dict structure."""
    return {k: spec_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in specs.items()}


def init_params(c, key):
    keys = iter(jax.random.split(key, len(param_specs(c)['layers']) + 2))
    return spec_map(lambda w: w.std * jax.random.normal(next(keys), w.shape), param_specs(c))


NORM_EPS = 1e-6  # RMSNorm's epsilon (export writes it into the Hugging Face config)


def rms_norm(x, eps=NORM_EPS):
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # statistics in (at least) fp32
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


def rope_table(pos, H, theta):
    """sin and cos (T, H) for rotating head vectors at positions pos (T,): entries i and i + H/2
    rotate together, by the angle pos * theta^(-2i/H)."""
    freq = theta ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)        # (H/2,)
    angle = pos[:, None].astype(jnp.float32) * freq                      # (T, H/2)
    sin, cos = jnp.sin(angle), jnp.cos(angle)  # then duplicated: see docs/performance.md, "Part I's code"
    return jnp.concatenate([sin, sin], -1), jnp.concatenate([cos, cos], -1)  # (T, H)


def rope(x, sin, cos):
    """RoPE: rotate each pair (x[i], x[i + H/2]) of x (B,heads,T,H) by its position's angle: x * cos +
    rotate_half(x) * sin; rotate_half(x1, x2) = (-x2, x1), a signed permutation applied as a matmul."""
    H = x.shape[-1]
    half, zero = jnp.eye(H // 2, dtype=x.dtype), jnp.zeros((H // 2, H // 2), x.dtype)
    rotate_half = jnp.block([[zero, half], [-half, zero]])               # (H, H)
    return x * cos.astype(x.dtype) + (x @ rotate_half) * sin.astype(x.dtype)


def attention(q, k, v, q_pos, k_pos):
    """Causal grouped-query attention, heads first. q (B,N,T,H), k and v (B,K,S,H) -> (B,N,T,H). A
    query sees the keys with k_pos <= q_pos. Each K head serves N/K query heads, repeated to N."""
    N, K, H = q.shape[1], k.shape[1], q.shape[3]
    k, v = jnp.repeat(k, N // K, axis=1), jnp.repeat(v, N // K, axis=1)
    scores = jnp.einsum('BNTH,BNSH->BNTS', q, k, preferred_element_type=wide_dtype(q.dtype))  # fp32 for the softmax
    causal = jnp.where(q_pos[:, None] >= k_pos[None, :], 0.0, -jnp.inf)  # (T,S)
    weights = jax.nn.softmax(scores / math.sqrt(H) + causal, axis=-1)    # softmax in fp32
    return jnp.einsum('BNTS,BNSH->BNTH', weights.astype(v.dtype), v)


# Fused attention kernels by --attention's name: kernel(q, k, v, c) is attention over positions
# 0..T-1 without the T x T scores in memory. Part II adds splash (TPU) and cuDNN (GPU).
FUSED_ATTENTION = {}


def block(x, w, c, pos, rot, cache=None):
    """One pre-norm transformer block. x (B,T,D); w holds this layer's weights (cast to x.dtype);
    rot = rope_table(pos). With a KV cache (k, v of shape (B, K, context, H)), this chunk's keys
    and values are written at positions pos and attention runs over the whole cache."""
    N, K = c.n_head, c.n_kv_head
    h = rms_norm(x)
    qkv = jnp.einsum('BTD,DJH->BJTH', h, w['qkv'])                     # J = N + 2K heads
    qk = rope(rms_norm(qkv[:, :N + K]), *rot)                            # QK-norm, then RoPE
    q, k, v = qk[:, :N], qk[:, N:], qkv[:, N + K:]
    if cache is None:  # by the fused kernel c.attention names, if Part II gave one
        out = FUSED_ATTENTION.get(c.attention, lambda q, k, v, c: attention(q, k, v, pos, pos))(q, k, v, c)
    else:  # write this chunk into the cache, then attend over all of it
        k = jax.lax.dynamic_update_slice_in_dim(cache[0], k, pos[0], axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(cache[1], v, pos[0], axis=2)
        cache, out = (k, v), attention(q, k, v, pos, jnp.arange(k.shape[2]))
    x = x + jnp.einsum('BNTH,NHD->BTD', out, w['o'])

    h = rms_norm(x)
    up = jnp.einsum('BTD,DF->BTF', h, w['up'])
    act = jax.nn.silu(jnp.einsum('BTD,DF->BTF', h, w['gate'])) * up if c.mlp == 'swiglu' \
        else jnp.square(jax.nn.relu(up))
    return x + jnp.einsum('BTF,FD->BTD', act, w['down']), cache


# What the backward pass may keep from the forward of a block (--remat); the rest is recomputed.
REMAT = {'none': None, 'full': jax.checkpoint_policies.nothing_saveable,
         'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def forward(params, tokens, c, cache=None, pos0=0):
    """tokens (B,T) int32 -> logits (B,T,V) fp32, padded vocab at -inf; decoding, with a cache: (logits, cache)."""
    x, out, new_cache = hidden(params, tokens, c, cache, pos0)
    return output_logits(x, out, c) if cache is None else (output_logits(x, out, c), new_cache)


def output_logits(x, out, c):
    """x (B,T,D) @ out (D,V): logits in the compute dtype (as PyTorch's autocast), then fp32 for the softmax;
    soft-capped if c says so, padded vocab entries at -inf."""
    logits = jnp.einsum('BTD,DV->BTV', x, out).astype(wide_dtype(x.dtype))
    if c.logit_softcap:
        logits = c.logit_softcap * jnp.tanh(logits / c.logit_softcap)
    return jnp.where(jnp.arange(logits.shape[-1]) < c.vocab_size, logits, -jnp.inf)


def shard(x, *spec, reduced=()):
    """Where x lives on a mesh of devices (Part II's, in JAX's explicit sharding mode: part of x's type):
    shard(x, 'data') splits its first axis over the devices, shard(x) puts it whole on each."""
    explicit = jax.sharding.AxisType.Explicit in jax.typeof(x).sharding.mesh.axis_types  # else: x as it is
    return jax.reshard(x, P(*spec, reduced=frozenset(reduced))) if explicit else x


def whole(w):
    """A weight whole on every device, `reduced`: its gradient stays each device's partial sum until a reshard."""
    return shard(w, *[None] * w.ndim, reduced={'data'})


def grad_sharding(w):
    """How w's gradient lies: as w, but a `whole` weight's as each device's partial sum (`unreduced`)."""
    return jax.typeof(w).sharding.update(spec=jax.typeof(w).sharding.spec.to_ct_spec())


@jax.custom_vjp
def lookup(table, tokens):
    """The table's rows for tokens (B,T) -> (B,T,D), in fp32, with a gradient of its own (lookup_bwd)."""
    rows = jax.typeof(tokens).sharding.update(spec=P(*jax.typeof(tokens).sharding.spec, None))  # as the tokens
    return shard(table).astype(wide_dtype(table.dtype)).at[tokens].get(out_sharding=rows)


def lookup_bwd(saved, g):  # JAX's would add repeated tokens' rows in bf16, and sum over the devices right here
    (table, tokens), sums = saved, grad_sharding(saved[0])
    n = max(jax.typeof(tokens).sharding.mesh.size, 1)  # devices splitting the batch, each summing its own rows
    def distinct(ids, rows):  # (b,T), (b,T,D) -> distinct ids (padded past the table), each one's rows' fp32 sum
        unique, where = jnp.unique(ids.ravel(), size=ids.size, fill_value=len(table), return_inverse=True)
        return unique, jax.ops.segment_sum(rows.reshape(ids.size, -1), where.ravel(), num_segments=ids.size)
    ids, rows = jax.vmap(distinct)(tokens.reshape(n, -1, tokens.shape[-1]), g.reshape(n, -1, *g.shape[1:]))
    grad = jnp.zeros(table.shape, table.dtype, out_sharding=sums)  # the padding ids fall off its end
    return grad.at[ids].add(rows.astype(table.dtype), mode='drop', out_sharding=sums), None


lookup.defvjp(lambda table, tokens: (lookup(table, tokens), (table, tokens)), lookup_bwd)


def hidden(params, tokens, c, cache=None, pos0=0):
    """The model up to its output layer: tokens (B,T) -> (the final normed residual stream
    (B,T,D), the output matrix (D,V), both in the compute dtype; the cache, if one is given)."""
    dt = compute_dtype(c)
    pos = pos0 + jnp.arange(tokens.shape[1])
    rot = rope_table(pos, head_dim(c), c.rope_theta)
    layers = jax.tree.map(lambda w: w.astype(dt), params['layers'])

    def body(x, layer):  # one block; each device: the layer's whole weights, its rows of x
        w, cache = layer
        x, cache = block(x, jax.tree.map(whole, w), c, pos, rot, cache)
        return shard(x, 'data'), cache
    body = jax.checkpoint(body, policy=REMAT[c.remat]) if c.remat != 'none' else body
    embed = whole(params['embed'].astype(dt))                            # whole on every device
    x = shard(lookup(embed, tokens).astype(dt), 'data')                  # (B,T,D), each device its rows
    if c.scan_layers:  # one compiled block, looped L times: compile time independent of depth
        x, cache = jax.lax.scan(body, x, (layers, cache))
    else:              # L copies of the block: longer compile, lets XLA fuse across layers
        caches = [None] * c.n_layer
        for l in range(c.n_layer):
            x, caches[l] = body(x, jax.tree.map(lambda a: a[l], (layers, cache)))
        cache = jax.tree.map(lambda *kv: jnp.stack(kv), *caches)  # None without a cache
    out = embed.T if c.tie_embed else params['unembed'].astype(dt)
    return rms_norm(x), out, cache


def init_cache(c, batch):
    shape = (c.n_layer, batch, c.n_kv_head, c.context, head_dim(c))
    return jnp.zeros(shape, compute_dtype(c)), jnp.zeros(shape, compute_dtype(c))


# ----------------------------------------------------------------------------------------------
# Loss: mean next-token cross-entropy, in nats per token: the log-sum-exp of the logits minus the
# target's logit, which is -log softmax(logits)[target]. JAX differentiates it.


def loss_fn(params, batch, c):
    """batch (B, T+1) int32: inputs are batch[:, :-1], targets batch[:, 1:]."""
    x, out, _ = hidden(params, batch[:, :-1], c)
    return cross_entropy(output_logits(x, out, c), batch[:, 1:])


def cross_entropy(logits, targets):
    """Mean cross-entropy of logits (B,T,V) fp32 against targets (B,T)."""
    target = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - target)


# ----------------------------------------------------------------------------------------------
# Optimizers: AdamW written out with jax.tree.map over the parameter tree (under jit, every
# weight's update is traced into one program), as optax.chain(clip_by_global_norm, adamw): bias-
# corrected moments, decoupled weight decay on every weight; and Muon for the blocks' matrices.


def peak_lrs(c):
    """(AdamW's, Muon's) peak rates: --lr and --matrix_lr scaled as 1/width; beside Muon, AdamW trains
    the embedding and output at --embed_lr at any width, as muP keeps an embedding's (docs/optimizers.md)."""
    scale = c.lr_width / c.d_model
    return (c.embed_lr if c.optimizer == 'muon' else c.lr * scale), c.matrix_lr * scale


def lr_schedule(step, c):
    """AdamW's LR for update `step` (0-based): 1) linear warmup from 0 to the peak (peak_lrs) over warmup_steps,
    2) constant, 3) warmdown to min_lr_frac * peak over the last warmdown_frac, reached at the last update."""
    step = jnp.asarray(step, wide_dtype(compute_dtype(c)))  # fp32 (fp64 in the tests' float64 runs)
    warmup = jnp.minimum(1.0, (step + 1) / max(c.warmup_steps, 1))
    warmdown_steps = round(c.warmdown_frac * c.steps)  # 0: no warmdown at all
    progress = jnp.clip((step + 1 - (c.steps - warmdown_steps)) / max(warmdown_steps, 1), 0.0, 1.0)
    shape = 1 - progress if c.warmdown == 'linear' else 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return peak_lrs(c)[0] * warmup * (c.min_lr_frac + (1 - c.min_lr_frac) * shape)


def warmdown_start(c):
    """Updates before the warmdown: a longer run's schedule is the same up to there (its checkpoint is kept)."""
    return c.steps - round(c.warmdown_frac * c.steps)


def adamw_init(params):
    zeros = lambda p: jnp.zeros_like(p, jnp.float32)
    return {'step': jnp.zeros((), jnp.int32), 'mu': jax.tree.map(zeros, params), 'nu': jax.tree.map(zeros, params)}


def clipped(grads, c):
    """The gradient scaled to a global norm of at most grad_clip, and its norm before."""
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    clip = jnp.minimum(1.0, c.grad_clip / (grad_norm + 1e-12)) if c.grad_clip else 1.0
    return jax.tree.map(lambda g: g * clip, grads), grad_norm


def adamw_leaf(p, g, mu, nu, step, lr, c):
    """AdamW on one weight: bias-corrected moments, decoupled weight decay. -> p, mu, nu"""
    b1, b2 = c.beta1, c.beta2
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g * g
    mu_hat, nu_hat = mu / (1 - b1 ** step), nu / (1 - b2 ** step)
    return p - lr * (mu_hat / (jnp.sqrt(nu_hat) + c.eps) + c.weight_decay * p), mu, nu


def adamw_update(params, grads, opt, lr, c):
    """One AdamW step at lr, global-norm clipped. -> new params, new opt state, the norm before clipping"""
    grads, grad_norm = clipped(grads, c)
    step = opt['step'] + 1
    new = jax.tree.map(lambda p, g, m, v: adamw_leaf(p, g, m, v, step, lr, c), params, grads, opt['mu'], opt['nu'])
    params, mu, nu = (jax.tree.map(lambda t: t[i], new, is_leaf=lambda t: type(t) is tuple) for i in range(3))
    return params, {'step': step, 'mu': mu, 'nu': nu}, grad_norm


# Muon (Keller Jordan, 2024; modded-nanogpt and nanochat train with it): for the blocks' matrices,
# momentum, then the update replaced by the nearest matrix whose singular values are all 1 (U V^T
# of its SVD U S V^T): every direction moves at the same rate. Newton-Schulz steps compute it
# without an SVD. The embedding and output layer stay on AdamW, at embed_lr; the matrices get matrix_lr.

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # the quintic's coefficients, from Keller Jordan's Muon


def orthogonalize(g, steps=5):
    """g (..., m, n) -> about U V^T where g = U S V^T: on g / |g|, five steps of x <- a x + (b A +
    c A^2) x with A = x x^T (the short side first: A is the small Gram matrix), in g's dtype. They
    move the singular values toward 1, not onto it (docs/optimizers.md): as good, and cheap in bf16."""
    a, b, c = NEWTON_SCHULZ
    tall = g.shape[-2] > g.shape[-1]
    x = jnp.swapaxes(g, -1, -2) if tall else g
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(wide_dtype(x.dtype))), (-2, -1), keepdims=True))  # in fp32 at least
    x = x / (norm + 1e-7).astype(x.dtype)                      # every singular value at most 1
    for _ in range(steps):
        A = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * A + c * A @ A) @ x
    return jnp.swapaxes(x, -1, -2) if tall else x


def muon_direction(name, u, c):
    """The orthogonalized update of a stacked weight (L, ...) as L matrices (in, out), qkv as three (q, k, v),
    o as (N*H, D); each scaled by sqrt(max(1, out / in)), Muon's rule (the wider up: the same size per output)."""
    def orth(m):  # (L, in, out); on a mesh each device orthogonalizes its share of the L (padded to split evenly)
        scale = max(1.0, m.shape[-1] / m.shape[-2]) ** 0.5
        L, n = m.shape[0], max(jax.typeof(m).sharding.mesh.size, 1)
        split = shard(jnp.pad(m.astype(compute_dtype(c)), [(0, -L % n), (0, 0), (0, 0)]), 'data')
        return shard(orthogonalize(split), *jax.typeof(m).sharding.spec)[:L].astype(m.dtype) * scale

    if name == 'qkv':  # (L, D, J, H): the q, k and v heads
        L, D, _, H = u.shape
        parts = jnp.split(u, [c.n_head, c.n_head + c.n_kv_head], axis=2)
        return jnp.concatenate([orth(p.reshape(L, D, -1)).reshape(p.shape) for p in parts], axis=2)
    if name == 'o':    # (L, N, H, D)
        return orth(u.reshape(u.shape[0], -1, u.shape[-1])).reshape(u.shape)
    return orth(u)     # up, gate (L, D, F); down (L, F, D)


def muon_update(params, grads, opt, lr, c):
    """One step: Muon for the blocks' matrices, AdamW at lr for the rest; clipping first, decoupled weight
    decay on both. opt['mu'] holds Muon's momentum (opt['nu'], AdamW's, unused there). -> as adamw_update"""
    grads, grad_norm = clipped(grads, c)
    step = opt['step'] + 1
    matrix_lr = lr * peak_lrs(c)[1] / peak_lrs(c)[0]  # the schedule's shape at Muon's peak

    def muon(name, p, g, m):
        m = c.momentum * m + (1 - c.momentum) * g     # momentum, an average of past gradients
        u = (1 - c.momentum) * g + c.momentum * m     # Nesterov: a look one step ahead
        return p - matrix_lr * (muon_direction(name, u, c) + c.weight_decay * p), m

    new, mu, nu = {'layers': {}}, {'layers': {}}, {'layers': opt['nu']['layers']}
    for name, p in params['layers'].items():
        new['layers'][name], mu['layers'][name] = muon(name, p, grads['layers'][name], opt['mu']['layers'][name])
    for name in sorted(params.keys() - {'layers'}):  # embed, unembed
        new[name], mu[name], nu[name] = adamw_leaf(params[name], grads[name], opt['mu'][name], opt['nu'][name], step, lr, c)
    return new, {'step': step, 'mu': mu, 'nu': nu}, grad_norm


# ----------------------------------------------------------------------------------------------
# Train step: one jit-compiled function, params and optimizer state donated (updated in place):
# the gradient of a batch, then an AdamW or Muon update. Part II compiles it for every device.


@partial(jax.jit, static_argnames='c', donate_argnums=(0, 1))
def train_step(params, opt, batch, c):
    """batch (grad_accum, micro_batch, seq_len + 1) -> new params, new opt state, stats."""
    loss, grads = batch_grads(params, batch, c)
    return optimizer_step(params, opt, loss, grads, c)


def batch_grads(params, batch, c):
    """The mean loss and gradient of a batch of microbatches (grad_accum, B, T+1), summed under lax.scan:
    grad_accum=4 gives the update of a 4x larger batch at a quarter of the memory. On a mesh, replicated
    weights are made `whole` first: each device sums its rows' gradients, the devices once, after the loop."""
    weights = jax.tree.map(lambda p: p if any(jax.typeof(p).sharding.spec) else whole(p), params)

    def micro(grad_sum, mb):
        loss, grads = jax.value_and_grad(loss_fn)(weights, mb, c)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    def mean(g, p):  # partial sums (`unreduced`) summed over the devices in bf16 (half the bytes), placed as p
        summed = lambda g: shard(g.astype(compute_dtype(c)), *jax.typeof(p).sharding.spec).astype(g.dtype)
        return (summed(g) if jax.typeof(g).sharding.spec.unreduced else g) / batch.shape[0]

    zeros = jax.tree.map(lambda w: jnp.zeros_like(w, out_sharding=grad_sharding(w)), weights)
    grads, losses = jax.lax.scan(micro, zeros, batch)
    return jnp.mean(losses), jax.tree.map(mean, grads, params)


def optimizer_step(params, opt, loss, grads, c):
    """The update at this step's learning rate. -> new params, new opt state, stats."""
    lr = lr_schedule(opt['step'], c)
    update = muon_update if c.optimizer == 'muon' else adamw_update
    params, opt, grad_norm = update(params, grads, opt, lr, c)
    return params, opt, {'loss': loss, 'grad_norm': grad_norm, 'lr': lr}


@partial(jax.jit, static_argnames='c')
def eval_loss(params, batches, c):
    """Mean loss over a stack of batches (n, B, T+1)."""
    return jnp.mean(jax.lax.map(lambda b: loss_fn(params, b, c), batches))


def fresh_state(c):
    params = init_params(c, jax.random.key(c.seed))
    return {'params': params, 'opt': adamw_init(params)}


# ----------------------------------------------------------------------------------------------
# Data: token shards in the llm.c / modded-nanogpt format (a header of 256 int32, then the
# tokens), so their FineWeb shards load as is. Batch k is a pure function of (seed, k): a resumed
# run sees exactly the batches of an uninterrupted one, with nothing to save but the step.


def open_shard(path):
    """Memory-map a token shard (never read whole), its header checked against its size."""
    n_tokens, dtype, problem = shard_header(path)
    if problem:
        raise UserError(problem)
    return np.memmap(path, dtype=dtype.newbyteorder('<'), mode='r', offset=HEADER_BYTES, shape=(n_tokens,))


class TokenWindows:
    """Every window of `window` consecutive tokens inside one shard of a split, numbered shard after shard."""

    def __init__(self, paths, window):
        self.shards = [open_shard(p) for p in paths]
        self.window = window
        self.ends = np.cumsum([max(len(s) - window + 1, 0) for s in self.shards])
        self.count = int(self.ends[-1])
        if self.count == 0:
            raise UserError(f'{os.path.dirname(paths[0])}: its shards hold fewer tokens than one window of '
                            f'{window} (seq_len + 1); use a smaller --seq_len or more data')

    def get(self, idx):
        """Windows number idx (an int array of any shape) -> idx.shape + (window,) int32."""
        flat = np.ravel(idx)
        shard = np.searchsorted(self.ends, flat, side='right')
        start = flat - np.concatenate([[0], self.ends])[shard]
        rows = [self.shards[s][o:o + self.window] for s, o in zip(shard, start)]
        return np.stack(rows).astype(np.int32).reshape(np.shape(idx) + (self.window,))


def train_indices(windows, c, k):
    """Which windows form batch k: batch_size draws seeded by (seed, k), as (grad_accum,
    batch_size // grad_accum) microbatches (each host reads the tokens of its own devices only)."""
    idx = np.random.default_rng([c.seed, k]).integers(0, windows.count, size=c.batch_size)
    return idx.reshape(c.grad_accum, c.batch_size // c.grad_accum)


def val_indices(windows, c):
    """A fixed validation set: eval_batches * batch_size windows spread evenly, in training's microbatches."""
    idx = np.linspace(0, windows.count - 1, c.eval_batches * c.batch_size).astype(np.int64)
    return idx.reshape(c.eval_batches * c.grad_accum, c.batch_size // c.grad_accum)


# ----------------------------------------------------------------------------------------------
# Checkpoints: OUT/ckpt_<step>/ holds state.npz (every array: params, optimizer state, step) and
# meta.json (step, config, tokenizer, the npz's size and SHA-256), written into a temporary
# directory renamed into place: a crash mid-write leaves the last one intact. No pickle anywhere.


def flatten(tree, prefix=''):
    """{'a': {'b': x}} -> {'a/b': x}"""
    return {name: x for k, v in tree.items()
            for name, x in (flatten(v, f'{prefix}{k}/') if isinstance(v, dict) else {f'{prefix}{k}': v}).items()}


def unflatten_like(template, flat, prefix=''):
    return {k: unflatten_like(v, flat, f'{prefix}{k}/') if isinstance(v, dict) else flat[f'{prefix}{k}']
            for k, v in template.items()}


def list_checkpoints(out):
    """Finished checkpoints in `out`, oldest first, as (step, path): ckpt_<digits>/ with a meta.json."""
    paths = glob.glob(os.path.join(out, 'ckpt_*'))
    return sorted((int(os.path.basename(p)[5:]), p) for p in paths
                  if re.fullmatch('ckpt_[0-9]+', os.path.basename(p)) and os.path.isfile(os.path.join(p, 'meta.json')))


def checkpoint_name(step):
    return f'ckpt_{step:08d}'


def write_checkpoint(out, state, c, meta_extra):
    """Write state = {'params', 'opt'} as OUT/ckpt_<step> (state.npz, then meta.json), renamed into place. -> its path"""
    step = int(state['opt']['step'])
    final = os.path.join(out, checkpoint_name(step))
    tmp = os.path.join(out, f'.tmp_{checkpoint_name(step)}_{os.getpid()}')
    os.makedirs(tmp)
    npz = os.path.join(tmp, 'state.npz')
    with open(npz, 'wb') as f:
        np.savez(f, **flatten(jax.device_get(state)))
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename says it is there
    meta = {'format': 1, 'step': step, 'config': dataclasses.asdict(c), **meta_extra,
            'state_bytes': os.path.getsize(npz), 'state_sha256': file_sha256(npz)}
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
        f.write(json.dumps(meta, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)  # atomic: readers see the whole checkpoint or none of it
    return final


def read_checkpoint(path, template):
    """A checkpoint's state.npz as host arrays in the structure of `template`. No pickle: runs no code."""
    with np.load(os.path.join(path, 'state.npz'), allow_pickle=False) as f:
        return unflatten_like(template, {k: f[k] for k in flatten(template)})


# ----------------------------------------------------------------------------------------------
# Training loop: a batch, a step, a progress line, an evaluation, a checkpoint; until c.steps.
# What it runs with, and where, is a Run: here one device, the data in c.data, the files in c.out.
# TrainingRun, in Part II, runs this same loop for real by giving the same methods its own.


class Run:
    """A run on one device: the shards in c.data; the state fresh, or resumed from the newest
    checkpoint in c.out (so train(c) again goes on where it stopped); log.jsonl and checkpoints in c.out."""

    def __init__(self, c):
        path = os.path.join(c.data, 'meta.json')  # what prepare.py says of the data
        self.meta = json.load(open(path)) if os.path.exists(path) else {}
        self.c = c = dataclasses.replace(c, vocab_size=self.meta.get('vocab_size', c.vocab_size),
                                         grad_accum=c.grad_accum or 1)
        train, val = (TokenWindows(sorted(glob.glob(os.path.join(c.data, f'{split}_*.bin'))), c.seq_len + 1)
                      for split in ('train', 'val'))
        state, saved = fresh_state(c), list_checkpoints(c.out)
        if saved:  # resume: the newest checkpoint's arrays, in the fresh state's structure
            state = jax.tree.map(jnp.asarray, read_checkpoint(saved[-1][1], state))
        self.params, self.opt, self.start = state['params'], state['opt'], int(state['opt']['step'])
        self.vals = val.get(val_indices(val, c))
        self.batches = (train.get(train_indices(train, c, k)) for k in itertools.count(self.start))
        self.t0, self.last = time.time(), (time.time(), self.start)

    def __enter__(self):
        os.makedirs(self.c.out, exist_ok=True)
        self.log_file = open(os.path.join(self.c.out, 'log.jsonl'), 'a')
        return self

    def __exit__(self, *exc):
        self.log_file.close()

    def step(self, params, opt, step):
        """Update number `step` (0-based), on its batch: train_step."""
        return train_step(params, opt, next(self.batches), self.c)

    def progress(self, done, stats):
        """A progress line after step `done`, with the time per step since the last one. -> log fields"""
        record = {k: float(v) for k, v in stats.items()}  # waits for the step
        (then, before), self.last = self.last, (time.time(), done)
        record['ms_per_step'] = 1000 * (self.last[0] - then) / (done - before)
        self.say(f"step {done:6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | {record['ms_per_step']:.1f} ms/step")
        return record

    def val_loss(self, params):
        return float(eval_loss(params, self.vals, self.c))

    def evaluate(self, params, done):
        """Validation loss every eval_every steps and at the end (bits per byte too, if meta.json can). -> log fields"""
        if done % self.c.eval_every and done != self.c.steps:
            return {}
        record = {'val_loss': self.val_loss(params)}
        line = f"step {done:6d} | val loss {record['val_loss']:.4f}"
        if self.meta.get('bytes_per_token'):
            record['val_bpb'] = record['val_loss'] / math.log(2) / self.meta['bytes_per_token']
            line += f" | val bits/byte {record['val_bpb']:.4f}"
        self.say(line)
        return record

    def log(self, record):
        print(json.dumps(record), file=self.log_file, flush=True)

    def stop_requested(self):  # whether to stop after this step, with a checkpoint (on a signal, say)
        return False

    def save(self, params, opt, done):
        """A checkpoint after step `done`; the newest keep_ckpts are kept, older ones deleted."""
        path = write_checkpoint(self.c.out, {'params': params, 'opt': opt}, self.c,
                                {'tokenizer': self.meta.get('tokenizer'), 'eot_id': self.meta.get('eot_id')})
        for _, old in list_checkpoints(self.c.out)[:-self.c.keep_ckpts]:
            shutil.rmtree(old)
        self.say(f'saved {path}')

    def say(self, *args):
        print(*args, flush=True)

    def finish(self, val):
        self.say(f"done: {self.c.steps} steps in {time.time() - self.t0:.1f}s | val loss {val['val_loss']:.4f}")


def train(c, run=None):
    """Pretrain: take a batch, take a step, log, evaluate, checkpoint; until step c.steps. The run
    (by default Run(c): this device, c.data and c.out) holds the state, the batches and the files."""
    with run or Run(c) as run:
        c, params, opt = run.c, run.params, run.opt
        if run.start >= c.steps:
            run.say(f'already trained {run.start} steps (--steps={c.steps}); nothing to do')
            return params
        val = {}
        for step in range(run.start, c.steps):
            params, opt, stats = run.step(params, opt, step)
            done = step + 1
            record = run.progress(done, stats) if done % c.log_every == 0 or done == c.steps else {}
            evals = run.evaluate(params, done)
            val = evals if 'val_loss' in evals else val
            if record or evals:
                run.log({'step': done, **record, **evals})
            stopping = run.stop_requested()
            if done % c.ckpt_every == 0 or done == c.steps or stopping or done == warmdown_start(c):
                run.save(params, opt, done)
        run.finish(val)
        return params


# ----------------------------------------------------------------------------------------------
# Sampling: prefill the prompt in one pass (filling a KV cache), then decode one token at a time,
# each step attending over the cache instead of recomputing the prefix.


@partial(jax.jit, static_argnames='c', donate_argnums=2)
def decode(params, tokens, cache, pos, c):
    """tokens (B,T) at positions pos.. -> the next token's logits (B,V), the cache with theirs in."""
    logits, cache = forward(params, tokens, c, cache, pos)
    return logits[:, -1], cache


def sample_token(logits, key, c):
    """logits (B, V) fp32 -> token ids (B,), with temperature, top-k and top-p (nucleus)."""
    if c.temperature == 0:
        return jnp.argmax(logits, -1)
    logits = (logits - logits.max(-1, keepdims=True)) / c.temperature  # max first: no inf at tiny temperatures
    if c.top_k:
        kth = jax.lax.top_k(logits, min(c.top_k, logits.shape[-1]))[0][:, -1:]  # top_k > vocab: all
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if c.top_p < 1:
        sorted_logits = jnp.sort(logits, -1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
        # the smallest prefix whose probability reaches top_p: cut at the logit where it does
        cutoff = jnp.take_along_axis(sorted_logits, jnp.sum(cum < c.top_p, -1, keepdims=True), -1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits)


def generate(params, prompt_ids, c, eot_id=None):
    """Yield new token ids one at a time (batch of one), stopping at eot_id. The model sees at most
    `context` tokens: each new one is added to the cache; when it is full, the window slides to its
    last context/2 tokens, prefilled again (nanoGPT crops every token; this, every context/2)."""
    tokens, key = list(prompt_ids), jax.random.key(c.seed)
    new, pos, cache = tokens[-c.context:], 0, init_cache(c, 1)  # to feed (first the prompt), at pos
    for _ in range(c.max_new_tokens):
        logits, cache = decode(params, jnp.asarray([new], jnp.int32), cache, pos, c)
        pos += len(new)
        key, sub = jax.random.split(key)
        token = int(sample_token(logits, sub, c)[0])
        if token == eot_id:
            return
        tokens.append(token)
        yield token
        new = [token]
        if pos == c.context:  # full: slide the window to the last context/2 tokens, this new one included
            new, pos, cache = tokens[-(c.context // 2):], 0, init_cache(c, 1)


# ==============================================================================================
# Part II: running it for real. First what training meets, in that order: settings and flags,
# processes (backend, several hosts, who prints), devices (the mesh, FSDP, the step on several
# devices), attention kernels, fitting memory, the run (its clock and guard), checkpoints and data
# that survive failures, runs kept in a bucket, hardware and cost. Then the tools training never
# calls: bench, TPU estimates, plan, evaluation tasks, plots, export, and the command line.
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Settings: Config adds to GPTConfig the settings of running it. `--name=value` overrides a
# field, a preset sets a group of fields, and explicit flags win over the preset.


@dataclass(frozen=True)
class Config(GPTConfig):
    """Every setting: GPTConfig's (Part I) and those of running it; the functions of Part II receive
    this one. Frozen, so it can be a static jit argument."""
    preset: str = setting('', "named group of settings (cpu, gpt2, tpu); '' picks one for the backend")
    init_from: str = setting('', "train: start from the weights of this run's newest checkpoint (a directory or gs://...), "
                                 'with a fresh optimizer at step 0 and this run\'s schedule; the model is its shape')
    # devices and hosts
    cpu_devices: int = setting(2, 'CPU only: virtual devices to split each batch over (data parallel)')
    fsdp: str = setting('auto', 'shard params and optimizer state over devices: auto (on several TPUs; on GPUs when '
                                'replicated they would take over half of one), true, false')
    distributed: bool = setting(False, 'multi-host: call jax.distributed.initialize() first (TPU pod slices)')
    coordinator: str = setting('', 'multi-host elsewhere: address:port of process 0 (implies --distributed)')
    num_processes: int = setting(1, 'multi-host elsewhere: number of processes')
    process_id: int = setting(0, 'multi-host elsewhere: this process, 0 .. num_processes - 1')
    coordinator_timeout: int = setting(300, 'multi-host elsewhere: seconds to wait for the coordinator (process 0) '
                                            'and the other processes')
    profile_steps: str = setting('', 'A:B writes a jax.profiler trace of steps A..B-1 to OUT/profile')
    # benchmark (python tinytpu.py bench)
    bench_steps: int = setting(50, 'train steps timed by bench, after 3 untimed warm-up steps')
    topology: str = setting('', 'bench: compile for this TPU slice without one (v5e:1x1, v6e:2x4, v5p:2x2x1) and '
                                'print its memory and the compiler-estimated speed; needs pip install "jax[tpu]"')
    peak_flops: float = setting(0.0, 'peak FLOP/s per chip for MFU; 0 = from the hardware table (CPU: measured)')
    price_per_hour: float = setting(0.0, 'dollars per chip-hour (CPU: per machine-hour); 0 = the list price')
    spot: bool = setting(False, "price the run at the chip's spot list price (a spot TPU VM, which can be taken away "
                                'at any time: keep the run in a bucket, --out=gs://...) instead of on-demand')
    # planning (python tinytpu.py plan)
    budget: float = setting(0.0, 'plan: dollars to spend on one training run')
    hardware: str = setting('', 'plan: chip to plan for (v6e, v5e, v5p, v4, h100, h200, a100); default: this one')
    chips: int = setting(1, 'plan: chips to train on (divides the hours, not the cost)')
    mfu: float = setting(0.0, 'plan: expected MFU; 0 = the last bench result for the chip, else 0.4')
    # evaluation (python tinytpu.py eval) and loss curves (python tinytpu.py plot)
    task: str = setting('hellaswag', 'eval: multiple-choice task to score: hellaswag (python prepare.py hellaswag '
                                     'makes its file), choices (made from the held-out text of --data), or any name '
                                     'with --task_data')
    task_data: str = setting('', "eval: the task's jsonl (ctx or ctx_a + ctx_b, endings, label); '' = data/TASK/TASK_val.jsonl")
    task_limit: int = setting(0, 'eval and --hellaswag_every: score the first N examples only; 0 = all')
    hellaswag_every: int = setting(0, 'train: score --task (HellaSwag) every this many steps and at the end, logged as '
                                      'TASK_acc_norm; 0 = off')
    plot_file: str = setting('', 'plot: the picture to write (.svg, .png or .pdf); default OUT/loss.svg of the first --out')
    # export (python tinytpu.py export)
    export_dir: str = setting('', 'export: directory to write the Hugging Face model to (config.json, model.safetensors, '
                                  'tokenizer); must not exist yet')
    export_dtype: str = setting('bfloat16', 'export: dtype of the exported weights: bfloat16, float16 or float32')


# Presets override the defaults above. `cpu` is nanoGPT's CPU demo size on byte-level Shakespeare;
# `gpt2` is GPT-2 small (124M) on FineWeb, with a SwiGLU MLP of GPT-2's parameter count (3 x 768 x
# 2048 = 2 x 768 x 3072) and no logit soft-cap, so it exports; `tpu` (148M with GPT-2's
# vocabulary) is shaped for a TPU's 128/256-wide matrix units: head_dim 256, one KV head, dims
# multiples of 256, and no logit soft-cap (its tanh over every logit cost 8% of a v6e step:
# docs/performance.md), and trains with Muon (it reached AdamW's loss in 0.7x the steps on two
# texts, for an estimated 1.7% more per step on a TPU: docs/optimizers.md). Each step is
# split into the fewest microbatches that fit the chip (--grad_accum=0, found by compiling).
# Each states its learning rates at its own width (lr_width), for a batch far larger than the
# cpu preset's: Muon's matrices at nanochat's 0.02 (docs/optimizers.md).
PRESETS = {
    'cpu': {},
    'gpt2': dict(data='data/fineweb10B', out='out/gpt2', n_layer=12, d_model=768, n_head=12,
                 n_kv_head=12, mlp='swiglu', d_ff=2048, vocab_size=50257, context=1024, seq_len=1024,
                 batch_size=64, steps=10000, lr=1e-3, lr_width=768, matrix_lr=0.02, embed_lr=1e-3, warmup_steps=250,
                 warmdown_frac=0.3, eval_every=500, eval_batches=20, log_every=10, ckpt_every=1000),
    'tpu': dict(data='data/fineweb10B', out='out/tpu', n_layer=8, d_model=1024, n_head=4,
                n_kv_head=1, d_head=256, mlp='swiglu', d_ff=3072, vocab_size=50257, optimizer='muon',
                context=2048, seq_len=2048, batch_size=64, steps=10000, lr=1e-3, lr_width=1024,
                matrix_lr=0.02, embed_lr=1e-3, warmup_steps=250, warmdown_frac=0.3, eval_every=500, eval_batches=20,
                log_every=10, ckpt_every=1000),
}


DEFAULT_PRESET = {'cpu': 'cpu', 'gpu': 'gpt2', 'tpu': 'tpu'}  # backend -> preset when none given


MODEL_FIELDS = ('n_layer', 'd_model', 'n_head', 'n_kv_head', 'd_head', 'd_ff', 'mlp', 'vocab_size',
                'tie_embed', 'rope_theta', 'logit_softcap')  # what a checkpoint's weights were trained to compute


USE_FIELDS = ('task', 'task_data', 'task_limit', 'plot_file', 'export_dir', 'export_dtype', 'prompt', 'max_new_tokens',
              'temperature', 'top_k', 'top_p')  # how a trained model is used: from the flags, never from its checkpoint


def parse_flags(argv):
    """['--lr=1e-3', ...] -> ({'lr': 0.001, ...}), converting each value to its field's type."""
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    flags = {}
    for arg in argv:
        name, eq, value = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or name not in types:
            raise UserError(f'unknown flag {arg!r} (python tinytpu.py --help lists them)')
        flags[name] = flag_value(name, types[name], eq, value)
    return flags


def flag_value(name, kind, eq, value):
    """The value of `--name` (eq == '') or `--name=value` as kind (bool, int, float or str), or a
    one-line UserError."""
    if kind is bool:
        if not eq or value.lower() in ('1', 'true', 'yes'):
            return True
        if value.lower() in ('0', 'false', 'no'):
            return False
        raise UserError(f'--{name}={value}: expected true or false')
    if not eq:
        raise UserError(f'--{name} needs a value: --{name}=...')
    try:
        v = kind(value)
    except ValueError:
        raise UserError(f'--{name}={value}: expected {"an integer" if kind is int else "a number"}')
    if kind is int and not -2**63 <= v < 2**63:
        raise UserError(f'--{name}={value}: out of range (integers here are below 2^63)')
    return v


# Deeper models than this run their blocks with lax.scan unless --scan_layers says otherwise: XLA
# compiles each unrolled block anew, so compile time and memory grow with depth (10,000 unrolled
# blocks of width 64 took over 12 GB and 2 minutes before the OS killed the compiler).
MAX_UNROLLED_LAYERS = 32


def make_config(flags, platform=None):
    """Defaults <- preset <- explicit flags. With no --preset, the platform's default preset."""
    preset = flags.get('preset') or DEFAULT_PRESET.get(platform or jax.default_backend(), 'cpu')
    if preset not in PRESETS:
        raise UserError(f'--preset={preset}: unknown preset (choose from {", ".join(PRESETS)})')
    if 'data' in flags and 'out' not in flags:  # a run's default --out follows its data: out/<the data's name>
        flags = {**flags, 'out': os.path.join('out', os.path.basename(flags['data'].rstrip('/')) or 'run')}
    c = Config(**{**PRESETS[preset], **flags, 'preset': preset})
    if c.optimizer == 'muon' and 'lr' in flags and 'embed_lr' not in flags:
        say(f'note: --lr is AdamW\'s rate when it trains every weight; beside Muon it trains the embedding and '
            f'output at --embed_lr (now {c.embed_lr:g}), and the matrices take --matrix_lr')
    if c.n_layer > MAX_UNROLLED_LAYERS and 'scan_layers' not in flags and not c.scan_layers:
        say(f'--n_layer={c.n_layer}: over {MAX_UNROLLED_LAYERS} blocks are compiled once and looped '
            '(--scan_layers=true), as compiling each one apart takes time and memory that grow with depth')
        c = dataclasses.replace(c, scan_layers=True)
    if c.init_from:  # the model is the source's: its shape, whatever the preset says
        if not in_bucket(c.init_from) and os.path.abspath(c.init_from) == os.path.abspath(c.out):
            raise UserError(f'--init_from={c.init_from} is --out; give the new run its own --out (run again with the '
                            'same --out to resume a run)')
        source = source_settings(c.init_from)
        for name in MODEL_FIELDS:
            if name in flags and flags[name] != source.get(name):
                raise UserError(f'--{name}={flags[name]}: --init_from={c.init_from} holds a model with '
                                f'--{name}={source.get(name)}; drop the flag (the model is the one started from)')
        c = dataclasses.replace(c, **{name: source[name] for name in MODEL_FIELDS if name in source})
    return c


def source_settings(source):
    """--init_from: the model settings of the newest checkpoint of the run in `source` (its local
    copy for gs://), or of the export there; or a one-line error."""
    if not in_bucket(source) and not os.path.isdir(source):
        raise UserError(f'--init_from={source}: no such directory; name a training run\'s --out or an export')
    if is_export(source):
        return hf_settings(export_config(source))
    settings = run_settings(fetch_run(Config(out=source)).out)
    if not settings:
        raise UserError(f'--init_from={source}: no checkpoint there to start from; name a training run\'s --out')
    return settings


def is_export(path):
    return not in_bucket(path) and all(os.path.isfile(os.path.join(path, f)) for f in ('config.json', 'model.safetensors'))


def export_config(directory):
    """An export's config.json, if tinytpu wrote it (its "tinytpu" entry: the step, the tokenizer)."""
    path = os.path.join(directory, 'config.json')
    config, problem = read_json(path, {'architectures': (lambda v: v == ['Qwen3ForCausalLM'], 'Qwen3ForCausalLM', True),
                                       'tinytpu': (lambda v: type(v) is dict, "tinytpu's record", True)})
    if problem:
        raise UserError(f'--init_from={directory}: {path}: {problem}; name a run\'s --out or a model tinytpu exported')
    return config


def source_weights(c, template, data):
    """--init_from: the params of the source (a run's newest checkpoint that loads, or an export),
    trained on the data's tokenizer. -> (params on the host, the record of where they came from)"""
    if is_export(c.init_from):
        config = export_config(c.init_from)
        check_compatible({'config': {k: getattr(c, k) for k in MODEL_FIELDS}, **config['tinytpu']}, c,
                         c.init_from, data, resuming=False)
        step = config['tinytpu'].get('step') if type(config['tinytpu'].get('step')) is int else 0
        return hf_params(c.init_from, c, template), {'path': c.init_from, 'checkpoint': 'model.safetensors', 'step': step}
    source = fetch_run(dataclasses.replace(c, out=c.init_from)).out
    loaded, used, meta = restore(dataclasses.replace(c, out=source), {'params': template}, data, resuming=False)
    return loaded['params'], {'path': c.init_from, 'checkpoint': os.path.basename(used), 'step': meta['step']}


def validate(c):
    """Reject impossible settings with one line, before anything is compiled."""
    for ok, message in setting_checks(c):
        if not ok:
            raise UserError(message)
    return c


def setting_checks(c):
    """(holds, the line to print if not) for every setting, checked in this order and only while
    the ones before hold: a later check may rely on them (--n_head=0 is reported, not divided by)."""
    bad = next((f.name for f in dataclasses.fields(Config)
                if f.type is float and not math.isfinite(getattr(c, f.name))), 'lr')
    yield math.isfinite(getattr(c, bad)), f'--{bad}={getattr(c, bad)}: must be a finite number'
    yield (c.n_layer >= 1 and c.d_model >= 1 and c.n_head >= 1 and c.n_kv_head >= 1,
           '--n_layer, --d_model, --n_head and --n_kv_head must be positive')
    yield c.d_head >= 0 and c.d_ff >= 0, '--d_head and --d_ff must be >= 0 (0 = the default width)'
    yield (c.d_head > 0 or c.d_model % c.n_head == 0,
           f'--d_model={c.d_model} is not divisible by --n_head={c.n_head} (or set --d_head)')
    yield (c.n_head % c.n_kv_head == 0,
           f'--n_head={c.n_head} is not a multiple of --n_kv_head={c.n_kv_head}')
    yield head_dim(c) % 2 == 0, f'head dim {head_dim(c)} must be even for RoPE'
    yield c.mlp in ('relu2', 'swiglu'), f'--mlp={c.mlp}: choose relu2 or swiglu'
    yield c.remat in REMAT, f'--remat={c.remat}: choose {", ".join(REMAT)}'
    yield (c.attention in ('auto', 'xla', 'splash', 'cudnn'),
           f'--attention={c.attention}: choose auto, xla, splash or cudnn')
    yield c.vocab_size >= 2, f'--vocab_size={c.vocab_size} must be at least 2'
    yield (1 <= c.seq_len <= c.context,
           f'--seq_len={c.seq_len} must be between 1 and the model context (--context={c.context})')
    yield c.steps >= 1, f'--steps={c.steps} must be at least 1'
    yield c.batch_size >= 1 and c.grad_accum >= 0, '--batch_size must be >= 1, --grad_accum >= 0 (0 = the fewest that fit)'
    yield (c.batch_size % max(c.grad_accum, 1) == 0,
           f'--batch_size={c.batch_size} must be a multiple of --grad_accum={c.grad_accum}')
    yield c.lr > 0, f'--lr={c.lr} must be positive'
    yield c.embed_lr > 0, f'--embed_lr={c.embed_lr} must be positive'
    yield c.lr_width >= 1, f'--lr_width={c.lr_width} must be at least 1 (the width --lr is for)'
    yield 0 <= c.min_lr_frac <= 1, f'--min_lr_frac={c.min_lr_frac} must be in [0, 1]'
    yield c.warmup_steps >= 0, f'--warmup_steps={c.warmup_steps} must be >= 0'
    yield 0 <= c.warmdown_frac <= 1, f'--warmdown_frac={c.warmdown_frac} must be in [0, 1]'
    yield c.warmdown in ('linear', 'cosine'), f'--warmdown={c.warmdown}: choose linear or cosine'
    yield (c.weight_decay >= 0 and c.grad_clip >= 0 and c.eps > 0,
           '--weight_decay and --grad_clip must be >= 0, --eps > 0')
    yield c.optimizer in ('adamw', 'muon'), f'--optimizer={c.optimizer}: choose adamw or muon'
    yield (c.matrix_lr > 0 and 0 <= c.momentum < 1,
           f'--matrix_lr must be positive (now {c.matrix_lr}), --momentum in [0, 1) (now {c.momentum})')
    yield 0 <= c.beta1 < 1 and 0 <= c.beta2 < 1, '--beta1 and --beta2 must be in [0, 1)'
    yield (c.dtype in ('auto', 'float32', 'bfloat16') or c.dtype == 'float64' and jax.config.jax_enable_x64,
           f'--dtype={c.dtype}: choose auto, float32 or bfloat16 (float64 is for the tests\' oracles, with '
           'JAX_ENABLE_X64=1)')
    yield (min(c.log_every, c.eval_every, c.eval_batches, c.ckpt_every, c.keep_ckpts) >= 1,
           '--log_every, --eval_every, --eval_batches, --ckpt_every, --keep_ckpts must be >= 1')
    yield (c.temperature >= 0 and c.top_k >= 0 and 0 < c.top_p <= 1,
           '--temperature and --top_k must be >= 0, --top_p in (0, 1]')
    yield c.max_new_tokens >= 0, f'--max_new_tokens={c.max_new_tokens} must be >= 0'
    yield c.cpu_devices >= 1, f'--cpu_devices={c.cpu_devices} must be at least 1'
    yield (c.bench_steps >= 1 and c.peak_flops >= 0 and c.price_per_hour >= 0,
           '--bench_steps must be >= 1, --peak_flops and --price_per_hour >= 0')
    yield (not c.profile_steps or profile_range(c) is not None,
           f'--profile_steps={c.profile_steps}: expected A:B with 0 <= A < B, e.g. 10:15')
    yield (not c.profile_steps or profile_range(c)[1] <= c.steps,
           f'--profile_steps={c.profile_steps}: the run has {c.steps} steps (--steps); trace steps within them')
    yield c.fsdp in ('auto', 'true', 'false'), f'--fsdp={c.fsdp}: choose auto, true or false'
    yield (c.budget >= 0 and c.chips >= 1 and 0 <= c.mfu <= 1,
           '--budget must be >= 0, --chips >= 1, --mfu in [0, 1]')
    yield (0 <= c.process_id < c.num_processes,
           f'--process_id={c.process_id} must be in 0 .. --num_processes - 1 ({c.num_processes - 1})')
    yield c.rope_theta > 0, f'--rope_theta={c.rope_theta} must be positive'
    yield c.logit_softcap >= 0, f'--logit_softcap={c.logit_softcap} must be >= 0 (0 = off)'
    yield 0 <= c.seed < 2**32, f'--seed={c.seed} must be in 0 .. 2^32 - 1 (JAX keys take 32 bits)'
    yield c.task_limit >= 0 and c.hellaswag_every >= 0, '--task_limit and --hellaswag_every must be >= 0 (0 = all, off)'
    yield (c.export_dtype in EXPORT_DTYPES,
           f'--export_dtype={c.export_dtype}: choose {", ".join(EXPORT_DTYPES)}')


def profile_range(c):
    """--profile_steps=A:B as (A, B), or None if malformed."""
    try:
        a, b = (int(x) for x in c.profile_steps.split(':'))
    except ValueError:
        return None
    return (a, b) if 0 <= a < b else None


def backend(c):
    """The platform the program is compiled for: tpu with --topology, else the one JAX runs on."""
    return 'tpu' if c.topology else jax.default_backend()


# ----------------------------------------------------------------------------------------------
# Processes: before JAX touches a device, which backend it starts (skip_absent_tpu), how many
# virtual CPU devices (use_cpu_devices), and the other hosts of a multi-host run joined
# (init_distributed). After it, process 0 alone prints, logs and writes checkpoints.


def skip_absent_tpu():
    """libtpu, installed where no TPU is attached (jax[tpu] on a laptop, for bench --topology),
    prints errors while JAX starts its backends. Unless JAX_PLATFORMS says which to use, a
    machine with neither a TPU (JAX's own PCI scan) nor a GPU runs on the CPU without asking libtpu."""
    import importlib.util
    if os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms or importlib.util.find_spec('libtpu') is None:
        return
    try:
        from jax._src import hardware_utils
        tpu = hardware_utils.num_available_tpu_chips_and_device_id()[0]
        gpu = hardware_utils.has_visible_nvidia_gpu() or os.path.exists('/dev/kfd')  # NVIDIA or AMD
    except (ImportError, AttributeError, OSError):  # JAX moved its check: leave the choice to JAX
        return
    if not tpu and not gpu:
        jax.config.update('jax_platforms', 'cpu')


def use_cpu_devices(n):
    """Ask for n virtual CPU devices; possible only before JAX has initialized its backends."""
    try:
        jax.config.update('jax_num_cpu_devices', n)
    except RuntimeError:  # already initialized (e.g. called twice in one process): keep as is
        pass


def init_distributed(flags):
    """Join the other hosts (before JAX touches a device). On a TPU pod slice, --distributed lets
    JAX find them itself; elsewhere --coordinator, --num_processes and --process_id say. What JAX
    would only report by aborting the process (a bad address, a port in use, no coordinator
    after --coordinator_timeout) is checked here first, and said in one line."""
    if not (flags.get('distributed') or flags.get('coordinator')):
        return
    if not flags.get('coordinator'):
        jax.distributed.initialize()
        return
    address, n = flags['coordinator'], flags.get('num_processes', 1)
    i, timeout = flags.get('process_id', 0), flags.get('coordinator_timeout', Config.coordinator_timeout)
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f'--coordinator={address}: expected HOST:PORT, like 10.0.0.2:1234')
    if not (n >= 1 and 0 <= i < n and timeout >= 1):
        raise UserError('--num_processes must be >= 1, --process_id in 0 .. num_processes - 1, '
                        '--coordinator_timeout >= 1')
    try:
        socket.getaddrinfo(host.strip('[]'), int(port), type=socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(f'--coordinator={address}: cannot resolve {host} ({e.strerror or e})')
    if i == 0:  # the coordinator runs here: its port must be free
        with socket.socket(socket.AF_INET6 if ':' in host.strip('[]') else socket.AF_INET) as probe:
            try:
                probe.bind(('', int(port)))
            except OSError as e:
                raise UserError(f'--coordinator={address}: cannot listen on port {port} ({e.strerror}); '
                                'choose a free port for every process')
        print(f'coordinator at {address}: waiting up to {timeout}s for {n - 1} more process(es) to join')
    else:
        wait_for_coordinator(host.strip('[]'), int(port), address, timeout)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU hosts talk over TCP
    joined = threading.Event()

    def give_up():  # JAX reports a process that never came only by aborting (C++): say it first
        if not joined.wait(timeout + 1):
            print(f'error: --coordinator={address}: not all {n} processes joined within {timeout}s '
                  '(--coordinator_timeout); start each with the same --coordinator and --num_processes and its own '
                  '--process_id, or wait longer', file=sys.stderr, flush=True)
            os._exit(2)

    threading.Thread(target=give_up, daemon=True).start()
    jax.distributed.initialize(address, n, i, initialization_timeout=timeout)
    joined.set()


def wait_for_coordinator(host, port, address, timeout):
    """Return once something listens at host:port, or fail in one line after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError:
            if time.time() > deadline:
                raise UserError(f'--coordinator={address}: nothing listening there after {timeout}s; start '
                                'process 0 (it runs the coordinator), check the address, port and firewall, '
                                'or wait longer with --coordinator_timeout')
            time.sleep(0.5)


def is_process0():
    """Whether this is process 0, which alone prints, logs and writes checkpoints."""
    return jax.process_index() == 0


def say(*args, **kw):
    """print, on process 0 only: a pod slice's other hosts train silently. Output piped into a
    program that stops reading (python tinytpu.py | head) is dropped from then on: training goes
    on to its end and its checkpoints."""
    if jax.process_index() == 0:
        try:
            print(*args, **kw)
        except BrokenPipeError:
            drop_output(kw.get('file') or sys.stdout)


def drop_output(stream):
    """Send what is still written to a stream whose reader has gone (a closed pipe) to /dev/null."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


# ----------------------------------------------------------------------------------------------
# Devices: one Mesh over every device (of every host) with a 'data' axis. Each batch is split
# along it, so every device computes the gradient of its slice. Params and AdamW moments are
# either replicated (the gradients all-reduced) or, with FSDP (ZeRO-3), split along one large
# axis per weight (param_specs' fsdp_axis): the weights are all-gathered for the forward pass and
# their gradients summed back to the shards, so a model too big for one chip trains on several.
# choose_fsdp picks by memory. Either way the step is Part I's train_step, compiled for the mesh
# in JAX's explicit sharding mode from these shardings and Part I's `shard` and `whole` (each device
# computes its rows of the batch with whole weights): no device code here repeats it (docs/multi-chip.md). On CPU
# the mesh pays off too: XLA threads small matmuls poorly, and splitting the batch over one
# virtual device per core (--cpu_devices) ran the quickstart 1.4x faster on 2 cores.


@functools.cache
def topology_devices(name):
    """The devices of a TPU slice that need not exist (libtpu describes it): enough to compile for."""
    import importlib.util
    if importlib.util.find_spec('libtpu') is None:
        raise UserError('--topology needs libtpu, the TPU compiler (~700 MB): pip install -U "jax[tpu]"')
    from jax.experimental import topologies
    # Loading, libtpu looks for the TPU VM it runs on and prints errors where there is none. It
    # compiles for the slice it is named either way (v6e:2x4's estimate is the same to the byte):
    # say this host is a one-chip TPU VM, and it stays quiet.
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-1')
    single = all(x == '1' for x in name.partition(':')[2].split('x'))  # v6e:1x1 names no host
    try:
        devices = topologies.get_topology_desc(topology_name=name, platform='tpu',
                                               **({'chips_per_host_bounds': (1, 1, 1)} if single else {})).devices
    except Exception as e:  # whatever libtpu says of a name it does not know
        if 'lockfile' in str(e):  # only one process may load libtpu at a time
            raise UserError(f'--topology={name}: libtpu is in use by another process; wait for it to finish, or '
                            'set ALLOW_MULTIPLE_LIBTPU_LOAD=1 to share it')
        raise UserError(f'--topology={name}: not a TPU slice libtpu knows ({str(e).splitlines()[0][:120]}); '
                        'use a name like v5e:1x1, v6e:2x4 or v5p:2x2x1')
    if not getattr(this_chip(devices[0].device_kind), 'clock', 0):
        raise UserError(f'--topology={name}: the hardware table has no {devices[0].device_kind} (its memory, peak and '
                        f'clock); use one of {", ".join(chip.name for chip in CHIPS if chip.clock)}')
    return devices


def target_devices(c):
    """The devices the program is compiled for: those of --topology (nothing runs), else JAX's; on
    one CPU host the first --cpu_devices of them (a process that started with more, as a test's
    script may, runs each command on as many as it asks for)."""
    if c.topology:
        return topology_devices(c.topology)
    one_cpu_host = jax.default_backend() == 'cpu' and jax.process_count() == 1
    return jax.devices()[:c.cpu_devices] if one_cpu_host else jax.devices()


def device_memory(c):
    """Bytes of memory one device has for a step: the chip's HBM for --topology, else what the
    device reports (TPU/GPU), else None (CPU)."""
    if c.topology:
        return this_chip(target_devices(c)[0].device_kind).memory
    return (jax.local_devices()[0].memory_stats() or {}).get('bytes_limit')


def microbatch_choices(c, n):
    """The --grad_accum values that cut a batch into equal microbatches that split evenly over
    n devices, fewest microbatches (the largest) first."""
    b = c.batch_size
    divisors = sorted({d for i in range(1, math.isqrt(b) + 1) if b % i == 0 for d in (i, b // i)})
    return [g for g in divisors if b // g % n == 0]


def split_evenly(c):
    """With several TPUs/GPUs, each microbatch must split evenly over them. When it does not
    (microbatches of 2 on 4 or 8 chips), use the most microbatches that do: the per-device
    microbatch only gets smaller, so what fit one chip fits each of several. --grad_accum=0 stays
    for compile_fitting_step to resolve, except where the device reports no memory (CPU): 1."""
    single_cpu = backend(c) == 'cpu' and jax.process_count() == 1
    n = 1 if single_cpu else len(target_devices(c))
    if c.grad_accum == 0:
        if device_memory(c) or not microbatch_choices(c, n):
            return c
        return dataclasses.replace(c, grad_accum=microbatch_choices(c, n)[0])
    micro = c.batch_size // c.grad_accum
    if micro % n == 0:
        return c
    fits = [g for g in microbatch_choices(c, n) if g <= c.grad_accum]
    if not fits:
        return c  # make_mesh explains
    say(f'{micro} sequences per microbatch do not split over {n} devices: using --grad_accum={fits[-1]}')
    return dataclasses.replace(c, grad_accum=fits[-1])


def make_mesh(c):
    devices = target_devices(c)
    micro = c.batch_size // max(c.grad_accum, 1)
    if backend(c) == 'cpu' and jax.process_count() == 1:  # the most that divide evenly
        n = max(d for d in range(1, len(devices) + 1) if micro % d == 0)
    elif not microbatch_choices(dataclasses.replace(c, grad_accum=0), len(devices)) or \
            (c.grad_accum and micro % len(devices)):
        raise UserError(f'--batch_size={c.batch_size} / --grad_accum={c.grad_accum} = {micro} '
                        f'sequences per microbatch do not split evenly over {len(devices)} devices')
    else:
        n = len(devices)
    return device_mesh(devices[:n])


def device_mesh(devices):
    """A mesh of these devices with one axis, 'data'. On several, JAX's explicit sharding: each
    array's sharding is part of its type, as Part I's shard and whole state it. One device: as Part I alone."""
    kind = jax.sharding.AxisType.Explicit if len(devices) > 1 else jax.sharding.AxisType.Auto
    return Mesh(np.array(devices), ('data',), axis_types=(kind,))


def setup_devices(c):
    """What train and bench start from: the microbatches split evenly, the mesh, the attention
    kernel and FSDP resolved. -> (config, mesh, a note on the kernel and the sharding)."""
    c = split_evenly(c)
    mesh = make_mesh(c)
    c, attention_note = pick_attention(c, mesh.devices.flat[0])
    c, sharding_note = choose_fsdp(c, mesh)
    check_memory(c, mesh)
    return c, mesh, f'attention {attention_note} | {sharding_note}'


def choose_fsdp(c, mesh):
    """Resolve --fsdp=auto. On several TPUs, FSDP: libtpu estimated the tpu preset's step on a
    v6e:2x4 at 52.0 ms with FSDP against 62.3 data parallel (AdamW: 51.5 against 56.4), as each
    chip updates only its shard of the weights (docs/multi-chip.md). On GPUs, data parallel
    (params and AdamW state replicated: one gradient all-reduce per step) while params,
    gradients and AdamW moments, 16 bytes per parameter, take at most half of a device's memory,
    leaving the rest for activations; FSDP above that (and on devices that do not report their
    memory). A CPU stays data parallel.
    -> (config with --fsdp true or false, a note saying which, with the numbers)."""
    replicated = 16 * param_count(c)
    limit = device_memory(c)
    tpu = backend(c) == 'tpu' and c.fsdp == 'auto'
    fsdp = use_fsdp(c, mesh) and (c.fsdp == 'true' or tpu or not limit or replicated > limit / 2)
    c = dataclasses.replace(c, fsdp='true' if fsdp else 'false')
    of = f' of {size(limit)}' if limit else ''
    if mesh.size == 1:
        return c, f'one device: params, gradients and {optimizer_state(c)} {size(replicated)}{of}'
    if fsdp:
        why = ('; on TPUs the faster: see docs/multi-chip.md' if tpu else
               ', over half' if limit and replicated > limit / 2 else '')
        return c, (f'FSDP over {mesh.size} devices: params, gradients and {optimizer_state(c)} {size(replicated / mesh.size)} per '
                   f'device{of} ({size(replicated)} replicated{why})')
    return c, (f'data parallel over {mesh.size} devices: params, gradients and {optimizer_state(c)} {size(replicated)} '
               f'per device{of}'
               f'{" (FSDP from half)" if limit else ""}')


def use_fsdp(c, mesh):
    """Whether params are sharded: --fsdp as choose_fsdp resolved it (auto, unresolved: on for
    several TPUs or GPUs)."""
    return c.fsdp == 'true' or (c.fsdp == 'auto' and mesh.size > 1 and backend(c) != 'cpu')


def state_shardings(c, mesh):
    """The NamedSharding of every array in {'params', 'opt'}."""
    fsdp = use_fsdp(c, mesh)

    def sharding(w):
        if not fsdp:
            return NamedSharding(mesh, P())
        if w.shape[w.fsdp_axis] % mesh.size:
            raise UserError(f'--fsdp: a weight of shape {w.shape} cannot be split evenly over {mesh.size} '
                            f'devices along axis {w.fsdp_axis}; choose sizes divisible by {mesh.size} or --fsdp=false')
        return NamedSharding(mesh, P(*[None] * w.fsdp_axis, 'data'))

    params = spec_map(sharding, param_specs(c))
    return {'params': params, 'opt': {'step': NamedSharding(mesh, P()), 'mu': params, 'nu': params}}


def place(tree, shardings):
    """Host arrays -> device arrays in the given shardings; each device receives only its slice."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]), tree, shardings)


def state_shapes(c, mesh):
    """{'params', 'opt'} as shapes with their shardings: enough to compile for, nothing allocated."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        jax.eval_shape(lambda: fresh_state(c)), state_shardings(c, mesh))


def resident_bytes(tree):
    """Bytes one device holds of these arrays (or of shapes with shardings)."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def state_bytes_per_device(c, mesh):
    """Bytes of params + AdamW state on one device, from the shardings (nothing is allocated)."""
    return resident_bytes(state_shapes(c, mesh))


def batch_sharding(mesh, ndim):
    """A stack (..., micro_batch, seq_len + 1) of batches, split along micro_batch."""
    return NamedSharding(mesh, P(*[None] * (ndim - 2), 'data', None))


def check_vocab(batch, c, what):
    if batch.max() >= c.vocab_size:
        raise UserError(f'--data={c.data}: {what} holds token id {batch.max()} but the vocabulary '
                        f'has {c.vocab_size} tokens; the data was prepared with another tokenizer')


def local_blocks(windows, idx, mesh, c, what):
    """The batch made of windows number idx (..., micro_batch), as the blocks this process's
    devices hold: each host reads only its slice of every batch. -> [(device, tokens)]"""
    shape = idx.shape + (windows.window,)
    blocks = []
    for device, index in batch_sharding(mesh, len(shape)).addressable_devices_indices_map(shape).items():
        rows = idx[index[:-1]]
        blocks.append((device, windows.get(rows)))
        check_vocab(blocks[-1][1], c, what)
    return blocks


def put_batch(blocks, shape, mesh):
    """Assemble the global batch array from this process's blocks (device_put in this thread)."""
    arrays = [jax.device_put(tokens, device) for device, tokens in blocks]
    return jax.make_array_from_single_device_arrays(shape, batch_sharding(mesh, len(shape)), arrays)


def as_floats(tree):
    """Replicated device values (loss, norms) -> Python floats, on any host."""
    return jax.tree.map(lambda x: float(np.asarray(x.addressable_data(0))), tree)


def host_state(state):
    """Every array gathered to host memory in full (from all hosts) for a checkpoint."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(state, tiled=True)
    return jax.device_get(state)


# ----------------------------------------------------------------------------------------------
# Attention kernels. Fused kernels never write the T x T scores to memory: they stream blocks of
# keys past each block of queries, keeping a running softmax (flash attention), and skip the
# blocks above the causal diagonal. Same inputs and outputs as `attention` over positions 0..T-1.


def splash_attention(q, k, v, interpret=None):
    """q (B,N,T,H), k and v (B,K,T,H) -> (B,N,T,H) with the Pallas TPU kernel (splash = sparse
    flash). It takes one sequence with one K head for a group of N/K query heads, so it is
    vmapped over B and K. Off TPU it runs in Pallas's interpreter: slow, for tests only."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    B, N, T, H = q.shape
    K = k.shape[1]
    b = splash_block(T)
    # The backward runs as two kernels (dk and dv; dq). splash's fused one does 2 matmuls fewer, but
    # leaves XLA a sum of partial dq's that libtpu estimated at 77 ms of a 498 ms v6e step.
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                          block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sm.MultiHeadMask([sm.CausalMask((T, T))] * (N // K))
    if interpret is None:
        interpret = jax.default_backend() != 'tpu'
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    q = (q / math.sqrt(H)).astype(q.dtype).reshape(B, K, N // K, T, H)  # the kernel does not scale
    return jax.vmap(jax.vmap(kernel))(q, k, v).reshape(B, N, T, H)


# Splash's block length, chosen by measurement on a real chip (libtpu's estimate cannot see inside
# a Pallas kernel): one layer's attention, forward and backward, on a v6e, by tpuchat's author
# (heads of 128, 2048 positions), in ms per block length. 1024 was fastest, though it computes more
# of the masked triangle (3 of 4 blocks against 10 of 16 at 512).
SPLASH_BLOCK_MS = {256: 2.13, 512: 1.44, 1024: 1.35, 2048: 1.42}


def splash_block(T):
    """Query and key block length of the splash kernel: the largest of 1024, 512, 256, 128 dividing T."""
    return max(b for b in (1024, 512, 256, 128) if T % b == 0)


def cudnn_attention(q, k, v, implementation='cudnn'):
    """q (B,N,T,H), k and v (B,K,T,H) -> (B,N,T,H) with cuDNN's fused attention (GPU; bf16 or
    fp16). jax.nn.dot_product_attention wants (B,T,heads,H) and serves K < N heads itself; its
    default implementation is plain XLA, so cuDNN must be asked for by name."""
    t = lambda x: x.transpose(0, 2, 1, 3)
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), is_causal=True, implementation=implementation))


def per_device(kernel):
    """kernel(q, k, v) run on each device's rows of the batch (shard_map) when a mesh of several
    devices is set: XLA splits the rest of the step over the devices by itself, but not a Pallas
    or cuDNN call, which it would otherwise run on the whole batch gathered onto every device."""
    def run(q, k, v, c):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            return kernel(q, k, v, c)
        return jax.shard_map(lambda q, k, v: kernel(q, k, v, c), mesh=mesh, in_specs=P('data'), out_specs=P('data'),
                             check_vma=False)(q, k, v)  # Pallas kernels do not say how they vary over the mesh
    return run


# Part I's block calls them by --attention's name (auto = xla until pick_attention
# resolves it). Splash is built for the platform c compiles for: interpreted off a TPU.
FUSED_ATTENTION['splash'] = per_device(lambda q, k, v, c: splash_attention(q, k, v, interpret=backend(c) != 'tpu'))
FUSED_ATTENTION['cudnn'] = per_device(lambda q, k, v, c: cudnn_attention(q, k, v))


def pick_attention(c, device=None):
    """Resolve --attention=auto (splash on TPU, cudnn on GPU, xla on CPU, where the reference
    measured faster than jax.nn's attention) and check that the kernel compiles, forward and backward,
    for these shapes on `device` (default: JAX's first). -> (config with the kernel that will run,
    a note saying which and why). An explicit choice that cannot run is an error; auto falls back
    to xla and says why."""
    platform, dt = backend(c), compute_dtype(c)
    want = c.attention if c.attention != 'auto' else {'tpu': 'splash', 'gpu': 'cudnn'}.get(platform, 'xla')
    problem = None
    if want == 'splash' and (platform == 'gpu' or c.seq_len % 128 or head_dim(c) % 128):
        problem = f'needs a TPU, and --seq_len ({c.seq_len}) and the head dim ({head_dim(c)}) multiples of 128'
    elif want == 'cudnn' and (platform != 'gpu' or dt not in (jnp.bfloat16, jnp.float16)):
        problem = f'needs a GPU and --dtype=bfloat16 (here: {platform}, {jnp.dtype(dt).name})'
    elif want != 'xla':
        one = NamedSharding(device_mesh([device or jax.devices()[0]]), P())
        q = jax.ShapeDtypeStruct((1, c.n_head, c.seq_len, head_dim(c)), dt, sharding=one)
        kv = jax.ShapeDtypeStruct((1, c.n_kv_head, c.seq_len, head_dim(c)), dt, sharding=one)
        loss = lambda q, k, v: jnp.sum(FUSED_ATTENTION[want](q, k, v, c).astype(jnp.float32))
        try:
            jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
        except Exception as e:  # whatever the kernel's own checks or the compiler reject
            problem = f'does not compile for these shapes ({type(e).__name__}: {str(e)[:200]})'.replace('\n', ' ')
    if problem and c.attention == want:
        raise UserError(f'--attention={want}: {problem}; use --attention=xla')
    if problem:
        return dataclasses.replace(c, attention='xla'), f'xla ({want} not used: {problem})'
    return dataclasses.replace(c, attention=want), want


# ----------------------------------------------------------------------------------------------
# Memory: what must fit before anything is allocated (check_memory), and the compiled steps
# checked against the device, in the fewest microbatches that fit (compile_fitting_step).


def host_memory():
    """Bytes of RAM in this machine, or None where the OS does not say."""
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return None


def least_memory(c, mesh):
    """Bytes per device that training needs at the least: params, gradients and AdamW moments (all
    fp32, as sharded), the validation set and a batch of int32 tokens."""
    tokens = (c.eval_batches + 1) * c.batch_size * (c.seq_len + 1) * 4
    return state_bytes_per_device(c, mesh) * 4 // 3 + tokens // mesh.size  # state = params + 2 moments


def check_memory(c, mesh):
    """Fail in one line, before anything is allocated or compiled, when params, their gradients,
    the AdamW moments and the token batches cannot fit in the device's memory (TPU/GPU) or, on a
    CPU, in the machine's (its devices share it). A lower bound: activations come on top, and
    compile_fitting_step checks the whole step once it is compiled."""
    n_params = param_count(c)
    need = least_memory(c, mesh)
    limit, where = device_memory(c), f'{target_devices(c)[0].device_kind} has'
    if not limit:
        need, limit, where = need * len(mesh.local_devices), host_memory(), 'this machine has'
    if limit and need > limit:
        per = '' if where == 'this machine has' else ' per device'
        raise UserError(f'{n_params / 1e6:,.1f}M params with their gradients and AdamW moments, and {c.eval_batches + 1} '
                        f'batches of {c.batch_size} x {c.seq_len} tokens (validation set and training), need at '
                        f'least {size(need)}{per} but {where} {size(limit)}; shrink the model (--n_layer, --d_model, '
                        'the vocabulary), --batch_size or --eval_batches, or shard over more chips (--fsdp)')


class TooBig(UserError):
    """The compiled train step needs more memory than the device has."""


def out_of_memory(e):
    """Whether an exception says the step does not fit: our own check, or XLA's RESOURCE_EXHAUSTED
    (a TPU's compiler, or any device allocating at run time)."""
    return isinstance(e, TooBig) or isinstance(e, jax.errors.JaxRuntimeError) and 'RESOURCE_EXHAUSTED' in str(e)


def step_bytes(compiled):
    """Device memory a compiled step uses while it runs: XLA's buffers for its arguments, outputs
    (less those that reuse a donated argument) and temporaries. None where XLA does not say."""
    m = compiled.memory_analysis()
    return None if m is None else \
        m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def check_fits(compiled, also_resident, what, c, devices=1):
    """Raise TooBig if a compiled step, with the arrays that stay on the device beside it, needs
    more memory than the device has (where it says: TPU, GPU, --topology), or on a CPU, with its
    `devices` virtual devices side by side, more than the machine has."""
    need, limit, where = step_bytes(compiled), device_memory(c), target_devices(c)[0].device_kind
    if not limit and backend(c) == 'cpu':
        need, limit, where = need and need * devices, host_memory(), 'this machine'
    if need is not None and limit and need + also_resident > limit:
        per = '' if where == 'this machine' else ' per device'
        raise TooBig(f'the {what} step needs {size(need + also_resident)}{per} '
                     f'with microbatches of {c.batch_size // c.grad_accum} sequences, but {where} has {size(limit)}')


def compile_step(params, opt, mesh, c):
    """Part I's train_step compiled ahead of time for these arrays (or their shapes) as they are
    sharded over the mesh, and for this config, called as step(params, opt, batch); checked
    against the device's memory: a clear error now rather than an out-of-memory crash mid-run."""
    batch = jax.ShapeDtypeStruct((c.grad_accum, c.batch_size // c.grad_accum, c.seq_len + 1), jnp.int32,
                                 sharding=batch_sharding(mesh, 3))
    # the new state comes out sharded as the old went in (Muon's shard annotation would spread it)
    state = state_shardings(c, mesh)
    pinned = jax.jit(train_step, static_argnames='c', donate_argnums=(0, 1),
                     out_shardings=(state['params'], state['opt'], NamedSharding(mesh, P())))
    with jax.set_mesh(mesh):
        step = pinned.lower(params, opt, batch, c).compile()
    check_fits(step, 0, 'train', c, len(mesh.local_devices))
    return step


def compile_eval(params, opt, mesh, c):
    """Part I's eval_loss compiled for the validation set in training's microbatches, split over
    the mesh, called as step(params, batches); checked against the memory it shares with the
    optimizer state."""
    vals = jax.ShapeDtypeStruct((c.eval_batches * c.grad_accum, c.batch_size // c.grad_accum, c.seq_len + 1),
                                jnp.int32, sharding=batch_sharding(mesh, 3))
    with jax.set_mesh(mesh):
        step = eval_loss.lower(params, vals, c).compile()
    check_fits(step, resident_bytes(opt) * len(mesh.local_devices), 'eval', c, len(mesh.local_devices))
    return step


# Beyond this many tokens per device a microbatch keeps the matrix units no busier, it only takes
# memory: libtpu estimated the tpu preset's v6e step at 426 ms with 8 x 2048 tokens per
# microbatch and 460 ms with 16 x 2048 (docs/tpu-estimates.md).
MAX_MICROBATCH_TOKENS = 8 * 2048


def compile_fitting_step(params, opt, mesh, c):
    """The train and eval steps compiled with microbatches that fit the device. -> (config, train
    step, eval step). More microbatches give the same batch and the same update in smaller
    pieces, and memory falls as they shrink: with --grad_accum=0 a binary search finds the fewest
    that fit, of at most MAX_MICROBATCH_TOKENS per device; a given --grad_accum is doubled while
    it does not fit."""
    choices = microbatch_choices(c, mesh.size)
    if c.grad_accum:
        doublings = [c.grad_accum * 2 ** k for k in range(c.batch_size.bit_length())]
        choices = [g for g in choices if g in doublings]
    else:
        small = [g for g in choices if c.batch_size // g // mesh.size * c.seq_len <= MAX_MICROBATCH_TOKENS]
        choices = small or choices[-1:]
    lo, hi, fitted, problem = 0, len(choices) - 1, None, None
    while lo <= hi:  # an explicit --grad_accum tries its doublings in order, auto bisects
        i = lo if c.grad_accum else (lo + hi) // 2
        trial = dataclasses.replace(c, grad_accum=choices[i])
        try:
            fitted = (trial, compile_step(params, opt, mesh, trial), compile_eval(params, opt, mesh, trial))
            hi = i - 1
            if c.grad_accum:
                break
        except (TooBig, jax.errors.JaxRuntimeError) as e:
            if not out_of_memory(e):
                raise
            problem, lo = str(e).splitlines()[0][:300], i + 1
            if c.grad_accum and lo <= hi:
                say(f'the train step does not fit in memory with microbatches of {c.batch_size // choices[i]} '
                    f'sequences: using --grad_accum={choices[lo]}')
    if fitted is None:
        raise UserError(f'{problem}; use more chips (FSDP splits params and optimizer state), or a smaller '
                        '--batch_size or model')
    if not c.grad_accum:
        say(f'microbatches of {fitted[0].batch_size // fitted[0].grad_accum} sequences (--grad_accum='
            f'{fitted[0].grad_accum}): the fewest that fit {size(device_memory(c))} per device, of at most '
            f'{MAX_MICROBATCH_TOKENS:,} tokens each')
    return fitted


def buffer_note(m):
    """XLA's buffer sizes for a compiled step (its memory_analysis()), in words."""
    return 'XLA buffer sizes unknown' if m is None else \
        f'XLA buffers per device {size(m.temp_size_in_bytes)} temporary + {size(m.argument_size_in_bytes)} arguments'


# ----------------------------------------------------------------------------------------------
# The run: Part I's training loop runs with a TrainingRun, its Run made real: what it starts from
# (one run per --out, the data and state checked, the log cut back to the checkpoint it resumes,
# the step compiled for the devices), its clock (Meter: time, tokens/s, MFU, dollars) and its
# guard (signals stop it with a checkpoint; so does divergence, before anything garbage is
# written).


def prefetch(make, start, depth=2):
    """Yield make(k) for k = start, start+1, ... computed in a background thread, so the
    accelerator never waits for the host to gather tokens. Errors re-raise in the consumer."""
    q = queue.Queue(depth)

    def worker():
        try:
            for k in range(start, sys.maxsize):
                q.put(make(k))
        except BaseException as e:  # hand the error to the consumer
            q.put(e)

    threading.Thread(target=worker, daemon=True).start()
    while True:
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        yield item


class TrainingRun(Run):
    """Part I's Run on every device of every host, with the clock, the guard, a lock on --out, a
    bucket and verified checkpoints. Entered (`with`), it starts: -> itself, holding what train()
    reads (c with the vocabulary, the devices' choices and the microbatches resolved; params, opt,
    start), and for its own methods the mesh, the compiled steps, the batches and the costs."""

    def __init__(self, c):
        self.c, self.held = c, contextlib.ExitStack()  # what the run holds until it ends: the lock, signals, the log

    def __enter__(self):
        with self.held:  # released here if starting fails, else when the run ends (__exit__)
            self.start_run(self.c)
            self.held = self.held.pop_all()
        return self

    def __exit__(self, *exc):
        self.held.close()

    def compile(self, c, mesh, state, meta):
        """The eval task read and checked, the price said, then the train and eval steps compiled for
        the state (arrays, or their shapes) in the fewest microbatches that fit. -> the config"""
        self.task = None
        if c.hellaswag_every:  # read and checked before anything is compiled
            if not meta.get('tokenizer'):
                raise UserError(f'--hellaswag_every needs the tokenizer: {c.data} has no meta.json naming it')
            enc = load_encoding(meta, c.data)
            self.task = task_examples(c, enc)[0], enc
        self.price, self.price_note = hourly_price(c, mesh)
        say(f'cost: {self.price_note}')
        t = time.time()
        c, self.compiled, self.eval = compile_fitting_step(state['params'], state['opt'], mesh, c)
        self.compiled_note = (f'compiled the train step in {time.time() - t:.1f}s | '
                              f'{buffer_note(self.compiled.memory_analysis())}')
        return c

    def start_run(self, c):
        """Everything training needs, in place: the data, the output directory (locked; its log cut
        back to the checkpoint), the mesh, the state (fresh or resumed), and unless there is nothing
        left to train, the compiled steps, the validation set, the batches, the cost, the clock and
        the guard."""
        held, self.t0 = self.held, time.time()
        if in_bucket(c.data):  # prepared data in a bucket: copied once into a local copy, read there
            c = dataclasses.replace(c, data=fetch_data(c.data))  # every host: each reads its own copy
        train_windows, val_windows, meta = load_data(c)
        if meta.get('tokenizer_sha256'):  # a trained tokenizer: there and whole now, not after training, when it is needed
            load_encoding(meta, c.data, os.path.join(c.data, 'meta.json'))
        if 'vocab_size' in meta:
            c = dataclasses.replace(c, vocab_size=int(meta['vocab_size']))
        validate(c)
        seen, there = c.steps * c.batch_size * c.seq_len, sum(len(s) for s in train_windows.shards)
        if seen > there:
            say(f'note: {c.steps:,} steps of {c.batch_size} x {c.seq_len} tokens read {seen:,} tokens, {seen / there:.1f} '
                f'times the {there:,} training tokens in {c.data}: the model sees its data more than once')
        c, mesh, device_note = setup_devices(c)
        if in_bucket(c.out):  # a run kept in a bucket works in a local copy of it, uploaded as it goes
            c = dataclasses.replace(c, out=held.enter_context(BucketRun(c.out, is_process0())).local)
        try:
            os.makedirs(c.out, exist_ok=True)
        except OSError as e:
            raise UserError(f'--out={c.out}: cannot create the directory ({e.strerror}); choose another --out')
        if not os.access(c.out, os.W_OK):
            raise UserError(f'--out={c.out}: directory is not writable; choose another --out')
        if jax.process_index() == 0:
            held.enter_context(only_run(c.out))  # before touching anything in it
            for stale in glob.glob(os.path.join(c.out, '.tmp_ckpt_*')) + glob.glob(os.path.join(c.out, '.log.jsonl.*.tmp')):
                remove(stale)  # left by a crash while saving a checkpoint or rewriting the log
            for path in not_checkpoints(c.out):
                say(f'warning: {path} is not a checkpoint (a directory holding meta.json); ignored, and replaced '
                    'if a checkpoint of its step is written', file=sys.stderr)
        shardings = state_shardings(c, mesh)
        shapes = jax.eval_shape(lambda: fresh_state(c))
        say(f'tinytpu | preset {c.preset} | {jax.default_backend()} x{mesh.size} '
            f'({jax.devices()[0].device_kind}{f", {jax.process_count()} hosts" if jax.process_count() > 1 else ""}) '
            f'| {count_params(shapes["params"]) / 1e6:.2f}M params | {c.optimizer}: {peak_rates(c)} '
            f'| dtype {jnp.dtype(compute_dtype(c)).name} | {device_note} | data {c.data} -> {c.out}')
        saved_steps = [step for step, _ in list_checkpoints(c.out)]
        self.compiled = None
        if not saved_steps or saved_steps[-1] < c.steps:  # compiled (or refused) before the state is allocated
            c = self.compile(c, mesh, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                                   shapes, shardings), meta)
        state, path, saved = restore(c, shapes, meta)
        if meta.get('tokenizer_sha256') and is_process0():
            keep_tokenizer(c, meta)
        self.init = saved.get('init_from')  # where a run started from --init_from began
        if path:
            state, path, saved = same_schedule(c, shapes, state, path, saved)
            say(f'resuming from {path}')
            state = place(state, shardings)
        elif c.init_from:  # the source's weights, a fresh optimizer at step 0
            params, self.init = source_weights(c, shapes['params'], meta)
            say(f'starting from the weights of {c.init_from} ({self.init["checkpoint"]}, step {self.init["step"]}) with '
                f'a fresh {c.optimizer} state at step 0')
            params = place(params, shardings['params'])
            state = {'params': params, 'opt': jax.jit(adamw_init, out_shardings=shardings['opt'])(params)}
        else:
            state = jax.jit(lambda: fresh_state(c), out_shardings=shardings)()
        self.c, self.mesh, self.meta, self.params, self.opt = c, mesh, meta, state['params'], state['opt']
        self.start, before = int(as_floats(state['opt']['step'])), saved.get('config', {})
        self.elapsed = saved.get('elapsed', 0.0)  # wall time of the earlier runs this one resumes
        self.tokens = saved.get('tokens', self.start * before.get('batch_size', 0) * before.get('seq_len', 0))
        if jax.process_index() == 0:  # (a run started from --init_from: its first record is written again below)
            trim_log(os.path.join(c.out, 'log.jsonl'), self.start if self.start or not c.init_from else -1)
        if self.start >= c.steps:
            return
        if self.compiled is None:  # the newest checkpoint was damaged: an earlier one resumed
            c = self.c = self.compile(c, mesh, state, meta)
        val_idx = val_indices(val_windows, c)
        self.vals = put_batch(local_blocks(val_windows, val_idx, mesh, c, 'val split'), val_idx.shape + (c.seq_len + 1,), mesh)
        shape = (c.grad_accum, c.batch_size // c.grad_accum, c.seq_len + 1)
        blocks = prefetch(lambda k: local_blocks(train_windows, train_indices(train_windows, c, k), mesh, c,
                                                 f'train batch {k}'), self.start)
        self.batches = (put_batch(b, shape, mesh) for b in blocks)
        compiled_note = self.compiled_note
        self.meter = Meter(c, self)                 # time, tokens/s, MFU and dollars; the profiler
        self.guard = held.enter_context(Guard(c))   # signals stop training with a checkpoint; so does divergence
        self.log_file = held.enter_context(open_log(os.path.join(c.out, 'log.jsonl')) if is_process0()
                                           else open(os.devnull, 'wb'))
        held.enter_context(jax.set_mesh(mesh))
        if self.start == 0 and self.init:  # the log says where the run started
            append(self.log_file, {'step': 0, 'tokens': 0, 'init_from': self.init})
        say(compiled_note)

    def say(self, *args):
        say(*args, flush=True)

    def step(self, params, opt, step):
        """Part I's train_step, compiled for the devices, on this host's share of the batch; the
        step before it is checked for divergence meanwhile."""
        with self.meter.profile(step):
            params, opt, self.stats = self.compiled(params, opt, next(self.batches))
        self.guard.check(self.stats, step)  # the step before this one, once done
        return params, opt, self.stats

    def progress(self, done, stats):
        return self.meter.progress_line(done, stats)

    def val_loss(self, params):
        return as_floats(self.eval(params, self.vals))

    def evaluate(self, params, done):
        with self.meter.aside():  # evaluation is not step time
            return super().evaluate(params, done) | task_scores(params, self, done)  # --hellaswag_every

    def log(self, record):
        append(self.log_file, {'step': record['step'], 'tokens': self.meter.tokens(record['step'])} | record)

    def stop_requested(self):
        with self.meter.aside():  # on several hosts, a collective
            self.stopping = self.guard.stop_requested()
        return self.stopping

    def save(self, params, opt, done):
        """Part I's write_checkpoint, of the state gathered from every process, by process 0, with
        the wall time and the tokens trained on so far (across resumes, whatever their --seq_len);
        then only the newest --keep_ckpts are kept. A checkpoint already at this step is one this
        run could not load (damaged: a whole one would have been resumed from): it is replaced."""
        with self.meter.aside():  # nor are checkpoints
            self.guard.check_params(params, self.stats, done)
            c, meta, state = self.c, self.meta, host_state({'params': params, 'opt': opt})  # every process takes part
            extra = {'tokenizer': meta.get('tokenizer'), 'eot_id': meta.get('eot_id'),
                     'elapsed': self.meter.clock()['elapsed'], 'tokens': self.meter.tokens(done),
                     'before_warmdown': done == warmdown_start(c),  # kept, to be trained further
                     **({'init_from': self.init} if self.init else {}),  # where the run started
                     **{k: meta[k] for k in ('tokenizer_sha256', 'tokenizer_pattern') if k in meta}}  # a trained tokenizer's
            if is_process0():
                if os.path.lexists(os.path.join(c.out, checkpoint_name(done))):
                    discard(os.path.join(c.out, checkpoint_name(done)))
                try:
                    path = write_checkpoint(c.out, state, c, extra)
                except OSError as e:
                    remove(os.path.join(c.out, f'.tmp_{checkpoint_name(done)}_{os.getpid()}'))
                    raise UserError(f'{c.out}: could not write the step-{done} checkpoint ({e.strerror or e}); '
                                    'the previous checkpoint is intact; free some space and resume')
                keep_newest(c.out, path, c.keep_ckpts)
                say(f'saved {path}', flush=True)
        self.guard.stop_if(self.stopping, done)

    def finish(self, val):
        summary = self.meter.summary(val.get('val_loss'))
        append(self.log_file, {'step': self.c.steps, 'summary': summary})
        say(summary_line(self.c.steps, summary, self.price_note))


@contextlib.contextmanager
def only_run(out):
    """One run per output directory: an exclusive lock on OUT/.lock (holding the owner's pid) for
    as long as the run lasts. The OS releases it when the process ends, however it ends."""
    f = open(os.path.join(out, '.lock'), 'a+', opener=open_file)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip()
        f.close()
        raise UserError(f'--out={out} is in use by another training run{f" (pid {owner})" if owner else ""}; '
                        'wait for it to finish, stop it, or choose another --out')
    f.seek(0)
    f.truncate()
    f.write(f'{os.getpid()}\n')
    f.flush()
    try:
        yield
    finally:
        f.truncate(0)
        f.close()


def open_file(path, flags):
    """os.open for a file a run writes, never through a symbolic link (O_NOFOLLOW): a link left in
    --out must not make a run overwrite what it points to. -> a file descriptor (open's opener)"""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f'{path} is a symbolic link; refusing to write through links: remove it, or use '
                            'another --out')
        raise


def open_log(path):
    """A log (log.jsonl, bench.jsonl) opened for appending, never through a link, unbuffered: each
    record is written whole when appended, and closing has nothing left to write (a full disk
    fails once, in `append`)."""
    return open(path, 'ab', buffering=0, opener=open_file)


def trim_log(path, step):
    """Drop log records past `step`, the checkpoint we resume from (and a line cut by a crash).
    The log is replaced by a complete new file (written beside it, then renamed), so a kill at
    any moment leaves the old log or the new one, never a truncated one. A link is refused: the
    log is written only where it appears to be."""
    if os.path.islink(path):
        raise UserError(f'{path} is a symbolic link; refusing to write the log through links')

    def keep(line):
        try:
            return json.loads(line)['step'] <= step
        except (ValueError, KeyError, TypeError):
            return False

    if not os.path.exists(path):
        return
    with open(path, encoding='utf-8', errors='replace') as f:  # a damaged line is dropped, not a traceback
        lines = f.readlines()
    kept = [line.rstrip('\n') + '\n' for line in lines if keep(line)]  # whole lines, for the appends to come
    if kept == lines:
        return
    try:
        with written(path) as f:
            f.write(''.join(kept).encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f'{path}: could not rewrite the log ({e.strerror or e}); it is unchanged; free some space')


def append(log, record):
    """One line of log.jsonl, written now. A full disk stops the run in one line: the last
    checkpoint is intact, and on resume the log is cut back to it (a half-written line too)."""
    try:
        log.write((json.dumps(record) + '\n').encode())
    except OSError as e:
        raise UserError(f'{log.name}: could not write the log ({e.strerror or e}); the last checkpoint is intact; '
                        'free some space and run the same command to resume')


class Meter:
    """The clock of a run: wall time since it began plus the runs it resumes (start-up and
    compiling are paid for too), dollars at its price, and the step time, tokens/s and MFU of the
    steps between log lines, leaving out evaluation and checkpoints (`aside`). It also starts and
    stops the --profile_steps trace."""

    def __init__(self, c, run):
        self.c, self.t0, self.before, self.price = c, run.t0, run.elapsed, run.price
        self.tokens_per_step = c.batch_size * c.seq_len
        self.flops, self.peak = flops_per_token(c), hardware_peak(c, run.mesh.size)
        self.last, self.last_step, self.start, self.before_tokens = time.time(), run.start, run.start, run.tokens
        self.timed_seconds, self.timed_steps = 0.0, 0  # step time only
        self.trace = profile_range(c)
        if self.trace and run.start > self.trace[0]:
            say(f'warning: --profile_steps={c.profile_steps}: this run resumes at step {run.start}, past the first '
                'step to trace; no trace is written', file=sys.stderr)

    def clock(self):
        """Wall time so far (this run and those it resumes) and what it cost."""
        seconds = self.before + time.time() - self.t0
        return {'elapsed': seconds, 'cost': self.price * seconds / 3600 if self.price else None}

    def tokens(self, done):
        """Tokens trained on after step `done`: the earlier runs' and this run's."""
        return self.before_tokens + (done - self.start) * self.tokens_per_step

    def mfu(self, seconds_per_step):
        return self.flops * self.tokens_per_step / seconds_per_step / self.peak if self.peak else None

    def progress_line(self, done, stats):
        """Print a progress line and return it as a log record."""
        values, now = as_floats(stats), time.time()  # waits for the step
        dt = (now - self.last) / max(done - self.last_step, 1)
        self.timed_seconds += now - self.last
        self.timed_steps += done - self.last_step
        self.last, self.last_step = now, done
        record = {'step': done, **values, 'ms_per_step': 1000 * dt, 'tokens_per_sec': self.tokens_per_step / dt,
                  'mfu': self.mfu(dt), **self.clock(), 'eta': dt * (self.c.steps - done)}  # at this step's pace
        if self.c.optimizer == 'muon':
            record['matrix_lr'] = values['lr'] * peak_lrs(self.c)[1] / peak_lrs(self.c)[0]
        say(progress_text(record))
        return record

    @contextlib.contextmanager
    def aside(self):
        t = time.time()
        yield
        self.last += time.time() - t

    @contextlib.contextmanager
    def profile(self, step):
        """--profile_steps=A:B: a trace of steps A..B-1 in OUT/profile (Perfetto, ui.perfetto.dev, or XProf)."""
        if self.trace and step == self.trace[0]:
            jax.profiler.start_trace(os.path.join(self.c.out, 'profile'), create_perfetto_trace=True)
        yield
        if self.trace and step + 1 == self.trace[1]:
            jax.block_until_ready(jax.live_arrays())  # the traced steps, finished
            jax.profiler.stop_trace()
            say(f'wrote a trace of steps {self.trace[0]}..{step} to {os.path.join(self.c.out, "profile")}')

    def summary(self, val_loss):
        """The run's totals: tokens, wall time, cost, the last validation loss, MFU over the timed steps."""
        mfu = self.mfu(self.timed_seconds / self.timed_steps) if self.timed_steps and self.timed_seconds else None
        return {'tokens': self.tokens(self.c.steps), **self.clock(), 'val_loss': val_loss, 'mfu': mfu}


def progress_text(r):
    """A log record as its printed progress line."""
    s = f"step {r['step']:6d} | loss {r['loss']:.4f} | lr {r['lr']:.2e}"
    s += f" (matrices {r['matrix_lr']:.2e})" if 'matrix_lr' in r else ''
    s += f" | gnorm {r['grad_norm']:.3f} | {r['ms_per_step']:.1f} ms/step | {r['tokens_per_sec']:,.0f} tok/s"
    s += f" | MFU {r['mfu']:.1%}" if r.get('mfu') is not None else ' | MFU n/a'
    s += f" | {duration(r['elapsed'])}" + (f" (ETA {duration(r['eta'])})" if r.get('eta') else '')
    return s + (f" | {dollars(r['cost'])}" if r.get('cost') is not None else '')


def duration(seconds):
    """3725.2 -> '1:02:05' (hours:minutes:seconds, hours unbounded)."""
    m, s = divmod(round(seconds), 60)
    return f'{m // 60}:{m % 60:02d}:{s:02d}'


def summary_line(steps, r, price_note):
    s = f"done: {steps:,} steps, {r['tokens']:,} tokens in {duration(r['elapsed'])}"
    s += f" | MFU {r['mfu']:.1%}" if r['mfu'] is not None else ' | MFU n/a'
    s += f" | {dollars(r['cost'])} ({price_note})" if r['cost'] is not None else f' | cost unknown ({price_note})'
    return s + (f" | val loss {r['val_loss']:.4f}" if r['val_loss'] is not None else '')


INTERRUPTED = threading.Lock()  # held by the one thread that prints "interrupted" and ends the process


def interrupted(signum=None, frame=None):
    """A Ctrl-C that is not training's to handle (start-up, compiling, sampling; a second one
    during training): one line, exit code 130, at once. Checkpoints and logs are replaced whole or
    not at all, so whatever was written stays whole. os._exit: XLA's threads may still be busy,
    and an orderly shutdown could crash on them."""
    if INTERRUPTED.acquire(blocking=False):
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            print('\ninterrupted; the last checkpoint in --out is intact', file=sys.stderr, flush=True)
        os._exit(130)


def stop_on_interrupt():
    """From now on a Ctrl-C ends the command through `interrupted`, unless a handler of its own
    (training's Guard) has taken SIGINT over. A Python handler runs only once the main thread is
    back from JAX (a compile can take minutes), so the signal also wakes a thread
    (signal.set_wakeup_fd) that ends the process at once."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    signal.signal(signal.SIGINT, interrupted)

    def watch():
        while True:
            if os.read(r, 1) == bytes([signal.SIGINT]) and signal.getsignal(signal.SIGINT) is interrupted:
                interrupted()

    threading.Thread(target=watch, daemon=True).start()


class StopSignal:
    """While active, the first SIGTERM or SIGINT (Ctrl-C) asks training to stop after the current
    step, with a checkpoint; a second one stops at once (`interrupted`). Checkpoints are written
    atomically, so stopping at any moment leaves the previous one intact. Preemptible TPUs get
    SIGTERM."""

    def __enter__(self):
        self.signum, self.saved = None, {}
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            self.saved = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            interrupted()
        self.signum = signum
        say(f'\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint '
            '(send it again to stop at once)', flush=True)

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)


class Guard(StopSignal):
    """Signals and divergence: SIGTERM or SIGINT stop training after the step, with a checkpoint
    (StopSignal), on every host at the same step; a NaN or inf loss, gradient or parameter stops
    it before anything garbage is written."""

    def __init__(self, c):
        self.c, self.previous = c, None

    def check(self, stats, step):
        """Wait for the step before this one (keeping at most one queued behind the running step:
        on CPU a deep queue of all-reduces can deadlock XLA's shared thread pool) and check it."""
        if self.previous is not None:
            check_finite(as_floats(self.previous), step, self.c)
        self.previous = stats

    def check_params(self, params, stats, step):
        check_finite(as_floats(stats), step, self.c)
        if not as_floats(all_finite(params)):  # never write NaNs into a checkpoint
            raise Diverged(f'training diverged at step {step}: parameters are not finite. {what_now(self.c)}')

    def stop_requested(self):
        """The signal that asked to stop, or 0. On several hosts, any host's signal stops them all
        at the same step (they must all take part in saving the checkpoint)."""
        if jax.process_count() == 1:
            return self.signum or 0
        from jax.experimental import multihost_utils
        return int(multihost_utils.process_allgather(np.int32(self.signum or 0)).max())

    def stop_if(self, signum, step):
        if signum:
            raise Preempted(f'stopped by {signal.Signals(signum).name} after step {step}; '
                            f'checkpoint saved in {self.c.out}; run the same command to resume', signum)


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint. Exit code 128 + signal."""


class Diverged(UserError):
    """The loss or gradients became NaN or inf. Exit code 3."""
    code = 3


@jax.jit
def all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def check_finite(stats, step, c):
    """Stop on a NaN or inf loss or gradient: training on garbage only wastes money."""
    loss, grad_norm = stats['loss'], stats['grad_norm']
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise Diverged(f'training diverged at step {step}: loss {loss}, grad norm {grad_norm}. {what_now(c)}')


def peak_rates(c):
    """The peak learning rates in words, with how --lr or --matrix_lr was scaled to this width."""
    adamw, muon = peak_lrs(c)
    scaled = f' x {c.lr_width}/{c.d_model}' if c.lr_width != c.d_model else ''
    if c.optimizer == 'muon':
        return f'matrices {muon:.3g}{scaled and f" (--matrix_lr={c.matrix_lr:g}{scaled})"}, embedding {adamw:.3g}'
    return f'lr {adamw:.3g}{scaled and f" (--lr={c.lr:g}{scaled})"}'


def what_now(c):
    """After divergence: what is kept, and the settings to change (the learning rates this
    optimizer has)."""
    lrs = (f'--matrix_lr (now {c.matrix_lr:g}) or --embed_lr (now {c.embed_lr:g})' if c.optimizer == 'muon' else
           f'--lr (now {c.lr:g})')
    fix = f'a lower {lrs}, more --warmup_steps (now {c.warmup_steps}) or --grad_clip=1 (now {c.grad_clip:g})'
    if not list_checkpoints(c.out):
        return f'No checkpoint was written; run again with {fix}'
    return (f'The last good checkpoint in {c.out} is kept; delete it to start over, or resume from it with '
            f'{fix}')


# ----------------------------------------------------------------------------------------------
# Checkpoints and data that survive failures: around Part I's write_checkpoint and read_checkpoint,
# each checkpoint is checked (its meta.json field by field, its state.npz's size and SHA-256)
# before it is used or counted as kept (check_checkpoint, keep_newest); a damaged one is skipped
# for the one before it; one deleted while a reader lists them is looked for again. The data
# directory is checked the same way (load_data); other trainers' directories are read as they are.


# Every field of every JSON file read here (a data directory's and a checkpoint's meta.json, logs,
# bench.jsonl) is checked against a schema, {field: (test, what it must be, required)}, before it is
# used: a damaged or hand-edited file is one line naming the file and the field, never a traceback.

def integer(lo=0, hi=None):
    return lambda v: type(v) is int and v >= lo and (hi is None or v <= hi)


def number(lo=0.0, hi=math.inf):
    return lambda v: type(v) in (int, float) and math.isfinite(v) and lo <= v <= hi


def text(v):
    return type(v) is str


def optional(test):
    return lambda v: v is None or test(v)


def file_name(v):
    """A plain file name: no directory, not '.' or '..' (what meta.json may name in its directory)."""
    return text(v) and v and os.path.basename(v) == v and v not in ('.', '..')


def shard_names(v):
    """{'train': {'shards': ['train_000000.bin', ...], 'tokens': N}, 'val': {...}}: plain file names."""
    return type(v) is dict and all(
        type(s) is dict and type(s.get('shards', [])) is list and integer()(s.get('tokens', 0))
        and all(file_name(n) for n in s.get('shards', [])) for s in v.values())


def sha256_text(v):
    return text(v) and re.fullmatch('[0-9a-f]{64}', v) is not None


DATA_META = {  # what prepare.py writes into a data directory's meta.json
    'tokenizer': (lambda v: text(v) and (v in BUILT_IN + ('byte',) or re.fullmatch('bpe:[0-9]+', v) is not None),
                  f'one of {", ".join(BUILT_IN)}, byte or bpe:N', False),
    'tokenizer_file': (file_name, 'a file name', False),
    'tokenizer_sha256': (sha256_text, 'a SHA-256', False),
    'tokenizer_pattern': (text, 'a regular expression', False),
    'vocab_size': (integer(2, 2**32), 'an integer from 2 to 2^32', False),
    'eot_id': (integer(0, 2**32 - 1), 'a token id', False),
    'bytes_per_token': (number(1e-9), 'a positive number', False),
    'splits': (shard_names, 'per split, a list of shard file names and a token count', False),
    'task': (file_name, 'a file name', False),
}


def field_problem(record, schema):
    """What is wrong with a parsed JSON record, in words ('"vocab_size" is 1e9, expected an
    integer ...'), or None if every field has the type and range the schema says."""
    if type(record) is not dict:
        return 'not a JSON object'
    for name, (test, words, required) in schema.items():
        if name not in record:
            if required:
                return f'no "{name}" field'
        elif not test(record[name]):
            return f'"{name}" is {json.dumps(record[name])[:40]}, expected {words}'
    return None


def read_json(path, schema):
    """A JSON file checked against a schema: -> (record, None), or (None, what is wrong with it)."""
    try:
        with open(path, encoding='utf-8') as f:
            record = json.load(f)
    except OSError as e:
        return None, f'unreadable: {e.strerror}'
    except ValueError:
        return None, 'not valid JSON'
    problem = field_problem(record, schema)
    return (None, problem) if problem else (record, None)


def prepared_files(meta):
    """The files a (checked) data meta.json lists: shards, the tokenizer, the task."""
    return [name for split in meta.get('splits', {}).values() for name in split.get('shards', [])] + \
        [meta[k] for k in ('tokenizer_file', 'task') if meta.get(k)]


class CorruptCheckpoint(UserError):
    """A checkpoint whose files are damaged (truncated, wrong checksum, unreadable)."""


def check_checkpoint(path, meta, template):
    """Before Part I's read_checkpoint: state.npz has the size and SHA-256 its meta.json records,
    every array the name, shape and dtype the template says (read from the headers: a header can
    claim any size), and its optimizer step is meta.json's."""
    _, npz = checkpoint_files(path)
    want = {k: (tuple(x.shape), np.dtype(x.dtype)) for k, x in flatten(template).items()}
    try:
        if os.path.getsize(npz) != meta['state_bytes'] or file_sha256(npz) != meta['state_sha256']:
            raise CorruptCheckpoint(f'{npz}: truncated or not matching its checksum')
        with np.load(npz, allow_pickle=False) as f:
            problem = npz_problem(f, want)
            if not problem and 'opt/step' in want and int(f['opt/step']) != meta['step']:
                problem = f'its optimizer step {int(f["opt/step"])} is not the step of its meta.json ({meta["step"]})'
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise CorruptCheckpoint(f'{npz}: unreadable ({getattr(e, "strerror", None) or e})')
    if problem:
        raise CorruptCheckpoint(f'{npz}: {problem}')


def keep_newest(out, written, keep):
    """After a save: keep the newest `keep` whole checkpoints in out, delete the older ones (and
    damaged ones among them), except the newest taken before the warmdown (train further from it)."""
    WHOLE[file_version(written)] = True  # just written and hashed: no need to read it back
    whole = [s for s, path in reversed(list_checkpoints(out)) if checkpoint_is_whole(path)][:keep]
    branch = next((s for s, path in reversed(list_checkpoints(out)) if before_warmdown(path)), None)
    for s, old in list_checkpoints(out):
        if s < whole[-1] and s != branch:  # older than the oldest one kept
            discard(old)


def before_warmdown(path):
    """Whether a whole checkpoint was taken at the end of its run's constant LR (save says)."""
    try:
        return read_checkpoint_meta(path).get('before_warmdown') is True and checkpoint_is_whole(path)
    except UserError:
        return False


def discard(path):
    """Delete a checkpoint directory, first renaming it out of the listing in one atomic step:
    a reader (sample, while training saves) finds it whole or not at all, never half-deleted."""
    trash = os.path.join(os.path.dirname(path), f'.tmp_ckpt_old_{os.path.basename(path)}_{os.getpid()}')
    os.rename(path, trash)
    remove(trash)


def remove(path):
    """Delete a file, a link (not what it points to) or a directory tree, as far as possible."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def not_checkpoints(out):
    """What is named like a checkpoint in `out` but is none (a file, a directory without
    meta.json, ckpt_ and something other than digits)."""
    listed = {path for _, path in list_checkpoints(out)}
    return sorted(p for p in glob.glob(os.path.join(out, 'ckpt_*')) if p not in listed)


WHOLE = {}  # file_version(checkpoint) -> whether its state.npz matched its meta.json's size and hash


def file_version(path):
    """A checkpoint's identity for WHOLE: its path and its state.npz's size, time and inode."""
    try:
        st = os.stat(os.path.join(path, 'state.npz'))
        return path, st.st_size, st.st_mtime_ns, st.st_ino
    except OSError:
        return path, None


def checkpoint_is_whole(path):
    """Whether a checkpoint's meta.json reads and its state.npz has the size and SHA-256 recorded
    there (each file version hashed once per process)."""
    key = file_version(path)
    if key not in WHOLE:
        try:
            meta = read_checkpoint_meta(path)
            npz = checkpoint_files(path)[1]
            WHOLE[key] = os.path.getsize(npz) == meta['state_bytes'] and file_sha256(npz) == meta['state_sha256']
        except (UserError, OSError):
            WHOLE[key] = False
    return WHOLE[key]


def checkpoint_files(path):
    """meta.json and state.npz of a checkpoint directory, refusing symlinks anywhere in it: a
    checkpoint is read only from the directory it appears to be in."""
    files = [os.path.join(path, 'meta.json'), os.path.join(path, 'state.npz')]
    for p in [path] + files:
        if os.path.islink(p):
            raise UserError(f'{p} is a symbolic link; refusing to load checkpoints through links')
    return files


def npz_problem(f, want):
    """What makes an open npz file (np.load's) not hold exactly the arrays `want` names, {name:
    (shape, dtype)}, read from each array's header alone, or None."""
    for name, (shape, dtype) in want.items():
        if name + '.npy' not in f.zip.namelist():
            return f'no array {name}'
        with f.zip.open(name + '.npy') as member:
            version = np.lib.format.read_magic(member)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            got_shape, _, got_dtype = header(member)
        if (got_shape, got_dtype) != (shape, dtype):
            return (f'array {name} is {got_dtype}{list(got_shape)}, but the model has {dtype}{list(shape)}; '
                    'it was not written by this model')
    return None


CHECKPOINT_META = {  # what write_checkpoint writes into a checkpoint's meta.json
    'step': (integer(), 'a step number', True),
    'config': (lambda v: type(v) is dict, 'the settings', True),  # and each of its field's type: config_problem
    'state_bytes': (integer(), 'a size in bytes', True),
    'state_sha256': (sha256_text, 'a SHA-256', True),
    'elapsed': (number(), 'seconds', False),
    'tokens': (integer(), 'tokens trained on', False),
    'before_warmdown': (lambda v: type(v) is bool, 'true or false', False),
    'init_from': (lambda v: type(v) is dict and text(v.get('path')) and integer()(v.get('step')),
                  'the run it started from and its step', False),
    'tokenizer': (optional(text), 'a tokenizer name', False),
    'eot_id': (optional(integer()), 'a token id', False),
    'tokenizer_sha256': DATA_META['tokenizer_sha256'],  # a trained tokenizer's (prepare.py --tokenizer=bpe:N)
    'tokenizer_pattern': DATA_META['tokenizer_pattern'],
}


def config_problem(saved):
    """The first saved setting whose value is not of its Config field's type, in words, or None.
    Settings this version does not know are ignored."""
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    for name, value in saved.items():
        kind = types.get(name)
        if kind and not (type(value) is kind or kind is float and type(value) is int):
            return f'its --{name} is {json.dumps(value)[:40]}, expected {"an" if kind is int else "a"} {kind.__name__}'
    return None


def read_checkpoint_meta(path):
    meta_path, _ = checkpoint_files(path)
    meta, problem = read_json(meta_path, CHECKPOINT_META)
    problem = problem or config_problem(meta['config'])
    if not problem and meta['step'] != int(os.path.basename(path)[5:]):
        problem = f'its step {meta["step"]} is not the one its directory is named for'
    if problem:
        raise CorruptCheckpoint(f'{meta_path}: not a tinytpu checkpoint ({problem})')
    old = meta['config']  # from before --lr_width and --embed_lr: --lr held at any width, and was Muon's AdamW's
    old.setdefault('lr_width', old.get('d_model'))
    old.setdefault('embed_lr', old.get('lr'))
    return meta


def check_compatible(meta, c, path, data=None, resuming=True):
    """The checkpoint's weights must be the model this config builds, trained on tokens of this
    data's tokenizer (`data`: its meta.json), when both say which: the same name and, for a
    trained tokenizer, the same file (its SHA-256). Resuming, also the same optimizer."""
    saved = meta['config']
    mine, theirs = (tokenizer_words(m) for m in (meta, data or {}))
    if mine and theirs and mine != theirs:
        redo = (f'--tokenizer={meta["tokenizer"]}' if not meta.get('tokenizer_sha256') else
                f'the same tokenizer (prepare.py --tokenizer={c.init_from or "DIR"} reuses a trained one)')
        raise UserError(f'{path} was trained on {mine} tokens, but --data={c.data} holds {theirs} '
                        f'tokens; use data prepared with {redo}' + (', or a new --out' if resuming else ''))
    for name in MODEL_FIELDS:
        if saved.get(name) != getattr(c, name):
            raise UserError(f'{path} was trained with --{name}={saved.get(name)}, but this run has '
                            f'--{name}={getattr(c, name)}; use the same setting or a new --out')
    if resuming and saved.get('optimizer', 'adamw') != c.optimizer:  # its state (momentum, moments) is the optimizer's own
        raise UserError(f'{path} was trained with --optimizer={saved.get("optimizer", "adamw")}, but this run has '
                        f'--optimizer={c.optimizer}; resume with the same optimizer or use a new --out')


def tokenizer_words(meta):
    """A meta.json's tokenizer in words: its name, and for a trained one its file's SHA-256."""
    sha = meta.get('tokenizer_sha256')
    return meta.get('tokenizer') and meta['tokenizer'] + (f' (tokenizer.tiktoken SHA-256 {sha[:12]})' if sha else '')


def keep_tokenizer(c, meta):
    """A trained tokenizer goes with the run: the data's tokenizer.tiktoken is copied into --out
    (written beside it, then renamed over), where sample, eval and export find it beside the
    checkpoints, and a run kept in a bucket uploads it."""
    dst = os.path.join(c.out, TOKENIZER_FILE)
    if os.path.isfile(dst) and not os.path.islink(dst) and file_sha256(dst) == meta['tokenizer_sha256']:
        return
    with open(os.path.join(c.data, meta.get('tokenizer_file', TOKENIZER_FILE)), 'rb') as f, written(dst) as out:
        shutil.copyfileobj(f, out)


def checkpoint_encoding(meta, c, path):
    """The tokenizer a checkpoint was trained with: a built-in one by name, or a trained one from
    --out (where training copied it), else from the data directory it was trained on; either
    must be the very file (SHA-256) its meta.json records."""
    if not meta.get('tokenizer'):
        raise UserError(f'{path}: the training data had no meta.json naming a tokenizer')
    where = c.out
    if meta.get('tokenizer_sha256') and not os.path.lexists(os.path.join(c.out, TOKENIZER_FILE)) and \
            os.path.lexists(os.path.join(c.data, TOKENIZER_FILE)):
        where = c.data
    return load_encoding(meta, where, os.path.join(path, 'meta.json'))


def restore(c, template, data=None, resuming=True):
    """The newest loadable checkpoint in c.out as (state, path, meta), or (template, None, {}) if
    there is none. A damaged one (bad checksum, truncated) is skipped with a warning. One that
    vanishes while being read (a training run beside us deleting its oldest) means: look again."""
    for attempt in range(5):
        checkpoints, problems = list_checkpoints(c.out), []
        for _, path in reversed(checkpoints):
            try:
                meta = read_checkpoint_meta(path)
                check_compatible(meta, c, path, data, resuming)
                check_checkpoint(path, meta, template)
                state = read_checkpoint(path, template)
                nan = next((k for k, x in flatten(state).items() if not np.isfinite(x).all()), None)
                if nan:  # training never writes one: a damaged or forged checkpoint
                    raise CorruptCheckpoint(f'{path}/state.npz: {nan} holds NaN or infinity')
            except CorruptCheckpoint as e:
                if not os.path.isdir(path):
                    break  # deleted under us: list again
                problems.append(str(e))
                continue
            for problem in problems:
                say(f'warning: {problem}; using the previous checkpoint', file=sys.stderr)
            return state, path, meta
        else:
            break
    if checkpoints:
        raise UserError(f'{problems[0] if problems else "checkpoints kept vanishing"}; and no older checkpoint in '
                        f'--out={c.out} loads: move them away to start over, or use a new --out')
    return template, None, {}


SCHEDULE_FIELDS = ('steps', 'lr', 'lr_width', 'embed_lr', 'matrix_lr', 'min_lr_frac', 'warmup_steps', 'warmdown_frac',
                   'warmdown')


def schedule_fields(c):
    """The settings of c's learning rates: AdamW alone has no --embed_lr or --matrix_lr; Muon, no --lr."""
    unused = ('lr',) if c.optimizer == 'muon' else ('embed_lr', 'matrix_lr')
    return [k for k in SCHEDULE_FIELDS if k not in unused]


def lr_history_agrees(saved, c, step):
    """Whether a run with the settings `saved` (a checkpoint's config) took its first `step`
    updates at the learning rates c's schedule gives them."""
    before = dataclasses.replace(c, **{k: saved[k] for k in SCHEDULE_FIELDS if k in saved})
    steps = np.arange(step)
    same_matrix_lr = c.optimizer != 'muon' or peak_lrs(before)[1] == peak_lrs(c)[1]
    return same_matrix_lr and bool(np.allclose(lr_schedule(steps, before), lr_schedule(steps, c), rtol=1e-6, atol=0))


def same_schedule(c, template, state, path, saved):
    """Resuming with another LR schedule (most often: --steps raised after a finished run, whose
    last updates decayed the LR). The newest checkpoint whose updates all agree with the new
    schedule is resumed instead (training keeps one from before each warmdown), said in one line;
    where none does, a note says where the LR jumps. -> (state, path, meta) to resume"""
    step, old = saved['step'], saved['config']
    if lr_history_agrees(old, c, step):
        return state, path, saved
    changed = ', '.join(f'--{k} {old[k]} -> {getattr(c, k)}' for k in schedule_fields(c) if old.get(k) != getattr(c, k))
    for earlier, candidate in reversed(list_checkpoints(c.out)):
        if earlier >= step:
            continue
        try:
            meta = read_checkpoint_meta(candidate)
            if lr_history_agrees(meta['config'], c, earlier):
                check_checkpoint(candidate, meta, template)
                state = read_checkpoint(candidate, template)
                if all(meta['config'].get(k) == getattr(c, k) for k in schedule_fields(c)):  # this schedule's own
                    say(f'{path} is of the run before, with {changed.replace(" -> ", " (now ")}); this run goes on '
                        f'from its own newest, {os.path.basename(candidate)}, and replaces {os.path.basename(path)} as '
                        'training passes its step')
                else:
                    say(f'the LR schedule changed ({changed}): training further from {candidate}, the newest '
                        'checkpoint whose updates follow the new schedule; those after it are replaced as training '
                        'passes their steps')
                return state, candidate, meta
        except UserError:
            continue
    before = dataclasses.replace(c, **{k: old[k] for k in SCHEDULE_FIELDS if k in old})
    now, then = float(lr_schedule(step, c)), float(lr_schedule(step - 1, before))
    say(f'note: the LR schedule changed ({changed}) and no checkpoint in {c.out} follows it: step {step} resumes '
        f'at lr {now:.2e}, where the run before took {then:.2e}')
    return state, path, saved


def load_model(c, explicit):
    """The newest checkpoint in c.out, for using the model (sample, eval): -> (config, its params in
    host memory, its meta.json, the tokenizer). The model's settings come from the checkpoint,
    the others from the flags (`explicit`: those given on the command line)."""
    checkpoints = list_checkpoints(c.out)
    if not checkpoints:
        raise UserError(f'--out={c.out}: no checkpoint found; train first: python tinytpu.py --out={c.out}')
    config = {}
    for _, path in reversed(checkpoints):  # the model shape, from the newest readable meta.json
        try:
            config = read_checkpoint_meta(path)['config']
            break
        except CorruptCheckpoint:
            pass  # restore() below falls back past it with a warning, or explains
    fields = {f.name for f in dataclasses.fields(Config)} - set(USE_FIELDS)
    saved = {k: v for k, v in config.items() if k in fields and k not in explicit}
    c = dataclasses.replace(c, **saved)
    c = validate(dataclasses.replace(c, seq_len=min(c.seq_len, c.context)))  # --context may shrink for sampling
    cache = 2 * c.n_layer * c.n_kv_head * c.context * head_dim(c) * jnp.dtype(compute_dtype(c)).itemsize
    limit = device_memory(c) or host_memory()
    if limit and cache > limit / 2:  # --context may grow for sampling too, but its KV cache must fit
        where = 'the device' if device_memory(c) else 'this machine'
        raise UserError(f'--context={c.context}: its KV cache would take {size(cache)}, but {where} has '
                        f'{size(limit)}; use a smaller --context')
    state, path, meta = restore(c, {'params': jax.eval_shape(lambda: init_params(c, jax.random.key(0)))})
    return c, state['params'], meta, checkpoint_encoding(meta, c, path)


def load_data(c):
    """-> (train windows, val windows, meta dict) for the data directory c.data: the shards its
    meta.json lists (data_files, Part II, checks them and reads other trainers' directories)."""
    splits, meta = data_files(c)
    train_windows, val_windows = (TokenWindows(splits[s], c.seq_len + 1) for s in ('train', 'val'))
    if 'vocab_size' not in meta:
        meta = {**meta, **vocab_from_shards(c, train_windows)}
    return train_windows, val_windows, meta


def data_files(c):
    """-> ({'train': shard paths, 'val': ...}, meta.json) of the data directory c.data, checked: the
    shards its meta.json lists, else every *train*.bin and *val*.bin in it (llm.c's and
    modded-nanogpt's downloads are named fineweb_train_000001.bin, TinyStories_val.bin, ...)."""
    if not os.path.isdir(c.data):
        raise UserError(f'--data={c.data}: {"not a directory" if os.path.exists(c.data) else "no such directory"}; create it with '
                        f'`python prepare.py shakespeare --tokenizer=byte` (or another dataset)')
    meta_path = os.path.join(c.data, 'meta.json')
    meta = {}
    if os.path.lexists(meta_path):
        meta, problem = read_json(meta_path, DATA_META)
        if not problem and meta.get('tokenizer', '').startswith('bpe:') and not meta.get('tokenizer_sha256'):
            problem = f'"tokenizer" is {meta["tokenizer"]}, a trained one, but no "tokenizer_sha256" says which'
        if problem:
            raise UserError(f'{meta_path}: {problem}; re-create it with prepare.py (or fix it by hand)')
    splits = {}
    for split in ('train', 'val'):
        listed = meta.get('splits', {}).get(split, {}).get('shards')
        if listed:  # exactly what prepare.py wrote, never a stale shard beside it
            splits[split] = [os.path.join(c.data, name) for name in listed]
            missing = [p for p in splits[split] if not os.path.isfile(p)]
            if missing:
                raise UserError(f'{meta_path} lists {missing[0]}, which is missing; re-run prepare.py')
        else:
            splits[split] = sorted(p for p in glob.glob(os.path.join(c.data, f'*{split}*.bin')) if os.path.isfile(p))
        if not splits[split]:
            raise UserError(f'--data={c.data}: no {split} shards (*{split}*.bin); create them with '
                            '`python prepare.py DATASET --out=...`')
    return splits, meta


def vocab_from_shards(c, windows):
    """No meta.json says what the tokens are: uint16 shards (llm.c's and modded-nanogpt's) are
    taken as GPT-2's, said in a line; uint32 ones could be any large vocabulary."""
    if windows.shards[0].dtype.itemsize == 2:
        say(f'--data={c.data}: no meta.json naming the tokenizer; 16-bit shards are taken as GPT-2 tokens '
            '(vocabulary 50,257); write a meta.json with "tokenizer" and "vocab_size" to say otherwise')
        return {'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_id': 50256}
    raise UserError(f'--data={c.data}: 32-bit token shards and no meta.json saying their vocabulary; write '
                    f'{os.path.join(c.data, "meta.json")} as {{"tokenizer": "cl100k_base", "vocab_size": 100277}} '
                    '(your tokenizer and size)')


# ----------------------------------------------------------------------------------------------
# Cloud Storage (gs://BUCKET/PATH), for machines whose disks do not last (spot TPUs, Colab): the
# one storage client: --data=gs://... copies prepared data (uploaded as it is, with
# `gcloud storage rsync`) once into a local copy and reads it there; --out=gs://... keeps a run
# (BucketRun, below). The client is google-cloud-storage, an optional extra imported only here.

def in_bucket(path):
    return path.startswith('gs://')


def local_copy(url):
    """The local directory that stands for gs://BUCKET/PATH: ~/.cache/tinytpu/BUCKET/PATH (or
    under $XDG_CACHE_HOME)."""
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
    return os.path.join(cache, 'tinytpu', *url[len('gs://'):].strip('/').split('/'))


class BucketDown(Exception):
    """The bucket did not answer (network, server errors): worth retrying."""


BUCKET_PATIENCE = 300  # seconds a bucket may not answer before a run that waits on it stops, in one line


class Bucket:
    """The objects under gs://BUCKET/PATH, named relative to it. Credentials are the machine's
    (Application Default Credentials: TPU VMs and Colab have them); with STORAGE_EMULATOR_HOST set
    the client talks to that emulator. A refusal (permission, no such bucket) is one line naming
    the bucket; a bucket that does not answer raises BucketDown."""

    def __init__(self, url):
        try:
            import requests
            from google.api_core import exceptions
            from google.cloud import storage
        except ImportError:
            raise UserError(f'{url}: a Cloud Storage path needs an optional extra: pip install google-cloud-storage')
        name, _, path = url[len('gs://'):].partition('/')
        if not re.fullmatch(r'[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]', name):
            raise UserError(f'{url}: not a bucket path; write gs://BUCKET/PATH')
        if {'.', '..'} & set(path.split('/')):  # its local copy would be another path's, or outside the cache
            raise UserError(f'{url}: a bucket path has no "." or ".." parts; write gs://BUCKET/PATH')
        self.url, self.prefix, self.errors = url.rstrip('/'), path.strip('/') + '/' if path.strip('/') else '', exceptions
        self.patience = BUCKET_PATIENCE
        self.unanswered = (exceptions.GoogleAPIError, requests.RequestException, OSError)
        try:
            self.bucket = storage.Client().bucket(name)
        except Exception as e:  # google.auth's DefaultCredentialsError, a bad project, ...
            raise UserError(f'{url}: no Google Cloud credentials ({str(e).splitlines()[0][:120]}); on your own machine '
                            'run `gcloud auth application-default login`')

    def call(self, what, fn, *args, **kw):
        """fn(*args, **kw), once (retry() tries again, saying so; the client's own retries would
        wait minutes in silence), with the client's errors said as tinytpu's."""
        try:
            return fn(*args, retry=None, timeout=(10, 120), **kw)
        except self.errors.Forbidden as e:
            raise UserError(f'{self.url}: permission denied to {what} ({e.message[:120]}); grant this machine\'s '
                            'account Storage Object Admin on the bucket')
        except self.errors.NotFound:
            self.check_exists()
            raise
        except self.unanswered as e:
            if isinstance(e, (self.errors.PreconditionFailed, FileNotFoundError)):
                raise
            raise BucketDown(f'{what}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ""}')

    def check_exists(self):
        """A one-line UserError if the bucket itself does not exist (when the bucket cannot say, as
        without permission to read its metadata, nothing)."""
        try:
            there = self.bucket.exists(retry=None, timeout=(10, 60))
        except Exception:
            return
        if not there:
            raise UserError(f'{self.url}: no such bucket; create it: gcloud storage buckets create gs://'
                            f'{self.bucket.name} --location=REGION (the TPU\'s region)')

    def objects(self):
        """{name: (bytes, CRC32C)} of the objects under this path; the CRC32C (base64, as the bucket
        records it for every object, composite ones too) checks a copy of it."""
        blobs = self.call('list', lambda **kw: list(self.bucket.client.list_blobs(self.bucket, prefix=self.prefix, **kw)))
        return {b.name[len(self.prefix):]: (b.size, b.crc32c) for b in blobs}

    def blob(self, name):
        return self.bucket.blob(self.prefix + name)

    def upload(self, path, name):
        self.call(f'upload {name}', self.blob(name).upload_from_filename, path)

    def download(self, name, path, crc32c=None):
        """The object `name` into the file `path`, whole (prepare.written); with `crc32c`, only if
        the copy has that CRC32C (else UserError)."""
        with written(path) as f:
            self.call(f'download {name}', self.blob(name).download_to_file, f)
            f.flush()
            if crc32c and file_crc32c(f) != crc32c:
                raise UserError(f'{self.url}/{name}: changed while it was copied, or damaged on the way; run again')

    def read(self, name):
        """(bytes, generation) of an object, or (None, 0) where there is none."""
        blob = self.call(f'read {name}', self.bucket.get_blob, self.prefix + name)
        try:
            return (None, 0) if blob is None else (self.call(f'read {name}', blob.download_as_bytes), blob.generation)
        except self.errors.NotFound:  # deleted between the two
            return None, 0

    def write(self, name, data, generation=None):
        """Replace an object by `data` whole; with `generation`, only if it is still that one
        (0: only if there is none). -> the new generation, or None if the precondition failed."""
        blob = self.blob(name)
        try:
            self.call(f'write {name}', blob.upload_from_string, data, if_generation_match=generation)
        except self.errors.PreconditionFailed:
            return None
        return blob.generation

    def delete(self, name):
        with contextlib.suppress(self.errors.NotFound):
            self.call(f'delete {name}', self.blob(name).delete)

    def retry(self, what, fn, *args):
        """fn(*args), tried again while the bucket does not answer, each time said, with a growing
        wait; for at most self.patience seconds (None: for as long as it takes), then one line."""
        t0 = time.time()
        for attempt in itertools.count():
            try:
                return fn(*args)
            except BucketDown as e:
                if self.patience is not None and time.time() - t0 > self.patience:
                    raise UserError(f'{self.url}: could not {what} for {time.time() - t0:.0f}s ({e}); check the '
                                    'network (or STORAGE_EMULATOR_HOST) and run the same command again')
                wait = min(2 ** attempt, 60)
                say(f'{self.url}: could not {what} ({e}); trying again in {wait}s', file=sys.stderr, flush=True)
                time.sleep(wait)


def file_crc32c(path):
    """A file's CRC32C as Cloud Storage writes it (base64 of 4 big-endian bytes); `path` may be a
    file open for reading too."""
    import google_crc32c  # installed with google-cloud-storage
    h = google_crc32c.Checksum()
    with open(path, 'rb') if isinstance(path, str) else contextlib.nullcontext(path) as f:
        f.seek(0)
        for block in iter(lambda: f.read(1 << 22), b''):
            h.update(block)
    return base64.b64encode(h.digest()).decode()


def fetch_data(url):
    """--data=gs://BUCKET/PATH: a directory prepare.py made, copied into its local copy: each file
    its meta.json lists, unless the local copy holds it with the bucket's CRC32C (downloaded
    whole, then checked against it), and meta.json last, as on disk. -> the local directory"""
    bucket, local = Bucket(url), local_copy(url)
    data, _ = bucket.retry('read meta.json', bucket.read, 'meta.json')
    upload = f'prepare the data here, then: gcloud storage rsync -r data/NAME {url} -x "^raw/"'
    if data is None:
        bucket.check_exists()
        raise UserError(f'--data={url}: no meta.json there; {upload}')
    try:
        meta = json.loads(data)
    except ValueError:
        meta = None
    problem = field_problem(meta, DATA_META)
    if problem:
        raise UserError(f'{url}/meta.json: {problem}; {upload}')
    names = prepared_files(meta)
    there = bucket.retry('list the bucket', bucket.objects)
    os.makedirs(local, exist_ok=True)
    for name in names:
        if name not in there:
            raise UserError(f'{url}/{name}: missing, and meta.json lists it (an upload cut short?); {upload}')
        path = os.path.join(local, name)
        if os.path.isfile(path) and file_crc32c(path) == there[name][1]:
            continue  # the bucket's own bytes
        t = time.time()
        bucket.retry(f'download {name}', bucket.download, name, path, there[name][1])
        say(f'copied {url}/{name} ({size(there[name][0])} in {time.time() - t:.1f}s)')
    with written(os.path.join(local, 'meta.json')) as f:
        f.write(data)
    return local


# A run kept in a bucket (--out=gs://BUCKET/PATH) works in a local copy of the bucket path as in
# any --out, and each checkpoint it writes is uploaded in the background, state.npz first and its
# meta.json last: in the bucket as on disk, a checkpoint with a meta.json is whole (meta.json
# records state.npz's size and SHA-256, checked on loading). On a new VM with an empty disk the
# same command downloads the whole checkpoints the run keeps, its log and its trained tokenizer
# (if any), and goes on. One run per bucket path: a lock object, created only where none is,
# refreshed while the run lives, taken over only when it has gone stale.

def bucket_checkpoints(objects):
    """{step: [object names]} of the checkpoints in a bucket listing, and which are whole (their
    meta.json uploaded, which comes last) -> (whole steps, {step: names})"""
    found = {}
    for name in objects:
        m = re.fullmatch(r'(ckpt_([0-9]+))/[^/]+', name)
        if m:
            found.setdefault(int(m[2]), []).append(name)
    whole = sorted(s for s, names in found.items() if f'{checkpoint_name(s)}/meta.json' in names)
    return whole, found


class BucketRun:
    """Training on --out=gs://...: the lock, the download of what a new VM lacks, and the uploads.
    Process 0 holds the lock and uploads; every process downloads (each host reads its copy)."""
    REFRESH, STALE = 30, 120  # seconds between the lock's refreshes; a lock older than STALE is a dead run's

    def __init__(self, url, lead):
        self.bucket, self.local, self.lead = Bucket(url), local_copy(url), lead
        self.generation, self.lost, self.uploaded, self.tokenizer_sent = None, False, set(), False
        self.closing, self.uploading = threading.Event(), threading.Lock()

    def __enter__(self):
        os.makedirs(self.local, exist_ok=True)
        if self.lead:
            self.lock()
        self.download_newest()
        self.bucket.patience = None  # while training, uploads wait for the bucket as long as it takes
        if self.lead:
            threading.Thread(target=self.keep_lock, daemon=True).start()
            threading.Thread(target=self.watch, daemon=True).start()
        return self

    def __exit__(self, *exc):
        if self.lead and self.generation and not self.lost:  # a lost lock is another run's now
            self.finish()
            with contextlib.suppress(Exception):  # a lock left behind goes stale anyway
                self.bucket.blob('.lock').delete(if_generation_match=self.generation)

    def lock(self):
        """Create .lock only where there is none (a generation precondition); a lock refreshed
        less than STALE seconds ago is a live run's: refuse. A stale one is taken over, and so is
        one of a process of this machine that is gone (killed, then the same command again)."""
        me = self.holder()
        data, generation = self.bucket.retry('read the lock', self.bucket.read, '.lock')
        if data is not None:
            try:
                owner = json.loads(data)
                age = time.time() - float(owner['time'])
            except (ValueError, KeyError, TypeError):
                owner, age = {}, math.inf
            if not -self.STALE < age < math.inf:  # no time, or far in the future (a clock set ahead): no proof of life
                age = math.inf
            dead_here = owner.get('host') == socket.gethostname() and type(owner.get('pid')) is int and \
                not process_alive(owner['pid'])
            if age < self.STALE and not dead_here:
                raise UserError(f'--out={self.bucket.url} is in use by another training run (host '
                                f'{owner.get("host")}, pid {owner.get("pid")}, alive {max(age, 0):.0f}s ago); wait for it to '
                                f'finish, stop it, or choose another --out (a lock not refreshed for {self.STALE}s is '
                                'taken over)')
            say(f'{self.bucket.url}: taking over the lock of a run that stopped' +
                (' (its process is gone)' if dead_here else f' {age:.0f}s ago' if age < math.inf else
                 ' (its lock has no believable time)'))
        self.generation = self.bucket.retry('write the lock', self.bucket.write, '.lock', me, generation)
        if self.generation is None:
            raise UserError(f'--out={self.bucket.url} was locked by another training run just now; choose '
                            'another --out')

    @staticmethod
    def holder():
        """The lock object's contents: who holds it, and when it was last refreshed."""
        return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'time': time.time()}).encode()

    def keep_lock(self):
        """Refresh the lock every REFRESH seconds, only if it is still ours."""
        while not self.closing.wait(self.REFRESH):
            me = self.holder()
            try:
                generation = self.bucket.write('.lock', me, self.generation)
            except BucketDown:
                continue  # try again at the next refresh; STALE allows several misses
            if generation is None:
                self.lost = True
                say(f'warning: {self.bucket.url}: another run took the lock over; this run uploads nothing more',
                    file=sys.stderr)
                return
            self.generation = generation

    def download_newest(self):
        """What a new VM lacks: the bucket's whole checkpoints (the few retention keeps) that the
        local copy does not hold whole, and the log. Process 0 also removes what a killed upload left (objects of a
        checkpoint with no meta.json), under the lock."""
        sizes = self.bucket.retry('list the bucket', self.bucket.objects)
        whole, found = bucket_checkpoints(sizes)
        self.uploaded = set(whole)
        if self.lead:
            for step, names in found.items():
                if step not in whole:
                    for name in names:
                        self.bucket.delete(name)
        for step in whole:  # the newest, and those kept beside it (the one before the warmdown)
            name = checkpoint_name(step)
            path = os.path.join(self.local, name)
            if not (os.path.isdir(path) and checkpoint_is_whole(path)):
                t = time.time()
                tmp = os.path.join(self.local, f'.tmp_ckpt_download_{os.getpid()}')
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                for file in ('state.npz', 'meta.json'):
                    where = os.path.join(tmp, file)
                    self.bucket.retry(f'download {name}/{file}', self.bucket.download, f'{name}/{file}', where)
                if os.path.lexists(path):
                    discard(path)
                os.rename(tmp, path)
                say(f'downloaded {name} from {self.bucket.url} ({size(sizes[name + "/state.npz"][0])} in '
                    f'{time.time() - t:.1f}s)')
        for name in ('log.jsonl', TOKENIZER_FILE):  # the log; a trained tokenizer (sample, eval, export read it)
            if name in sizes:
                self.bucket.retry(f'download {name}', self.bucket.download, name, os.path.join(self.local, name))

    def watch(self):
        """Upload each checkpoint that appears in the local copy (training writes them whole, by a
        rename), one at a time, in this background thread: training never waits for the network."""
        while not self.closing.is_set():
            try:
                self.upload_newest()
            except UserError:  # given up after the run ended: finish() says so
                return
            self.closing.wait(1.0)

    def upload_newest(self):
        """Upload what the local copy keeps and the bucket lacks, the newest first (what a new VM
        resumes from), one at a time."""
        with self.uploading:
            while not self.lost:
                missing = [path for step, path in list_checkpoints(self.local) if step not in self.uploaded]
                if not missing or not self.upload(missing[-1]):
                    return

    def finish(self):
        """At the run's end (done, a signal, an error): the newest checkpoint and the log into the
        bucket before the process exits, then the lock released."""
        self.closing.set()
        self.bucket.patience = BUCKET_PATIENCE  # the run is over: wait a while, not forever
        say(f'uploading what {self.bucket.url} lacks before exiting ...', flush=True)
        self.upload_newest()
        log = os.path.join(self.local, 'log.jsonl')
        if os.path.exists(log) and not self.lost:
            self.bucket.retry('upload log.jsonl', self.bucket.upload, log, 'log.jsonl')

    def upload(self, path):
        """A checkpoint into the bucket: state.npz, the log (a whole-object rewrite), then meta.json
        (from then on it is whole); then the bucket's checkpoints that the local copy no longer
        keeps are deleted, meta.json first."""
        name, t = os.path.basename(path), time.time()
        log, tokenizer = os.path.join(self.local, 'log.jsonl'), os.path.join(self.local, TOKENIZER_FILE)
        try:  # the log before meta.json: the bucket's log reaches at least its newest whole checkpoint
            self.bucket.retry(f'upload {name}/state.npz', self.bucket.upload, f'{path}/state.npz', f'{name}/state.npz')
            if os.path.exists(log):
                self.bucket.retry('upload log.jsonl', self.bucket.upload, log, 'log.jsonl')
            self.bucket.retry(f'upload {name}/meta.json', self.bucket.upload, f'{path}/meta.json', f'{name}/meta.json')
        except FileNotFoundError:
            return False  # deleted by retention meanwhile: a newer one is there to upload
        self.uploaded.add(int(name[5:]))
        if os.path.isfile(tokenizer) and not self.tokenizer_sent:  # once: a run's tokenizer never changes
            self.bucket.retry(f'upload {TOKENIZER_FILE}', self.bucket.upload, tokenizer, TOKENIZER_FILE)
            self.tokenizer_sent = True
        kept = {step for step, _ in list_checkpoints(self.local)}
        whole, found = bucket_checkpoints(self.bucket.retry('list the bucket', self.bucket.objects))
        for step, names in found.items():
            if step not in kept and step < whole[-1]:
                for file in sorted(names, key=lambda n: not n.endswith('meta.json')):
                    self.bucket.retry(f'delete {file}', self.bucket.delete, file)
                self.uploaded.discard(step)
        say(f'uploaded {name} to {self.bucket.url} in {time.time() - t:.1f}s', flush=True)
        return True


def fetch_run(c):
    """sample, eval, export, plot with --out=gs://...: the newest whole checkpoint and the log,
    downloaded into the local copy. -> the config with --out the local copy"""
    if not in_bucket(c.out):
        return c
    if ',' in c.out:
        raise UserError(f'--out={c.out}: name one bucket path at a time')
    with BucketRun(c.out, lead=False) as run:
        return dataclasses.replace(c, out=run.local)


# ----------------------------------------------------------------------------------------------
# Hardware: what a chip can do and what an hour of it costs, for MFU (model FLOPs utilization =
# achieved model FLOP/s over peak) and for dollars in the log. Matched against
# jax.devices()[0].device_kind, first match wins. Prices are list prices per chip-hour, on-demand
# and spot (--spot); they change over time and by region (spot prices up to once a day): pass
# --price_per_hour to use what you actually pay.


@dataclass(frozen=True)
class Chip:
    name: str        # what --hardware= calls it
    kind: str        # substring of jax's device_kind
    peak: float      # dense bf16 FLOP/s per chip
    price: float     # on-demand dollars per chip-hour (0 = no list price known)
    memory: float    # bytes of HBM per chip
    clock: float = 0.0  # TPUs: Hz, to turn the compiler's cycle estimates into seconds
    ici: float = 0.0    # TPUs: bytes/s one chip sends over its inter-chip links
    spot: float = 0.0   # spot (preemptible) dollars per chip-hour (0 = no list price known)


GiB = 2 ** 30


CHIPS = [
    # peak and memory: cloud.google.com/tpu/docs/{v6e,v5e,v5p,v4}; price: cloud.google.com/tpu/pricing
    # (on-demand, per chip-hour; v6e us-east1, v5e us-west4, v5p us-east5, v4 us-central2; v6e's
    # $2.70 is also the price in Google's Trillium GA announcement, December 2024)
    # ici: the same pages' "interchip interconnect bandwidth" (Gbps / 8). clock = peak / FLOPs per
    # cycle of the matrix units (4 MXUs per core, 256x256 on v6e and 128x128 before, 2 cores on v5p
    # and v4, 2 FLOPs per multiply-add): v6e 918e12 / (4 * 256^2 * 2) = 1.75 GHz. libtpu's cost
    # model agrees: it estimates a 4096^3 bf16 matmul at 87-97% of these FLOPs per cycle.
    # spot: SkyPilot's GCP catalog (github.com/skypilot-org/skypilot-catalog, catalogs/v7/gcp/vms.csv
    # at commit 017e250, which it builds from Google's billing catalog), the same regions as the
    # on-demand prices, per chip (a v4-8 or v5p-8 is 4 chips): 24% of on-demand (v6e), 39% (v5e),
    # 37% (v5p), 29% (v4). A spot price holds for a day at least (cloud.google.com/spot-vms/pricing).
    Chip('v6e', 'TPU v6', 918e12, 2.70, 32 * GiB, clock=918e12 / (4 * 256**2 * 2), ici=3584e9 / 8, spot=0.6483),
    Chip('v5e', 'TPU v5 lite', 197e12, 1.20, 16 * GiB, clock=197e12 / (4 * 128**2 * 2), ici=1600e9 / 8, spot=0.4692),
    Chip('v5p', 'TPU v5', 459e12, 4.20, 95 * GiB, clock=459e12 / (2 * 4 * 128**2 * 2), ici=4800e9 / 8, spot=1.5601),
    Chip('v4', 'TPU v4', 275e12, 3.22, 32 * GiB, clock=275e12 / (2 * 4 * 128**2 * 2), ici=2400e9 / 8, spot=0.9215),
    # peak and memory: NVIDIA's H100, H200 and A100 datasheets (dense, without sparsity);
    # price: runpod.io/pricing (Secure Cloud on-demand, per GPU-hour; SXM parts). No list price
    # is kept for the H100 PCIe, nor a spot price for any GPU: pass --price_per_hour.
    Chip('h100-pcie', 'H100 PCIe', 756e12, 0.0, 80 * GiB),
    Chip('h100', 'H100', 989e12, 2.69, 80 * GiB),
    Chip('h200', 'H200', 989e12, 3.59, 141 * GiB),
    Chip('a100', 'A100', 312e12, 1.49, 80 * GiB),  # the 80 GB part (a 40 GB one exists too)
]


def this_chip(kind=None):
    """The CHIPS entry for a device_kind (default: the devices JAX sees), or None for CPU or a
    chip not in the table."""
    kind = kind or jax.devices()[0].device_kind
    return next((chip for chip in CHIPS if chip.kind in kind), None)


def chip_named(name):
    """The CHIPS entry called `name` (as in --hardware=v6e), or None."""
    return next((chip for chip in CHIPS if chip.name == name.lower()), None)


def chip_count(mesh):
    """Chips a run pays for: the mesh's devices, or on CPU the machines (a CPU's virtual devices
    share its cores)."""
    return jax.process_count() if jax.default_backend() == 'cpu' else mesh.size


def matmul_params(c):
    """Weights that take part in matmuls: every block's, plus the output projection (the input
    embedding is a lookup). The P of 6P, and of tokens-per-parameter rules."""
    L, D, N, K, H, F = c.n_layer, c.d_model, c.n_head, c.n_kv_head, head_dim(c), ff_dim(c)
    per_layer = D * N * H * 2 + D * K * H * 2 + D * F * (3 if c.mlp == 'swiglu' else 2)
    return L * per_layer + D * padded_vocab(c)


def count_params(params):
    return sum(x.size for x in jax.tree.leaves(params))


def param_count(c):
    """Parameters the config builds, from the weights' shapes alone (nothing is allocated)."""
    return count_params(jax.eval_shape(lambda: init_params(c, jax.random.key(0))))


def flops_per_token(c):
    """Training FLOPs per token, PaLM appendix B: 6P + 12*L*N*H*T, with P = matmul_params(c), L
    layers, N query heads of width H, T = seq_len. The attention term counts the full T x T
    score matrix: causal masking is NOT halved,
    matching PaLM and nanoGPT, so MFUs compare with theirs."""
    return 6 * matmul_params(c) + 12 * c.n_layer * c.n_head * head_dim(c) * c.seq_len


def hardware_peak(c, n_devices=1):
    """Peak FLOP/s of n_devices chips (--peak_flops, else the table), or None if unknown. On CPU:
    measured (cpu_peak), for every core at once, however many virtual devices share them."""
    if c.peak_flops:
        return c.peak_flops * n_devices
    chip = this_chip()
    if chip:
        return chip.peak * n_devices
    return cpu_peak() if jax.default_backend() == 'cpu' else None


@functools.cache
def cpu_peak():
    """The CPU's FLOP/s on a 512 x 512 fp32 matmul, which already uses every core: the fastest of
    10 runs (~20 ms; a shared VM's other tenants slow some down), measured once per process. 512
    measured the rate 1024 does (175 against 170 GFLOP/s, 2 cores) in a thirtieth of the time."""
    n = 512
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        mm(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)


def list_price(chip, spot):
    """(a chip's list price per chip-hour, on-demand or spot, and which it is); 0 when none is kept."""
    return (chip.spot if spot else chip.price), f"{chip.name} {'spot' if spot else 'on-demand'} list price"


def hourly_price(c, mesh):
    """(dollars per hour for the whole run, where the number comes from), or (None, why not)."""
    chips, chip = chip_count(mesh), this_chip()
    unit = 'machine' if jax.default_backend() == 'cpu' else 'chip'
    if c.price_per_hour:
        return c.price_per_hour * chips, f'{chips} {unit}(s) x ${c.price_per_hour:g}/{unit}-hour (--price_per_hour)'
    each, what = list_price(chip, c.spot) if chip else (0, '')
    if each:
        return each * chips, f'{chips} chips x ${each:g}/chip-hour ({what})'
    return None, f"no {'spot ' if c.spot else ''}price for this hardware; pass --price_per_hour to see dollars"


def dollars(x):
    return f'${x:,.2f}' if x >= 1 else f'${x:.2g}'


def size(n):
    return f'{n / 2**30:,.2f} GiB' if n >= 2**30 else f'{n / 2**20:,.1f} MiB'


# ----------------------------------------------------------------------------------------------
# Benchmark: the real train step on synthetic tokens, timed step by step after compilation.


def peak_memory():
    """Peak bytes on device 0 (TPU/GPU), or the process's peak RSS on CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
        return stats['peak_bytes_in_use'], 'device'
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process RSS'


def time_steps(c, mesh):
    """Compile the train step ahead of time (with more microbatches if it does not fit), then time
    3 + bench_steps steps on one synthetic batch. -> (config, {'compile_s', 'times': the step times
    after the 3 warm-up ones, 'buffers': XLA's buffer sizes})."""
    state = jax.jit(lambda: fresh_state(c), out_shardings=state_shardings(c, mesh))()
    params, opt = state['params'], state['opt']
    t = time.perf_counter()
    c, step, _ = compile_fitting_step(params, opt, mesh, c)
    compile_s, times = time.perf_counter() - t, []
    shape = (c.grad_accum, c.batch_size // c.grad_accum, c.seq_len + 1)
    tokens = np.random.default_rng(c.seed).integers(0, c.vocab_size, shape, dtype=np.int32)
    batch = jax.device_put(tokens, batch_sharding(mesh, 3))
    for _ in range(3 + c.bench_steps):
        t = time.perf_counter()
        params, opt, stats = step(params, opt, batch)
        jax.block_until_ready(stats)
        times.append(time.perf_counter() - t)
    return c, {'compile_s': compile_s, 'times': np.array(times[3:]), 'buffers': step.memory_analysis()}


def bench(c):
    if c.topology:
        return bench_topology(c)
    c, mesh, device_note = setup_devices(c)
    c, timed = time_steps(c, mesh)
    times, compile_s, buffers = timed['times'], timed['compile_s'], timed['buffers']
    median, flops, peak = float(np.median(times)), flops_per_token(c), hardware_peak(c, mesh.size)
    tokens_per_sec = c.batch_size * c.seq_len / median
    memory, where = peak_memory()
    price, price_note = hourly_price(c, mesh)
    chip = this_chip()
    r = {'preset': c.preset, 'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
         'chip': chip.name if chip else None, 'attention': c.attention,
         'devices': mesh.size, 'params': param_count(c), 'tokens_per_step': c.batch_size * c.seq_len,
         'grad_accum': c.grad_accum, 'compile_s': compile_s, 'ms_per_step': 1000 * median, 'ms_min': 1000 * times.min(),
         'ms_max': 1000 * times.max(), 'tokens_per_sec': tokens_per_sec, 'flops_per_token': flops,
         'achieved_flops': flops * tokens_per_sec, 'peak_flops': peak,
         'mfu': flops * tokens_per_sec / peak if peak else None, 'peak_memory_bytes': memory,
         'temp_bytes': getattr(buffers, 'temp_size_in_bytes', None),
         'argument_bytes': getattr(buffers, 'argument_size_in_bytes', None),
         'price_per_hour': price,
         'dollars_per_million_tokens': price / 3600 / tokens_per_sec * 1e6 if price else None}
    say(f"bench | {c.preset} | {r['backend']} x{mesh.size} ({r['device']}) | {r['params'] / 1e6:.2f}M params "
        f"| {r['tokens_per_step']} tokens/step | {device_note} | compile {compile_s:.1f}s")
    mfu = f"MFU {r['mfu']:.1%} of {peak / 1e12:.3g} TFLOP/s" if peak else \
        'MFU unknown (unknown chip: pass --peak_flops)'
    say(f"{r['ms_per_step']:.1f} ms/step, median of {c.bench_steps} (min {r['ms_min']:.1f}, max {r['ms_max']:.1f}) "
        f"| {tokens_per_sec:,.0f} tok/s | {r['achieved_flops'] / 1e9:,.1f} GFLOP/s | {mfu}")
    say(f'FLOPs/token {flops:,} = 6P + 12*L*N*H*T (P: matmul weights with the output projection, without the '
        f'input embedding; causal attention not halved)')
    say(f'memory: {buffer_note(buffers)} | peak {size(memory)} ({where})')
    say(f"{dollars(r['dollars_per_million_tokens'])} per million tokens ({price_note})" if price else
        f'cost: {price_note}')
    say(json.dumps(r))
    record_bench(c, r)
    return r


def record_bench(c, r):
    """Append a bench result to OUT/bench.jsonl, where `plan` finds its MFU (in a bucket: the
    object rewritten whole, only if no other run rewrote it meanwhile)."""
    if jax.process_index() == 0 and in_bucket(c.out):
        bucket = Bucket(c.out)
        for _ in range(5):
            data, generation = bucket.read('bench.jsonl')
            if bucket.write('bench.jsonl', (data or b'') + (json.dumps(r) + '\n').encode(), generation) is not None:
                return
    elif jax.process_index() == 0:
        try:
            os.makedirs(c.out, exist_ok=True)
            with open_log(os.path.join(c.out, 'bench.jsonl')) as f:
                f.write((json.dumps(r) + '\n').encode())
        except OSError as e:
            say(f'warning: could not record the result in {c.out}/bench.jsonl ({e.strerror})', file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Compiling for a TPU that is not here (bench --topology): libtpu compiles for any slice on any
# machine. The compiled program gives XLA's buffer sizes (does it fit?) and, per fused op, the TPU
# compiler's own cost model: an `estimated_cycles` figure. An estimated step time is their sum,
# with each loop's body counted once per iteration (its trip count read from the loop condition),
# at the chip's clock. Two things the cost model does not price are added by rule:
#   - Pallas kernels (splash attention) are opaque custom calls: their matmul FLOPs, causal
#     blocks only, are counted at KERNEL_EFFICIENCY of the chip's peak;
#   - collectives (several chips): the bytes each chip sends, by ring algorithm, are counted;
#     those the cost model leaves unpriced (TPUs run collectives as their own fusions beside
#     compute) are timed over the chip's ICI links at their published bandwidth, not overlapped.
# These are estimates, never measurements: docs/performance.md says how they are made.

KERNEL_EFFICIENCY = 0.5  # an assumption: flash kernels reach roughly half of peak; see docs/performance.md

# How much faster than estimated a real chip ran: tpuchat's own step (the revision its author
# measured), rebuilt in plain JAX and compiled with the same libtpu, was estimated at 410.2 ms on a
# v6e and 1,191.9 ms on a v5e and measured at ~301 and ~881 ms. A PROJECTION divides an estimate
# by this; over 13 measured configurations of that code the factor was 1.26-1.45 (about +-7%).
# Other chips and several chips are uncalibrated.
CALIBRATION = {'v6e': 1.36, 'v5e': 1.35}
CALIBRATION_BAND = (1.26, 1.45)


DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4,
               'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}


COLLECTIVES = {'all-gather': 1, 'reduce-scatter': 1, 'all-to-all': 1, 'all-reduce': 2,
               'collective-permute': 1}  # op: times its data crosses a chip's links (ring algorithm)


def hlo_computations(text):
    """A compiled module's HLO text -> ({computation: [(name, type, opcode, text)]}, entry name).
    An instruction's text may run over several lines (a Pallas kernel's metadata does)."""
    comps, current, entry = {}, None, None
    for line in text.splitlines():
        head = re.match(r'(ENTRY )?%([\w.\-]+) .*\{$', line)
        op = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(', line)
        if head and not op:
            current = comps.setdefault(head[2], [])
            entry = head[2] if head[1] else entry
        elif line == '}':
            current = None
        elif current is not None and op:
            current.append([op[1], op[2], op[3], line])
        elif current:  # the rest of the instruction above
            current[-1][3] += line
    return comps, entry


def array_bytes(hlo_type):
    """Bytes of every array in an HLO type ('bf16[8,2048]{...}' or a tuple of them), as a list."""
    return [DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(',') if d)
            for dt, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', hlo_type)]


def ring_bytes(opcode, hlo_type, n_devices):
    """Bytes one chip sends, by ring algorithm, for a collective over n_devices whose output type
    is hlo_type (a tuple when XLA combined several; an async -start op's tuple holds its operands
    first, then its outputs). A reduce-scatter's output is 1/n of the data it reduces; an all-reduce
    that XLA slices right after (an "all-reduce-scatter" fusion) is counted like one too."""
    collective, arrays = opcode.removesuffix('-start'), array_bytes(hlo_type)
    if collective == 'collective-permute':  # each chip sends its operand once, to one neighbour
        return max(arrays)
    if opcode.endswith('-start'):
        arrays = arrays[len(arrays) // 2:]
    data = sum(arrays) * (n_devices if collective == 'reduce-scatter' else 1)
    return COLLECTIVES[collective] * data * (n_devices - 1) / n_devices


def trip_count(comps, condition):
    """Iterations of a while loop whose condition is `i < constant` (what scan and map compile to)."""
    constants = [int(m[1]) for *_, line in comps[condition] for m in [re.search(r'constant\((\d+)\)', line)] if m]
    return max(constants, default=1)


def estimate_step(compiled, chip, n_devices, kernel_flops):
    """The TPU compiler's cost estimate of one run of a compiled program. kernel_flops: FLOPs of
    one call of each Pallas kernel, by a substring of its name. -> dict of seconds and bytes."""
    comps, entry = hlo_computations(compiled.as_text())
    totals = {'cycles': 0, 'kernel_flops': 0, 'collective_bytes': 0, 'unpriced_bytes': 0}
    by_source = {}  # cycles by the JAX operation each fused op came from (its op_name metadata)

    def walk(name, times):
        for op_name, hlo_type, opcode, line in comps[name]:
            if opcode == 'while':
                loop = dict(re.findall(r'(body|condition)=%([\w.\-]+)', line))
                n = trip_count(comps, loop['condition'])
                walk(loop['body'], times * n)
                walk(loop['condition'], times * n)
                continue
            if opcode == 'call':
                walk(re.search(r'to_apply=%([\w.\-]+)', line)[1], times)
                continue
            if opcode == 'custom-call' and 'tpu_custom_call' in line:
                totals['kernel_flops'] += times * next((f for key, f in kernel_flops.items() if key in op_name), 0)
                continue
            # a collective stands alone, or inside a fusion (TPUs run them as fusions beside compute)
            callee = re.search(r'calls=%([\w.\-]+)', line) if opcode == 'fusion' else None
            inner = comps.get(callee[1], []) if callee else []
            parts = [(opcode, hlo_type)] + [(op, t) for _, t, op, _ in inner]
            scatter = callee and 'all-reduce-scatter' in callee[1]  # all-reduce + slice: a reduce-scatter
            moved = sum(ring_bytes('reduce-scatter' if scatter else op, t, n_devices) / (n_devices if scatter else 1)
                        for op, t in parts if op.removesuffix('-start') in COLLECTIVES and n_devices > 1)
            totals['collective_bytes'] += times * moved
            cycles = re.search(r'"estimated_cycles":"(\d+)"', line)
            if not cycles:  # the cost model did not price it: its bytes go over the links at ICI speed
                totals['unpriced_bytes'] += times * moved
                continue
            totals['cycles'] += times * int(cycles[1])
            source = re.search(r'op_name="([^"]*)"', line)
            source = f'{hlo_type.split("{")[0]} {source[1] if source else opcode}'
            by_source[source] = by_source.get(source, 0) + times * int(cycles[1])

    walk(entry, 1)
    xla = totals['cycles'] / chip.clock
    kernels = totals['kernel_flops'] / (chip.peak * KERNEL_EFFICIENCY)
    collectives = totals['unpriced_bytes'] / chip.ici if chip.ici else 0.0
    costliest = sorted(by_source.items(), key=lambda kv: -kv[1])[:8]
    return {'seconds': xla + kernels + collectives, 'xla_seconds': xla, 'kernel_seconds': kernels,
            'collective_seconds': collectives, 'collective_bytes': totals['collective_bytes'],
            'costliest': [(source, cycles / chip.clock) for source, cycles in costliest]}


def splash_flops(c, mesh):
    """What one call of each splash kernel on one device costs, as FLOPs at KERNEL_EFFICIENCY: the
    matmuls of blocks of 512 (or the kernel's, if smaller), the blocks above the causal diagonal
    skipped: forward QK^T and PV (2 matmuls); backward dK and dV (QK^T, dP recomputed: 4) and dQ
    (QK^T, dP, dQ: 3), each 2*T*T*H per head. Larger blocks compute more of the masked triangle but
    ran faster on a real chip: their cost is scaled by the time measured (SPLASH_BLOCK_MS)."""
    micro = c.batch_size // c.grad_accum // mesh.size
    block = splash_block(c.seq_len)
    priced = min(block, 512)
    blocks = c.seq_len // priced
    per_matmul = micro * c.n_head * 2 * c.seq_len ** 2 * head_dim(c) * (blocks + 1) / (2 * blocks)
    per_matmul *= SPLASH_BLOCK_MS[block] / SPLASH_BLOCK_MS[512] if block > 512 else 1
    return {'dkv': 4 * per_matmul, 'dq': 3 * per_matmul, 'fwd': 2 * per_matmul}


def bench_topology(c):
    """bench --topology: compile (never run) the train and eval steps for a TPU slice, with the
    fewest microbatches that fit its memory, and print their memory and estimated speed. The
    program runs on the CPU backend here, so --dtype=auto is resolved as on a TPU: bfloat16."""
    c = dataclasses.replace(c, dtype='bfloat16') if c.dtype == 'auto' else c
    c, mesh, device_note = setup_devices(c)
    chip = this_chip(mesh.devices.flat[0].device_kind)
    state = state_shapes(c, mesh)
    t = time.perf_counter()
    c, compiled_train, compiled_eval = compile_fitting_step(state['params'], state['opt'], mesh, c)
    compile_s = time.perf_counter() - t
    est = estimate_step(compiled_train, chip, mesh.size, splash_flops(c, mesh) if c.attention == 'splash' else {})
    tokens_per_sec = c.batch_size * c.seq_len / est['seconds']
    flops = flops_per_token(c)
    train_bytes, eval_bytes = step_bytes(compiled_train), step_bytes(compiled_eval) + resident_bytes(state['opt'])
    r = {'preset': c.preset, 'topology': c.topology, 'chip': chip.name, 'devices': mesh.size,
         'attention': c.attention, 'fsdp': use_fsdp(c, mesh), 'params': count_params(state['params']),
         'tokens_per_step': c.batch_size * c.seq_len, 'grad_accum': c.grad_accum,
         'microbatch': c.batch_size // c.grad_accum, 'compile_s': compile_s,
         'device_bytes': chip.memory, 'train_bytes_per_device': train_bytes, 'eval_bytes_per_device': eval_bytes,
         'fits': {'train': train_bytes <= chip.memory, 'eval': eval_bytes <= chip.memory},
         'est_ms_per_step': 1000 * est['seconds'], 'est_tokens_per_sec': tokens_per_sec,
         'est_mfu': flops * tokens_per_sec / (chip.peak * mesh.size),
         'est_ms_xla': 1000 * est['xla_seconds'], 'est_ms_kernels': 1000 * est['kernel_seconds'],
         'est_ms_collectives': 1000 * est['collective_seconds'],
         'collective_bytes_per_step': est['collective_bytes'], 'flops_per_token': flops}
    factor = CALIBRATION.get(chip.name) if mesh.size == 1 else None
    if factor:  # the projection: what a real chip would likely do
        r |= {'calibration': factor, 'projected_ms_per_step': r['est_ms_per_step'] / factor,
              'projected_tokens_per_sec': tokens_per_sec * factor, 'projected_mfu': r['est_mfu'] * factor}
    per_million = {what: dollars(each * mesh.size / 3600 / tokens_per_sec * 1e6) + f' at ${each:g}/chip-hour {what}'
                   for what, each in (('on-demand', chip.price), ('spot', chip.spot)) if each}
    say(f"bench | {c.preset} | compiled for {c.topology}: {mesh.size} x {chip.name} ({mesh.devices.flat[0].device_kind}) "
        f"| {r['params'] / 1e6:.2f}M params | {device_note} | compile {compile_s:.1f}s (not run)")
    say(f"memory per device: train step {size(train_bytes)}, eval step {size(eval_bytes)} of {size(chip.memory)} HBM "
        f"-> {'fits' if all(r['fits'].values()) else 'DOES NOT FIT'} with {c.grad_accum} microbatches of "
        f"{r['microbatch']} x {c.seq_len} tokens")
    say(f"ESTIMATE (libtpu's cost model, not a measurement): {r['est_ms_per_step']:.1f} ms/step "
        f"(XLA ops {r['est_ms_xla']:.1f} + Pallas kernels {r['est_ms_kernels']:.1f} at {KERNEL_EFFICIENCY:.0%} of peak "
        f"+ collectives {r['est_ms_collectives']:.1f}, {size(r['collective_bytes_per_step'])} per chip) "
        f"| {tokens_per_sec:,.0f} tok/s | MFU {r['est_mfu']:.1%} | per million tokens: {', '.join(per_million.values())}")
    if factor:
        low, high = (r['est_ms_per_step'] / f for f in CALIBRATION_BAND[::-1])
        say(f"PROJECTION (the estimate / {factor}, how much faster a real {chip.name} ran tpuchat's step than estimated; "
            f"not a measurement): {r['projected_ms_per_step']:.1f} ms/step ({low:.3g}-{high:.3g} over the "
            f"{CALIBRATION_BAND[0]}-{CALIBRATION_BAND[1]} seen) | {r['projected_tokens_per_sec']:,.0f} tok/s "
            f"| MFU {r['projected_mfu']:.1%}")
    else:
        say(f'no PROJECTION: {"several chips are" if mesh.size > 1 else chip.name + " is"} uncalibrated (only one v6e '
            'and one v5e have been measured against their estimates)')
    say('costliest XLA ops (estimated ms per step; output type and the JAX operation they come from):')
    for source, seconds in est['costliest']:
        say(f'  {1000 * seconds:8.1f} ms  {source[:150]}')
    say(json.dumps(r))
    record_bench(c, r)
    return r


# ----------------------------------------------------------------------------------------------
# Plan: from a budget to a compute-optimal run. For a fixed compute budget, loss is lowest with
# about 20 training tokens per parameter (Hoffmann et al. 2022, "Chinchilla"). The dollars buy
# chip-hours; chip-hours at a peak and an MFU buy FLOPs; the FLOPs buy the largest model of a
# ladder of shapes that can see 20 tokens per parameter within the budget.

TOKENS_PER_PARAM = 20
PRETOKENIZED_SHARD_TOKENS = 100_000_000  # tokens in one of the FineWeb shards prepare.py downloads


DEFAULT_MFU = 0.4  # between nanoGPT's ~37% (A100) and the 46.5% of a JAX 130M model on a v6e


def optimizer_state(c):
    """What the optimizer keeps per weight, in words."""
    return 'Muon (matrices) and AdamW' if c.optimizer == 'muon' else 'AdamW'


def plan_shape(c, layers):
    """A rung of the ladder of models: `layers` blocks of width 128 * ceil(layers / 2), so about
    64 channels per layer (GPT-2 small's 768 / 12) with each rung ~1.2x the last in parameters;
    heads of width 128 and the preset's MLP at its default width. Every matrix dimension is a multiple
    of 128, the width of a TPU v4/v5 matrix unit (v6e's is 256: rungs of 4, 8, 12, ... layers fit it too)."""
    d_model = 128 * math.ceil(layers / 2)
    return dataclasses.replace(c, n_layer=layers, d_model=d_model, n_head=d_model // 128,
                               n_kv_head=d_model // 128, d_head=128, d_ff=0)


def plan_backend(flags):
    """The backend whose preset a plan starts from: that of --hardware, else this machine's."""
    chip = chip_named(flags.get('hardware', ''))
    return None if chip is None else 'tpu' if 'TPU' in chip.kind else 'gpu'


def bench_mfu(c, chip):
    """The MFU `bench` found for this chip, from OUT/bench.jsonl: the newest measured one, else the
    newest projection of bench --topology (its estimate, calibrated), else its newest uncalibrated
    estimate. -> (mfu, where it comes from), or (None, None)."""
    def record(line):  # a line that is not a result (damaged, hand-edited) is skipped
        try:
            r = json.loads(line)
        except ValueError:
            return None
        return r if type(r) is dict and r.get('chip') == chip.name else None

    try:
        if in_bucket(c.out):
            lines = (Bucket(c.out).read('bench.jsonl')[0] or b'').decode('utf-8', errors='replace').splitlines()
        else:
            with open(os.path.join(c.out, 'bench.jsonl'), encoding='utf-8', errors='replace') as f:
                lines = f.readlines()
        mine = [r for r in map(record, lines) if r]
    except (OSError, BucketDown):
        return None, None
    for key, how in (('mfu', 'measured by bench'),
                     ('projected_mfu', "PROJECTED: bench --topology's estimate x how much faster a real chip ran"),
                     ('est_mfu', "ESTIMATED by bench --topology from libtpu's cost model")):
        found = [r[key] for r in mine if number(1e-6, 1)(r.get(key))]
        if found:
            return found[-1], f'{how}, {c.out}/bench.jsonl'
    return None, None


def plan_chip(c):
    if c.hardware:
        chip = chip_named(c.hardware)
        if chip is None:
            raise UserError(f'--hardware={c.hardware}: unknown chip (choose from {", ".join(x.name for x in CHIPS)})')
        return chip
    chip = this_chip()
    if chip is None:
        raise UserError(f'this machine ({jax.devices()[0].device_kind}) is not in the hardware table; '
                        f'plan for one that is: --hardware={CHIPS[0].name} (or {", ".join(x.name for x in CHIPS[1:])})')
    return chip


def make_plan(c, chip):
    """The largest ladder model that trains on TOKENS_PER_PARAM tokens per parameter within
    c.budget dollars -> dict of the numbers `plan` prints (and tests check by hand)."""
    if c.chips > c.batch_size:
        raise UserError(f'--chips={c.chips} is more than the {c.batch_size} sequences of a step (--batch_size): each '
                        'chip needs at least one; plan for fewer chips or a larger --batch_size')
    price = c.price_per_hour or list_price(chip, c.spot)[0]
    if not price:
        raise UserError(f"no {'spot ' if c.spot else ''}list price for {chip.name}; pass --price_per_hour=DOLLARS")
    peak = c.peak_flops or chip.peak
    mfu, mfu_source = (c.mfu, '--mfu') if c.mfu else bench_mfu(c, chip)
    if not mfu:
        mfu, mfu_source = DEFAULT_MFU, f'default; measure yours with python tinytpu.py bench --preset={c.preset}' + (
            f' (or estimate it without a TPU: bench --topology={chip.name}:{"1x1x1" if chip.name in ("v5p", "v4") else "1x1"})'
            if chip.clock else '')
    flops_per_dollar = peak * mfu * 3600 / price                 # per chip; more chips, same cost
    tokens_per_step = c.batch_size * c.seq_len
    best = None
    for layers in range(1, 1000):
        m = plan_shape(c, layers)
        steps = math.ceil(TOKENS_PER_PARAM * matmul_params(m) / tokens_per_step)
        tokens = steps * tokens_per_step
        flops = tokens * flops_per_token(m)
        cost = flops / flops_per_dollar
        if cost > c.budget:
            break
        best = {'config': m, 'params': matmul_params(m), 'steps': steps, 'tokens': tokens, 'flops': flops,
                'cost': cost, 'hours': flops / (peak * mfu * c.chips) / 3600}

    if best is None:
        raise UserError(f'--budget={c.budget:g}: too small for the smallest model of the ladder '
                        f'({dollars(cost)} on {chip.name}); raise --budget')
    return best | {'chip': chip.name, 'price': price, 'peak': peak, 'mfu': mfu, 'mfu_source': mfu_source,
                   'chip_hours': c.budget / price, 'budget_flops': c.budget * flops_per_dollar}


def plan(c):
    chip = plan_chip(c)
    p = make_plan(c, chip)
    m = p['config']
    flags = {'preset': c.preset, 'n_layer': m.n_layer, 'd_model': m.d_model, 'n_head': m.n_head,
             'n_kv_head': m.n_kv_head, 'd_head': m.d_head, 'd_ff': m.d_ff, 'mlp': m.mlp, 'steps': p['steps']}
    if p['steps'] < 10 * c.warmup_steps:  # short runs: warm up for a tenth of them
        flags['warmup_steps'] = max(1, p['steps'] // 10)
    if c.spot and not c.price_per_hour:
        flags['spot'] = 'true'  # the run's log prices it the same way
    flags['out'] = f"out/plan_{chip.name}_{round(c.budget)}usd"
    state = 12 * param_count(m) / c.chips  # fp32 p, mu, nu
    say(f"plan | {dollars(c.budget)} on {chip.name} at ${p['price']:g}/chip-hour = {p['chip_hours']:,.1f} chip-hours "
        f"| peak {p['peak'] / 1e12:g} TFLOP/s x MFU {p['mfu']:.1%} ({p['mfu_source']}) = {p['budget_flops']:.3g} FLOPs")
    mlp = 'SwiGLU' if m.mlp == 'swiglu' else 'ReLU^2'
    say(f"model | {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads of {m.d_head}, {mlp} MLP {ff_dim(m)} "
        f"| {p['params'] / 1e6:,.1f}M params (matmul weights; {TOKENS_PER_PARAM} tokens each)")
    say(f"run   | {p['tokens'] / 1e9:,.3g}B tokens = {p['steps']:,} steps of {c.batch_size} x {c.seq_len} "
        f"| {p['flops']:.3g} FLOPs | {p['hours']:,.1f} hours on {c.chips} chip{'s' if c.chips > 1 else ''} "
        f"| {dollars(p['cost'])} of {dollars(c.budget)}")
    fits = state < 0.5 * chip.memory
    say(f"memory| params + {optimizer_state(c)} {state / 2**30:,.1f} GiB per chip of {chip.memory / 2**30:g} GiB"
        + ('' if fits else ' -- too much for activations too: plan for more --chips (FSDP splits it)'))
    if chip.price and chip.spot and not c.price_per_hour:
        say(f'price | the same {dollars(c.budget)} at each list price of {chip.name} (--spot plans for spot):')
        for spot in (False, True):
            each = list_price(chip, spot)[0]
            try:
                q = p if spot == c.spot else make_plan(dataclasses.replace(c, spot=spot), chip)
                buys = (f"{q['chip_hours']:,.1f} chip-hours -> {q['config'].n_layer} layers x {q['config'].d_model}, "
                        f"{q['params'] / 1e6:,.1f}M params, {q['steps']:,} steps, {q['hours']:,.1f} hours")
            except UserError:
                buys = 'too little for the smallest model'
            say(f"      | {'spot' if spot else 'on-demand':9} ${each:g}/chip-hour: {buys}" + ('  <- this plan' if spot == c.spot else '')
                + ('  (plus restarts: spot TPUs are taken away without warning; keep the run in a bucket, '
                   '--out=gs://...)' if spot else ''))
    data_tokens = {'data/fineweb10B': 10e9}.get(c.data)
    if data_tokens and p['tokens'] > data_tokens:
        say(f'data  | {p["tokens"] / data_tokens:.1f} passes over the 10B-token FineWeb sample (repeated data '
            'helps less than fresh; consider a larger dataset)')
    command = 'python tinytpu.py ' + ' '.join(f'--{k}={v}' for k, v in flags.items())
    dataset = os.path.basename(c.data)
    if dataset in ('fineweb10B', 'finewebedu10B'):  # shards of 100M tokens: enough for the run, and the val shard
        dataset += f' --shards={math.ceil(p["tokens"] / PRETOKENIZED_SHARD_TOKENS)}'
    say(f'to run it (after python prepare.py {dataset}):\n  {command}')
    return p | {'command': command}


# ----------------------------------------------------------------------------------------------
# Evaluation on a multiple-choice task (HellaSwag), the way llm.c scores it ("completion style"):
# each candidate ending follows the context, and the model's log-probability of the ending's
# tokens (not the context's) scores it. acc picks the ending with the highest total; acc_norm the
# highest mean per token (per byte for the byte tokenizer), which does not favour short endings.
# The candidates are sorted by length and padded, a batch at a time, to the next power of two
# (a few compiled shapes), and each batch is one forward pass, split over the devices like
# training's batches.

TASK_TOKENS = 8192  # tokens per device in one scoring pass (its fp32 logits: 8192 x vocab x 4 bytes)


def task_file(c):
    path = c.task_data or os.path.join('data', c.task, f'{c.task}_val.jsonl')
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such file; ' + ('make it with: python prepare.py hellaswag' if c.task == 'hellaswag'
                        and not c.task_data else 'pass --task_data=PATH.jsonl (HellaSwag\'s format), or --task=hellaswag '
                        'or choices'))
    return path


def task_examples(c, enc):
    """The first c.task_limit (0: all) examples of the task, as [(context, endings, label)]: made from
    the run's held-out text for --task=choices, else read from task_file(c). -> (examples, whence)"""
    if c.task == 'choices' and not c.task_data:
        examples = held_out_choices(c, enc)
        return examples[:c.task_limit or len(examples)], f'the held-out text of {c.data}'
    path = task_file(c)
    return read_task(path, c.task_limit), path


TASK_EXAMPLE = {
    'ctx': (text, 'text', False), 'ctx_a': (text, 'text', False), 'ctx_b': (text, 'text', False),
    'endings': (lambda v: type(v) is list and len(v) >= 2 and all(map(text, v)), 'a list of 2 or more strings', True),
    'label': (integer(), 'the index of the right ending', True),
}


def read_task(path, limit=0):
    """The first `limit` (0: all) examples of a multiple-choice jsonl as [(context, endings, label)],
    or a one-line UserError naming the file and the line that is not such an example."""
    examples = []
    try:
        with open(path, encoding='utf-8') as f:
            for n, line in enumerate(f, 1):
                if limit and len(examples) == limit:
                    break
                if not line.strip():
                    continue
                try:
                    example = json.loads(line)
                except ValueError:
                    raise UserError(f'{path}, line {n}: not valid JSON')
                problem = field_problem(example, TASK_EXAMPLE)
                if not problem and 'ctx' not in example and 'ctx_a' not in example:
                    problem = 'no "ctx" (or "ctx_a") field'
                if not problem and example['label'] >= len(example['endings']):
                    problem = f'"label" is {example["label"]}, but there are {len(example["endings"])} endings'
                if not problem and not all(ending.strip() for ending in example['endings']):
                    problem = 'an ending is empty (nothing to score)'
                if problem:
                    raise UserError(f'{path}, line {n}: {problem}; each line needs "ctx" (or "ctx_a" and '
                                    '"ctx_b"), "endings" and "label", as in HellaSwag')
                context = example.get('ctx', ' '.join(p for p in (example.get('ctx_a'), example.get('ctx_b')) if p))
                examples.append((context, example['endings'], example['label']))
    except UnicodeDecodeError:
        raise UserError(f'{path}: not UTF-8 text')
    if not examples:
        raise UserError(f'{path}: no examples in it')
    return examples


def held_out_choices(c, enc, text_bytes=4 << 20):
    """--task=choices: make_choices's examples from the first 4 MB of the run's held-out text (its
    data's val shards, decoded), which training never saw."""
    if in_bucket(c.data):
        c = dataclasses.replace(c, data=fetch_data(c.data))
    splits, meta = data_files(c)
    enc = load_encoding(meta, c.data) if meta.get('tokenizer') else enc  # the data's own, to read its text
    tokens = np.concatenate([np.asarray(open_shard(p)[:text_bytes]) for p in splits['val']])[:text_bytes]
    eot = b'<|endoftext|>'
    data = enc.decode_bytes(tokens.tolist()).removeprefix(eot).replace(eot, b'\n')
    data = data[:data.rfind(b'\n', 0, text_bytes) + 1] if len(data) > text_bytes else data  # whole lines
    examples = make_choices(data.decode('utf-8', errors='replace'))
    if not examples:
        raise UserError(f'{c.data}: too little held-out text to make examples of (lines of 5 or more words)')
    return [(e['ctx'], e['endings'], e['label']) for e in examples]


def make_choices(corpus, n=1000, choices=4, seed=0):
    """Up to n HellaSwag-format examples from a text. The context is a passage of up to 300
    characters that ends inside a line, after its first words; the right ending is the rest of
    the line (4 or more words), the wrong ones are those same words in other orders. So nothing
    but knowing how words go together tells them apart: an untrained model is at chance."""
    rng = random.Random(seed)
    lines = corpus.split('\n')
    examples = []
    for i in range(1, len(lines)):  # line 0 may start mid-line (where the held-out part begins)
        words = lines[i].split(' ')
        if len(words) < 5 or len(set(words)) < 3:
            continue
        cut = rng.randrange(1, len(words) - 3)
        rest, orders = words[cut:], [words[cut:]]  # the right order first
        for _ in range(20 * choices):
            order = rng.sample(rest, len(rest))
            if len(orders) < choices and order not in orders:
                orders.append(order)
        if len(orders) < choices:
            continue
        first = i
        while first > 1 and sum(len(line) + 1 for line in lines[first - 1:i]) <= 300:
            first -= 1
        endings = [' '.join(order) for order in orders[1:]]
        label = rng.randrange(choices)
        endings.insert(label, ' '.join(rest))
        examples.append({'ctx': '\n'.join(lines[first:i] + [' '.join(words[:cut])]), 'endings': endings, 'label': label})
    return rng.sample(examples, min(n, len(examples)))


def task_rows(examples, enc, context):
    """Every (example, ending) as (tokens, first scored position): the context's tokens and then
    the ending's, joined by a space unless the context ends in whitespace, cut from the left to
    the model's context. The ending's tokens are scored."""
    rows = []
    for ctx, endings, _ in examples:
        ctx_ids = enc.encode_ordinary(ctx)
        join = '' if not ctx or ctx[-1].isspace() else ' '
        for ending in endings:
            end_ids = enc.encode_ordinary(join + ending)
            ids = (ctx_ids + end_ids)[-(context + 1):]
            rows.append((ids, len(ids) - min(len(end_ids), len(ids) - 1)))
    return rows


def score_task(params, examples, enc, c, mesh, tokens_per_device=TASK_TOKENS, what='task'):
    """acc and acc_norm of a model on [(context, endings, label)]. -> {'acc', 'acc_norm', 'examples'}"""
    rows = task_rows(examples, enc, c.context)
    logp = ending_logprob_sums(params, rows, c, mesh, tokens_per_device, what)
    counts = np.array([max(len(ids) - scored_from, 1) for ids, scored_from in rows])  # an empty ending: 1, not 0
    return choice_accuracy(logp, counts, [(len(endings), label) for _, endings, label in examples])


def ending_logprob_sums(params, rows, c, mesh, tokens_per_device, what):
    """The log-probability of each row's scored tokens, in batches of at most tokens_per_device
    tokens per device (one row at the least), with a progress line every 10 s."""
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))
    logp = np.zeros(len(rows))
    n, i, t0 = mesh.size, 0, time.time()
    last = t0

    def bucket(r):  # row r's inputs, padded to a power of two: at least 16, at most the context
        return min(c.context, 1 << max(len(rows[r][0]) - 2, 15).bit_length())

    while i < len(order):
        R = n * max(1, tokens_per_device // bucket(order[i]))
        T = bucket(order[min(i + R, len(order)) - 1])  # the longest row of the batch
        R = n * max(1, tokens_per_device // T)         # fewer rows if it is longer than the first
        chunk = order[i:i + R]
        tokens, mask = np.zeros((1, R, T + 1), np.int32), np.zeros((1, R, T), bool)
        for k, r in enumerate(chunk):
            ids, scored_from = rows[r]
            tokens[0, k, :len(ids)] = ids
            mask[0, k, scored_from - 1:len(ids) - 1] = True
        batch = place({'tokens': tokens, 'mask': mask}, {'tokens': batch_sharding(mesh, 3), 'mask': batch_sharding(mesh, 3)})
        with jax.set_mesh(mesh):
            out = score_rows(params, batch, c)
        logp[chunk] = np.asarray(out.addressable_data(0))[:len(chunk)]
        i += len(chunk)
        if time.time() - last > 10 and i < len(order):
            last = time.time()
            say(f'{what}: {i:,} of {len(order):,} endings scored ({duration(last - t0)})', flush=True)
    return logp


@partial(jax.jit, static_argnames='c')
def score_rows(params, batch, c):
    """Rows (tokens (1, R, T+1), mask (1, R, T)), split over the devices: the summed
    log-probability of each row's masked next tokens, on every device. -> (R,) fp32"""
    tokens, mask = batch['tokens'][0], batch['mask'][0]
    logits = forward(params, tokens[:, :-1], c)  # (R,T,V) fp32
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    logp = jnp.sum(jnp.where(mask, target - jax.nn.logsumexp(logits, -1), 0.0), -1)
    return shard(logp)  # whole on every device


def choice_accuracy(logp, counts, examples):
    """From each ending's summed log-probability and token count, and each example's (number of
    endings, label): the fraction picked right by the total (acc) and by the mean (acc_norm)."""
    def picks(scores, label):  # the label's score beats every other; a tie or a NaN counts as wrong
        return bool(np.all(np.delete(scores, label) < scores[label]))

    right = right_norm = i = 0
    for n, label in examples:
        right += picks(logp[i:i + n], label)
        right_norm += picks(logp[i:i + n] / counts[i:i + n], label)
        i += n
    return {'acc': right / len(examples), 'acc_norm': right_norm / len(examples), 'examples': len(examples)}


def evaluate_task(c, explicit):
    """python tinytpu.py eval: score the newest checkpoint in c.out on a multiple-choice task."""
    if c.task != 'choices' or c.task_data:
        task_file(c)  # there, before the model is loaded
    c, params, meta, enc = load_model(c, explicit)
    examples, path = task_examples(c, enc)
    mesh = device_mesh(target_devices(c))
    c, _ = choose_fsdp(c, mesh)
    params = place(params, state_shardings(c, mesh)['params'])
    step = meta.get('step')
    say(f'{c.task}: {len(examples):,} examples of {path} | step {step} of {c.out} | {mesh.size} device(s)', flush=True)
    t = time.time()
    r = score_task(params, examples, enc, c, mesh, what=c.task)
    say(f"{c.task}: acc {r['acc']:.4f} | acc_norm {r['acc_norm']:.4f} (by mean log-probability per token) | "
        f"{r['examples']:,} examples | step {step} | {time.time() - t:.1f}s")
    say(json.dumps({'task': c.task, **r, 'step': step}))


def task_scores(params, run, step):
    """--hellaswag_every: the task's scores at its steps and the last, printed, and returned as log
    fields ({} at other steps). Each pass scores at most a training microbatch's tokens per
    device: that much fits beside the optimizer state."""
    c = run.c
    if not run.task or (step % c.hellaswag_every and step != c.steps):
        return {}
    examples, enc = run.task
    micro_tokens = c.batch_size // c.grad_accum // run.mesh.size * c.seq_len
    r = score_task(params, examples, enc, c, run.mesh, min(TASK_TOKENS, max(micro_tokens, 1)), c.task)
    say(f"step {step:6d} | {c.task} acc {r['acc']:.4f} | acc_norm {r['acc_norm']:.4f} ({r['examples']:,} examples)")
    return {f'{c.task}_acc': r['acc'], f'{c.task}_acc_norm': r['acc_norm']}


# ----------------------------------------------------------------------------------------------
# Loss curves: python tinytpu.py plot --out=A[,B,...] draws each run's log.jsonl (train and val
# loss, and bits per byte and the task score where logged) against tokens seen, on a log scale.


def log_records(out):
    """The records of a run's log.jsonl (objects with a step; a line cut by a crash is skipped)."""
    path = os.path.join(out, 'log.jsonl')
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such file; --out names a training run\'s directory (train first)')
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if type(r) is dict and type(r.get('step')) is int:
                yield r


def read_log(out):
    """A run's log.jsonl as its training and evaluation records, each with its tokens seen."""
    records = [r for r in log_records(out) if 'summary' not in r and
               type(r.get('tokens', 0)) in (int, float)]  # a damaged record is skipped
    if records and any('tokens' not in r for r in records):  # logs older than the tokens field
        checkpoints = list_checkpoints(out)
        if not checkpoints:
            raise UserError(f'{os.path.join(out, "log.jsonl")} does not record tokens and {out} has no checkpoint '
                            'saying the batch size')
        saved = read_checkpoint_meta(checkpoints[-1][1])['config']
        for r in records:
            r.setdefault('tokens', r['step'] * saved['batch_size'] * saved['seq_len'])
    return records


def plot(c):
    """Write the loss curves of the runs in c.out (comma-separated) to c.plot_file."""
    runs = [out for out in c.out.split(',') if out]
    if not runs:
        raise UserError(f'--out={c.out}: name the run directories to draw, --out=A or --out=A,B')
    runs = [fetch_run(dataclasses.replace(c, out=out)).out for out in runs]  # gs://: their local copies
    path = c.plot_file or os.path.join(runs[0], 'loss.svg')
    kind = os.path.splitext(path)[1].lstrip('.').lower()
    if kind not in ('svg', 'png', 'pdf'):
        raise UserError(f'--plot_file={path}: name a .svg, .png or .pdf file')
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only, no window
        import matplotlib.pyplot as plt
        plt.rcParams['svg.fonttype'] = 'none'  # text in an SVG stays text: smaller, searchable
    except ImportError:
        raise UserError('plot needs matplotlib, an optional extra: pip install matplotlib')
    logs = {out: read_log(out) for out in runs}
    losses = [r for records in logs.values() for r in records if {'loss', 'val_loss'} & set(r)]
    if not any(type(r.get(key)) in (int, float) for r in losses for key in ('loss', 'val_loss')):
        logs_named = ' or '.join(os.path.join(out, 'log.jsonl') for out in runs)
        raise UserError(f'--out={c.out}: no loss recorded yet in {logs_named}; train for --log_every steps at least')
    panels = [('loss', 'loss (nats per token)')]
    for key, label in (('val_bpb', 'validation bits per byte'), (f'{c.task}_acc_norm', f'{c.task} acc_norm')):
        if any(key in r for records in logs.values() for r in records):
            panels.append((key, label))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for color, (out, records) in zip(itertools.cycle(plt.rcParams['axes.prop_cycle'].by_key()['color']), logs.items()):
        for ax, (key, label) in zip(axes[0], panels):
            series = [('loss', 'train', '-'), ('val_loss', 'val', '--')] if key == 'loss' else [(key, None, '-')]
            for series_key, name, style in series:
                points = [(r['tokens'], r[series_key]) for r in records
                          if type(r.get(series_key)) in (int, float) and r['tokens'] > 0]
                if points:
                    ax.plot(*zip(*points), style, color=color, marker='o' if series_key != 'loss' else None, markersize=3,
                            label=f'{out} {name}' if name else out)
    for ax, (key, label) in zip(axes[0], panels):
        if key.endswith('_acc_norm'):
            ax.axhline(0.25, color='gray', linewidth=0.8, linestyle=':', label='chance (4 endings)')
        ax.set_xscale('log')
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))  # 100k 200k 500k 1M: labels that fit
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=''))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel('tokens')
        ax.set_ylabel(label)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with written(path) as f:
            fig.savefig(f, format=kind)
    finally:
        plt.close(fig)
    say(f'wrote {path}')
    if len(runs) > 1:  # and what they ended at
        names = [out for out in c.out.split(',') if out]
        print_runs([{'run': name, **d} for name, d in zip(names, differing_settings(runs))],
                   [run_result(out) for out in runs])


# ----------------------------------------------------------------------------------------------
# Sweeps and tables of runs. `sweep` trains an ordinary run for each point of a grid: every
# setting given a comma-separated list (--lr=3e-4,1e-3,3e-3 --matrix_lr=0.005,0.02) is swept, the
# grid being their product, each point in OUT/NAME=VALUE+... (so it resumes, runs on any backend
# and in a bucket). The same command again skips the finished points and continues an interrupted
# one; its ETA fits the times of the points so far to their FLOPs. At the end: the table of the
# runs, the best point, the command for the hero run, and the validation loss against the first
# swept setting (OUT/sweep.svg), one curve per value of the others: where the good basin is, and
# whether it moved. `plot --out=A,B` prints the same table.


def sweep_grid(argv):
    """sweep's flags -> (the flags every point shares, [(setting, [values as typed])] in order)."""
    fixed, swept = [], []
    for arg in argv:
        name, _, value = arg.removeprefix('--').partition('=')
        if ',' not in value or name == 'out':
            fixed.append(arg)
            continue
        values = value.split(',')
        if not all(values) or len(set(values)) < len(values) or name in dict(swept):
            raise UserError(f'--{name}={value}: give a setting one list of distinct values, as --{name}=A,B,C')
        swept.append((name, values))
    if not swept:
        raise UserError('sweep: give at least one setting a comma-separated list of values (--lr=3e-4,1e-3,3e-3)')
    return fixed, swept


def sweep_points(flags, swept):
    """Every point of the grid as (its name, its config, its values), each checked before any of
    them trains."""
    root = make_config(flags).out
    points = []
    for values in itertools.product(*(values for _, values in swept)):
        name = '+'.join(f'{setting}={value}' for (setting, _), value in zip(swept, values))  # no comma: plot --out=A,B
        point = parse_flags([f'--{setting}={value}' for (setting, _), value in zip(swept, values)])
        out = f'{root.rstrip("/")}/{name}' if in_bucket(root) else os.path.join(root, name)
        points.append((name, validate(make_config({**flags, **point, 'out': out})), values))
    return root, points


def sweep(fixed, swept):
    """python tinytpu.py sweep: train each point not finished yet, then report."""
    flags = parse_flags(fixed)
    root, points = sweep_points(flags, swept)
    say(f'sweep: {len(points)} points ({" x ".join(str(len(v)) for _, v in swept)}) in {root}')
    # what each point's log says (a point in a bucket: train says whether it is finished)
    logged = [{} if in_bucket(c.out) else run_result(c.out, quiet=True) for _, c, _ in points]
    left = [not (r.get('finished') and r.get('steps') == c.steps) for (_, c, _), r in zip(points, logged)]
    work = [point_work(c, r.get('steps', 0)) if todo else 0 for (_, c, _), r, todo in zip(points, logged, left)]
    timed = []  # (work, seconds) of each point trained by this command
    for i, (name, c, _) in enumerate(points):
        if not left[i]:
            say(f'sweep: point {i + 1} of {len(points)}, {name}: finished before')
            continue
        eta = f' (ETA {duration(sweep_eta(timed, [w for w in work[i:] if w]))})' if timed else ''
        say(f'sweep: point {i + 1} of {len(points)}, {name}{eta}', flush=True)
        t = time.time()
        train(c, TrainingRun(c))
        timed.append((work[i], time.time() - t))
    outs = [fetch_run(c).out for _, c, _ in points]  # a bucket's: their local copies
    results = [run_result(out) for out in outs]
    grid = [values for _, _, values in points]
    print_runs([dict(zip([s for s, _ in swept], values)) for values in grid], results)
    scored = [(r['val_loss'], i) for i, r in enumerate(results) if 'val_loss' in r]
    if not scored:
        raise UserError(f'sweep: no point in {root} logged a validation loss; train for --eval_every steps at least')
    best = min(scored)[1]
    hero = 'python tinytpu.py ' + ' '.join([a for a in fixed if not a.startswith('--out=')] +
                                           [f'--{s}={v}' for (s, _), v in zip(swept, grid[best])])
    say(f'best: {points[best][0]} (val loss {results[best]["val_loss"]:.4f}); the hero run, the best values with '
        f'the other flags (raise --steps for a longer run; --out=DIR gives it its own directory):\n  {hero}')
    plot_sweep(root, swept, grid, results, flags.get('plot_file') or os.path.join(os.path.dirname(outs[0]), 'sweep.svg'))
    say(json.dumps({'sweep': root, 'best': points[best][0], 'hero': hero, 'points': [
        {'name': name, **dict(zip([s for s, _ in swept], values)), **r}
        for (name, _, values), r in zip(points, results)]}))


def point_work(c, done):
    """The training FLOPs a point has still to do after the `done` steps its log reached, which its
    time is estimated from (sweep_eta): a wider or longer point takes longer."""
    return max(c.steps - done, 0) * c.batch_size * c.seq_len * flops_per_token(c)


def sweep_eta(timed, left):
    """Seconds for the points left, given their work and the (work, seconds) of the points trained:
    seconds = a + b * work, fitted by least squares once the points trained differ in work (a point
    also starts, compiles and evaluates); before that, or if the fit says less for more work, in
    proportion to the work."""
    works, seconds = zip(*timed)
    mean_w, mean_s = sum(works) / len(works), sum(seconds) / len(seconds)
    spread = sum((w - mean_w) ** 2 for w in works)
    b = sum((w - mean_w) * (s - mean_s) for w, s in zip(works, seconds)) / spread if spread else 0
    a = mean_s - b * mean_w
    if b <= 0 or a < 0:
        a, b = 0, sum(seconds) / max(sum(works), 1)
    return sum(a + b * w for w in left)


def run_result(out, quiet=False):
    """A run's totals from its log.jsonl: its last summary (steps, tokens, seconds, dollars, the last
    validation loss), else what its last records say. {} (or a one-line error) if there is none."""
    if quiet and not os.path.isfile(os.path.join(out, 'log.jsonl')):
        return {}
    r = {}
    for record in log_records(out):
        summary = record.get('summary') if type(record.get('summary')) is dict else {}
        fields = {'steps': record['step'], 'tokens': record.get('tokens'), 'seconds': record.get('elapsed'),
                  'dollars': record.get('cost'), 'val_loss': record.get('val_loss')}
        fields.update({'seconds': summary.get('elapsed'), 'dollars': summary.get('cost'),
                       'tokens': summary.get('tokens'), 'val_loss': summary.get('val_loss')} if summary else {})
        r.update({k: v for k, v in fields.items() if type(v) in (int, float) and math.isfinite(v)})
        r['finished'] = bool(summary)
    return r


def run_settings(out):
    """The settings of a run's newest checkpoint (its config), {} if it has none."""
    for _, path in reversed(list_checkpoints(out)):
        with contextlib.suppress(CorruptCheckpoint):
            return read_checkpoint_meta(path)['config']
    return {}


def differing_settings(outs):
    """Per run, the settings (of its newest checkpoint) in which the runs differ, in name order."""
    settings = [run_settings(out) for out in outs]
    keys = sorted({k for s in settings for k in s} - {'out'} - set(USE_FIELDS))
    differ = [k for k in keys if len({json.dumps(s.get(k)) for s in settings}) > 1]
    return [{k: s.get(k, '') for k in differ} for s in settings]


def print_runs(leading, results):
    """A table: each run's leading cells (a dict: the settings that tell the runs apart), its
    final val loss, tokens, hours and dollars."""
    header = list(leading[0]) + ['val loss', 'tokens', 'hours', 'dollars']
    rows = [[str(v) for v in cells.values()] +
            [f"{r['val_loss']:.4f}" if 'val_loss' in r else '-', f"{r['tokens']:,}" if 'tokens' in r else '-',
             f"{r['seconds'] / 3600:.3f}" if 'seconds' in r else '-', dollars(r['dollars']) if 'dollars' in r else '-']
            for cells, r in zip(leading, results)]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        say('  '.join(cell.ljust(w) if i < len(leading[0]) else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))))


def plot_sweep(root, swept, grid, results, path):
    """Validation loss against the first swept setting (a log axis when its values are positive
    numbers), one curve per value of the other swept settings, into path."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        plt.rcParams['svg.fonttype'] = 'none'
    except ImportError:
        say('(no sweep plot: it needs matplotlib, an optional extra: pip install matplotlib)')
        return
    (setting, values), others = swept[0], swept[1:]
    try:
        xs = [float(v) for v in values]
    except ValueError:
        xs = list(range(len(values)))
    curves = {}
    for point, r in zip(grid, results):
        if 'val_loss' in r:
            label = ','.join(f'{s}={v}' for (s, _), v in zip(others, point[1:])) or None
            curves.setdefault(label, []).append((xs[values.index(point[0])], r['val_loss']))
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, points in curves.items():
        ax.plot(*zip(*sorted(points)), '-o', markersize=4, label=label)
    if all(x > 0 for x in xs) and len(xs) > 1 and xs != list(range(len(values))):
        ax.set_xscale('log')
    ax.set_xticks(xs, values)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f'--{setting}')
    ax.set_ylabel('final validation loss')
    ax.set_title(root, fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    if any(curves):
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with written(path) as f:
            fig.savefig(f, format=os.path.splitext(path)[1].lstrip('.').lower() or 'svg')
    finally:
        plt.close(fig)
    say(f'wrote {path}')


# ----------------------------------------------------------------------------------------------
# Export to the Hugging Face format: python tinytpu.py export --export_dir=DIR writes the newest
# checkpoint so that `transformers` loads it with no custom code (and from there vLLM, the Hub, and
# for GPT-2 tokens llama.cpp's converter). A SwiGLU model is, weight for weight, a Qwen3ForCausalLM: Llama's
# pre-norm blocks with RMSNorm, RoPE pairing entry i with i + H/2 ("rotate half"), grouped-query
# attention and a SwiGLU MLP, no biases, plus Qwen3's per-head RMSNorm of q and k. tinytpu's
# norms have no gain, so theirs are exported as ones; the vocabulary's padding rows are dropped.
# A ReLU^2 MLP is exported as the gated MLP it equals (hf_weights). The logit soft-cap has no
# standard architecture: such models are refused.
# model.safetensors is written by its published format (an 8-byte header length, a JSON header
# naming each tensor's dtype, shape and byte range, then the bytes): 20 lines that keep the
# runtime needs at four packages. The tokenizer is converted from tiktoken's: a tokenizer.json
# (byte-level BPE: tiktoken's split pattern, its vocabulary and the merges that rebuild it).

EXPORT_DTYPES = {'bfloat16': 'BF16', 'float16': 'F16', 'float32': 'F32'}  # numpy name: safetensors name


def export_problem(c):
    """Why a model cannot be exported as a standard architecture, naming the setting, or None."""
    if c.logit_softcap:
        return (f'--logit_softcap={c.logit_softcap:g}: the logit soft-cap has no place in Qwen3ForCausalLM; export takes '
                'models trained with --logit_softcap=0')
    return None


def hf_config(c, meta):
    """config.json of Qwen3ForCausalLM for this model."""
    eot = meta.get('eot_id')
    return {'architectures': ['Qwen3ForCausalLM'], 'model_type': 'qwen3', 'vocab_size': c.vocab_size,
            'hidden_size': c.d_model, 'intermediate_size': ff_dim(c), 'num_hidden_layers': c.n_layer,
            'num_attention_heads': c.n_head, 'num_key_value_heads': c.n_kv_head, 'head_dim': head_dim(c),
            'hidden_act': 'silu' if c.mlp == 'swiglu' else 'relu',  # ReLU^2 as a gated MLP: hf_weights
            'max_position_embeddings': c.context, 'rms_norm_eps': NORM_EPS,
            'rope_theta': c.rope_theta, 'rope_parameters': {'rope_type': 'default', 'rope_theta': c.rope_theta},
            'tie_word_embeddings': c.tie_embed, 'attention_bias': False, 'attention_dropout': 0.0,
            'use_sliding_window': False, 'initializer_range': 0.02, 'use_cache': True,
            'bos_token_id': eot, 'eos_token_id': eot, 'torch_dtype': c.export_dtype,
            'tinytpu': {'step': meta.get('step'), **{k: meta[k] for k in ('tokenizer', 'tokenizer_sha256', 'eot_id')
                                                     if meta.get(k) is not None}}}  # for --init_from


def hf_weights(params, c):
    """The params as Qwen3ForCausalLM's tensors, fp32: name -> array. torch's Linear weights are
    (out, in); q/k/v/o heads are laid out head after head, each of head_dim entries. Its MLP is
    gated, down(act(x gate) * (x up)): a ReLU^2 MLP is the gated one with act = ReLU and gate = up,
    as relu(a) * a = relu(a)^2 for every a."""
    L, D, N, K, H, V = c.n_layer, c.d_model, c.n_head, c.n_kv_head, head_dim(c), c.vocab_size
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    w, ones = p['layers'], lambda n: np.ones(n, np.float32)
    tensors = {'model.embed_tokens.weight': p['embed'][:V], 'model.norm.weight': ones(D)}
    for l in range(L):
        layer = f'model.layers.{l}.'
        qkv = w['qkv'][l]                                                 # (D, N+2K, H)
        tensors |= {
            layer + 'input_layernorm.weight': ones(D),
            layer + 'self_attn.q_proj.weight': qkv[:, :N].reshape(D, N * H).T,
            layer + 'self_attn.k_proj.weight': qkv[:, N:N + K].reshape(D, K * H).T,
            layer + 'self_attn.v_proj.weight': qkv[:, N + K:].reshape(D, K * H).T,
            layer + 'self_attn.q_norm.weight': ones(H), layer + 'self_attn.k_norm.weight': ones(H),
            layer + 'self_attn.o_proj.weight': w['o'][l].reshape(N * H, D).T,
            layer + 'post_attention_layernorm.weight': ones(D),
            layer + 'mlp.gate_proj.weight': w['gate' if c.mlp == 'swiglu' else 'up'][l].T,
            layer + 'mlp.up_proj.weight': w['up'][l].T,
            layer + 'mlp.down_proj.weight': w['down'][l].T,
        }
    if not c.tie_embed:
        tensors['lm_head.weight'] = p['unembed'][:, :V].T
    return tensors


def write_safetensors(path, tensors, dtype):
    """tensors (name -> array) in the safetensors format, converted to dtype (an EXPORT_DTYPES key)."""
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name, x in tensors.items():
        nbytes = x.size * jnp.dtype(dtype).itemsize
        header[name] = {'dtype': EXPORT_DTYPES[dtype], 'shape': list(x.shape), 'data_offsets': [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(',', ':')).encode()
    blob += b' ' * (-len(blob) % 8)  # the tensors start 8-byte aligned
    with open(path, 'wb') as f:
        f.write(len(blob).to_bytes(8, 'little') + blob)
        for x in tensors.values():  # little-endian, row-major
            f.write(np.ascontiguousarray(x.astype(jnp.dtype(dtype))).tobytes())


def read_safetensors(path):
    """The tensors of a model.safetensors file (as write_safetensors writes them) as fp32 arrays."""
    dtypes = {name: np.dtype(jnp.dtype(numpy_name)) for numpy_name, name in EXPORT_DTYPES.items()}
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        header, data = json.loads(f.read(n)), f.read()
    return {name: np.frombuffer(data[a:b], dtypes[t['dtype']]).reshape(t['shape']).astype(np.float32)
            for name, t in header.items() if name != '__metadata__' for a, b in [t['data_offsets']]}


def hf_settings(config):
    """A Qwen3ForCausalLM config.json that export wrote, as tinytpu's model settings."""
    return {'n_layer': config['num_hidden_layers'], 'd_model': config['hidden_size'],
            'n_head': config['num_attention_heads'], 'n_kv_head': config['num_key_value_heads'],
            'd_head': config['head_dim'], 'd_ff': config['intermediate_size'],
            'mlp': 'swiglu' if config['hidden_act'] == 'silu' else 'relu2', 'vocab_size': config['vocab_size'],
            'tie_embed': config['tie_word_embeddings'], 'rope_theta': float(config['rope_theta']), 'logit_softcap': 0.0}


def hf_params(directory, c, template):
    """The params in an export (hf_weights read backwards), in the structure of `template`; the
    vocabulary's padding rows, which export drops, are zeros. A file that is not such an export
    (other tensors, norms with gains, a gate unlike up in a ReLU^2 model) is a one-line error."""
    t = read_safetensors(os.path.join(directory, 'model.safetensors'))
    L, D, N, K, H, V = c.n_layer, c.d_model, c.n_head, c.n_kv_head, head_dim(c), c.vocab_size
    pad = lambda x, axis: np.pad(x, [(0, padded_vocab(c) - V) if a == axis else (0, 0) for a in range(x.ndim)])  # noqa: E731
    try:
        if not all((x == 1).all() for name, x in t.items() if name.endswith('norm.weight')):
            raise ValueError('its norms have gains, which tinytpu\'s model has not')
        layer = lambda l, name: t[f'model.layers.{l}.{name}.weight']  # noqa: E731
        if c.mlp == 'relu2' and any((layer(l, 'mlp.gate_proj') != layer(l, 'mlp.up_proj')).any() for l in range(L)):
            raise ValueError('a ReLU model whose gate is not its up projection')
        layers = {'qkv': np.stack([np.concatenate([layer(l, f'self_attn.{x}_proj').T.reshape(D, n, H) for x, n in
                                                   (('q', N), ('k', K), ('v', K))], axis=1) for l in range(L)]),
                  'o': np.stack([layer(l, 'self_attn.o_proj').T.reshape(N, H, D) for l in range(L)]),
                  'up': np.stack([layer(l, 'mlp.up_proj').T for l in range(L)]),
                  'down': np.stack([layer(l, 'mlp.down_proj').T for l in range(L)])}
        if c.mlp == 'swiglu':
            layers['gate'] = np.stack([layer(l, 'mlp.gate_proj').T for l in range(L)])
        params = {'layers': layers, 'embed': pad(t['model.embed_tokens.weight'], 0)}
        if not c.tie_embed:
            params['unembed'] = pad(t['lm_head.weight'].T, 1)
        flat = flatten(params)
        for name, want in flatten(template).items():
            if name not in flat or flat[name].shape != tuple(want.shape):
                raise ValueError(f'no {name} of shape {tuple(want.shape)}')
    except (KeyError, ValueError) as e:
        raise UserError(f'--init_from={directory}: not a model tinytpu exported ({str(e)[:100]})')
    return jax.tree.map(lambda x, want: x.astype(want.dtype), unflatten_like(template, flat), template)


def byte_chars():
    """The printable character that stands for each byte in a byte-level BPE vocabulary (GPT-2's
    convention, which Hugging Face's tokenizers follow): printable Latin-1 bytes stand for
    themselves, the others for the characters from U+0100 on, in order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = iter(range(0x100, 0x200))
    return {b: chr(b) if b in keep else chr(next(others)) for b in range(256)}


def bpe_merges(ranks):
    """The merges of a byte-level BPE from tiktoken's ranks (token bytes -> id): a token of 2+ bytes
    is the merge of the two parts that BPE, applying only merges of lower rank, leaves it in."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda t: t[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            i = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], math.inf))
            if ranks.get(parts[i] + parts[i + 1], math.inf) >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:  # else no merge makes it (ignore_merges still finds it whole)
            merges.append((parts[0], parts[1]))
    return merges


def hf_tokenizer(enc):
    """tokenizer.json (Hugging Face's tokenizers format) that splits and merges as tiktoken's enc."""
    chars = byte_chars()
    spell = lambda token: ''.join(chars[b] for b in token)  # noqa: E731
    ranks = enc._mergeable_ranks
    specials = [{'id': i, 'content': t, 'single_word': False, 'lstrip': False, 'rstrip': False, 'normalized': False,
                 'special': True} for t, i in sorted(enc._special_tokens.items(), key=lambda t: t[1])]
    return {'version': '1.0', 'truncation': None, 'padding': None, 'added_tokens': specials, 'normalizer': None,
            'pre_tokenizer': {'type': 'Sequence', 'pretokenizers': [
                {'type': 'Split', 'pattern': {'Regex': enc._pat_str}, 'behavior': 'Isolated', 'invert': False},
                {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': False}]},
            'post_processor': None,
            'decoder': {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': False},
            'model': {'type': 'BPE', 'dropout': None, 'unk_token': None, 'continuing_subword_prefix': None,
                      'end_of_word_suffix': None, 'fuse_unk': False, 'byte_fallback': False,
                      'ignore_merges': True,  # as tiktoken: a piece that is a token stays one
                      'vocab': {spell(t): i for t, i in ranks.items()},
                      'merges': [f'{spell(a)} {spell(b)}' for a, b in bpe_merges(ranks)]}}


def write_tokenizer(out, enc, eot, context):
    """The tokenizer files AutoTokenizer loads offline: tokenizer.json and tokenizer_config.json."""
    eot_text = enc.decode([eot]) if eot is not None else None
    with open(os.path.join(out, 'tokenizer.json'), 'w', encoding='utf-8') as f:
        json.dump(hf_tokenizer(enc), f, ensure_ascii=False)
    with open(os.path.join(out, 'tokenizer_config.json'), 'w') as f:
        json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': eot_text, 'eos_token': eot_text,
                   'pad_token': eot_text, 'model_max_length': context, 'clean_up_tokenization_spaces': False}, f, indent=1)


def export(c, explicit):
    """python tinytpu.py export: the newest checkpoint in c.out as a Hugging Face model in
    c.export_dir, written into a temporary directory beside it and renamed into place."""
    if not c.export_dir:
        raise UserError('export needs --export_dir=DIR, the directory to write the model to')
    if os.path.lexists(c.export_dir):
        raise UserError(f'--export_dir={c.export_dir} already exists; choose a new directory (nothing is overwritten)')
    c, params, meta, enc = load_model(c, explicit)
    problem = export_problem(c)
    if problem:
        raise UserError(f'{c.out}: cannot export: {problem}')
    eot = meta.get('eot_id')
    parent = os.path.dirname(os.path.abspath(c.export_dir))
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(os.path.join(parent, '.tmp_export_*')):  # what a killed export left
        pid = stale.rpartition('_')[2]
        if not (pid.isdigit() and process_alive(int(pid))):
            remove(stale)
    tmp = os.path.join(parent, f'.tmp_export_{os.getpid()}')
    os.makedirs(tmp)
    try:
        write_safetensors(os.path.join(tmp, 'model.safetensors'), hf_weights(params, c), c.export_dtype)
        files = {'config.json': hf_config(c, meta),
                 'generation_config.json': {'bos_token_id': eot, 'eos_token_id': eot, 'pad_token_id': eot}}
        for name, record in files.items():
            with open(os.path.join(tmp, name), 'w') as f:
                json.dump(record, f, indent=1)
        write_tokenizer(tmp, enc, eot, c.context)
        with open(os.path.join(tmp, 'README.md'), 'w') as f:
            f.write(model_card(c, meta))
        os.rename(tmp, c.export_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f'wrote {c.export_dir}: Qwen3ForCausalLM, {param_count(c) / 1e6:.2f}M params in {c.export_dtype} '
        f'(step {meta.get("step")} of {c.out}), tokenizer {meta["tokenizer"]}')


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        pass
    return True


def model_card(c, meta):
    """README.md of an exported model: where it came from and how to load it."""
    byte_note = ('\nThe tokenizer is `byte`: token i < 256 is byte i, token 256 is <|endoftext|>; '
                 'tokenizer.json spells this mapping out as a byte-level BPE with no merges.\n'
                 if meta['tokenizer'] == 'byte' else '')
    return (f'# {os.path.basename(os.path.normpath(c.export_dir))}\n\nA {param_count(c) / 1e6:.2f}M-parameter GPT '
            f'trained from scratch with tinytpu ({meta.get("step")} steps on `{c.data}`, tokenizer `{meta["tokenizer"]}`), '
            f'exported as Qwen3ForCausalLM: {c.n_layer} layers, d_model {c.d_model}, {c.n_head} query heads and '
            f'{c.n_kv_head} key/value heads of width {head_dim(c)}, '
            f'{"SwiGLU" if c.mlp == "swiglu" else "ReLU² (as a gated MLP: gate = up, ReLU)"} {ff_dim(c)}, context {c.context}.\n'
            f'{byte_note}\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n'
            f'tok = AutoTokenizer.from_pretrained("DIR")\nmodel = AutoModelForCausalLM.from_pretrained("DIR")\n'
            f'out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=50)\n'
            f'print(tok.decode(out[0]))\n```\n')


# ----------------------------------------------------------------------------------------------
# Command line: python tinytpu.py [train|sample|eval|plot|export|bench|plan] [--name=value ...]


def sample(c, explicit):
    """Load the newest checkpoint in c.out and print a continuation of c.prompt."""
    c, params, meta, enc = load_model(c, explicit)
    params = jax.device_put(params)
    prompt_ids = enc.encode(c.prompt, allowed_special='all')
    if not prompt_ids:
        raise UserError('--prompt is empty; give some text to continue')
    print(c.prompt, end='', flush=True)
    pending = []  # a character can span several tokens: print only what decodes cleanly
    for token in generate(params, prompt_ids, c, meta.get('eot_id')):
        pending.append(token)
        piece = enc.decode_bytes(pending)
        try:
            print(piece.decode('utf-8'), end='', flush=True)
            pending = []
        except UnicodeDecodeError:
            if len(pending) > 8:
                print(piece.decode('utf-8', errors='replace'), end='', flush=True)
                pending = []
    print()


COMMANDS = {  # what --help says of each (usage, below, reads this)
    'train': 'train a GPT, or continue the run in --out (the default command)',
    'sample': 'continue --prompt with the newest checkpoint in --out',
    'eval': 'score the newest checkpoint in --out on a multiple-choice task (--task)',
    'plot': "draw the loss curves of the runs in --out=A[,B,...] into a picture, and tabulate them",
    'sweep': 'train a run for each point of a grid (--lr=3e-4,1e-3,3e-3 ...), then compare them',
    'export': 'write the newest checkpoint in --out as a Hugging Face model (--export_dir)',
    'bench': 'time the train step here, or estimate it for a TPU slice (--topology)',
    'plan': 'turn a --budget in dollars into a compute-optimal run and its command',
}


def usage(source):
    """Print --help, read from this file's source (so it answers before JAX loads): the COMMANDS,
    then each setting (a GPTConfig or Config field) with its default and help. -> exit code 0"""
    import textwrap
    commands, presets, fields = {}, [], []
    for node in ast.parse(source).body:
        name = getattr(node, 'name', None) or getattr(getattr(node, 'targets', [None])[0], 'id', None)
        if name == 'COMMANDS':
            commands = ast.literal_eval(node.value)
        elif name == 'PRESETS':
            presets = [key.value for key in node.value.keys]
        elif name in ('GPTConfig', 'Config'):
            fields += [(f.target.id, *map(ast.literal_eval, f.value.args)) for f in node.body
                       if isinstance(f.value, ast.Call) and getattr(f.value.func, 'id', None) == 'setting']
    column, lines = 34, ['usage: python tinytpu.py [COMMAND] [--name=value ...]', '', 'commands:']
    lines += [f'  {name:<8}{what}' for name, what in commands.items()]
    lines += ['', f'settings, with their defaults (--preset={"|".join(presets)} sets groups of them; '
                  'flags given win):']
    for name, default, what in fields:
        shown = str(default).lower() if type(default) is bool else \
            default if type(default) is not str or (default.isprintable() and default.strip()) else repr(default)
        flag = f'  --{name}={shown}'
        wrapped = textwrap.wrap(what, 100 - column)
        lines += [flag] if len(flag) >= column else []
        lines += [(f'{flag:<{column}}' if i == 0 and len(flag) < column else ' ' * column) + w
                  for i, w in enumerate(wrapped)]
    try:
        print('\n'.join(lines), flush=True)
    except BrokenPipeError:  # python tinytpu.py --help | head: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv):
    if any(a in ('-h', '--help', 'help') for a in argv):
        return usage(open(__file__, encoding='utf-8').read())
    command = argv[0] if argv and not argv[0].startswith('-') else 'train'
    args = argv[1:] if argv and argv[0] == command else argv
    c = None
    try:
        if command not in COMMANDS:
            raise UserError(f'unknown command {command!r}: use {", ".join(COMMANDS)} (or --help)')
        fixed, swept = sweep_grid(args) if command == 'sweep' else (args, None)
        flags = parse_flags(fixed)
        if flags.get('topology'):
            if command != 'bench':
                raise UserError(f'--topology is for bench (python tinytpu.py bench --topology={flags["topology"]})')
            jax.config.update('jax_platforms', 'cpu')  # compile only: leave any TPU here to others
        if flags.get('cpu_devices', 1) < 1:  # used before validate: JAX takes it at start-up
            raise UserError(f'--cpu_devices={flags["cpu_devices"]} must be at least 1')
        skip_absent_tpu()
        use_cpu_devices(flags.get('cpu_devices', Config.cpu_devices))
        init_distributed(flags)
        c = validate(make_config(flags, plan_backend(flags) if command == 'plan' else None))
        if command == 'train':
            train(c, TrainingRun(c))
        elif command == 'bench':
            bench(c)
        elif command == 'plan':
            plan(c)
        elif command == 'plot':
            plot(c)
        elif command == 'sweep':
            sweep(fixed, swept)
        elif command == 'eval':
            evaluate_task(fetch_run(c), set(flags) - set(MODEL_FIELDS))
        elif command == 'export':
            export(fetch_run(c), set(flags) - set(MODEL_FIELDS))
        else:
            sample(fetch_run(c), set(flags) - set(MODEL_FIELDS))
    except (UserError, PrepareError) as e:
        print(f'error: {e}', file=sys.stderr)
        return getattr(e, 'code', 2)
    except Preempted as e:
        message, signum = e.args
        print(message, file=sys.stderr)
        return 128 + signum
    except KeyboardInterrupt:
        print('\ninterrupted; the last checkpoint in --out is intact', file=sys.stderr)
        return 130
    except BrokenPipeError:  # sample | head: the reader has all it wanted
        drop_output(sys.stdout)
        return 0
    except OSError as e:  # a file the user named or made: missing, a directory, not allowed, disk full
        if not e.filename:
            raise
        print(f'error: {e.filename}: {e.strerror}', file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:
        if not out_of_memory(e):
            raise
        accum = getattr(c, 'grad_accum', 1)
        print(f'error: out of memory on the {jax.default_backend().upper()} ({str(e).splitlines()[0][:160]}); '
              f'split each step into more microbatches (--grad_accum={2 * accum}, now {accum}), '
              'train on more chips (FSDP splits params and optimizer state), or shrink --batch_size or the '
              'model; the last checkpoint in --out is intact', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    stop_on_interrupt()
    sys.exit(main(sys.argv[1:]))
