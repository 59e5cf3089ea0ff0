"""Our ChatGLM weights as transformers' own `GlmForCausalLM` (the same architecture family).

Used as the independent reference in tests and as the baseline in `bench/engine.py`: q/k/v are split
out of `query_key_value`, names are mapped, nothing else changes.
"""

from transformers import GlmConfig, GlmForCausalLM


def to_transformers_glm(model, attn_implementation: str = "eager") -> GlmForCausalLM:
    """Build a GlmForCausalLM holding our model's weights (qkv split, names mapped)."""
    c = model.config
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if c.rope_ratio and c.rope_ratio != 1:
        if c.family == "chatglm3":
            rope["rope_theta"] = 10000.0 * c.rope_ratio
        else:
            rope.update(rope_type="linear", factor=float(c.rope_ratio))
    ref_cfg = GlmConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_kv_groups, head_dim=c.kv_channels, max_position_embeddings=c.seq_length,
        rms_norm_eps=c.layernorm_epsilon, attention_bias=c.add_qkv_bias, tie_word_embeddings=False,
        rope_parameters=rope, pad_token_id=0, eos_token_id=2,
    )
    ref_cfg._attn_implementation = attn_implementation
    dtype = model.transformer.output_layer.weight.dtype
    ref = GlmForCausalLM(ref_cfg).to(dtype=dtype, device=model.transformer.output_layer.weight.device).eval()
    src = dict(model.state_dict())
    q_size = c.num_attention_heads * c.kv_channels
    kv_size = c.num_kv_groups * c.kv_channels
    dst = {
        "model.embed_tokens.weight": src["transformer.embedding.word_embeddings.weight"],
        "model.norm.weight": src["transformer.encoder.final_layernorm.weight"],
        "lm_head.weight": src["transformer.output_layer.weight"],
    }
    for i in range(c.num_layers):
        p = f"transformer.encoder.layers.{i}."
        o = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            name = p + f"self_attention.query_key_value.{kind}"
            if name in src:
                q, k, v = src[name].split([q_size, kv_size, kv_size], dim=0)
                dst[o + f"self_attn.q_proj.{kind}"] = q
                dst[o + f"self_attn.k_proj.{kind}"] = k
                dst[o + f"self_attn.v_proj.{kind}"] = v
        dst[o + "self_attn.o_proj.weight"] = src[p + "self_attention.dense.weight"]
        dst[o + "input_layernorm.weight"] = src[p + "input_layernorm.weight"]
        dst[o + "post_attention_layernorm.weight"] = src[p + "post_attention_layernorm.weight"]
        dst[o + "mlp.gate_up_proj.weight"] = src[p + "mlp.dense_h_to_4h.weight"]
        dst[o + "mlp.down_proj.weight"] = src[p + "mlp.dense_4h_to_h.weight"]
    missing, unexpected = ref.load_state_dict(dst, strict=False)
    if unexpected or any("rotary" not in m for m in missing):
        raise ValueError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    return ref
