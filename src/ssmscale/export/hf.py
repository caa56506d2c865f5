"""Hugging Face export: a finished run becomes a folder that transformers loads as a model equal to it.

Each family goes to the transformers class with the very same structure (read from transformers' own
modeling code, 5.x), weights renamed by state_dict key (not by module attribute, so a refactor of our
module tree that keeps the keys keeps the export):

  transformer -> LlamaForCausalLM: pre-norm RMSNorm, RoPE in the half-split (GPT-NeoX/Llama) layout with
                 theta = rope_base, SDPA, SwiGLU, no biases, tied head; our fused qkv is split in three
                 (rows q | k | v, heads consecutive within each, which is Llama's q/k/v_proj layout).
  mamba       -> MambaForCausalLM: intermediate = expand x d_model, dt_rank, conv bias, A = -exp(A_log),
                 D, dt_proj bias as the scan's delta bias with softplus; tied head.
  mamba2      -> Mamba2ForCausalLM where heads x head_dim = expand x d_model (Mamba2Config derives the
                 inner width from expand and refuses anything else); otherwise (the ladder rounds the
                 head count, e.g. d_model 90: 23 heads of 8 = 184, not 180) NemotronHForCausalLM with
                 every layer a Mamba-2 layer, whose inner width is mamba_num_heads x mamba_head_dim.
                 NemotronH has no tied head: its lm_head is written as a copy of the embedding (equal
                 logits; a fine-tune there would untie them).
Both Mamba-2 classes: conv over x, B, C with bias, A = -exp(A_log) per head, D per head, dt_bias with
softplus and no clamp (time_step_limit (0, inf)), gated RMSNorm of y * silu(z) over groups of
d_inner / ngroups channels, the model's norm_eps everywhere.

Equal means: in fp32 the logits agree to rounding. Every export loads the written folder back with
AutoModelForCausalLM and compares its logits with ours on a fixed batch; above MAX_REL_DIFF nothing is
written. In bf16 they differ at bf16 rounding: our residual stream stays fp32 under autocast, as
Mamba's and Mamba-2's residual_in_fp32 keeps theirs, while Llama's and NemotronH's residual is in the
model's dtype. The embedding keeps its padding to a multiple of 8 rows (logits over the padded
vocabulary, as in training); generation_config suppresses the padded ids, as our generate() does.

The hybrid (and any other family) is refused: no transformers class has its structure (see
`refusal`). transformers is imported inside the functions that need it, so a refusal is instant.
"""

from __future__ import annotations

import re

from ..models.config import ModelConfig

MAX_REL_DIFF = 1e-4          # max |ours - theirs| / max |ours| over the check batch's logits
CHECK_BATCH, CHECK_LEN = 2, 64

_NOT_EXACT = {
    "hybrid": "no transformers class has the hybrid's structure: NemotronH stacks Mamba-2 and "
              "attention-only layers like it but its attention has no RoPE; Bamba, Jamba, FalconH1, Zamba2 "
              "and GraniteMoeHybrid put an MLP in every layer (or share or parallelise blocks)",
}

_LLAMA_KEYS = [
    (r"embedding\.weight", ["model.embed_tokens.weight"]),
    (r"norm_f\.weight", ["model.norm.weight"]),
    (r"blocks\.(\d+)\.norm_attn\.weight", [r"model.layers.\1.input_layernorm.weight"]),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", [r"model.layers.\1.self_attn.q_proj.weight",
                                           r"model.layers.\1.self_attn.k_proj.weight",
                                           r"model.layers.\1.self_attn.v_proj.weight"]),
    (r"blocks\.(\d+)\.attn\.out_proj\.weight", [r"model.layers.\1.self_attn.o_proj.weight"]),
    (r"blocks\.(\d+)\.norm_mlp\.weight", [r"model.layers.\1.post_attention_layernorm.weight"]),
    (r"blocks\.(\d+)\.mlp\.w_gate\.weight", [r"model.layers.\1.mlp.gate_proj.weight"]),
    (r"blocks\.(\d+)\.mlp\.w_up\.weight", [r"model.layers.\1.mlp.up_proj.weight"]),
    (r"blocks\.(\d+)\.mlp\.w_down\.weight", [r"model.layers.\1.mlp.down_proj.weight"]),
]


def _ssm_keys(prefix: str) -> list:
    """Mamba, Mamba-2 and NemotronH name the mixer's parameters as we do; only the trunk is renamed."""
    return [
        (r"embedding\.weight", [f"{prefix}.embeddings.weight"]),
        (r"norm_f\.weight", [f"{prefix}.norm_f.weight"]),
        (r"blocks\.(\d+)\.norm\.weight", [rf"{prefix}.layers.\1.norm.weight"]),
        (r"blocks\.(\d+)\.mixer\.(.+)", [rf"{prefix}.layers.\1.mixer.\2"]),
    ]


def mamba2_fits_mamba2_class(cfg: ModelConfig) -> bool:
    return cfg.mamba2_d_inner == cfg.expand * cfg.d_model


def refusal(cfg: ModelConfig) -> str | None:
    """Why `cfg` cannot be exported exactly (None: it can)."""
    if cfg.family in ("transformer", "mamba", "mamba2"):
        return None
    why = _NOT_EXACT.get(cfg.family, "no transformers class is known to have its structure")
    return f"family {cfg.family}: not exportable to Hugging Face ({why})"


def class_name(cfg: ModelConfig) -> str:
    if cfg.family == "transformer":
        return "LlamaForCausalLM"
    if cfg.family == "mamba":
        return "MambaForCausalLM"
    return "Mamba2ForCausalLM" if mamba2_fits_mamba2_class(cfg) else "NemotronHForCausalLM"


def hf_config(cfg: ModelConfig, separator_id: int, seq_len: int):
    """The transformers config of the class that expresses `cfg` exactly."""
    import transformers
    special = {"bos_token_id": separator_id, "eos_token_id": separator_id, "pad_token_id": separator_id}
    common = {"vocab_size": cfg.padded_vocab, "hidden_size": cfg.d_model, "use_cache": True, **special}
    name = class_name(cfg)
    if name == "LlamaForCausalLM":
        return transformers.LlamaConfig(
            **common, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, head_dim=cfg.head_dim,
            hidden_act="silu", rms_norm_eps=cfg.norm_eps, attention_bias=False, mlp_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
            max_position_embeddings=seq_len, tie_word_embeddings=True, initializer_range=cfg.init_std)
    if name == "MambaForCausalLM":
        return transformers.MambaConfig(
            **common, state_size=cfg.d_state, num_hidden_layers=cfg.n_layer, layer_norm_epsilon=cfg.norm_eps,
            expand=cfg.expand, conv_kernel=cfg.d_conv, use_bias=False, use_conv_bias=True, hidden_act="silu",
            residual_in_fp32=True, time_step_rank=cfg.dt_rank_, time_step_min=cfg.dt_min,
            time_step_max=cfg.dt_max, time_step_floor=cfg.dt_init_floor, tie_word_embeddings=True)
    ssm = {"conv_kernel": cfg.d_conv, "n_groups": cfg.mamba2_ngroups, "chunk_size": cfg.mamba2_chunk_size,
           "use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": cfg.norm_eps,
           "time_step_min": cfg.dt_min, "time_step_max": cfg.dt_max, "time_step_floor": cfg.dt_init_floor,
           "time_step_limit": (0.0, float("inf"))}
    if name == "Mamba2ForCausalLM":
        return transformers.Mamba2Config(
            **common, **ssm, num_heads=cfg.mamba2_nheads, head_dim=cfg.mamba2_head_dim,
            state_size=cfg.mamba2_d_state, num_hidden_layers=cfg.n_layer, expand=cfg.expand, hidden_act="silu",
            residual_in_fp32=True, tie_word_embeddings=True)
    return transformers.NemotronHConfig(
        **{**common, "use_cache": False}, **ssm, layers_block_type=["linear_attention"] * cfg.n_layer,
        mamba_num_heads=cfg.mamba2_nheads, mamba_head_dim=cfg.mamba2_head_dim, ssm_state_size=cfg.mamba2_d_state,
        mamba_hidden_act="silu", residual_in_fp32=True, tie_word_embeddings=False,
        # attention, MLP and MoE settings are unused (every layer is Mamba-2); these keep the config valid
        num_attention_heads=1, num_key_value_heads=1, head_dim=cfg.d_model, max_position_embeddings=seq_len)


def hf_state_dict(state: dict, cfg: ModelConfig) -> dict:
    """Our state dict under the chosen class's keys (qkv split in three; NemotronH gets lm_head)."""
    name = class_name(cfg)
    rules = {"LlamaForCausalLM": _LLAMA_KEYS, "MambaForCausalLM": _ssm_keys("backbone"),
             "Mamba2ForCausalLM": _ssm_keys("backbone"), "NemotronHForCausalLM": _ssm_keys("model")}[name]
    out = {}
    for key, tensor in state.items():
        for pattern, targets in rules:
            m = re.fullmatch(pattern, key)
            if m:
                parts = tensor.chunk(len(targets), dim=0) if len(targets) > 1 else (tensor,)
                for target, part in zip(targets, parts):
                    out[m.expand(target)] = part.contiguous()
                break
        else:
            raise RuntimeError(f"export: no {name} counterpart for our parameter {key} (hf.py maps by key)")
    if name == "NemotronHForCausalLM":
        out["lm_head.weight"] = state["embedding.weight"].clone()
    return out


def build_model(state: dict, cfg: ModelConfig, separator_id: int, seq_len: int):
    """The transformers model holding our weights, every one of its parameters given (strictly)."""
    import torch
    import transformers
    config = hf_config(cfg, separator_id, seq_len)
    with torch.device("cpu"):
        model = getattr(transformers, class_name(cfg))(config)
    tensors = hf_state_dict(state, cfg)
    expected = model.state_dict()
    for key, tensor in tensors.items():
        if key not in expected or expected[key].shape != tensor.shape:
            shape = tuple(expected[key].shape) if key in expected else "absent"
            raise RuntimeError(f"export: {key} {tuple(tensor.shape)} does not fit {class_name(cfg)} ({shape})")
    missing, _ = model.load_state_dict(tensors, strict=False)
    untied = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if untied:
        raise RuntimeError(f"export: {class_name(cfg)} parameters left without our weights: {', '.join(untied)}")
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"export: {class_name(cfg)} did not tie its head to the embedding")
    model.generation_config = generation_config(cfg, separator_id)
    return model.eval()


def generation_config(cfg: ModelConfig, separator_id: int):
    """Greedy by default; the separator (end of a document) ends a generation; padded ids never come out.

    NemotronH without attention layers cannot run with a cache in transformers 5.x (its forward builds
    an attention mask from a cache that has no attention layer and fails), so its exports default to
    use_cache False (config and generation): the same tokens, recomputing the prefix at each step."""
    import transformers
    padded = list(range(cfg.vocab_size, cfg.padded_vocab))
    return transformers.GenerationConfig(bos_token_id=separator_id, eos_token_id=separator_id,
                                         pad_token_id=separator_id, do_sample=False,
                                         suppress_tokens=padded or None,
                                         use_cache=class_name(cfg) != "NemotronHForCausalLM")


def max_rel_diff(ours, theirs) -> float:
    """max |ours - theirs| / max |ours|: the equality measure of the export check and the tests."""
    return float((ours.double() - theirs.double()).abs().max() / ours.double().abs().max())


def check_folder(folder, model, cfg: ModelConfig) -> float:
    """Load `folder` with AutoModelForCausalLM (local files only) and compare its logits with `model`'s
    (our LM) on a fixed batch of CHECK_BATCH x CHECK_LEN tokens; returns the max relative difference."""
    import torch
    import transformers
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (CHECK_BATCH, CHECK_LEN), generator=gen)
    with torch.no_grad():
        return max_rel_diff(model.eval()(tokens).float(), theirs.eval()(tokens).logits.float())
