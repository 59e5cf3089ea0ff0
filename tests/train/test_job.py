"""The web app's training job: its own process, one at a time, followed through its files, stoppable."""

import json
import time

import pytest

from glmapp import allocator
from glmapp.adapters import list_adapters
from glmapp.train.config import TrainConfig
from glmapp.train.job import JobRunner, TrainBusy


def wait_for(condition, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": "a fixed reply"}) for i in range(8)))
    return path


def test_job_runs_in_its_own_process_one_at_a_time_and_ends_in_the_picker(tmp_path, demo_v2, data):
    adapters = tmp_path / "adapters"
    runner = JobRunner(adapters)
    config = TrainConfig(model=str(demo_v2), data=[str(data)], out=str(adapters / "mine"), max_steps=4,
                         batch_size=4, grad_accum=1, save_steps=100)
    job = runner.start(config, "mine")
    with pytest.raises(TrainBusy, match=r"A training job is running \(mine\)"):
        runner.start(config, "other")
    assert job.process.wait(timeout=300) == 0, job.stderr_file.read_text()
    progress = runner.progress()
    assert progress["status"] == "finished" and progress["step"] == 4 and progress["total"] == 4
    assert [e["step"] for e in progress["log"]] == [1, 2, 3, 4]
    assert any("Adapter written" in line for line in progress["tail"])
    assert [(a.name, a.error) for a in list_adapters(adapters)] == [("mine", None)]


def test_stop_leaves_an_incomplete_run_the_picker_shows_with_resume(tmp_path, demo_v2, data):
    adapters = tmp_path / "adapters"
    runner = JobRunner(adapters)
    config = TrainConfig(model=str(demo_v2), data=[str(data)], out=str(adapters / "long"), max_steps=100000,
                         batch_size=4, grad_accum=1, save_steps=5)
    job = runner.start(config, "long")
    wait_for(lambda: (runner.progress() or {}).get("step", 0) >= 6 or not job.running())
    assert job.running(), job.stderr_file.read_text()
    assert allocator.in_use(job.process.pid) == "tcmalloc"  # the job's process starts with it (test.sh installs it)
    assert "training in progress at step" in {a.name: a.error for a in list_adapters(adapters)}["long"]
    assert runner.stop(grace_s=60)
    assert not job.running()
    progress = runner.progress()
    assert progress["status"].startswith("stopped (incomplete")
    error = {a.name: a.error for a in list_adapters(adapters)}["long"]
    assert "training stopped at step" in error and "--resume" in error
    assert not (adapters / "long" / "adapter_config.json").exists()
    assert runner.stop() is False
