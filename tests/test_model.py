"""Our ChatGLM network against an independent implementation, and its two call paths."""

import pytest
import torch

from glmapp.engine.kv_cache import DenseKVCache
from glmapp.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration
from glmapp.models.glm_convert import to_transformers_glm


def small_model(family="chatglm2", rope_ratio=1.0, seed=0, layers=2):
    torch.manual_seed(seed)
    config = ChatGLMConfig(
        num_layers=layers, padded_vocab_size=256, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
        num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
        seq_length=4096, family=family, rope_ratio=rope_ratio,
    )
    model = ChatGLMForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger than init scale so that every term matters in the comparison
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("family,rope_ratio", [("chatglm2", 1.0), ("chatglm3", 1.0), ("chatglm2", 16.0)])
@pytest.mark.parametrize("length", [1, 7, 64, 300])
def test_logits_match_transformers_glm(family, rope_ratio, length):
    model = small_model(family, rope_ratio)
    reference = to_transformers_glm(model)
    ids = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(length))
    # Positions far from 0 exercise the rotary angles (and the 32k position interpolation).
    positions = torch.arange(length).expand(2, length) + 1000
    with torch.no_grad():
        ours = model(ids, position_ids=positions).logits
        theirs = reference(ids, position_ids=positions).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_rope_ratio_changes_logits():
    ids = torch.randint(0, 256, (1, 40))
    positions = torch.arange(40)[None] + 500
    with torch.no_grad():
        a = small_model("chatglm2", 1.0)(ids, position_ids=positions).logits
        b = small_model("chatglm2", 16.0)(ids, position_ids=positions).logits
    assert (a - b).abs().max() > 1e-3


def test_state_dict_names_and_shapes_follow_the_official_layout():
    config = ChatGLMConfig(num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696,
                           kv_channels=128, num_attention_heads=32, multi_query_attention=True,
                           multi_query_group_num=2, add_qkv_bias=True)
    with torch.device("meta"):
        state = ChatGLMForConditionalGeneration(config).state_dict()
    assert len(state) == 200  # spec §2.1
    expect = {
        "transformer.embedding.word_embeddings.weight": (65024, 4096),
        "transformer.rotary_pos_emb.inv_freq": (32,),
        "transformer.encoder.layers.27.input_layernorm.weight": (4096,),
        "transformer.encoder.layers.27.self_attention.query_key_value.weight": (4608, 4096),
        "transformer.encoder.layers.27.self_attention.query_key_value.bias": (4608,),
        "transformer.encoder.layers.27.self_attention.dense.weight": (4096, 4096),
        "transformer.encoder.layers.27.post_attention_layernorm.weight": (4096,),
        "transformer.encoder.layers.27.mlp.dense_h_to_4h.weight": (27392, 4096),
        "transformer.encoder.layers.27.mlp.dense_4h_to_h.weight": (4096, 13696),
        "transformer.encoder.final_layernorm.weight": (4096,),
        "transformer.output_layer.weight": (65024, 4096),
    }
    for name, shape in expect.items():
        assert tuple(state[name].shape) == shape, name
    total = sum(t.numel() for t in state.values())
    assert total == 6_243_584_032  # spec §2.1: exactly the official parameter count


def test_cached_prefill_and_decode_match_full_forward():
    model = small_model()
    ids = torch.randint(0, 256, (2, 50))
    cache = DenseKVCache.for_model(model, batch=2, capacity=64)
    with torch.no_grad():
        full = model(ids).logits
        steps = [model.forward_cached(ids[:, :20], torch.arange(20).expand(2, 20), cache)]
        cache.commit(20)
        for s in range(20, 50, 10):  # chunked prefill over a non-empty cache
            steps.append(model.forward_cached(ids[:, s:s + 10], torch.arange(s, s + 10).expand(2, 10), cache))
            cache.commit(10)
    torch.testing.assert_close(steps[0], full[:, 19], atol=1e-5, rtol=1e-5)
    for i, logits in enumerate(steps[1:]):
        torch.testing.assert_close(logits, full[:, 29 + 10 * i], atol=1e-5, rtol=1e-5)


def test_greedy_with_cache_equals_full_recompute_for_64_tokens():
    model = small_model(layers=3)
    prompt = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        seq = prompt
        for _ in range(64):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        recompute = seq[0, 12:].tolist()

        cache = DenseKVCache.for_model(model, 1, 128)
        logits = model.forward_cached(prompt, torch.arange(12)[None], cache)
        cache.commit(12)
        cached = []
        for _ in range(64):
            nxt = logits.argmax(-1, keepdim=True)
            cached.append(int(nxt))
            logits = model.forward_cached(nxt, torch.tensor([[cache.length]]), cache)
            cache.commit(1)
    assert cached == recompute
    assert len(set(cached)) > 1  # a non-degenerate sequence


def test_left_padding_mask_gives_the_unpadded_logits():
    model = small_model()
    ids = torch.randint(1, 256, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], dim=1).long()
    positions = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.arange(9)[None]], dim=1)
    with torch.no_grad():
        plain = model(ids).logits
        batch = model(padded, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch[:, 4:], plain, atol=1e-5, rtol=1e-5)


def test_training_forward_returns_loss_and_gradients():
    model = small_model().train()
    ids = torch.randint(0, 256, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grad = model.transformer.encoder.layers[0].self_attention.query_key_value.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_loss():
    model = small_model().train()
    ids = torch.randint(0, 256, (2, 16))
    plain = model(ids, labels=ids).loss
    model.activation_checkpointing_enable()
    checkpointed = model(ids, labels=ids).loss
    checkpointed.backward()
    torch.testing.assert_close(plain, checkpointed)


def test_save_pretrained_reloads_with_our_loader(tmp_path, demo_v2):
    import glmapp

    model, tokenizer = glmapp.load(str(demo_v2))
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes((demo_v2 / "tokenizer.model").read_bytes())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == set(model.state_dict())
    assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in names
    again, _ = glmapp.load(str(tmp_path))
    ids = torch.tensor([tokenizer.encode("你好, world")])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_auto_classes_load_our_model_without_remote_code(demo_v2):
    import glmapp.chat  # noqa: F401 - the model code registers the chatglm model type
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(demo_v2))
    assert isinstance(config, ChatGLMConfig)
    model = AutoModelForCausalLM.from_pretrained(str(demo_v2))
    assert hasattr(model, "stream_chat")
    ours, _ = glmapp.load(str(demo_v2))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), ours(ids).logits, atol=1e-3, rtol=1e-3)
