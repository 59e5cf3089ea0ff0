"""One place that finds a checkpoint and loads it: path / Hugging Face cache / hub id / demo.

Notable choices:
- The model is built on the meta device, materialised once in the target dtype and device, then
  filled tensor by tensor. Safetensors are read straight into the destination parameter (no
  intermediate copy when dtypes match); `.bin` shards are memory-mapped one shard at a time.
  Peak host memory is about the model's size plus one tensor.
- Every file is checked before anything is kept: a missing or truncated shard, an unknown
  `model_type` or a tensor of the wrong shape raises `CheckpointError` naming the file/tensor,
  and the half-built model is dropped.
- It is also the one writer of checkpoints in the official layouts (`write_checkpoint`: demo checkpoints,
  merged adapters, the int4 layout), so a written folder is exactly what the loader reads. It imports the
  quantization schemes; they never import it (no cycle).
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from glmapp import commands
from glmapp.choices import DEFAULT_MODEL, DEMO_FORMATS, FAMILIES
from glmapp.cpu_threads import single_threaded
from glmapp.errors import CheckpointError, QuantizationError
from glmapp.quant import (QuantizingLoader, layer_linear_names, linear_names, model_mode, quantize_weight,
                          resolve_mode, swap_for_loading)
from glmapp.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration
from glmapp.models.chatglm1 import ChatGLM1Config, ChatGLM1ForConditionalGeneration, is_v1_config

SUPPORTED_FAMILIES = FAMILIES
_ST_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class ResolvedCheckpoint:
    path: Path
    source: str  # "path", "hf-cache", "hub"


def resolve(model: str, *, download: bool = True, progress=None) -> ResolvedCheckpoint:
    """A local folder, or a hub id looked up in the Hugging Face cache first, then (with `download`) fetched from
    the hub after checking the disk has room (`glmapp.download`; `progress(fraction, message, detail)`)."""
    p = Path(model).expanduser()
    if p.is_dir():
        return ResolvedCheckpoint(p.resolve(), "path")
    if model.startswith((".", "/", "~")) or model.count("/") != 1 or p.exists():
        raise CheckpointError(
            f"Model folder not found: {model!r}. Give a folder holding config.json, tokenizer.model and "
            f"weights, a hub id such as {DEFAULT_MODEL}, or create a demo checkpoint with "
            f"`{commands.MAKE_DEMO}`."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    from glmapp.download import PATTERNS, DiskSpaceError
    from glmapp.download import download as fetch

    try:
        cached = Path(snapshot_download(model, local_files_only=True, allow_patterns=PATTERNS))
        weight_files(cached)  # a snapshot with only config.json (read before a download) is not the checkpoint
        if not any((cached / name).is_file() for name in ("tokenizer.model", "ice_text.model")):
            raise CheckpointError("no tokenizer in the cached snapshot")
        return ResolvedCheckpoint(cached, "hf-cache")
    except Exception as cache_miss:  # noqa: BLE001 - any miss means "not cached", reported below
        reason = f"not in the Hugging Face cache ({HF_HUB_CACHE})"
        if download and not HF_HUB_OFFLINE:
            try:
                return ResolvedCheckpoint(fetch(model, progress), "hub")
            except DiskSpaceError:
                raise
            except Exception as hub_error:  # noqa: BLE001 - network/auth/unknown id: all reported
                reason += f", and downloading it failed ({type(hub_error).__name__}: {str(hub_error)[:200]})"
        elif download:
            reason += " and HF_HUB_OFFLINE is set"
        raise CheckpointError(
            f"No weights for {model!r}: looked for a local folder named {model!r} and for the hub id, "
            f"{reason}. To get real weights run `{commands.download(model)}` on a machine with "
            f"network access (or copy the folder here and pass --model PATH). To try the app without "
            f"weights, use the demo checkpoint: `{commands.MAKE_DEMO}` or `--demo`."
        ) from cache_miss


def resolve_config(model: str) -> Path:
    """The folder holding `model`'s config.json, without its weights: the local folder or the cached snapshot,
    else that one small file fetched from the hub."""
    try:
        return resolve(model, download=False).path
    except CheckpointError:
        if Path(model).expanduser().exists() or model.count("/") != 1:
            raise
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model, "config.json")).parent


def read_config(path: Path) -> ChatGLMConfig | ChatGLM1Config:
    """config.json -> ChatGLMConfig with `family` set; unsupported models get a clear error."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"config.json is missing in the model folder {path.name!r}.")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"config.json in {path.name!r} is not valid JSON ({e}).") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"config.json in {path.name!r} must hold a JSON object.")
    model_type = raw.get("model_type")
    if model_type != "chatglm":
        raise CheckpointError(
            f"Unsupported model_type {model_type!r} in config.json: glmapp runs ChatGLM-6B, ChatGLM2-6B and "
            f"ChatGLM3-6B checkpoints (model_type 'chatglm')."
        )
    config_cls = ChatGLM1Config if is_v1_config(raw) else ChatGLMConfig
    if raw.get("quantization_embeddings"):
        raise CheckpointError("Checkpoints with quantized embeddings (chatglm-6b-int4-qe) are not supported; use "
                              "THUDM/chatglm-6b-int4 or chatglm-6b with --quant int4.")
    if raw.get("pre_seq_len"):
        raise CheckpointError("This is a P-tuning v2 prefix checkpoint (pre_seq_len), not a base model: put its folder "
                              "in the adapters folder and load the base model it was trained on.")
    if raw.get("quantization_bit") not in (None, 0, 4, 8):
        raise CheckpointError(
            f"Pre-quantized checkpoints with quantization_bit={raw['quantization_bit']} are not supported: "
            "glmapp reads the official int4/int8 layouts (quantization_bit 4 or 8) or full-precision weights."
        )
    if config_cls is ChatGLMConfig:
        raw.setdefault("family", detect_family(path, raw))
    else:  # the v1 config answers to some v2/v3 names as read-only properties; a file must not set them
        mixed = sorted(k for k in raw if isinstance(vars(ChatGLM1Config).get(k), property))
        if mixed:
            raise CheckpointError(f"config.json in {path.name!r} mixes ChatGLM-6B (v1) keys (position_encoding_2d, "
                                  f"inner_hidden_size) with ChatGLM2/3 keys ({', '.join(mixed)}); use the "
                                  f"config.json that came with the weights.")
    raw.pop("auto_map", None)
    try:
        return config_cls(**raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json in {path.name!r} has invalid values: {e}") from None


def detect_family(path: Path, raw: dict) -> str:
    """ChatGLM2 and ChatGLM3 share the network; the tokenizer's role tokens and the name tell them apart."""
    name = str(raw.get("_name_or_path", "")) + " " + path.name
    if "chatglm3" in name.lower():
        return "chatglm3"
    if "chatglm2" in name.lower():
        return "chatglm2"
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.is_file():
        text = tok_cfg.read_text(encoding="utf-8", errors="replace")
        if "<|user|>" in text or "chatglm3" in text.lower():
            return "chatglm3"
    return "chatglm3" if raw.get("seq_length") == 8192 else "chatglm2"


def weight_files(path: Path) -> list[Path]:
    """Weight files in preference order: safetensors (index or single), then .bin (index or single)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index_name} is not a valid shard index (no weight_map).") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise CheckpointError(f"Missing weight shard {missing[0]!r} listed in {index_name} "
                                      f"({len(missing)} of {len(files)} shards missing); download it again.")
            return [path / f for f in files]
        if (path / single).is_file():
            return [path / single]
    raise CheckpointError(
        f"No weights in model folder {path.name!r}: expected model.safetensors(.index.json) or "
        f"pytorch_model.bin(.index.json) shards."
    )


def _safetensors_entries(file: Path):
    """Parse a safetensors header; yields (name, dtype, shape, byte offset, byte length)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"Weight file {file.name!r} is truncated (empty header).")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"Weight file {file.name!r} is truncated or not safetensors.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"Weight file {file.name!r} has a corrupt safetensors header.") from None
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if base + end > size:
            raise CheckpointError(f"Weight file {file.name!r} is truncated: tensor {name!r} ends at byte "
                                  f"{base + end} but the file has {size} bytes. Download it again.")
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"Tensor {name!r} in {file.name!r} has unsupported dtype {info['dtype']}.")
        yield name, dtype, tuple(info["shape"]), base + start, end - start


def _iter_safetensors(file: Path, targets: dict[str, torch.Tensor]):
    """Yield (name, tensor); reads bytes directly into the target when dtype and device match."""
    with open(file, "rb", buffering=0) as f:
        for name, dtype, shape, offset, length in _safetensors_entries(file):
            dst = targets.get(name)
            direct = (dst is not None and dst.dtype == dtype and dst.device.type == "cpu"
                      and tuple(dst.shape) == shape and dst.is_contiguous())
            buf = dst if direct else torch.empty(shape, dtype=dtype)
            f.seek(offset)
            view = memoryview(buf.view(-1).view(torch.uint8).numpy()) if buf.numel() else memoryview(b"")
            if f.readinto(view) != length:
                raise CheckpointError(f"Weight file {file.name!r} is truncated at tensor {name!r}.")
            yield name, (None if direct else buf)


def _iter_bin(file: Path):
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"Weight file {file.name!r} cannot be read (truncated or corrupt: "
                              f"{type(e).__name__}). Download it again.") from None
    for name in list(state):
        yield name, state.pop(name)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CheckpointError(f"Unknown device {device!r}: use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"Device {device!r} requested but CUDA is not available here; use --device cpu.")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise CheckpointError(f"Unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16.")
    return _DTYPES[dtype]


def model_class(config, model_cls=None):
    """The class to build for `config`: `model_cls` (default the plain model), or for a ChatGLM-6B (v1) config
    its v1 counterpart (`model_cls.family_classes["chatglm1"]`, e.g. chat.ChatModel -> chat.ChatModel1)."""
    if not isinstance(config, ChatGLM1Config):
        return model_cls or ChatGLMForConditionalGeneration
    if model_cls is None or model_cls is ChatGLMForConditionalGeneration:
        return ChatGLM1ForConditionalGeneration
    cls = getattr(model_cls, "family_classes", {}).get("chatglm1", model_cls)
    if not issubclass(cls, ChatGLM1ForConditionalGeneration):
        raise CheckpointError(f"{model_cls.__name__} cannot hold a ChatGLM-6B (v1) checkpoint.")
    return cls


def _rotary_buffers(model):
    """(name, module) of every rotary `inv_freq` holder: one in v2/v3, one per layer in v1."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "compute_inv_freq")]


def build_empty(config: ChatGLMConfig | ChatGLM1Config, dtype: torch.dtype, device: torch.device, model_cls=None,
                quant: str = "none"):
    """Model skeleton: built on meta (no init cost), linears swapped for `quant`, then allocated once in
    dtype on device (so a quantized model never allocates its full-precision linears)."""
    with torch.device("meta"):
        model = model_class(config, model_cls)(config)
    swap_for_loading(model, quant)
    model = model.to(dtype).to_empty(device=device)
    for _, rotary in _rotary_buffers(model):
        rotary.inv_freq = rotary.compute_inv_freq(device).to(dtype)
    if hasattr(model, "tie_lm_head"):
        model.tie_lm_head()  # v1: to_empty made lm_head a parameter of its own
    return model.eval()


def load_model(path: Path, device=None, dtype="auto", model_cls=None, family: str | None = None,
               quant: str | None = None, progress=None):
    """Read config and weights of a resolved folder into a ready model (eval mode, no grad).

    `quant` (glmapp.quant.MODES) quantizes the encoder linears tensor by tensor as they are read; None
    loads the checkpoint as stored. `progress(fraction, message)` is called as tensors arrive.
    Runs single-threaded on CPU (copying is memory-bound anyway) so that the calling thread never owns
    an OpenMP team that would slow down the engine thread (see glmapp.cpu_threads).
    """
    with single_threaded():
        return _load_model(Path(path), device, dtype, model_cls, family, quant, progress)


def iter_tensors(path: Path):
    """(name, CPU tensor) for every tensor of a checkpoint folder, one file at a time."""
    for file in weight_files(Path(path)):
        yield from (_iter_safetensors(file, {}) if file.suffix == ".safetensors" else _iter_bin(file))


def _load_model(path: Path, device=None, dtype="auto", model_cls=None, family: str | None = None,
                quant: str | None = None, progress=None):
    config = read_config(path)
    if family:
        if family not in SUPPORTED_FAMILIES:
            raise CheckpointError(f"Unknown family {family!r}: use one of {', '.join(SUPPORTED_FAMILIES)}.")
        if (family == "chatglm1") != isinstance(config, ChatGLM1Config):
            raise CheckpointError(f"--family {family} does not fit this checkpoint: its config.json is "
                                  f"{config.family}'s; leave --family out to detect it.")
        config.family = family
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    mode = resolve_mode(quant, config.quantization_bit, dev)
    files = weight_files(path)
    model = build_empty(config, dt, dev, model_cls, quant=mode)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    # Pre-quantized checkpoints fill the QuantizedLinear tensors directly; full precision goes through `quantizer`.
    quantizer = QuantizingLoader(model, "none" if config.quantization_bit else mode, dev, dt)
    expected = set(params) | set(quantizer.modules)
    filled: set[str] = set()
    with torch.no_grad():
        for file in files:
            reader = _iter_safetensors(file, params) if file.suffix == ".safetensors" else _iter_bin(file)
            for name, tensor in reader:
                if progress is not None:
                    progress(len(filled) / len(expected), f"Loading {name}")
                if name in quantizer.modules:
                    filled.update(quantizer.take(name, tensor if tensor is not None else params[name]))
                    continue
                dst = params.get(name)
                if dst is None:
                    continue  # extras such as prefix_encoder or classifier heads are not used
                if tensor is not None:
                    if tuple(tensor.shape) != tuple(dst.shape):
                        hint = (f" config.json has quantization_bit={config.quantization_bit} (pre-quantized "
                                f"int8 weights expected) but the tensor is {tensor.dtype}"
                                if config.quantization_bit and dst.dtype == torch.int8 else "")
                        raise CheckpointError(
                            f"Tensor {name!r} in {file.name!r} has shape {tuple(tensor.shape)}, but this "
                            f"config expects {tuple(dst.shape)}: the weights and config.json disagree.{hint}"
                        )
                    dst.copy_(tensor)
                filled.add(name)
    for name, rotary in _rotary_buffers(model):
        rotary.inv_freq.copy_(rotary.compute_inv_freq(dev))
        filled.add(f"{name}.inv_freq")  # values are recomputed, never read (spec §2.1, §2.3)
    missing = sorted(expected - filled)
    if missing:
        raise CheckpointError(f"Weights are missing {len(missing)} tensors, e.g. {missing[0]!r}: "
                              f"the checkpoint is incomplete or for another model.")
    model.requires_grad_(False)
    model.config.name_or_path = str(path)
    if mode in ("int8", "int4"):
        model.config.quantization_bit = int(mode[3:])  # as the official model.quantize() records it
    return model


# ---- the one writer: official layouts (demo checkpoints, merged adapters, int4) -----------------------------
TOKENIZER_FILES = ("tokenizer.model", "ice_text.model", "tokenizer_config.json", "special_tokens_map.json")


def _shards(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    total = sum(t.numel() * t.element_size() for t in state.values())
    target, shards, current, size = total / n, [], {}, 0
    for name, t in state.items():
        current[name] = t
        size += t.numel() * t.element_size()
        if size >= target * (len(shards) + 1) and len(shards) < n - 1:
            shards.append(current)
            current = {}
    shards.append(current)
    return [s for s in shards if s]


def write_weights(state: dict[str, torch.Tensor], out: Path, fmt: str, num_shards: int = 2) -> None:
    """Write `state` in one of the official layouts (`bin`: one pytorch_model.bin, as the int4 checkpoints)."""
    if fmt not in (*DEMO_FORMATS, "bin"):
        raise CheckpointError(f"Unknown weight format {fmt!r}: use one of {', '.join(DEMO_FORMATS)}, bin.")
    if fmt == "safetensors":
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        return
    if fmt == "bin":
        torch.save(state, out / "pytorch_model.bin")
        return
    shards = _shards(state, num_shards)
    stem, ext, index = (("model", "safetensors", "model.safetensors.index.json") if fmt == "safetensors-sharded"
                        else ("pytorch_model", "bin", "pytorch_model.bin.index.json"))
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        if ext == "safetensors":
            save_file(shard, out / fname, metadata={"format": "pt"})
        else:
            torch.save(shard, out / fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_checkpoint(out: str | Path, state: dict[str, torch.Tensor], raw_config: dict, *,
                     tokenizer_from: Path | None = None, fmt: str = "safetensors-sharded", num_shards: int = 2) -> Path:
    """A checkpoint folder in the official layout: the weights, config.json, and the tokenizer files of
    `tokenizer_from` (a writer that makes its own tokenizer, like the demo, writes them itself). -> the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(state, out, fmt, num_shards)
    (out / "config.json").write_text(json.dumps(raw_config, indent=2, ensure_ascii=False) + "\n")
    for name in TOKENIZER_FILES if tokenizer_from is not None else ():
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, out / name)
    return out


TOKENIZER_FILES = ("tokenizer.model", "ice_text.model", "tokenizer_config.json", "special_tokens_map.json")


def quantized_state_dict(tensors, quantized: set[str], bits: int = 4):
    """(name, tensor) stream -> the official int4/int8 state dict (spec §2.2): the `quantized` linear weights as
    int8 (two int4 per byte for 4 bits) + fp16 weight_scale, everything else fp16."""
    state = {}
    for name, tensor in tensors:
        if name in quantized and tensor.is_floating_point():
            q, scale = quantize_weight(tensor, bits)
            state[name] = q
            state[name.removesuffix("weight") + "weight_scale"] = scale.half()
        else:
            state[name] = tensor.half() if tensor.is_floating_point() else tensor
    return state


def write_quantized_checkpoint(model_or_path, out, bits: int = 4) -> Path:
    """Write an int4 (or int8) checkpoint in the official layout (THUDM/chatglm2-6b-int4, chatglm-6b-int4/-int8):
    config.json with quantization_bit, one pytorch_model.bin, and the tokenizer files of the source. Takes a
    checkpoint folder (streamed tensor by tensor) or a loaded full-precision model or one already in that mode
    (its name_or_path folder supplies config and tokenizer)."""
    if bits not in (4, 8):
        raise QuantizationError(f"The official layouts are 4 or 8 bits (got {bits}).")
    out, mode = Path(out), f"int{bits}"
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
        if model_mode(model) not in ("none", mode):
            raise QuantizationError(f"Cannot write {mode} from a {model_mode(model)} model: load it full precision.")
        source = Path(model.config.name_or_path)
        names = {f"{p}.weight" for p in linear_names(model)}
        state = quantized_state_dict(((k, v.detach().cpu()) for k, v in model.state_dict().items()), names, bits)
    else:
        source = Path(model_or_path)
        config = read_config(source)
        if config.quantization_bit:
            raise QuantizationError(f"{source.name!r} is already quantized (quantization_bit="
                                    f"{config.quantization_bit}); write from the full-precision checkpoint.")
        names = {f"{p}.weight" for p in layer_linear_names(config.num_layers, config.family == "chatglm1")}
        state = quantized_state_dict(iter_tensors(source), names, bits)
    if not (source / "config.json").is_file():
        raise QuantizationError(f"No config.json next to the source ({source}); give the checkpoint folder.")
    raw = json.loads((source / "config.json").read_text(encoding="utf-8"))
    raw.update(quantization_bit=bits, torch_dtype="float16")
    return write_checkpoint(out, state, raw, tokenizer_from=source, fmt="bin")


def write_int4_checkpoint(model_or_path, out) -> Path:
    """`write_quantized_checkpoint` with 4 bits (the layout of THUDM/chatglm2-6b-int4)."""
    return write_quantized_checkpoint(model_or_path, out, 4)
