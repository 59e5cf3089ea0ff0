"""Adapter picker, per-session adapters in chat and compare, and reloads that keep adapters — as plain
handler calls on the real LocalBackend with the demo checkpoint and adapters made by peft."""

from __future__ import annotations

import gc
import json
import weakref
from types import SimpleNamespace

import pytest

import glmapp
from glmapp.backends import LocalBackend
from glmapp.ui.adapter_handlers import BASE, AdapterHandlers
from glmapp.ui.chat_handlers import ChatHandlers
from glmapp.ui.compare_handlers import CompareHandlers
from glmapp.ui.model_handlers import reload_model

GREEDY = dict(system="", max_length=8192, max_new_tokens=12, temperature=0, top_p=0.8, top_k=0,
              repetition_penalty=1.0, seed=None)


@pytest.fixture(scope="module")
def adapters_dir(adapters_copy):
    """The peft-made adapters plus two bad ones: one whose metadata shows the problem, one corrupt on load."""
    return adapters_copy("ui-adapters", corrupt=["corrupt"], no_weights=["no-weights"])


@pytest.fixture(scope="module")
def manager(demo_v2, adapters_dir):
    """Shared by the tests that only load adapters and chat (adapters stay resident: no test depends on
    which ones another test loaded)."""
    m = LocalBackend.load(str(demo_v2), adapters_dir=str(adapters_dir))
    yield m
    m.close()


@pytest.fixture()
def own_manager(demo_v2, adapters_dir):
    """A manager of its own for a test that reloads or re-quantizes the model (the shared one stays float32,
    unquantized, whatever order the tests run in)."""
    m = LocalBackend.load(str(demo_v2), adapters_dir=str(adapters_dir))
    yield m
    m.close()


@pytest.fixture()
def picker(manager):
    return AdapterHandlers(manager)


@pytest.fixture()
def chat(manager):
    return ChatHandlers(manager)


def reply(chat, adapter=None, request=None, text="hello"):
    *_, (_, messages, _, stats) = chat.send(text, [], **GREEDY, adapter=adapter, request=request)
    return messages[1]["content"], stats


def test_adapters_are_listed_with_metadata_and_broken_ones_marked(picker):
    choices = dict(picker.choices())
    assert choices["none (base model)"] == BASE
    assert {"qkv", "all", "mlp", "corrupt"} <= set(choices.values())
    assert choices["no-weights (unavailable)"] == "no-weights"
    table = picker.table("all")
    row = next(line for line in table.splitlines() if line.startswith("| all |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == ["4", "8.0"]  # rank, alpha
    assert set(cells[4].split(", ")) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert cells[5].endswith("KB") and "active in this tab" in cells[6]
    broken = next(line for line in table.splitlines() if line.startswith("| no-weights |"))
    assert "unavailable" in broken and "adapter_model.safetensors" in broken


def test_choosing_an_adapter_changes_the_greedy_reply_and_none_restores_it(picker, chat):
    base, base_stats = reply(chat)
    assert "base model" in base_stats
    active, status = picker.select("all", None)
    assert active == "all" and "all" in status and "all" in picker.backend.loaded_adapters()
    tuned, stats = reply(chat, active)
    assert tuned != base and stats.startswith("adapter all ·")
    active, _ = picker.select(BASE, active)
    assert active is None and reply(chat, active)[0] == base
    assert reply(chat, "all")[0] == tuned  # still resident: switching back is instant and gives the same reply


def test_an_adapter_choice_applies_only_to_its_own_session(picker, chat):
    base, _ = reply(chat)
    tuned, _ = reply(chat, "mlp") if picker.select("mlp", None)[0] == "mlp" else pytest.fail("mlp did not load")
    a, b = SimpleNamespace(session_hash="a"), SimpleNamespace(session_hash="b")
    long = {**GREEDY, "max_new_tokens": 12}
    gen_a = chat.send("hello", [], **long, adapter="mlp", request=a)
    gen_b = chat.send("hello", [], **long, adapter=None, request=b)
    next(gen_a), next(gen_b)  # both are running on the engine at the same time
    *_, (_, messages_a, _, _) = gen_a
    *_, (_, messages_b, _, _) = gen_b
    assert messages_a[1]["content"] == tuned and messages_b[1]["content"] == base


@pytest.mark.parametrize("choice, why", [("no-weights", "no adapter_model"), ("corrupt", "truncated or corrupt")])
def test_a_failing_adapter_load_warns_and_keeps_the_previous_choice(picker, choice, why):
    active, _ = picker.select("qkv", None)
    with pytest.warns(UserWarning, match=f"Could not load adapter '{choice}'.*{why}.*Still using qkv"):
        active, status = picker.select(choice, active)
    assert active == "qkv" and "Still using qkv" in status and choice not in picker.backend.loaded_adapters()


@pytest.mark.parametrize("spec", ["../x", "../ui-adapters0/qkv", "/etc", "qkv/../../x"])
def test_escaping_the_adapters_folder_is_refused_with_a_message(picker, spec):
    with pytest.warns(UserWarning, match="outside the adapters folder"):
        active, status = picker.load_spec(spec, "all")
    assert active == "all" and "outside the adapters folder" in status


def test_load_by_path_and_empty_spec(picker):
    active, _ = picker.load_spec(" qkv ", None)
    assert active == "qkv"
    with pytest.warns(UserWarning, match="No adapter given"):
        assert picker.load_spec("  ", "qkv")[0] == "qkv"


def test_compare_columns_with_two_adapters_differ_and_the_vote_names_them(manager, chat, tmp_path):
    compare = CompareHandlers(manager, tmp_path / "votes.jsonl")
    greedy = [0, 0.8, 1]  # temperature, top_p, seed
    columns = ["qkv", *greedy, "all", *greedy, BASE, *greedy, BASE, *greedy]
    *_, last = compare.run("hello", 3, 12, *columns)
    stats, record = last[4:8], last[8]
    assert [c["adapter"] for c in record["columns"]] == ["qkv", "all", None]
    texts = [c["output"] for c in record["columns"]]
    assert texts[0] != texts[1] and texts[0] != texts[2] and texts[1] != texts[2]
    assert texts[1] == reply(chat, "all")[0] and texts[2] == reply(chat)[0]  # batched == solo, per adapter
    assert stats[0].startswith("adapter qkv ·") and stats[2].startswith("base model ·")
    compare.vote("B", "the full adapter", record)
    entry = json.loads((tmp_path / "votes.jsonl").read_text().splitlines()[-1])
    assert entry["vote"] == "B" and [c["adapter"] for c in entry["columns"]] == ["qkv", "all", None]


def test_compare_column_with_a_bad_adapter_names_the_column(manager, tmp_path):
    import gradio as gr

    compare = CompareHandlers(manager, tmp_path / "votes.jsonl")
    with pytest.raises(gr.Error, match="Column B: .*corrupt"):
        list(compare.run("hello", 2, 4, "qkv", 0, 0.8, 1, "corrupt", 0, 0.8, 1, BASE, 0, 0.8, 1, BASE, 0, 0.8, 1))


def test_reload_frees_the_old_model_first_and_keeps_adapters(own_manager, monkeypatch):
    manager, chat = own_manager, ChatHandlers(own_manager)
    for name in ("all", "qkv", "mlp"):
        manager.load_adapter(name)
    tuned_before, _ = reply(chat, "all")
    old_model = weakref.ref(manager.model)
    real_load, old_alive_at_load = glmapp.load, []

    def spy(*args, **kwargs):
        gc.collect()
        old_alive_at_load.append(old_model() is not None)
        return real_load(*args, **kwargs)

    monkeypatch.setattr("glmapp.load", spy)
    assert "bfloat16" in reload_model(manager, "bfloat16")
    assert old_alive_at_load == [False]  # the old weights were gone before the new ones were read
    assert {"all", "qkv", "mlp"} <= set(manager.loaded_adapters())
    base_bf16, _ = reply(chat)
    tuned_bf16, stats = reply(chat, "all")
    assert tuned_bf16 != base_bf16 and stats.startswith("adapter all")
    reload_model(manager, "float32")
    assert reply(chat, "all")[0] == tuned_before  # same weights, same adapter, same greedy reply


def test_failed_reload_loads_the_previous_dtype_again_with_its_adapters(own_manager, monkeypatch):
    manager, chat = own_manager, ChatHandlers(own_manager)
    import gradio as gr

    manager.load_adapter("qkv")
    tuned_before, _ = reply(chat, "qkv")
    real_load, calls = glmapp.load, []

    def fail_first(*args, **kwargs):
        calls.append(kwargs.get("dtype"))
        if len(calls) == 1:
            raise MemoryError("no room for float16")
        return real_load(*args, **kwargs)

    monkeypatch.setattr("glmapp.load", fail_first)
    with pytest.raises(gr.Error, match="no room for float16.*previous model was loaded again \\(float32\\).*qkv"):
        reload_model(manager, "float16")
    assert calls == ["float16", "auto"] and manager.info().dtype == "float32"  # the previous choice: auto
    assert reply(chat, "qkv")[0] == tuned_before


def test_a_request_during_a_reload_gets_a_clear_message(own_manager, monkeypatch):
    manager, chat = own_manager, ChatHandlers(own_manager)
    import gradio as gr

    monkeypatch.setattr(manager.host, "_engine", None)  # the state between freeing the old model and the new one
    with pytest.raises(gr.Error, match="being reloaded"):
        reply(chat)
    assert "being reloaded" in __import__("glmapp.ui.model_handlers").ui.model_handlers.model_info_markdown(manager)


def test_quantization_switch_keeps_adapters_refuses_unavailable_modes_and_recovers(own_manager, monkeypatch):
    manager, chat = own_manager, ChatHandlers(own_manager)
    import gradio as gr

    from glmapp.ui.model_handlers import quant_choices, switch_quantization

    manager.load_adapter("all")
    assert [value for _, value in quant_choices(manager)][:3] == ["none", "int8", "int4"]
    assert "int8" in switch_quantization(manager, "int8")
    assert manager.info().quant == "int8" and "all" in manager.loaded_adapters()
    base_int8, _ = reply(chat)
    tuned_int8, stats = reply(chat, "all")
    assert tuned_int8 != base_int8 and stats.startswith("adapter all")

    serving = manager.model
    monkeypatch.setattr("glmapp.quant.available_modes", lambda device="cpu": {
        "none": None, "int8": None, "int4": "needs a kernel this machine lacks", "bnb-int8": None, "bnb-nf4": None})
    assert "int4 (unavailable: needs a kernel this machine lacks)" in dict(quant_choices(manager))
    with pytest.raises(gr.Error, match="needs a kernel this machine lacks"):
        switch_quantization(manager, "int4")
    assert manager.model is serving  # refused before anything was freed
    monkeypatch.undo()

    import glmapp.checkpoint

    real = glmapp.checkpoint.load_model
    monkeypatch.setattr(glmapp.checkpoint, "load_model", lambda *a, **k: (_ for _ in ()).throw(
        MemoryError("no room")) if k.get("quant") == "int4" else real(*a, **k))
    with pytest.raises(gr.Error, match="no room.*reloaded as 'int8'.*all"):
        switch_quantization(manager, "int4")
    assert manager.info().quant == "int8" and reply(chat, "all")[0] == tuned_int8
    monkeypatch.undo()
    switch_quantization(manager, "none")
    assert manager.info().quant == "none" and "all" in manager.loaded_adapters()


HTML_NAME = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def html_adapters(adapters_copy):
    """A working adapter and a broken one (no weights), both named with HTML."""
    return adapters_copy("html-adapters", no_weights=[f"{HTML_NAME} broken"]), HTML_NAME


def test_adapter_names_in_pop_ups_show_as_text(demo_v2, html_adapters, capsys):
    import shutil

    root, name = html_adapters
    shutil.copytree(root / "qkv", root / name, dirs_exist_ok=True)
    manager = LocalBackend.load(str(demo_v2), adapters_dir=str(root))
    try:
        picker = AdapterHandlers(manager)
        escaped = "&lt;img src=x onerror=alert(1)&gt;"
        with pytest.warns(UserWarning) as warned:
            picker.select(f"{name} broken", None)
        assert escaped in str(warned[0].message) and "<img" not in str(warned[0].message)
        assert picker.select(name, None)[0] == name  # the name itself is kept as it is
        shown = capsys.readouterr().out  # gr.Info outside a request prints its message
        assert f"Adapter {escaped} is active" in shown and "<img" not in shown
    finally:
        manager.close()


def test_hub_downloads_are_refused_to_anonymous_visitors_of_a_reachable_app():
    from glmapp import adapter_hub
    from glmapp.ui.adapter_handlers import hub_downloads
    from glmapp.ui.config import AppConfig

    assert hub_downloads(AppConfig()) is adapter_hub.download  # only this machine reaches it
    assert hub_downloads(AppConfig(share=True, auth=["a:b"])) is adapter_hub.download  # every visitor logged in
    for config in (AppConfig(share=True), AppConfig(host="0.0.0.0")):
        with pytest.raises(glmapp.errors.AdapterError, match="reachable by others without a login.*--auth"):
            hub_downloads(config)("someone/lora")


def test_load_by_hub_id_on_a_shared_app_says_why_it_is_refused(manager):
    from glmapp.ui.adapter_handlers import hub_downloads
    from glmapp.ui.config import AppConfig

    picker = AdapterHandlers(manager, hub_downloads(AppConfig(share=True)))
    with pytest.warns(UserWarning, match="someone/lora.*reachable by others without a login"):
        active, _ = picker.load_spec("someone/lora", "qkv")
    assert active == "qkv" and "someone/lora" not in manager.loaded_adapters()


def test_a_hub_download_does_not_block_other_adapter_actions(manager, adapters_dir, tmp_path):
    """The download runs without the adapter lock: another tab picks an adapter meanwhile; then the
    downloaded adapter is installed."""
    import shutil
    import threading

    started, release = threading.Event(), threading.Event()
    downloaded = tmp_path / "snapshot"
    shutil.copytree(adapters_dir / "mlp", downloaded)

    def slow_download(repo_id):
        started.set()
        assert release.wait(60), "the test never released the download"
        return downloaded

    results = {}
    loader = threading.Thread(target=lambda: results.setdefault(
        "hub", AdapterHandlers(manager, slow_download).load_spec("someone/lora", None)))
    loader.start()
    try:
        assert started.wait(60)
        other_tab = threading.Thread(target=lambda: results.setdefault(
            "pick", AdapterHandlers(manager).select("qkv", None)))
        other_tab.start()
        other_tab.join(30)
        assert not other_tab.is_alive(), "picking an adapter waited for another tab's download"
        assert results["pick"][0] == "qkv"
    finally:
        release.set()
        loader.join(60)
    assert results["hub"][0] == "someone/lora" and "someone/lora" in manager.loaded_adapters()
