"""Check a thin-key checkpoint's weight files against its config before an engine loads them.

Reads only safetensors headers (no tensor data), so it is cheap enough to run before every start.
Each problem is reported as one line naming the file and the tensor or field, so a broken checkpoint
fails before vLLM starts instead of as a traceback deep in a worker.
"""

from __future__ import annotations

import json
from pathlib import Path

from thinkeys.checkpoint import ROPE_FREQS_NAME, RopeStrategy, SourceFamily, ThinKeyConfig, ThinKeyError


def _tensor_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found pickle-based {', '.join(pickles)}: re-convert to safetensors)" if pickles else ""
        raise ThinKeyError(f"{folder}: no *.safetensors weights{hint}")
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in files:
        size = file.stat().st_size
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = (tuple(f.get_slice(name).get_shape()), file)
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise ThinKeyError(f"{file}: unreadable safetensors file ({exc}); re-create it") from None
        # A truncated file can keep a valid header: the data must reach the end of the last tensor.
        header_len = int.from_bytes(file.open("rb").read(8), "little")
        header = json.loads(file.open("rb").read(8 + header_len)[8:])
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ThinKeyError(
                f"{file}: truncated ({size} bytes, header needs {8 + header_len + end}); re-create it"
            )
    return shapes


def check_checkpoint_files(folder: str | Path) -> ThinKeyConfig:
    """Validate config + weights of a thin-key checkpoint; returns its ThinKeyConfig."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    thin = ThinKeyConfig.from_hf_config(config, where=str(folder / "config.json"))
    shapes = _tensor_shapes(folder)
    heads = config.get("num_attention_heads") or config.get("n_head")
    kv_heads = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size") or config.get("n_embd")
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    r, d = thin.rank, thin.head_dim

    def expect(name: str, shape: tuple[int, ...], field: str) -> None:
        found = shapes.get(name)
        if found is None:
            raise ThinKeyError(f"{folder}: tensor {name} is missing (thin_keys.{field})")
        if found[0] != shape:
            raise ThinKeyError(
                f"{found[1]}: {name} has shape {list(found[0])} but thin_keys.{field} implies {list(shape)}"
            )

    for i in range(layers):
        if thin.family.family == SourceFamily.GPT2:
            expect(f"h.{i}.attn.c_attn.weight" if f"h.{i}.attn.c_attn.weight" in shapes else f"transformer.h.{i}.attn.c_attn.weight",
                   (hidden, 2 * heads * r + heads * d), "rank")
            continue
        prefix = f"model.layers.{i}.self_attn"
        expect(f"{prefix}.q_proj.weight", (heads * r, hidden), "rank")
        expect(f"{prefix}.k_proj.weight", (kv_heads * r, hidden), "rank")
        expect(f"{prefix}.v_proj.weight", (kv_heads * d, hidden), "head_dim")
        if thin.rope != RopeStrategy.NONE:
            expect(f"{prefix}.{ROPE_FREQS_NAME}", (kv_heads, thin.rope_dims // 2), "rope_dims")
    return thin
