"""ChatGLM-6B (v1) model vs an independent reference written from the spec (§2.3, §4) in plain torch."""

import math

import pytest
import torch

from glmapp.engine.kv_cache import DenseKVCache
from glmapp.models.chatglm1 import ChatGLM1Config, ChatGLM1ForConditionalGeneration, positions_2d

MASK, GMASK, BOS, EOS, PAD = 250, 251, 254, 255, 3


def tiny_config(**kw) -> ChatGLM1Config:
    args = dict(vocab_size=260, hidden_size=128, num_layers=3, num_attention_heads=2, inner_hidden_size=256,
                max_sequence_length=256, bos_token_id=BOS, eos_token_id=EOS, mask_token_id=MASK,
                gmask_token_id=GMASK, pad_token_id=PAD)
    return ChatGLM1Config(**{**args, **kw})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ChatGLM1ForConditionalGeneration(tiny_config()).float().eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong bias/scale path shows
        for name, p in m.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
            elif "dense_h_to_4h" in name:  # pre-activations of a few units: tanh-GELU differs from erf-GELU
                p.normal_(0, 0.4)
            elif "query_key_value" in name:  # sharp attention: rotary angle errors show in the logits
                p.normal_(0, 0.3)
            else:
                p.normal_(0, 0.08)
    return m


# ---- the reference: seq-first, one unpadded row, official formulas written out --------------------------
def reference_logits(sd: dict, cfg: ChatGLM1Config, ids: list[int], prefix=None) -> torch.Tensor:
    """Logits [s, vocab]; `prefix`: per layer (key, value) [P, heads, d] prepended to the keys/values, without
    rotary, visible to every query, positions not shifted (spec §8)."""
    s, heads, d = len(ids), cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    bos, gmask, mask = cfg.bos_token_id, cfg.gmask_token_id, cfg.mask_token_id
    context = ids.index(bos)
    mask_pos = ids.index(gmask) if gmask in ids else ids.index(mask)
    position = torch.tensor([i if i < context else mask_pos for i in range(s)], dtype=torch.float32)
    block = torch.tensor([0 if i < context else i - context + 1 for i in range(s)], dtype=torch.float32)
    rot = d // 2
    inv_freq = (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).half().float()

    def table(p):
        freqs = torch.einsum("i,j->ij", p, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None, :], emb.sin()[:, None, :]  # [s, 1, rot]

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    (cos_p, sin_p), (cos_b, sin_b) = table(position), table(block)
    blocked = torch.ones(s, s).tril() < 0.5
    blocked[:, :context] = False
    p_len = 0 if prefix is None else prefix[0][0].shape[0]
    blocked = torch.cat((torch.zeros(s, p_len, dtype=torch.bool), blocked), dim=1)
    alpha = (2 * 28) ** 0.5

    def ln(x, prefix):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-5)

    def lin(x, prefix):
        return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]

    x = sd["transformer.word_embeddings.weight"][torch.tensor(ids)]
    for layer in range(cfg.num_layers):
        p = f"transformer.layers.{layer}."
        h_in = ln(x, p + "input_layernorm")
        qkv = lin(h_in, p + "attention.query_key_value").view(s, heads, 3 * d)
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        q1, q2 = q.chunk(2, dim=-1)
        k1, k2 = k.chunk(2, dim=-1)
        q = torch.cat((q1 * cos_p + rotate_half(q1) * sin_p, q2 * cos_b + rotate_half(q2) * sin_b), dim=-1)
        k = torch.cat((k1 * cos_p + rotate_half(k1) * sin_p, k2 * cos_b + rotate_half(k2) * sin_b), dim=-1)
        if prefix is not None:
            k, v = torch.cat((prefix[layer][0], k)), torch.cat((prefix[layer][1], v))
        coeff = layer + 1
        scores = torch.einsum("ihd,jhd->hij", q / (math.sqrt(d) * coeff), k)
        scores = scores.masked_fill(blocked, -10000.0) * coeff
        probs = scores.softmax(-1)
        ctx = torch.einsum("hij,jhd->ihd", probs, v).reshape(s, heads * d)
        h = h_in * alpha + lin(ctx, p + "attention.dense")
        m_in = ln(h, p + "post_attention_layernorm")
        u = lin(m_in, p + "mlp.dense_h_to_4h")
        u = 0.5 * u * (1.0 + torch.tanh(0.7978845608028654 * (u + 0.044715 * u**3)))
        x = m_in * alpha + lin(u, p + "mlp.dense_4h_to_h")
    x = ln(x, "transformer.final_layernorm")
    return x @ sd["lm_head.weight"].T


PROMPTS = [
    [5, 17, 33, 90, GMASK, BOS],
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, GMASK, BOS, 40, 41, 42],  # answer tokens after <sop>
    [20, MASK, 21, 22, BOS, 60],  # [MASK] in the middle, no [gMASK]
    [(7 * i) % 240 + 4 for i in range(190)] + [GMASK, BOS, 30],  # long: fp16-rounded frequencies matter
]


@torch.no_grad()
@pytest.mark.parametrize("ids", PROMPTS)
def test_logits_match_reference(model, ids):
    ours = model(torch.tensor([ids])).logits[0]
    ref = reference_logits(model.state_dict(), model.config, ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_state_dict_has_the_368_official_tensors():
    with torch.device("meta"):
        m = ChatGLM1ForConditionalGeneration(ChatGLM1Config(vocab_size=130528))
    sd = m.state_dict()
    assert len(sd) == 368
    assert sd["transformer.layers.27.attention.query_key_value.weight"].shape == (12288, 4096)
    assert sd["transformer.layers.0.attention.rotary_emb.inv_freq"].shape == (32,)
    assert sd["transformer.layers.5.mlp.dense_h_to_4h.bias"].shape == (16384,)
    assert sd["lm_head.weight"].shape == (130528, 4096)
    assert m.lm_head.weight is m.transformer.word_embeddings.weight


def test_positions_follow_the_official_example():
    # spec §4: "你好" -> [5, 74874, 130001, 130004]: pos [0,1,2,2], block [0,0,0,1]; k-th new token (2, 1+k)
    pos, context = positions_2d([5, 74874, 130001, 130004, 9, 9], 130004, 130000, 130001)
    assert context == 3
    assert pos == [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2], [2, 3]]


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(model):
    width = max(len(r) for r in PROMPTS)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in PROMPTS])
    keep = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in PROMPTS])
    batch = model(ids, attention_mask=keep).logits
    for row, r in enumerate(PROMPTS):
        alone = model(torch.tensor([r])).logits[0]
        torch.testing.assert_close(batch[row, width - len(r):], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cached_greedy_decode_equals_full_forward(model):
    prompt = PROMPTS[1][:14]  # ends with [gMASK] <sop>
    cache = DenseKVCache.for_model(model, batch=1, capacity=64)
    cache.context_length = prompt.index(BOS)
    pos, _ = positions_2d(prompt, BOS, MASK, GMASK)
    logits = model.forward_cached(torch.tensor([prompt]), torch.tensor([pos]), cache)
    cache.commit(len(prompt))
    ids = list(prompt)
    for _ in range(8):
        full = model(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(logits[0], full, atol=1e-4, rtol=1e-4)
        ids.append(int(full.argmax()))
        step_pos = positions_2d(ids, BOS, MASK, GMASK)[0][-1]
        logits = model.forward_cached(torch.tensor([ids[-1:]]), torch.tensor([[step_pos]]), cache)
        cache.commit(1)


@torch.no_grad()
def test_cache_refuses_a_context_split_across_steps(model):
    cache = DenseKVCache.for_model(model, batch=1, capacity=64)
    cache.context_length = 5
    prompt = PROMPTS[0]
    pos, _ = positions_2d(prompt, BOS, MASK, GMASK)
    with pytest.raises(RuntimeError, match="prefilled in one step"):
        model.forward_cached(torch.tensor([prompt[:3]]), torch.tensor([pos[:3]]), cache)
