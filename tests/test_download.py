"""Checkpoints from the hub: the disk check, progress, resuming, and the app loading one in the background.

huggingface_hub reads HF_ENDPOINT when it is imported, so each download runs in a fresh process pointed at a
FakeHub (tests/fake_hub.py: the hub's file protocol on 127.0.0.1), as the app runs on a real Space."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fake_hub import FakeHub

from glmapp.download import MARGIN, DiskSpaceError, check_disk, describe_transfer

ROOT = Path(__file__).resolve().parents[1]
REPO = "org/tiny-chatglm2"

DOWNLOAD = """
import json, sys
import glmapp
reports = []
net, tok = glmapp.load(sys.argv[1], progress=lambda f, m, d="": reports.append([f, m, d]))
print(json.dumps({"reports": reports, "layers": net.config.num_layers, "family": tok.family,
                  "weight": net.transformer.output_layer.weight.float().sum().item()}))
"""


def hub_env(hub: FakeHub, home: Path, **extra) -> dict:
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0", "PYTHONUNBUFFERED": "1", **extra}


def run_download(hub: FakeHub, home: Path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DOWNLOAD, REPO], env=hub_env(hub, home, **extra), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def hub(demo_v2):
    server = FakeHub(REPO, demo_v2)
    yield server
    server.close()


def weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def test_a_hub_id_downloads_with_progress_and_loads_the_same_model(hub, demo_v2, tmp_path, loaded_v2):
    done = run_download(hub, tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    downloads = [r for r in out["reports"] if r[1].startswith("Downloading")]
    assert downloads and downloads[-1][0] == 1.0 and all("of" in r[2] for r in downloads)
    assert any("/s" in r[2] for r in downloads)  # a speed once bytes arrived
    assert [r[0] for r in downloads] == sorted(r[0] for r in downloads)  # never goes back
    assert any(r[1].startswith("Loading") for r in out["reports"])  # then the tensors
    model, _ = loaded_v2
    assert out["family"] == "chatglm2" and out["layers"] == model.config.num_layers
    assert out["weight"] == pytest.approx(model.transformer.output_layer.weight.float().sum().item())
    assert set(hub.fetched) >= set(weight_files(demo_v2))
    again = run_download(hub, tmp_path / "hf")  # now from the cache: nothing fetched again
    assert again.returncode == 0 and not [f for f in hub.fetched[len(set(hub.fetched)):]
                                          if f.endswith(".safetensors")]


def test_not_enough_disk_is_refused_with_both_numbers_before_any_weight_is_fetched(hub, tmp_path):
    done = run_download(hub, tmp_path / "hf", GLMAPP_DISK_LIMIT="100K")
    assert done.returncode != 0
    assert "DiskSpaceError" in done.stderr and "Not enough disk space to download org/tiny-chatglm2" in done.stderr
    assert "it needs 1.2 MB" in done.stderr and "only 100.0 KB is free" in done.stderr
    assert not [f for f in hub.fetched if f.endswith(".safetensors")]


def test_a_start_killed_mid_download_keeps_the_finished_files_and_leaves_no_partial_file(demo_v2, tmp_path):
    shards = weight_files(demo_v2)
    hub = FakeHub(REPO, demo_v2, hold=shards[-1])  # the last shard stops halfway; the others finish
    home = tmp_path / "hf"
    try:
        proc = subprocess.Popen([sys.executable, "-c", DOWNLOAD, REPO], env=hub_env(hub, home), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert hub.half_sent.wait(120), "the download never started"
        deadline = time.monotonic() + 120
        while len(list(home.rglob("snapshots/*/*.safetensors"))) < len(shards) - 1:  # the others are in place
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)  # bounded by the deadline
        proc.kill()  # the machine stops mid-download
        proc.wait(30)
        assert list(home.rglob("*.incomplete"))  # what huggingface_hub leaves behind
        hub.release()
        before = list(hub.fetched)
        done = run_download(hub, home)
        assert done.returncode == 0, done.stderr
        again = [f for f in hub.fetched[len(before):] if f.endswith(".safetensors")]
        assert again == [shards[-1]]  # only the unfinished file is fetched again
        assert not list(home.rglob("*.incomplete"))
        snapshot = next(home.rglob("snapshots/*/config.json")).parent
        for name in shards:
            assert (snapshot / name).read_bytes() == (demo_v2 / name).read_bytes()
    finally:
        hub.close()


def test_the_disk_check_names_both_numbers_and_keeps_a_margin(tmp_path):
    check_disk("o/m", 10 * 2**30, tmp_path, free=11 * 2**30)  # fits, margin included
    with pytest.raises(DiskSpaceError, match=r"needs 10.0 GB .* only 10.2 GB is free in .*HF_HOME"):
        check_disk("o/m", 10 * 2**30, tmp_path, free=10 * 2**30 + MARGIN // 2)
    assert describe_transfer(2**30, 4 * 2**30, 10.0).startswith("1.0 GB of 4.0 GB · 102.4 MB/s · about 30 s")


def test_a_bad_disk_limit_is_named():
    from glmapp.download import disk_limit
    from glmapp.errors import CheckpointError

    os.environ["GLMAPP_DISK_LIMIT"] = "lots"
    try:
        with pytest.raises(CheckpointError, match="GLMAPP_DISK_LIMIT='LOTS' is not a size"):
            disk_limit()
    finally:
        del os.environ["GLMAPP_DISK_LIMIT"]


# ---- the app: up before the model, the API says so -------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(tmp: Path, model: str, env: dict | None = None):
    port = free_port()
    log = (tmp / "app.log").open("w")
    proc = subprocess.Popen([sys.executable, "app.py", "--model", model, "--port", str(port), "--data-dir",
                             str(tmp / "data"), "--adapters-dir", str(tmp / "adapters")], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=env or {**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, f"http://127.0.0.1:{port}"


def wait_for(url: str, check, proc, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the app exited"
        try:
            response = httpx.get(url, timeout=5)
            if check(response):
                return response
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # polling a starting process; bounded by the deadline
    raise TimeoutError(url)


def test_the_api_answers_503_while_the_model_downloads_then_serves_it(demo_v2, tmp_path):
    hub = FakeHub(REPO, demo_v2, hold=True)
    proc, url = start_app(tmp_path, REPO, hub_env(hub, tmp_path / "hf"))
    try:
        loading = wait_for(url + "/health", lambda r: r.status_code == 503, proc)
        assert loading.json()["error"]["code"] == "model_loading"
        assert hub.half_sent.wait(120)
        models = httpx.get(url + "/v1/models", timeout=10)
        assert models.status_code == 503 and "still loading" in models.json()["error"]["message"]
        hub.release()
        wait_for(url + "/health", lambda r: r.status_code == 200, proc)
        body = {"model": REPO, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(30)
        hub.close()


@pytest.mark.parametrize("broken", ["missing", "truncated"])
def test_a_checkpoint_that_cannot_load_keeps_the_server_up_and_says_why(demo_v2, tmp_path, broken):
    model = tmp_path / "model"
    if broken == "truncated":
        shutil.copytree(demo_v2, model)
        shard = sorted(model.glob("*.safetensors"))[-1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc, url = start_app(tmp_path, str(model))
    try:
        failed = wait_for(url + "/health", lambda r: r.status_code == 503 and
                          r.json()["error"]["code"] == "model_load_failed", proc)
        assert str(tmp_path) not in failed.text  # no path for callers without a key
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        message = reply.json()["error"]["message"]
        assert reply.status_code == 503 and "could not be loaded" not in message
        assert ("not found" if broken == "missing" else "model-0000") in message and "--demo" in message
        assert httpx.get(url + "/", timeout=10).status_code == 200  # the page is up to show it
    finally:
        proc.terminate()
        proc.wait(30)
