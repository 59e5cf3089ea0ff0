"""LoRA adapters: PEFT format, mixed-adapter batches, merge/export, and every bad adapter."""

import json
import os
import shutil

import pytest
import torch
from peft import PrefixTuningConfig

import glmapp
from glmapp.adapters import AdapterManager, export_merged, list_adapters
from glmapp.backends import RequestHandle
from glmapp.engine.engine import Engine
from glmapp.engine.request import GenerationRequest
from glmapp.engine.sampling import SamplingParams
from glmapp.errors import AdapterError

TARGET_SETS = {  # as made by the peft_adapters_dir fixture (tests/conftest.py)
    "qkv": ["query_key_value"],
    "all": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "mlp": ["dense_h_to_4h", "dense_4h_to_h"],
}


@pytest.fixture(scope="module")
def adapters_dir(peft_adapters_dir, peft_target_sets):
    assert peft_target_sets == TARGET_SETS
    return peft_adapters_dir


@pytest.fixture()
def model_tok(demo_v2):
    return glmapp.load(str(demo_v2))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_adapters_are_listed_with_metadata(adapters_dir):
    infos = {i.name: i for i in list_adapters(adapters_dir)}
    assert set(infos) == set(TARGET_SETS)
    assert infos["all"].r == 4 and infos["all"].alpha == 8
    assert sorted(infos["all"].target_modules) == sorted(TARGET_SETS["all"])
    assert infos["qkv"].size_bytes > 0 and infos["qkv"].error is None


def test_peft_made_adapter_gives_the_same_logits_as_peft(demo_v2, tmp_path, model_tok, make_peft_adapter):
    peft_model = make_peft_adapter(demo_v2, tmp_path / "a", TARGET_SETS["all"], seed=11)
    model, tok = model_tok
    manager = AdapterManager.of(model)
    manager.load("a", tmp_path)
    ids = torch.tensor([tok.encode("你好，LoRA! 12345")])
    with manager.active("a"):
        ours = logits(model, ids)
    theirs = logits(peft_model, ids)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours - logits(model, ids)).abs().max() > 1e-3  # the adapter really changes the output


def merged_model(demo_v2, adapters_dir, name):
    model, _ = glmapp.load(str(demo_v2))
    manager = AdapterManager.of(model)
    manager.load(name, adapters_dir)
    manager.merge(name)
    return model


def test_mixed_adapter_batch_matches_merged_models(model_tok, adapters_dir, demo_v2):
    model, tok = model_tok
    manager = AdapterManager.of(model)
    for name in TARGET_SETS:
        manager.load(name, adapters_dir)
    ids = torch.tensor([tok.encode("同一个问题，不同的适配器。")] * 4)
    s = ids.shape[1]
    rows = lambda i: torch.arange(i * s, (i + 1) * s)  # noqa: E731 - flattened token rows of batch row i
    with manager.rows([("qkv", rows(0)), ("all", rows(2)), ("mlp", rows(3))]):
        mixed = logits(model, ids)
    base = glmapp.load(str(demo_v2))[0]
    torch.testing.assert_close(mixed[1], logits(base, ids[1:2])[0], atol=1e-5, rtol=1e-5)
    for row, name in ((0, "qkv"), (2, "all"), (3, "mlp")):
        expected = logits(merged_model(demo_v2, adapters_dir, name), ids[row:row + 1])[0]
        torch.testing.assert_close(mixed[row], expected, atol=1e-4, rtol=1e-4)


def test_mixed_ranks_and_a_replaced_adapter_in_one_batch(model_tok, adapters_copy, demo_v2, make_peft_adapter):
    """The stacked multi-adapter path: ranks 4 and 8 side by side, then one name reloaded with other
    weights and targets (cached stacks must not serve the old ones); fp32 logits to 1e-4."""
    root = adapters_copy("mixed_ranks")
    make_peft_adapter(demo_v2, root / "big", TARGET_SETS["all"], seed=7, r=8, alpha=16)
    model, tok = model_tok
    manager = AdapterManager.of(model)
    for name in ("qkv", "big"):
        manager.load(name, root)
    ids = torch.tensor([tok.encode("秩不同的适配器。")] * 3)
    s = ids.shape[1]
    rows = lambda i: torch.arange(i * s, (i + 1) * s)  # noqa: E731
    groups = [("big", rows(0)), ("qkv", rows(2))]
    with manager.rows(groups):
        mixed = logits(model, ids)
    torch.testing.assert_close(mixed[0], logits(merged_model(demo_v2, root, "big"), ids[:1])[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[2], logits(merged_model(demo_v2, root, "qkv"), ids[:1])[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1], logits(glmapp.load(str(demo_v2))[0], ids[1:2])[0], atol=1e-5, rtol=1e-5)
    manager.load("mlp", root, name="qkv")  # same name, other weights and targets
    with manager.rows(groups):
        again = logits(model, ids)
    torch.testing.assert_close(again[2], logits(merged_model(demo_v2, root, "mlp"), ids[:1])[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again[0], mixed[0], atol=1e-5, rtol=1e-5)


def run(engine, prompt, adapter, n=16):
    h = RequestHandle(f"{adapter}-{os.urandom(4).hex()}", engine.cancel)
    engine.submit(h, GenerationRequest(prompt, SamplingParams(temperature=0), n, stop_ids=[-1], adapter=adapter))
    return h


def tokens_of(handle):
    out = []
    for d in handle:
        assert d.error is None, d.error
        out.extend(d.token_ids)
    return out


def test_engine_batch_mixing_adapters_equals_solo_runs(model_tok, adapters_dir):
    model, tok = model_tok
    manager = AdapterManager.of(model)
    for name in TARGET_SETS:
        manager.load(name, adapters_dir)
    prompt = tok.encode("Compare these adapters, please.")
    engine = Engine(model, tok)
    try:
        choices = [None, "qkv", "all", "mlp"]
        batched = [tokens_of(h) for h in [run(engine, prompt, a) for a in choices]]
        solo = [tokens_of(run(engine, prompt, a)) for a in choices]
        # the base row and the adapter rows differ, and the prompt KV is never shared across adapters
        assert len({tuple(t) for t in batched}) == 4
        assert batched == solo
        bad = run(engine, prompt, "nope")
        last = list(bad)[-1]
        assert last.finish_reason == "error" and "not loaded" in last.error
    finally:
        engine.shutdown()


def test_merge_export_then_reload_equals_merged_in_memory(demo_v2, adapters_dir, tmp_path):
    out = export_merged(str(demo_v2), "all", tmp_path / "merged", adapters_dir, dtype="float32")
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.model").is_file()
    reloaded, tok = glmapp.load(str(out))
    ids = torch.tensor([tok.encode("merged?")])
    torch.testing.assert_close(logits(reloaded, ids), logits(merged_model(demo_v2, adapters_dir, "all"), ids))


def test_merge_cli(demo_v2, adapters_dir, tmp_path, monkeypatch):
    from glmapp.cli import main

    assert main(["merge", str(demo_v2), "qkv", "--out", str(tmp_path / "m"), "--adapters-dir",
                 str(adapters_dir)]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16" and cfg["model_type"] == "chatglm"
    # `glmapp merge BASE ./my-lora`: a path outside the adapters folder, as a user types it
    shutil.copytree(adapters_dir / "qkv", tmp_path / "my-lora")
    monkeypatch.chdir(tmp_path)
    assert main(["merge", str(demo_v2), "./my-lora", "--out", "m2"]) == 0
    assert json.loads((tmp_path / "m2" / "config.json").read_text()) == cfg


def test_unload_restores_the_base(model_tok, adapters_dir):
    model, tok = model_tok
    ids = torch.tensor([tok.encode("unload")])
    before = logits(model, ids)
    manager = AdapterManager.of(model)
    manager.load("all", adapters_dir)
    manager.unload("all")
    with manager.active(None):
        torch.testing.assert_close(logits(model, ids), before)
    with pytest.raises(AdapterError, match="not loaded"):
        manager.unload("all")


# ---- bad adapters: clear error, model untouched --------------------------------------------------------
def copy_adapter(adapters_dir, tmp_path, name="qkv"):
    root = tmp_path / "adapters"
    shutil.copytree(adapters_dir / name, root / "bad")
    return root


def assert_untouched(model, before_state, before_names):
    manager = AdapterManager.of(model)
    assert manager.names() == before_names
    after = model.state_dict()
    assert set(after) == set(before_state)
    for k, v in before_state.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("damage,expect", [
    ("shape", r"does not fit this model at .*query_key_value.*lora_A \(4, 48\)"),
    ("target", r"targets module .*fc1.*not a supported target"),
    ("truncate", r"adapter_model.safetensors.*truncated or corrupt"),
    ("no_config", r"has no adapter_config.json"),
    ("prefix", r"PREFIX_TUNING; glmapp supports LoRA"),
    ("no_weights", r"no adapter_model.safetensors"),
])
def test_bad_adapters_get_clear_errors_and_leave_the_model_untouched(model_tok, adapters_dir, tmp_path, damage,
                                                                      expect):
    from safetensors.torch import load_file, save_file

    model, _ = model_tok
    manager = AdapterManager.of(model)
    manager.load("all", adapters_dir)  # an adapter already active must survive a failed load
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_names = manager.names()
    root = copy_adapter(adapters_dir, tmp_path)
    weights = root / "bad" / "adapter_model.safetensors"
    if damage == "shape":
        state = load_file(str(weights))
        key = next(k for k in state if "query_key_value.lora_A" in k)
        state[key] = state[key][:, :48].contiguous()
        save_file(state, str(weights))
    elif damage == "target":
        state = load_file(str(weights))
        state = {k.replace("layers.1.self_attention.query_key_value", "layers.1.mlp.fc1"): v for k, v in state.items()}
        save_file(state, str(weights))
    elif damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "no_config":
        (root / "bad" / "adapter_config.json").unlink()
    elif damage == "prefix":
        cfg = PrefixTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM").to_dict()
        (root / "bad" / "adapter_config.json").write_text(json.dumps({k: str(v) if not isinstance(
            v, (int, float, str, bool, list, dict, type(None))) else v for k, v in cfg.items()}))
    elif damage == "no_weights":
        weights.unlink()
    with pytest.raises(AdapterError, match=expect):
        manager.load("bad", root)
    assert_untouched(model, before_state, before_names)


@pytest.mark.parametrize("spec", ["../adapters/qkv", "/etc/passwd", "~/.ssh", "sub/../../x"])
def test_confined_adapter_paths_cannot_escape_the_adapters_folder(model_tok, adapters_dir, spec):
    manager = AdapterManager.of(model_tok[0])
    with pytest.raises(AdapterError, match="outside the adapters folder|No adapter named"):
        manager.load(spec, adapters_dir, confine=True)


def test_symlink_out_of_the_adapters_folder_is_refused_when_confined(model_tok, adapters_dir, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    (root / "sneaky").symlink_to(adapters_dir / "qkv")
    manager = AdapterManager.of(model_tok[0])
    with pytest.raises(AdapterError, match="symlink"):
        manager.load("sneaky", root, confine=True)
    assert list_adapters(root) == []
    assert manager.load("sneaky", root).name == "sneaky"  # the Python API follows the caller's symlink


def test_the_python_api_takes_any_path_the_caller_gives(model_tok, adapters_dir, tmp_path, monkeypatch):
    """The command line and the Python API belong to the user of the machine: absolute, ~, ../ and symlinked
    paths outside the adapters folder all load (the adapters folder itself is empty here)."""
    home, work = tmp_path / "home", tmp_path / "work"
    shutil.copytree(adapters_dir / "qkv", home / "my-lora")
    (work / "adapters").mkdir(parents=True)
    (work / "link").symlink_to(adapters_dir / "mlp")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    manager = AdapterManager.of(model_tok[0])
    loaded = [manager.load(spec, "adapters").name for spec in
              (str(adapters_dir / "all"), "~/my-lora", "../home/my-lora", "./link")]
    assert loaded == ["all", "my-lora", "my-lora", "mlp"]
    with pytest.raises(AdapterError, match="No adapter named 'nowhere' in the adapters folder 'adapters'/ nor a path"):
        manager.load("nowhere", "adapters")


def test_unknown_adapter_name_offline(model_tok, adapters_dir):
    manager = AdapterManager.of(model_tok[0])
    with pytest.raises(AdapterError, match="No adapter named 'missing'"):
        manager.load("missing", adapters_dir)
    with pytest.raises(AdapterError, match="Hugging Face cache"):
        manager.load("someone/some-adapter", adapters_dir)


def test_chat_api_and_cli_take_an_adapter(model_tok, adapters_dir, demo_v2):
    import subprocess
    import sys

    model, tok = model_tok
    AdapterManager.of(model).load("all", adapters_dir)
    base = model.chat(tok, "你好", [], do_sample=False, max_new_tokens=12)[0]
    tuned = model.chat(tok, "你好", [], do_sample=False, max_new_tokens=12, adapter="all")[0]
    assert base != tuned
    proc = subprocess.run([sys.executable, "-m", "glmapp", "chat", "--model", str(demo_v2), "--adapters-dir",
                           str(adapters_dir), "--adapter", "all", "--temperature", "0", "--max-new-tokens", "12"],
                          input="你好\n", capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "LoRA adapter 'all' applied" in proc.stderr
    missing = "../no-such-adapter-b7c1"  # relative to the working directory (the command line may name any path)
    bad = subprocess.run([sys.executable, "-m", "glmapp", "chat", "--model", str(demo_v2), "--adapters-dir",
                          str(adapters_dir), "--adapter", missing], input="", capture_output=True, text=True,
                         timeout=180)
    assert bad.returncode == 2 and f"No adapter named '{missing}'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("mode", ["int8", "int4", "bnb-nf4"])
def test_lora_runs_over_a_quantized_base(demo_v2, adapters_dir, mode):
    model, tok = glmapp.load(str(demo_v2), quant=mode)
    manager = AdapterManager.of(model)
    manager.load("all", adapters_dir)
    ids = torch.tensor([tok.encode("QLoRA 你好")])
    base = logits(model, ids)
    with manager.active("all"):
        tuned = logits(model, ids)
    full, _ = glmapp.load(str(demo_v2))
    full_manager = AdapterManager.of(full)
    full_manager.load("all", adapters_dir)
    with full_manager.active("all"):
        reference = logits(full, ids)
    # the adapter's delta is applied exactly; only the quantized base differs from full precision
    delta_quant, delta_full = tuned - base, reference - logits(full, ids)
    assert (delta_quant - delta_full).abs().max() < 0.25 * delta_full.abs().max()
    assert (tuned.argmax(-1) == reference.argmax(-1)).float().mean() > 0.5
    engine = Engine(model, tok)
    try:
        prompt = tok.encode("mixed rows over a quantized base")
        batched = [tokens_of(h) for h in [run(engine, prompt, a) for a in (None, "all")]]
        solo = [tokens_of(run(engine, prompt, a)) for a in (None, "all")]
        assert batched == solo and batched[0] != batched[1]
    finally:
        engine.shutdown()
    with pytest.raises(AdapterError, match="full-precision base"):
        manager.merge("all")
    assert manager.names() == ["all"]  # a refused merge changes nothing
