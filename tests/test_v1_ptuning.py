"""P-tuning v2 prefix checkpoints (spec §8) on v1, v2 and v3: read, validated, applied through a seeded KV cache.

References: v1 -> the plain-torch v1 reference of test_v1_model with the prefix prepended; v2/v3 -> transformers'
GlmForCausalLM (glm_convert) with the prefix as its past key/values. The prefix keys/values are computed here from
the spec's rules, independently of glmapp.ptuning.
"""

import json

import pytest
import torch
from transformers import DynamicCache

import glmapp
from glmapp.demo import make_demo
from glmapp.engine.kv_cache import DenseKVCache
from glmapp.errors import AdapterError
from glmapp.models.chatglm1 import positions_2d
from glmapp.models.glm_convert import to_transformers_glm
from glmapp.ptuning import prefix_kv, read_prefix, seed_cache
from tests.test_v1_model import reference_logits

P = 6


def make_ptuning(base, out, projection: bool, seed: int = 0, pre_seq_len: int = P):
    """A prefix checkpoint as the official ptuning scripts save it: base config + pre_seq_len, prefix tensors only."""
    cfg = json.loads((base / "config.json").read_text())
    v1 = "inner_hidden_size" in cfg
    layers, hidden = cfg["num_layers"], cfg["hidden_size"]
    kv = 2 * layers * hidden if v1 else 2 * layers * cfg["multi_query_group_num"] * cfg["kv_channels"]
    gen = torch.Generator().manual_seed(seed)
    t = {}
    if projection:
        width = hidden if v1 else kv
        t["embedding.weight"] = torch.randn(pre_seq_len, width, generator=gen)
        t["trans.0.weight"] = torch.randn(hidden, width, generator=gen) * 0.1
        t["trans.0.bias"] = torch.randn(hidden, generator=gen) * 0.1
        t["trans.2.weight"] = torch.randn(kv, hidden, generator=gen)
        t["trans.2.bias"] = torch.randn(kv, generator=gen) * 0.1
    else:
        t["embedding.weight"] = torch.randn(pre_seq_len, kv, generator=gen)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({**cfg, "pre_seq_len": pre_seq_len, "prefix_projection": projection}))
    torch.save({f"transformer.prefix_encoder.{k}": v for k, v in t.items()}, out / "pytorch_model.bin")
    return out, t


def spec_prefix_kv(t: dict, config) -> list:
    x = t["embedding.weight"]
    if "trans.0.weight" in t:
        x = torch.tanh(x @ t["trans.0.weight"].T + t["trans.0.bias"]) @ t["trans.2.weight"].T + t["trans.2.bias"]
    layers = config.num_layers
    groups = config.num_attention_heads if config.family == "chatglm1" else config.multi_query_group_num
    x = x.reshape(x.shape[0], 2 * layers, groups, -1)  # [P, (layer0 k, layer0 v, layer1 k, ...), groups, d]
    return [(x[:, 2 * i], x[:, 2 * i + 1]) for i in range(layers)]


@pytest.fixture(scope="module")
def v1_model(tmp_path_factory):
    path = make_demo(tmp_path_factory.mktemp("pt-v1") / "base", family="chatglm1")
    model, tok = glmapp.load(str(path), dtype="float32")
    return path, model, tok


@pytest.mark.parametrize("projection", [False, True])
@torch.no_grad()
def test_v1_prefix_matches_the_reference_and_changes_the_output(v1_model, tmp_path, projection):
    base, model, tok = v1_model
    folder, tensors = make_ptuning(base, tmp_path / "pt", projection)
    weights = read_prefix("pt", folder, model.config)
    kv = prefix_kv(weights, model.config, torch.float32, "cpu")
    for (k, v), (rk, rv) in zip(kv, spec_prefix_kv(tensors, model.config)):
        torch.testing.assert_close(k, rk)
        torch.testing.assert_close(v, rv)
    ids = tok.encode("你好\n今天天气怎么样")
    cache = DenseKVCache.for_model(model, batch=1, capacity=64)
    seed_cache(cache, kv)
    cache.context_length = P + ids.index(tok.bos_token_id)
    positions, _ = positions_2d(ids, tok.bos_token_id, tok.mask_token_id, tok.gmask_token_id)
    ours = model.forward_cached(torch.tensor([ids]), torch.tensor([positions]), cache,
                                logits_index=torch.arange(len(ids)))
    cache.commit(len(ids))
    sd = model.state_dict()
    ref = reference_logits(sd, model.config, ids, prefix=kv)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert (ref - reference_logits(sd, model.config, ids)).abs().max() > 1e-3  # the prefix matters
    for _ in range(3):  # decode steps after the prefix: positions still unshifted by P
        ids.append(int(ours[-1].argmax()))
        pos = positions_2d(ids, tok.bos_token_id, tok.mask_token_id, tok.gmask_token_id)[0][-1]
        ours = model.forward_cached(torch.tensor([ids[-1:]]), torch.tensor([[pos]]), cache)
        cache.commit(1)
        torch.testing.assert_close(ours[0], reference_logits(sd, model.config, ids, prefix=kv)[-1],
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
@pytest.mark.parametrize("projection", [False, True])
@torch.no_grad()
def test_v2_v3_prefix_matches_transformers_glm_with_the_prefix_as_past(family, projection, request, tmp_path):
    base = request.getfixturevalue("demo_v2" if family == "chatglm2" else "demo_v3")
    model, tok = glmapp.load(str(base), dtype="float32")
    folder, tensors = make_ptuning(base, tmp_path / "pt", projection, seed=1)
    kv = prefix_kv(read_prefix("pt", folder, model.config), model.config, torch.float32, "cpu")
    ids = tok.encode("hello there, how are you?")
    n = len(ids)
    cache = DenseKVCache.for_model(model, batch=1, capacity=64)
    seed_cache(cache, kv)
    ours = model.forward_cached(torch.tensor([ids]), torch.arange(n)[None], cache, logits_index=torch.arange(n))
    past = DynamicCache()
    for layer, (k, v) in enumerate(spec_prefix_kv(tensors, model.config)):
        past.update(k.transpose(0, 1)[None], v.transpose(0, 1)[None], layer)  # [1, groups, P, d]
    ref = to_transformers_glm(model)(torch.tensor([ids]), position_ids=torch.arange(n)[None], past_key_values=past,
                                     attention_mask=torch.ones(1, P + n, dtype=torch.long)).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    plain = model(torch.tensor([ids])).logits[0]
    assert (plain - ref).abs().max() > 1e-3


def test_a_v1_prefix_on_a_v2_model_is_refused(v1_model, loaded_v2, tmp_path):
    folder, _ = make_ptuning(v1_model[0], tmp_path / "pt", False)
    with pytest.raises(AdapterError, match="trained on a chatglm1 model"):
        read_prefix("pt", folder, loaded_v2[0].config)


def test_wrong_shapes_and_corrupt_files_are_named(demo_v2, loaded_v2, tmp_path):
    folder, _ = make_ptuning(demo_v2, tmp_path / "pt", False)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "pre_seq_len": P + 1}))
    with pytest.raises(AdapterError, match=r"embedding.weight has shape \[6, .*pre_seq_len 7"):
        read_prefix("pt", folder, loaded_v2[0].config)
    (folder / "config.json").write_text(json.dumps({**cfg, "prefix_projection": True}))
    with pytest.raises(AdapterError, match="lacks transformer.prefix_encoder.trans.0.weight"):
        read_prefix("pt", folder, loaded_v2[0].config)
    (folder / "config.json").write_text(json.dumps(cfg))
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="cannot be read"):
        read_prefix("pt", folder, loaded_v2[0].config)
