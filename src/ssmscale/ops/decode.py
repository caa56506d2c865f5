"""Fused decoding on the CPU: decode_cpu.c via ctypes, one C call per decoded token.

- `step(mixer, u, cache)` advances one token through a Mamba or Mamba-2 mixer: its whole step
  (projections, conv, state update, gate, norm) in one C call, conv and SSM state updated in place.
  `block_step` is the mixers' hook for the whole block (models/block.py), the block's pre-norm folded into
  the same call.
- Each returns None where the fused call does not apply: gradients wanted, a tensor not fp32 on the CPU,
  the kernel missing (SSMSCALE_NO_FUSED_STEP=1 turns it off). The definition is the modules: each mixer's
  `step_reference`, the attention's forward with a cache.
- `ssm_call` / `attention_call` bind a layer's step to its cache tensors (a `LayerCall`); an attention block's
  step is Transformer++'s layer with its SwiGLU branch, or the hybrid's attention layer, its keys and values
  written into the KV cache. `Chain` runs a model's calls and its final norm and tied head as ONE C call per
  token (chain_step: one parallel region; models/lm.py builds and checks it), optionally reading bf16 copies
  of the projection weights.
- The calls' fixed parts (weight pointers, sizes, threads) are built once per module and reused while the
  weights stay the same tensors: at batch 1 the Python around a call costs as much as a small layer's
  arithmetic.
"""

from __future__ import annotations

import ctypes
import weakref
from pathlib import Path

import torch

from . import cbuild

DISABLE_ENV = "SSMSCALE_NO_FUSED_STEP"
SOURCE = Path(__file__).with_name("decode_cpu.c")
_MIN_WEIGHTS_PER_THREAD = 1 << 16    # a projection smaller than this runs on one thread


class _Args(ctypes.Structure):
    """Mirror of StepArgs in decode_cpu.c."""
    _fields_ = ([(n, ctypes.c_int64) for n in ("kind", "batch", "d_model", "d_inner", "d_state", "d_conv", "dt_rank",
                                               "heads", "groups", "n_threads", "bf16")]
                + [("eps", ctypes.c_double), ("pre_w", ctypes.c_void_p), ("pre_eps", ctypes.c_double)]
                + [(n, ctypes.c_void_p) for n in ("u", "in_w", "conv_w", "conv_b", "x_w", "dt_w", "dt_b", "A_log", "D",
                                                  "norm_w", "out_w", "conv_state", "ssm_state", "out", "work")])


class _AttnArgs(ctypes.Structure):
    """Mirror of AttnArgs in decode_cpu.c."""
    _fields_ = ([(n, ctypes.c_int64) for n in ("batch", "d_model", "heads", "head_dim", "max_len", "pos", "d_ff",
                                               "n_threads", "bf16")]
                + [("eps", ctypes.c_double), ("mlp_eps", ctypes.c_double)]
                + [(n, ctypes.c_void_p) for n in ("u", "norm_w", "qkv_w", "out_w", "cos_row", "sin_row", "k_cache",
                                                  "v_cache", "mlp_norm_w", "gate_w", "up_w", "down_w", "out", "work")])


class _HeadArgs(ctypes.Structure):
    """Mirror of HeadArgs in decode_cpu.c."""
    _fields_ = ([(n, ctypes.c_int64) for n in ("batch", "d_model", "vocab")] + [("eps", ctypes.c_double)]
                + [(n, ctypes.c_void_p) for n in ("x", "norm_w", "emb", "normed", "logits")])


_state: dict = {}


def load():
    """The library, or None (`unavailable_reason()` then says why); tried once per process."""
    if "lib" not in _state:
        lib, reason = cbuild.load(SOURCE, DISABLE_ENV)
        if lib is not None:
            lib.mixer_step.argtypes = [ctypes.POINTER(_Args)]
            lib.mixer_step.restype = ctypes.c_int
            lib.chain_step.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p),
                                       ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(_HeadArgs),
                                       ctypes.POINTER(ctypes.c_int64)]
            lib.chain_step.restype = ctypes.c_int
        _state.update(lib=lib, reason=reason)
    return _state["lib"]


def unavailable_reason() -> str | None:
    load()
    return _state["reason"]


_prepared: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # mixer -> (weight pointers, _Args)


def fp32_cpu(tensors) -> bool:
    """Whether every tensor is an fp32 contiguous CPU tensor: what the C code reads."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def _threads_for(weight) -> int:
    """Threads for a call whose largest projection is `weight`: torch's count, fewer for a small one."""
    return max(1, min(torch.get_num_threads(), weight.numel() // _MIN_WEIGHTS_PER_THREAD))


def _is_mamba2(mixer) -> bool:
    """A Mamba-2 mixer (its dt bias is a parameter of its own; Mamba's is dt_proj's): told by its parts, since
    ops/ does not import models/."""
    return hasattr(mixer, "dt_bias")


def _weights(mixer) -> dict:
    """The mixer's tensors the kernel reads, by StepArgs field."""
    w = dict(in_w=mixer.in_proj.weight, conv_w=mixer.conv1d.weight, conv_b=mixer.conv1d.bias, A_log=mixer.A_log,
             D=mixer.D, out_w=mixer.out_proj.weight)
    if _is_mamba2(mixer):
        w.update(dt_b=mixer.dt_bias, norm_w=mixer.norm.weight)
    else:
        w.update(x_w=mixer.x_proj.weight, dt_w=mixer.dt_proj.weight, dt_b=mixer.dt_proj.bias)
    return w


def _prepare(mixer):
    """The call's fixed part, built once per mixer and set of weights (a new weight tensor, e.g. after .to(),
    rebuilds it): None where the weights are not fp32 contiguous CPU tensors or the kernel is missing."""
    weights = _weights(mixer)
    key = (*(t.data_ptr() for t in weights.values()), torch.get_num_threads())
    have = _prepared.get(mixer)
    if have is not None and have[0] == key:
        return have[1]
    args = None
    if load() is not None and fp32_cpu(weights.values()):
        args = _Args(d_model=mixer.in_proj.weight.shape[1], d_state=mixer.d_state, d_conv=mixer.d_conv,
                     **{k: t.data_ptr() for k, t in weights.items()})
        args.n_threads = _threads_for(mixer.in_proj.weight)
        if _is_mamba2(mixer):
            args.kind, args.d_inner, args.heads, args.groups, args.eps = (2, mixer.d_inner, mixer.heads, mixer.groups,
                                                                          mixer.norm.eps)
        else:
            args.kind, args.d_inner, args.dt_rank = 1, mixer.d_inner, mixer.dt_rank
    _prepared[mixer] = (key, args)
    return args


def supported(mixer, u, cache) -> bool:
    """Whether `step` takes this call: fp32 CPU tensors, no gradient wanted, the kernel built."""
    if torch.is_grad_enabled() and (u.requires_grad or any(p.requires_grad for p in mixer.parameters())):
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (u, cache.conv, cache.ssm)):
        return False
    return cache.conv.is_contiguous() and cache.ssm.is_contiguous() and _prepare(mixer) is not None


def _ssm_work(mixer, args, batch) -> int:
    """Floats of scratch mixer_step needs for `batch` rows (see StepArgs.work in decode_cpu.c)."""
    width, e, d = mixer.in_proj.weight.shape[0], args.d_inner, args.d_model
    middle = args.dt_rank + 2 * args.d_state if args.kind == 1 else 2 * args.groups * args.d_state
    return batch * (width + e + middle + e + d)


def step(mixer, u, cache, norm=None):
    """One token through `mixer` (MambaMixer or Mamba2Mixer): u (batch, 1, d) -> (batch, 1, d), or None
    where the fused step does not apply (see `supported`; the caller then runs the mixer's own step).
    With `norm` (the block's RMSNorm), u is the block's input and the result u + mixer(norm(u)): the
    whole block in the one call."""
    if not supported(mixer, u, cache) or (norm is not None and not (
            norm.weight.dtype == torch.float32 and norm.weight.device.type == "cpu")):
        return None
    args = _prepared[mixer][1]
    batch, d = u.shape[0], u.shape[-1]
    u = u.reshape(batch, d).contiguous()
    out = torch.empty(batch, 1, d)
    work = torch.empty(_ssm_work(mixer, args, batch))
    args.batch, args.u, args.out, args.work = batch, u.data_ptr(), out.data_ptr(), work.data_ptr()
    args.pre_w, args.pre_eps = (None, 0.0) if norm is None else (norm.weight.data_ptr(), norm.eps)
    args.conv_state, args.ssm_state = cache.conv.data_ptr(), cache.ssm.data_ptr()
    code = load().mixer_step(ctypes.byref(args))
    args.u = args.out = args.work = args.conv_state = args.ssm_state = args.pre_w = None   # nothing dangling
    if code != 0:
        raise RuntimeError("fused decoding step failed")
    cache.pos += 1
    return out


def block_step(mixer, x, cache, norm):
    """One decoded token through a whole block, x + mixer(norm(x)), in one call: the Mamba and Mamba-2
    mixers' `block_step` (models/block.py); None before a prompt is in the cache or where `step` does not apply."""
    return step(mixer, x, cache, norm=norm) if cache.pos > 0 else None


def _attention_work(args, batch, positions) -> int:
    """Floats of scratch an attention layer needs for `batch` rows attending over `positions` (AttnArgs.work)."""
    width = args.heads * args.head_dim
    return batch * (2 * args.d_model + 4 * width + args.heads * positions + 2 * args.d_ff)


# ---- a whole stack of fused layers per decoded token (models/lm.py) ----

class LayerCall:
    """One block's decoding step bound to its cache's tensors: its kind for chain_step (1 Mamba, 2 Mamba-2,
    3 attention), its arguments (fixed but for the input, output and scratch pointers the chain sets once, and for
    an attention layer the position and rotary rows it sets per token; n_threads among them) and the floats of
    scratch it needs. It holds no reference to the cache object."""
    __slots__ = ("kind", "args", "rope", "work", "keep")

    def __init__(self, kind, args, rope, work, keep=()):
        self.kind, self.args, self.rope, self.work = kind, args, rope, work
        self.keep = keep          # tensors the pointers point into (bf16 copies of the weights)


WEIGHTS = ("fp32", "bf16")
_PROJECTIONS = ("in_w", "x_w", "dt_w", "out_w", "qkv_w", "gate_w", "up_w", "down_w")


def _in_bf16(args, weights: str, tensors: dict) -> tuple:
    """With weights="bf16", point the call's projection weights (`tensors`, by argument field) at bf16 copies,
    rounded to nearest even as torch converts; the copies are returned, to be kept alive with the call. Norms,
    conv, A, D and the dt bias stay fp32."""
    if weights not in WEIGHTS:
        raise ValueError(f"decode weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    if weights == "fp32":
        return ()
    names = [name for name in _PROJECTIONS if name in tensors]
    keep = tuple(tensors[name].to(torch.bfloat16).contiguous() for name in names)
    for name, copy in zip(names, keep):
        setattr(args, name, copy.data_ptr())
    args.bf16 = 1
    return keep


def block_call(mixer, cache, norm, norm_mlp=None, mlp=None, weights="fp32"):
    """The Mamba and Mamba-2 mixers' `decode_call` (models/block.py): their block has no MLP."""
    return ssm_call(mixer, cache, norm, weights) if mlp is None else None


def ssm_call(mixer, cache, norm, weights="fp32"):
    """A Mamba or Mamba-2 block's step (norm, mixer, residual) bound to `cache`, or None where it does not apply."""
    if not (fp32_cpu((cache.conv, cache.ssm, norm.weight)) and cache.pos > 0):
        return None
    base = _prepare(mixer)
    if base is None:
        return None
    args = _Args.from_buffer_copy(base)
    args.batch, args.pre_w, args.pre_eps = cache.ssm.shape[0], norm.weight.data_ptr(), norm.eps
    args.conv_state, args.ssm_state = cache.conv.data_ptr(), cache.ssm.data_ptr()
    keep = _in_bf16(args, weights, _weights(mixer))
    return LayerCall(args.kind, args, None, _ssm_work(mixer, args, args.batch), keep)


def attention_call(attn, cache, norm, cos, sin, norm_mlp=None, mlp=None, weights="fp32"):
    """An attention block's step (with the SwiGLU branch where `mlp` is given) bound to its KV cache, or None
    where it does not apply (a tensor not fp32 on the CPU, no prompt in the cache, the kernel missing).
    cos, sin: the rotary tables (positions, head_dim), covering every position of the cache."""
    tensors = dict(norm_w=norm.weight, qkv_w=attn.qkv.weight, out_w=attn.out_proj.weight)
    if mlp is not None:
        tensors.update(mlp_norm_w=norm_mlp.weight, gate_w=mlp.w_gate.weight, up_w=mlp.w_up.weight,
                       down_w=mlp.w_down.weight)
    if load() is None or cache.pos == 0 or cos.shape[0] < cache.k.shape[2] or \
            not fp32_cpu((*tensors.values(), cache.k, cache.v, cos, sin)):
        return None
    args = _AttnArgs(batch=cache.k.shape[0], d_model=attn.qkv.weight.shape[1], heads=attn.n_head,
                     head_dim=attn.head_dim, max_len=cache.k.shape[2], n_threads=_threads_for(attn.qkv.weight),
                     d_ff=0 if mlp is None else mlp.w_gate.weight.shape[0], eps=norm.eps,
                     mlp_eps=0.0 if mlp is None else norm_mlp.eps, k_cache=cache.k.data_ptr(),
                     v_cache=cache.v.data_ptr(), **{k: t.data_ptr() for k, t in tensors.items()})
    row = cos.stride(0) * cos.element_size()
    rope = (cos.data_ptr(), sin.data_ptr(), row, cos, sin)        # the tables kept alive with the call
    keep = _in_bf16(args, weights, tensors)
    return LayerCall(3, args, rope, _attention_work(args, args.batch, args.max_len), keep)


SOLO_TOKENS, BUSY_TOKENS = 64, 3


class Chain:
    """Single-token decoding through a stack of bound layer calls with fixed buffers, and the LM's final norm and
    tied head: per token one copy in and one C call (chain_step) that runs every layer and the head in one
    parallel region (layer i reads one buffer and writes the other), no framework op between them. The caller
    checks the chain still matches the model's weights and the caches it is given (models/lm.py)."""

    def __init__(self, calls, batch, d_model, norm_w, eps, embedding):
        self.calls = calls
        self.bufs = [torch.empty(batch, d_model), torch.empty(batch, d_model)]
        self.work = torch.empty(max(max(c.work for c in calls), batch * d_model))
        for i, c in enumerate(calls):
            c.args.u, c.args.out = self.bufs[i % 2].data_ptr(), self.bufs[(i + 1) % 2].data_ptr()
            c.args.work = self.work.data_ptr()
        self.attention = [(i, c) for i, c in enumerate(calls) if c.rope is not None]
        self.kinds = (ctypes.c_int64 * len(calls))(*(c.kind for c in calls))
        self.args = (ctypes.c_void_p * len(calls))(*(ctypes.addressof(c.args) for c in calls))
        self.threads = max(c.args.n_threads for c in calls)
        self.slept, self.solo, self.busy = ctypes.c_int64(0), 0, 0
        self.logits = torch.empty(batch, 1, embedding.shape[0])
        self.head = _HeadArgs(batch=batch, d_model=d_model, vocab=embedding.shape[0], eps=eps,
                              x=self.bufs[len(calls) % 2].data_ptr(), norm_w=norm_w.data_ptr(),
                              emb=embedding.data_ptr(), normed=self.work.data_ptr(), logits=self.logits.data_ptr())
        self.head_ref = ctypes.pointer(self.head)
        self.fn = load().chain_step

    def __call__(self, x, caches):
        """x (batch, 1, d_model), the embedded token -> its logits (batch, 1, vocab); each layer's cache (the ones
        the calls were bound to, in order) advances by one."""
        for i, c in self.attention:
            pos = caches[i].pos
            if pos >= c.args.max_len:
                raise ValueError(f"KV cache full: {pos} + 1 > max_len {c.args.max_len}")
            c.args.pos, c.args.cos_row, c.args.sin_row = pos, c.rope[0] + pos * c.rope[2], c.rope[1] + pos * c.rope[2]
        self.bufs[0].copy_(x.reshape(self.bufs[0].shape))
        threads = 1 if self.solo else self.threads
        if self.fn(self.kinds, self.args, len(self.calls), threads, self.head_ref, ctypes.byref(self.slept)) != 0:
            raise RuntimeError("fused decoding step failed")
        # More barrier waits that had to sleep than layers, BUSY_TOKENS tokens in a row: the threads are not
        # getting their cores (a busy machine: there nearly every wait sleeps; alone a token sleeps 0-1 times, a
        # stray one tens), and a team waits for its slowest member at every barrier. Decode the next SOLO_TOKENS
        # tokens on one thread, then try the team again. The split never changes a result (rows and channels).
        if self.solo:
            self.solo -= 1
        else:
            self.busy = self.busy + 1 if self.slept.value > len(self.calls) else 0
            if self.busy >= BUSY_TOKENS:
                self.solo, self.busy = SOLO_TOKENS, 0
        for cache in caches:
            cache.pos += 1
        return self.logits.clone()
