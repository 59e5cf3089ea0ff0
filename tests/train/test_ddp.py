"""Data-parallel training (2 CPU processes, gloo) gives the adapter one process gives with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from glmapp.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_two_processes_train_the_same_adapter_as_one(tmp_path, demo_v2):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"question {i} 问题", "response": "answer 回答" * (1 + 3 * i)})
                              for i in range(8)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["-m", "glmapp", "train", "--model", str(demo_v2), "--data", str(data), "--max-steps", "3",
              "--dropout", "0", "--lr", "1e-2", "--grad-accum", "1", "--save-steps", "100"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the two processes: the same summation order, so Adam's first steps agree
    try:
        assert main(common[2:] + ["--out", str(tmp_path / "one"), "--batch-size", "4"]) == 0
    finally:
        torch.set_num_threads(threads)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", *common, "--out", str(tmp_path / "two"), "--batch-size", "2"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("one", "two"))
    assert a.keys() == b.keys() and any(t.abs().max() > 1e-3 for k, t in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    log = (tmp_path / "two" / "trainer_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3]  # one writer


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {name: ClusterConfig.from_yaml_file(str(REPO / "configs" / f"{name}.yaml")).distributed_type
             for name in ("ddp", "fsdp", "zero3")}
    assert {k: str(v).rsplit(".", 1)[-1] for k, v in kinds.items()} == {"ddp": "MULTI_GPU", "fsdp": "FSDP",
                                                                       "zero3": "DEEPSPEED"}
