"""The inline engine behind the app: ModelHost builds it from EngineConfig(inline=True); a chat reply and a whole
Compare run give the threaded engine's text, and the Compare columns run as one batch."""

import pytest

from glmapp.backends import LocalBackend
from glmapp.engine.engine import Engine, EngineConfig
from glmapp.engine.inline import InlineEngine
from glmapp.engine.sampling import SamplingParams
from glmapp.ui.compare_handlers import CompareHandlers

COLUMNS = [None, 0, 0.8, 1, None, 0.95, 0.8, 7, None, 1.2, 0.5, 3, None, 0.8, 0.8, 1]  # adapter, t, top_p, seed


@pytest.fixture(scope="module")
def backends(demo_v2):
    made = {mode: LocalBackend.load(str(demo_v2), engine_config=EngineConfig(kv_cache_mb=8, inline=mode == "inline"))
            for mode in ("threaded", "inline")}
    yield made
    for backend in made.values():
        backend.close()


def test_the_host_builds_the_engine_the_config_names(backends):
    assert type(backends["inline"].engine) is InlineEngine
    assert type(backends["threaded"].engine) is Engine


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.9, seed=5)])
def test_a_chat_reply_is_the_threaded_engines(backends, params):
    replies = {mode: list(b.chat_stream("你好，介绍一下你自己", [], max_new_tokens=20, params=params))[-1]
               for mode, b in backends.items()}
    assert replies["inline"].finish_reason == "length"
    assert replies["inline"].response == replies["threaded"].response
    assert backends["inline"].stats()["runs"] == 0  # the call's KV memory is gone


def test_a_compare_run_is_one_batch_with_the_threaded_engines_columns(backends, tmp_path):
    records = {}
    for mode, backend in backends.items():
        steps = backend.stats()["steps"]
        records[mode] = list(CompareHandlers(backend, tmp_path / "votes.jsonl").run("hello", 4, 24, *COLUMNS))[-1][-1]
        if mode == "inline":
            tokens = [c["completion_tokens"] for c in records[mode]["columns"]]
            assert min(tokens) > 8
            assert backend.stats()["steps"] - steps <= max(tokens) + 1 < sum(tokens)
    assert [c["output"] for c in records["inline"]["columns"]] == [c["output"] for c in records["threaded"]["columns"]]
    assert backends["inline"].stats()["runs"] == 0
