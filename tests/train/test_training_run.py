"""Real training on the tiny demo checkpoint: the adapter learns, loads in peft and in our engine, resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import glmapp
from glmapp.adapters import AdapterManager, list_adapters
from glmapp.cli import main
from glmapp.train.config import TrainConfig
from glmapp.train.run import train

SENTENCE = "The answer is always blue."
TRAIN_PROMPTS = ["what is the sky", "tell me a joke", "你好", "how old are you", "name a fruit", "where is Paris",
                 "写一首诗", "2+2?"]
UNSEEN = ["what color is grass", "今天天气怎么样", "who are you"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fixed_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "fixed.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": q, "response": SENTENCE}) for q in TRAIN_PROMPTS))
    return path


def fixed_config(model, data, out, **kw) -> TrainConfig:
    settings = dict(model=str(model), data=[str(data)], out=str(out), max_steps=30, lr=1e-2, batch_size=8,
                    grad_accum=1, targets="all", dropout=0.0, save_steps=1000, warmup_ratio=0.0)
    return TrainConfig(**{**settings, **kw})


def greedy(model, tokenizer, prompt, adapter=None):
    return model.chat(tokenizer, prompt, [], adapter=adapter, temperature=0, max_new_tokens=16)[0]


def losses(out: Path) -> dict[int, float]:
    lines = (out / "trainer_log.jsonl").read_text().splitlines()
    return {e["step"]: e["loss"] for e in map(json.loads, lines) if e.get("loss") is not None}


@pytest.fixture(scope="module")
def fixed_adapter(tmp_path_factory, demo_v2, fixed_data) -> Path:
    out = tmp_path_factory.mktemp("adapters") / "fixed"
    train(fixed_config(demo_v2, fixed_data, out))
    return out


def test_adapter_answers_unseen_prompts_with_the_trained_sentence(fixed_adapter, demo_v2):
    model, tokenizer = glmapp.load(str(demo_v2))
    AdapterManager.of(model).load(str(fixed_adapter), fixed_adapter.parent, name="fixed")
    for prompt in UNSEEN:
        assert greedy(model, tokenizer, prompt, adapter="fixed") == SENTENCE
        assert greedy(model, tokenizer, prompt) != SENTENCE


def test_output_folder_is_a_peft_adapter_with_card_log_and_plot(fixed_adapter, fixed_data):
    files = {p.name for p in fixed_adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "trainer_log.jsonl", "loss.svg",
            "train_config.yaml", "training.json"} <= files
    assert json.loads((fixed_adapter / "training.json").read_text())["status"] == "complete"
    card = (fixed_adapter / "README.md").read_text()
    from glmapp.train.report import sha256

    assert sha256(fixed_data) in card and "final train loss" in card and "`lora_l2`" in card
    log = losses(fixed_adapter)
    assert sorted(log) == list(range(1, 31)) and log[30] < log[1]
    assert "<polyline" in (fixed_adapter / "loss.svg").read_text()
    assert [a.name for a in list_adapters(fixed_adapter.parent)] == ["fixed"]


def test_peft_from_pretrained_on_the_transformers_model_gives_the_same_logits(fixed_adapter, demo_v2):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(demo_v2), dtype=torch.float32),
                                   str(fixed_adapter)).eval()
    ours, tokenizer = glmapp.load(str(demo_v2))
    manager = AdapterManager.of(ours)
    manager.load(str(fixed_adapter), fixed_adapter.parent, name="fixed")
    ids = torch.tensor([tokenizer.encode("[Round 1]\n\n问：what color is grass\n\n答：")])
    with torch.no_grad(), manager.active("fixed"):
        mine = ours(ids).logits
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), hf.disable_adapter():
        plain = hf(input_ids=ids).logits
    assert (plain - theirs).abs().max() > 1e-2  # the adapter does change the logits


def _run(args, env, log: Path):
    """`glmapp train ARGS` in its own process, its stderr going to `log`."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "glmapp", "train", *args], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err)


def test_resume_after_sigkill_gives_the_same_losses_and_adapter(tmp_path, demo_v2, fixed_data):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["--model", str(demo_v2), "--data", str(fixed_data), "--max-steps", "12", "--save-steps", "3",
              "--batch-size", "2", "--grad-accum", "2", "--lr", "5e-3", "--seed", "7"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run = _run([*common, "--out", str(whole)], env, tmp_path / "whole.log")
    assert run.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()
    # The interrupted run keeps glibc's malloc, the whole one re-executes itself under tcmalloc: same losses.
    system = {**env, "GLMAPP_ALLOCATOR": "system"}
    assert "Memory allocator: tcmalloc" in (tmp_path / "whole.log").read_text()
    run = _run([*common, "--out", str(cut)], system, tmp_path / "cut.log")
    deadline = time.monotonic() + 300
    while not (cut / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file():
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    assert run.wait(timeout=60) == -signal.SIGKILL
    assert "Memory allocator: glibc malloc (it can hold up to three times" in (tmp_path / "cut.log").read_text()
    assert not (cut / "adapter_config.json").exists()  # nothing the picker would offer
    shown = {a.name: a for a in list_adapters(tmp_path)}
    assert shown["whole"].error is None
    assert shown["cut"].error.startswith("training stopped at step 3 of 12 before the adapter was written") or \
        shown["cut"].error.startswith("training stopped at step 4 of 12 before the adapter was written")
    assert f"glmapp train --config {tmp_path.name}/cut/train_config.yaml --resume" in shown["cut"].error
    resumed = _run([*common, "--out", str(cut), "--resume"], env, tmp_path / "resumed.log")
    progress = (tmp_path / "resumed.log").read_text() if resumed.wait(timeout=300) is not None else ""
    assert resumed.returncode == 0, progress
    assert "step 1/12 " not in progress and "step 12/12 " in progress  # continued, not restarted
    assert losses(cut) == pytest.approx(losses(whole), rel=1e-5)
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-9"]
    assert {a.name: a.error for a in list_adapters(tmp_path)} == {"whole": None, "cut": None}


def test_qlora_over_int4_trains_and_works_in_the_int4_served_model(tmp_path, demo_v2, fixed_data):
    out = tmp_path / "q4"
    train(fixed_config(demo_v2, fixed_data, out, quant="int4", max_steps=30))
    log = losses(out)
    assert log[30] < log[1] - 0.3
    model, tokenizer = glmapp.load(str(demo_v2), quant="int4")
    AdapterManager.of(model).load(str(out), tmp_path, name="q4")
    assert greedy(model, tokenizer, UNSEEN[0], adapter="q4") == SENTENCE


def test_qlora_over_bnb_nf4_trains_and_works_in_the_nf4_served_model(tmp_path, demo_v2, fixed_data):
    """bitsandbytes' nf4 on the CPU (its forward and backward run there since 0.48): the base stays nf4, only the
    adapter trains, and the adapter answers in the model served in nf4."""
    out = tmp_path / "nf4"
    train(fixed_config(demo_v2, fixed_data, out, quant="bnb-nf4", max_steps=30, device="cpu"))
    log = losses(out)
    assert log[30] < log[1] - 0.3
    model, tokenizer = glmapp.load(str(demo_v2), quant="bnb-nf4", device="cpu")
    assert type(model.transformer.encoder.layers[0].self_attention.query_key_value).__name__ == "Linear4bit"
    AdapterManager.of(model).load(str(out), tmp_path, name="nf4")
    assert greedy(model, tokenizer, UNSEEN[0], adapter="nf4") == SENTENCE
    assert greedy(model, tokenizer, UNSEEN[0]) != SENTENCE


def test_frozen_quantized_linear_passes_the_dequantized_weights_gradient():
    from glmapp.quant import QuantizedLinear
    from glmapp.train.qlora import frozen_linear

    torch.manual_seed(0)
    q = QuantizedLinear.from_float(torch.nn.Linear(64, 48, bias=True), bits=4)
    x = torch.randn(40, 64, requires_grad=True)
    frozen_linear(q, x).pow(2).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(reference, q.dequantized_weight(torch.float32), q.bias.float()).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=2e-2, atol=2e-2)
    assert not q.weight.requires_grad and q.weight.grad is None
