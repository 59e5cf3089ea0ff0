"""Getting a checkpoint from the Hugging Face hub: room on the disk first, then the download with progress.

- Before any byte is fetched, `snapshot_download(dry_run=True)` says which files are missing and how big they
  are; when they do not fit in the free space of the cache's disk (less a margin), the download is refused with
  both numbers (`DiskSpaceError`), instead of filling the disk 9 GB in.
- The download itself is huggingface_hub's: files already in the cache are kept, so a start interrupted
  mid-download fetches only the files it had not finished (huggingface_hub >= 2 cannot continue a partial file
  from another process: it writes each to a process-unique temporary file, which `clear_partial_files` removes
  once no one is writing it).
- Progress (bytes, speed, time left) goes to a `progress(fraction, message, detail)` callback through a tqdm
  class, which is how huggingface_hub reports it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from glmapp.backends.base import format_bytes
from glmapp.errors import CheckpointError

PATTERNS = ["*.json", "tokenizer.model", "ice_text.model", "*.safetensors", "*.bin", "*.py"]
MARGIN = 512 * 2**20  # kept free after a download (the OS, logs, the adapters being trained)


class DiskSpaceError(CheckpointError):
    """The checkpoint does not fit in the free space of the disk it would be downloaded to."""


def free_bytes(folder: Path) -> int:
    """Free space of the disk holding `folder` (or its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_disk(repo_id: str, needed: int, folder: Path, free: int | None = None) -> None:
    """Refuse (DiskSpaceError, both numbers) when `needed` bytes plus the margin do not fit in `folder`'s disk.
    `free`: the free bytes when known (else measured), e.g. a limit a deployment sets with GLMAPP_DISK_LIMIT."""
    free = free_bytes(folder) if free is None else free
    if needed + MARGIN > free:
        raise DiskSpaceError(
            f"Not enough disk space to download {repo_id}: it needs {format_bytes(needed)} (plus "
            f"{format_bytes(MARGIN)} kept free) but only {format_bytes(free)} is free in {folder}. Free some "
            f"space, or set HF_HOME to a folder on a bigger disk, then start again (what was downloaded is kept).")


def disk_limit() -> int | None:
    """GLMAPP_DISK_LIMIT (bytes, or with a K/M/G suffix): treat at most this much as free (a Space's quota)."""
    raw = os.environ.get("GLMAPP_DISK_LIMIT", "").strip().upper()
    if not raw:
        return None
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(raw[-1], 1)
    try:
        return int(float(raw.rstrip("KMG")) * scale)
    except ValueError:
        raise CheckpointError(f"GLMAPP_DISK_LIMIT={raw!r} is not a size: give bytes or e.g. 20G.") from None


def clear_partial_files(repo_id: str) -> int:
    """Remove what interrupted downloads of `repo_id` left (huggingface_hub writes each file to a temporary
    `<blob>.<random>.incomplete` and cannot reuse one from another process; a killed start leaves it behind,
    eating the disk the next start needs). A partial file is removed only while its blob's download lock is
    free, i.e. no process is downloading that blob now -> bytes freed."""
    from filelock import FileLock, Timeout
    from huggingface_hub.file_download import repo_folder_name

    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    freed = 0
    for partial in (cache_folder() / folder / "blobs").glob("*.incomplete"):
        blob = partial.name.split(".", 1)[0]
        lock = FileLock(str(cache_folder() / ".locks" / folder / f"{blob}.lock"))
        try:
            with lock.acquire(timeout=0):
                size = partial.stat().st_size
                partial.unlink()
                freed += size
        except (Timeout, FileNotFoundError):  # being downloaded now, or already gone
            continue
    return freed


def cache_folder() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def download(repo_id: str, progress=None) -> Path:
    """Fetch the checkpoint's files into the Hugging Face cache -> the snapshot folder. Raises DiskSpaceError
    before fetching when it does not fit; other failures propagate (the caller words them)."""
    from huggingface_hub import snapshot_download

    report = progress or (lambda fraction, message, detail="": None)
    report(0.0, f"Looking up {repo_id} on the hub")
    clear_partial_files(repo_id)  # the files a killed start completed are kept (and not fetched again)
    quiet = progress_bar_class(None, "", 0)
    plan = snapshot_download(repo_id, allow_patterns=PATTERNS, dry_run=True, tqdm_class=quiet)
    needed = sum(f.file_size or 0 for f in plan if f.will_download)
    limit = disk_limit()
    free = free_bytes(cache_folder())
    check_disk(repo_id, needed, cache_folder(), free if limit is None else min(free, limit))
    bar = progress_bar_class(report, f"Downloading {repo_id}", needed)
    return Path(snapshot_download(repo_id, allow_patterns=PATTERNS, tqdm_class=bar))


def describe_transfer(done: float, total: float, seconds: float) -> str:
    """'1.2 GB of 12.4 GB · 48 MB/s · about 4 min left' (speed and time once there is something to show)."""
    text = f"{format_bytes(done)} of {format_bytes(total)}"
    if seconds > 0 and done > 0:
        rate = done / seconds
        text += f" · {format_bytes(rate)}/s"
        if total > done:
            left = (total - done) / rate
            text += f" · about {left / 60:.0f} min left" if left >= 90 else f" · about {left:.0f} s left"
    return text


def progress_bar_class(report, message: str, total: int):
    """A tqdm class that sends huggingface_hub's byte counts to `report(fraction, message, detail)` (None:
    silent), out of `total` bytes (what the dry run said is missing). snapshot_download makes three bars with
    it: files fetched (not bytes), bytes transferred (counted only for Xet storage) and bytes written (its own
    total grows as each file starts, hence ours): only the last one is reported."""
    from tqdm.auto import tqdm

    class ReportingBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 - closed in close()
            super().__init__(*args, **kwargs)
            self._reported = (report is not None and total > 0 and kwargs.get("unit") == "B"
                              and not str(kwargs.get("desc", "")).startswith("Downloading"))
            self._since = time.monotonic()

        def update(self, n=1):
            result = super().update(n)
            if self._reported:
                seconds = time.monotonic() - self._since
                report(min(self.n / total, 1.0), message, describe_transfer(self.n, total, seconds))
            return result

        def close(self):
            file = self.fp
            super().close()
            file.close()

    return ReportingBar
