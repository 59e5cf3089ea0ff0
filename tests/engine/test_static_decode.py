"""Static-shape decode (the CUDA-graph path) run eagerly on CPU: same tokens as the varlen step."""

from types import SimpleNamespace

import pytest
import torch
from test_engine import SETTINGS, collect, make_engine, model_tok, prompts_of, submit  # noqa: F401 (fixture)

from glmapp.engine.sampling import SamplingParams


def run_batch(model_tok, prompts, settings, lengths, **cfg):
    engine = make_engine(model_tok, **cfg)
    try:
        handles = [submit(engine, p, s, n) for p, s, n in zip(prompts, settings, lengths)]
        tokens = [collect(h)[0] for h in handles]
        return tokens, engine.runner.static, engine.stats()
    finally:
        engine.shutdown()


def test_static_decode_gives_the_varlen_tokens_for_a_mixed_batch(model_tok):
    tok = model_tok[1]
    prompts = prompts_of(tok, 7) + [tok.encode("很长的上下文，" * 40)]  # one row spans many blocks
    lengths = [24, 40, 16, 32, 24, 48, 8, 30]  # rows finish at different steps: batches of 8 down to 1
    expected, static, _ = run_batch(model_tok, prompts, SETTINGS, lengths, static_decode=False)
    assert static is None
    got, static, stats = run_batch(model_tok, prompts, SETTINGS, lengths, static_decode=True, max_seqs=8)
    assert got == expected
    assert static.steps >= 30  # the decode steps really took the static path
    assert static.replays == 0  # no CUDA graphs on CPU
    assert stats["free_blocks"] == stats["num_blocks"]


def _run_and_keep_keys(model_tok, prompts, **cfg):
    """Greedy 12-token replies of `prompts` run together, and a copy of the key cache after them."""
    engine = make_engine(model_tok, max_seqs=8, **cfg)
    try:
        handles = [submit(engine, p, SamplingParams(temperature=0), 12) for p in prompts]
        outs = [collect(h)[0] for h in handles]
        return outs, engine.cache.k.clone(), engine.allocator.num_blocks, engine.config.block_size
    finally:
        engine.shutdown()


def test_padding_rows_write_only_into_the_spare_block(model_tok):
    prompts = prompts_of(model_tok[1], 3)
    outs, keys, spare, bs = _run_and_keep_keys(model_tok, prompts, static_decode=True)  # 3 rows padded to 4
    plain_outs, plain_keys, _, _ = _run_and_keep_keys(model_tok, prompts, static_decode=False)  # no padding
    owned = torch.ones(keys.shape[1], dtype=torch.bool)  # every slot but the spare block's (spare = the
    owned[spare * bs:(spare + 1) * bs] = False  # cache's extra block, never handed out)
    assert keys[:, ~owned].abs().sum() > 0  # the padding rows did write, into the spare block
    # Elsewhere the cache holds what the same requests write without padding rows: the requests' own keys,
    # and zeros in the blocks no request used.
    stray = ((keys[:, owned] != 0) != (plain_keys[:, owned] != 0)).sum().item()
    assert stray == 0, f"{stray} key values written outside the requests' slots and the spare block"
    torch.testing.assert_close(keys[:, owned], plain_keys[:, owned])
    alone = [run_batch(model_tok, [p], [SamplingParams(temperature=0)], [12], static_decode=True)[0][0]
             for p in prompts]
    assert outs == plain_outs == alone


def test_static_path_declines_prefill_and_adapter_rows(model_tok):
    engine = make_engine(model_tok, static_decode=True, max_seqs=4)
    try:
        static = engine.runner.static

        def work(num_computed, num_tokens=1, samples=True, adapter=None):
            seq = SimpleNamespace(num_computed=num_computed, adapter=adapter, block_table=[0])
            return SimpleNamespace(seq=seq, num_tokens=num_tokens, samples=samples)

        assert static.accepts([work(5), work(9)])
        assert not static.accepts([work(5), work(0, num_tokens=7)])  # a prefill chunk in the step
        assert not static.accepts([work(5), work(9, samples=False)])  # a 1-token chunk of a long prompt
        assert not static.accepts([work(5, adapter="a")])  # LoRA row groups are not static
        assert not static.accepts([work(5)] * 5)  # more rows than the buffers hold
        assert [static.bucket(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    finally:
        engine.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_match_eager_decoding(demo_v2):
    import glmapp

    model, tok = glmapp.load(str(demo_v2), device="cuda", dtype="float32")
    prompts = prompts_of(tok, 5)
    settings, lengths = SETTINGS[:5], [20, 12, 30, 8, 16]
    expected, _, _ = run_batch((model, tok), prompts, settings, lengths, static_decode=False)
    got, static, _ = run_batch((model, tok), prompts, settings, lengths, static_decode=True, max_seqs=8)
    assert got == expected
    assert static.replays > 0


def test_compiled_static_decode_gives_the_same_tokens(model_tok):
    tok = model_tok[1]
    prompts = prompts_of(tok, 2)  # batches of 2 then 1: two shapes, so dynamo also builds a dynamic graph
    settings = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=5)]
    lengths = [10, 6]
    expected, _, _ = run_batch(model_tok, prompts, settings, lengths, static_decode=False)
    got, static, _ = run_batch(model_tok, prompts, settings, lengths, static_decode=True, compile=True, max_seqs=2)
    assert got == expected
    assert static.steps > 0
