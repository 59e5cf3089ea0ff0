"""LoRA adapters from the Hugging Face Hub: only the adapter's own files, and only up to a size cap.

Notable choices:
- `snapshot_download` with `allow_patterns`: a repository may hold a whole model next to its adapter;
  only `adapter_config.json`, the weight file and the README are fetched.
- A dry run lists those files with their sizes first; over `MAX_ADAPTER_BYTES` nothing is fetched.
  The real download is pinned to the commit the dry run saw, so the size checked is the size fetched.
- Finding an adapter already in the Hugging Face cache never touches the network.
"""

from __future__ import annotations

import re
from pathlib import Path

from glmapp.errors import AdapterError

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"]
MAX_ADAPTER_BYTES = 2 * 1024**3  # a LoRA adapter of a 6B model is tens of MB; 2 GB leaves room for high ranks
_PART = re.compile(r"^[\w][\w.\-]{0,95}$")


def is_hub_id(spec: str) -> bool:
    """`owner/name` as the hub spells repository ids."""
    parts = spec.split("/")
    return len(parts) == 2 and all(_PART.match(p) and ".." not in p for p in parts)


def cached(repo_id: str, cache_dir: str | Path | None = None) -> Path | None:
    """The adapter's folder in the Hugging Face cache, or None when it was never downloaded."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=ADAPTER_FILES, local_files_only=True,
                                        cache_dir=cache_dir))
    except Exception:  # noqa: BLE001 - huggingface_hub raises several types for "not in the cache"
        return None
    return folder if (folder / "adapter_config.json").is_file() else None


def check_listing(repo_id: str, sizes: dict[str, int | None], max_bytes: int | None) -> None:
    """Refuse a download whose adapter files are missing or (together) larger than `max_bytes`."""
    if "adapter_config.json" not in sizes:
        raise AdapterError(f"Hub repository {repo_id!r} has no adapter_config.json: it is not a PEFT LoRA adapter.")
    if not {"adapter_model.safetensors", "adapter_model.bin"} & set(sizes):
        raise AdapterError(f"Hub repository {repo_id!r} has no adapter_model.safetensors or adapter_model.bin.")
    if max_bytes is None:
        return
    if any(size is None for size in sizes.values()):
        raise AdapterError(f"The hub did not say how large the files of {repo_id!r} are; not downloading them.")
    total = sum(sizes.values())
    if total > max_bytes:
        raise AdapterError(f"Adapter {repo_id!r} is {total / 1024**2:,.0f} MB, over the {max_bytes / 1024**2:,.0f} MB "
                           f"limit for downloads; download it yourself (hf download {repo_id} --local-dir ...) "
                           f"into the adapters folder.")


def download(repo_id: str, *, max_bytes: int | None = MAX_ADAPTER_BYTES, endpoint: str | None = None,
             cache_dir: str | Path | None = None) -> Path:
    """Fetch the adapter files of `repo_id` into the Hugging Face cache (at most `max_bytes`) -> folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        raise AdapterError(f"Adapter {repo_id!r} is not in the adapters folder nor in the Hugging Face cache, "
                           f"and downloads are off (HF_HUB_OFFLINE).")
    fetch = dict(allow_patterns=ADAPTER_FILES, endpoint=endpoint, cache_dir=cache_dir)
    try:
        plan = snapshot_download(repo_id, dry_run=True, **fetch)
    except Exception as e:  # noqa: BLE001 - network, authentication, unknown id: the user sees the kind
        raise AdapterError(f"Adapter {repo_id!r} is not in the adapters folder, and the hub did not list it "
                           f"({type(e).__name__}).") from None
    check_listing(repo_id, {f.filename: f.file_size for f in plan}, max_bytes)
    try:
        return Path(snapshot_download(repo_id, revision=plan[0].commit_hash, **fetch))
    except Exception as e:  # noqa: BLE001
        raise AdapterError(f"Downloading adapter {repo_id!r} from the hub failed ({type(e).__name__}).") from None
