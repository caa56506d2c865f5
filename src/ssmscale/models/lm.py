"""One language-model shell for every family: embed -> n x block -> RMSNorm -> tied LM head.

Layer i is a Block (models/block.py) of kind cfg.layer_kinds[i]: the kind's mixer, built as
`Mixer(d_model, **options)`, behind a pre-norm residual, with Transformer++'s SwiGLU branch after it where
the kind has one. The four built-in families and any plugin go through this one path; a kind only says
which mixer, which options and whether the MLP follows (LAYERS).

Blocks keep their own residual: the residual stream stays fp32 (params are fp32; under bf16
autocast the branch outputs are added back into the fp32 stream). The embedding is padded to a
multiple of 8 rows; logits cover the padded vocabulary (the extra rows are never targets).
"""

from __future__ import annotations

import math
import operator
import weakref

import torch
import torch.nn as nn

from ..ops import decode

from .block import Block, LayerSpec
from .config import ModelConfig
from .hybrid import attention_layer
from .mamba import mamba_layer
from .mamba2 import mamba2_layer
from .norm import RMSNorm
from .plugin import load_mixer_class
from .transformer import SwiGLU, transformer_layer


def plugin_layer(cfg: ModelConfig) -> LayerSpec:
    """A plugin family's layer: its mixer (imported here: code execution, on purpose), then the MLP if asked."""
    return LayerSpec(load_mixer_class(cfg.mixer.target), dict(cfg.mixer.options), mlp=cfg.mixer.mlp)


LAYERS = {"transformer": transformer_layer, "attention": attention_layer, "mamba": mamba_layer,
          "mamba2": mamba2_layer, "plugin": plugin_layer}


def build_block(cfg: ModelConfig, kind: str, spec: LayerSpec | None = None) -> Block:
    spec = spec or LAYERS[kind](cfg)
    mixer = spec.mixer(cfg.d_model, **spec.options)     # built before the MLP: the order weights are drawn in
    mlp = SwiGLU(cfg.d_model, cfg.ffn_dim, cfg.init_std) if spec.mlp else None
    return Block(kind, mixer, cfg.d_model, cfg.norm_eps, mlp, spec.names)


class LM(nn.Module):
    # Precision of the projection weights a decoded token reads, after the prompt: "fp32" (the model's own), or
    # "bf16" (copies rounded once; halves the bytes batch-1 decoding must stream; results move by bf16 rounding).
    # Only the fused chain decodes in bf16: a model whose layers cannot form one raises rather than run fp32.
    decode_weights: str = "fp32"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        specs = {kind: LAYERS[kind](cfg) for kind in dict.fromkeys(cfg.layer_kinds)}
        self.blocks = nn.ModuleList(build_block(cfg, kind, specs[kind]) for kind in cfg.layer_kinds)
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        cfg = self.cfg
        nn.init.normal_(self.embedding.weight, std=cfg.init_std)
        for block in self.blocks:
            block.reset_parameters()
            # GPT-2 / Mamba: scale each residual branch's output projection by 1/sqrt(#branches)
            scale = 1.0 / math.sqrt(block.residual_branches * cfg.n_layer)
            for w in block.residual_out_projections():
                w.mul_(scale)

    def forward(self, tokens, cache=None):
        """tokens (batch, L) int64 -> logits (batch, L, padded_vocab).

        With `cache` (from `allocate_cache`), the tokens continue the cached sequence. One token after the
        prompt, where every layer has a fused step, runs the stack as one chain of C calls (ops/decode.py)."""
        x = self.embedding(tokens)
        if cache is not None and tokens.shape[1] == 1 and all(getattr(c, "pos", 0) > 0 for c in cache):
            chain = self._decode_chain(cache)
            if chain is not None:
                return chain(x, cache)
            if self.decode_weights != "fp32":
                raise ValueError(f"decode_weights {self.decode_weights!r} needs every layer's fused decoding step "
                                 "(built-in families, fp32 CPU tensors, no gradients); set decode_weights = 'fp32'")
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])
        return self.norm_f(x) @ self.embedding.weight.t()

    def _decode_chain(self, cache):
        """The chain of fused layer calls bound to `cache`, built once per cache and reused while the weights and
        the cache tensors stay where they were; None where a layer has no fused step, gradients are wanted, or
        the chain cannot be built (then the blocks run one by one)."""
        if not cache or len(cache) != len(self.blocks):
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return None
        head = cache[0]
        if not _weakrefable(head):
            return None
        if not all(hasattr(c, "pointers") for c in cache):
            return None          # (a plugin's cache: no fused step to chain)
        have = _CHAINS.get(head)
        if have is not None and have[0]() is not self:
            have = None          # (the cache was decoded by another model)
        # where every parameter lies, read through the modules' own tables (cheaper than parameters() per token):
        # a moved or replaced weight rebuilds the chain
        slots = have[3] if have is not None else [(m._parameters, n) for m in self.modules()
                                                        for n, p in m._parameters.items() if p is not None]
        # bf16 decoding reads copies made when the chain was built: a weight changed in place since (a reload, an
        # optimizer step; each bumps the tensor's version counter) rebuilds it too. fp32 chains read the weights.
        tensors = [d[n] for d, n in slots]
        versions = () if self.decode_weights == "fp32" else tuple(map(_VERSION, tensors))
        key = (tuple(map(torch.Tensor.data_ptr, tensors)), versions, tuple(c.pointers() for c in cache),
               torch.get_num_threads(), self.decode_weights)
        if have is not None and have[1] == key:
            return have[2]
        calls = [block.decode_call(c, self.decode_weights) for block, c in zip(self.blocks, cache)]
        chain = None
        if all(c is not None for c in calls) and decode.fp32_cpu((self.norm_f.weight, self.embedding.weight)):
            chain = decode.Chain(calls, batch=_batch_of(head), d_model=self.cfg.d_model, norm_w=self.norm_f.weight,
                                 eps=self.norm_f.eps, embedding=self.embedding.weight)
        _CHAINS[head] = (weakref.ref(self), key, chain, slots)
        return chain

    @property
    def can_generate(self) -> bool:
        """Whether every layer's mixer has a cache to continue a sequence with (a plugin may have none)."""
        return all(b.can_generate for b in self.blocks)

    def allocate_cache(self, batch: int, max_len: int, dtype=None, device=None):
        """Per-layer generation state: a KV cache (attention) or conv + SSM state (Mamba, Mamba-2), or
        whatever a plugin mixer's allocate_cache returns."""
        p = self.embedding.weight
        return [b.allocate_cache(batch, max_len, dtype or p.dtype, device or p.device) for b in self.blocks]

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0, generator=None):
        """Greedy (temperature 0) or sampled continuation of `prompt` (batch, L0), using the cache."""
        cache = self.allocate_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        logits = self(prompt, cache)[:, -1]
        out = [prompt]
        for _ in range(max_new_tokens):
            logits = logits[:, : self.cfg.vocab_size].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            logits = self(nxt, cache)[:, -1]
        return torch.cat(out, dim=1)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding.weight.numel() if non_embedding else n

    @property
    def chunked_prefill(self) -> bool:
        """Whether a piece of several tokens may follow the prompt in the cache (Mamba-1 takes one at a time)."""
        return all(getattr(b, "chunked_prefill", False) for b in self.blocks)


_VERSION = operator.attrgetter("_version")      # a tensor's in-place change counter
_CHAINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # first layer's cache -> (model, key, chain, slots)


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False


def _batch_of(c) -> int:
    return next(t.shape[0] for t in vars(c).values() if isinstance(t, torch.Tensor))


def kernel_impl(cfg: ModelConfig, device: str) -> str | None:
    """The sequence-mixing kernels `cfg` runs on `device`, as recorded in results: the selective scan's
    implementation for Mamba layers, "ssd-<impl>" for Mamba-2 layers, the fused SSD's form included
    ("ssd-fused-recurrent"; None for attention only)."""
    kinds = set(cfg.layer_kinds)
    names = []
    if "plugin" in kinds:
        names.append(f"plugin-{cfg.mixer.class_name}")
    if "mamba" in kinds:
        from ..ops.scan import resolve_impl
        names.append(resolve_impl(cfg.scan_impl, device).name)
    if "mamba2" in kinds:
        from ..ops.ssd import resolve_ssd_impl
        shape = (cfg.mamba2_head_dim, cfg.mamba2_d_state)
        names.append(f"ssd-{resolve_ssd_impl(cfg.ssd_impl, device, shape)}")
    return "+".join(names) or None

def state_bytes(cfg: ModelConfig, batch: int = 1, max_len: int = 1) -> int | None:
    """Bytes of the generation state `LM.allocate_cache` holds for `max_len` tokens (fp32 weights):
    the KV cache of attention layers, the conv and SSM state of recurrent ones, whatever mix the
    family's blocks allocate. Built on the meta device, so nothing is allocated. None for a model that
    cannot generate (a plugin mixer without allocate_cache)."""
    with torch.device("meta"):
        model = LM(cfg)
        if not model.can_generate:
            return None
        cache = model.allocate_cache(batch, max_len, dtype=torch.float32, device="meta")
    return _tensor_bytes(cache)


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable from obj (tensors, lists, tuples, dicts, objects' attributes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(_tensor_bytes(v) for v in vars(obj).values())
    return 0
