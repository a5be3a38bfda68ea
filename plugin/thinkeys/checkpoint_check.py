"""Check a thin-key checkpoint's files against its config before an engine loads them.

Reads safetensors headers and the small RoPE frequency tables only (no weight data), so it is cheap
enough to run before every start. Each problem is one line naming the file and the tensor or
config field, and the fix, so a broken checkpoint fails before vLLM starts instead of as a
traceback deep in an engine worker (which vLLM's server prints as a wall of worker logs and then
"Engine core initialization failed").

What is checked, in order:

* config.json: parses, has the thin-key fields (:class:`ThinKeyConfig`), the geometry fields the
  family needs, an ``architectures`` entry that is the thin twin of ``source_architecture``, and a
  ``head_dim`` that agrees with ``thin_keys.head_dim``;
* every ``*.safetensors`` file: a readable header, data that reaches the end of its last tensor
  (a truncated download or an interrupted copy keeps a valid header), no tensor in two files;
* every attention tensor the thin model loads: present, with the shape ``rank`` / ``head_dim`` /
  ``rope_dims`` imply (QK-norm families: source-width projections and norms plus the
  ``[Hkv, r, d]`` query/key maps), a floating-point dtype;
* the RoPE frequency tables: float32, finite, non-negative.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from thinkeys.checkpoint import (
    CONFIG_KEY,
    KEY_MAP_NAME,
    QUERY_MAP_NAME,
    REBUILD_TABLE_NAME,
    ROPE_FREQS_NAME,
    RopeStrategy,
    SourceFamily,
    ThinKeyConfig,
    ThinKeyError,
)

#: safetensors dtype names of floating-point tensors.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


class _Tensor:
    __slots__ = ("shape", "dtype", "file")

    def __init__(self, shape: tuple[int, ...], dtype: str, file: Path) -> None:
        self.shape, self.dtype, self.file = shape, dtype, file


def _read_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size."""
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ThinKeyError(f"{file}: truncated ({size} bytes, no safetensors header); re-create it")
        header_len = int.from_bytes(prefix, "little")
        if 8 + header_len > size:
            raise ThinKeyError(f"{file}: truncated ({size} bytes, header needs {8 + header_len}); re-create it")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ThinKeyError(f"{file}: unreadable safetensors header ({exc}); re-create it") from None
    if not isinstance(header, dict):
        raise ThinKeyError(f"{file}: unreadable safetensors header (not a JSON object); re-create it")
    # A truncated file can keep a valid header: the data must reach the end of the last tensor.
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError):
        raise ThinKeyError(f"{file}: unreadable safetensors header (a tensor has no data_offsets); re-create it") from None
    if 8 + header_len + end > size:
        raise ThinKeyError(f"{file}: truncated ({size} bytes, its header needs {8 + header_len + end}); re-create it")
    return header


def _tensors(folder: Path) -> dict[str, _Tensor]:
    """Name -> shape, dtype and file of every tensor in the folder's safetensors files."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found pickle-based {', '.join(pickles)}: re-convert to safetensors)" if pickles else ""
        raise ThinKeyError(f"{folder}: no *.safetensors weights{hint}")
    tensors: dict[str, _Tensor] = {}
    for file in files:
        _read_header(file)
        try:  # safetensors' own parser has the last word on whether the header is valid
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name in tensors:
                        raise ThinKeyError(f"{file}: tensor {name} is also in {tensors[name].file.name}; keep one copy")
                    piece = f.get_slice(name)
                    tensors[name] = _Tensor(tuple(piece.get_shape()), piece.get_dtype(), file)
        except ThinKeyError:
            raise
        except Exception as exc:  # safetensors raises its own error types for bad headers
            message = " ".join(str(exc).split())
            raise ThinKeyError(f"{file}: unreadable safetensors file ({message}); re-create it") from None
    return tensors


def _config_int(config: dict[str, Any], config_path: Path, *names: str) -> int:
    for name in names:
        value = config.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ThinKeyError(f"{config_path}: {name} is {value!r}; it must be a positive integer")
            return value
    raise ThinKeyError(f"{config_path}: missing {' / '.join(names)}; the model geometry cannot be known without it")


def check_checkpoint_files(folder: str | Path) -> ThinKeyConfig:
    """Validate config + weights of a thin-key checkpoint folder; returns its ThinKeyConfig or raises ThinKeyError."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ThinKeyError(f"{config_path}: missing; a checkpoint folder needs a config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ThinKeyError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ThinKeyError(f"{config_path}: not a JSON object")
    thin = ThinKeyConfig.from_hf_config(config, where=str(config_path))
    gpt2 = thin.family.family == SourceFamily.GPT2
    archs = config.get("architectures") or []
    if archs != [thin.thin_architecture]:
        raise ThinKeyError(
            f"{config_path}: architectures is {archs} but {CONFIG_KEY}.source_architecture "
            f"{thin.source_architecture} needs [{thin.thin_architecture!r}]; re-convert the checkpoint"
        )
    heads = _config_int(config, config_path, "num_attention_heads", "n_head")
    kv_heads = heads if gpt2 else (config.get("num_key_value_heads") or heads)
    hidden = _config_int(config, config_path, "hidden_size", "n_embd")
    layers = _config_int(config, config_path, "num_hidden_layers", "n_layer")
    config_head_dim = config.get("head_dim") or hidden // heads
    if config_head_dim != thin.head_dim:
        raise ThinKeyError(
            f"{config_path}: {CONFIG_KEY}.head_dim is {thin.head_dim} but the model's head_dim is {config_head_dim}; "
            "the two must agree (values keep the source head size)"
        )
    tensors = _tensors(folder)
    r, d = thin.rank, thin.head_dim

    def expect(name: str, shape: tuple[int, ...], field: str) -> _Tensor:
        found = tensors.get(name)
        if found is None:
            raise ThinKeyError(f"{folder}: tensor {name} is missing (needed for {CONFIG_KEY}.{field}); re-convert the checkpoint")
        if found.shape != shape:
            raise ThinKeyError(
                f"{found.file}: {name} has shape {list(found.shape)} but {CONFIG_KEY}.{field} = "
                f"{getattr(thin, field)} implies {list(shape)}; re-convert, or fix {CONFIG_KEY}.{field} in {config_path.name}"
            )
        if found.dtype not in FLOAT_DTYPES:
            raise ThinKeyError(f"{found.file}: {name} has dtype {found.dtype}; weights must be floating point")
        return found

    freq_tables: list[tuple[str, _Tensor]] = []
    for i in range(layers):
        if gpt2:
            prefix = next((p for p in (f"h.{i}.attn", f"transformer.h.{i}.attn") if f"{p}.c_attn.weight" in tensors), f"h.{i}.attn")
            expect(f"{prefix}.c_attn.weight", (hidden, 2 * heads * r + heads * d), "rank")
            expect(f"{prefix}.c_attn.bias", (2 * heads * r + heads * d,), "rank")
            expect(f"{prefix}.c_proj.weight", (heads * d, hidden), "head_dim")
            continue
        prefix = f"model.layers.{i}.self_attn"
        if thin.family.qk_norm:  # projections and norms keep the source shapes; the maps take q/k to r
            expect(f"{prefix}.q_proj.weight", (heads * d, hidden), "head_dim")
            expect(f"{prefix}.k_proj.weight", (kv_heads * d, hidden), "head_dim")
            expect(f"{prefix}.q_norm.weight", (d,), "head_dim")
            expect(f"{prefix}.k_norm.weight", (d,), "head_dim")
            if thin.rebuild:  # the source's normalised queries; the latent B k_norm(k) and its expansion A^T
                expect(f"{prefix}.{REBUILD_TABLE_NAME}", (kv_heads, d, r), "rank")
            else:
                expect(f"{prefix}.{QUERY_MAP_NAME}", (kv_heads, r, d), "rank")
            expect(f"{prefix}.{KEY_MAP_NAME}", (kv_heads, r, d), "rank")
        elif thin.rebuild:  # the source's queries; an r-wide latent key and its [Hkv, d, r] expansion
            expect(f"{prefix}.q_proj.weight", (heads * d, hidden), "head_dim")
            expect(f"{prefix}.k_proj.weight", (kv_heads * r, hidden), "rank")
            expect(f"{prefix}.{REBUILD_TABLE_NAME}", (kv_heads, d, r), "rank")
        else:
            expect(f"{prefix}.q_proj.weight", (heads * r, hidden), "rank")
            expect(f"{prefix}.k_proj.weight", (kv_heads * r, hidden), "rank")
        expect(f"{prefix}.v_proj.weight", (kv_heads * d, hidden), "head_dim")
        expect(f"{prefix}.o_proj.weight", (hidden, heads * d), "head_dim")
        if f"{prefix}.q_proj.bias" in tensors or thin.family.family == SourceFamily.QWEN2:
            width, field = (d, "head_dim") if thin.family.qk_norm else (r, "rank")
            q_width, q_field = (d, "head_dim") if thin.rebuild else (width, field)
            expect(f"{prefix}.q_proj.bias", (heads * q_width,), q_field)
            expect(f"{prefix}.k_proj.bias", (kv_heads * width,), field)
        if thin.rope != RopeStrategy.NONE:
            name = f"{prefix}.{ROPE_FREQS_NAME}"
            freq_tables.append((name, expect(name, (kv_heads, thin.rope_dims // 2), "rope_dims")))
        elif f"{prefix}.{ROPE_FREQS_NAME}" in tensors:
            raise ThinKeyError(
                f"{tensors[f'{prefix}.{ROPE_FREQS_NAME}'].file}: has {prefix}.{ROPE_FREQS_NAME} but "
                f"{CONFIG_KEY}.rope is 'none'; set the strategy it was converted with"
            )
    _check_freq_values(freq_tables)
    return thin


def _check_freq_values(tables: list[tuple[str, _Tensor]]) -> None:
    """RoPE tables are tiny ([Hkv, rope_dims / 2]): read them and check they are usable angles per position."""
    if not tables:
        return
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[str, _Tensor]]] = {}
    for name, tensor in tables:
        by_file.setdefault(tensor.file, []).append((name, tensor))
    for file, entries in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name, tensor in entries:
                if tensor.dtype != "F32":
                    raise ThinKeyError(f"{file}: {name} has dtype {tensor.dtype}; RoPE frequency tables are float32")
                values = f.get_tensor(name)
                bad = [float(v) for v in values.flatten().tolist() if not math.isfinite(v) or v < 0]
                if bad:
                    raise ThinKeyError(
                        f"{file}: {name} holds {bad[0]} ({len(bad)} bad entries); RoPE frequencies are finite "
                        "radians per position >= 0; re-convert the checkpoint"
                    )
