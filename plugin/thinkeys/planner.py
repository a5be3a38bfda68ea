"""``thinkeys plan``: what thin keys would gain on a given model and KV memory, before converting anything.

It answers from a Hugging Face ``config.json`` (a file, or a checkpoint folder holding one) or a
named preset in ``configs/presets/`` (``llama-7b-mha``, ``mistral-7b``, ...): KV bytes per user at
a context length, stock vs thin, the bytes each user saves, and how many users fit, counted the
way vLLM counts them (whole blocks; see :mod:`thinkeys.accounting`, which does all the arithmetic).

    thinkeys plan llama-7b-mha --rank d/4 --context 128K --kv-memory 80GiB
    thinkeys plan path/to/config.json --rank 32 --kv-memory 24GB --json

Imports neither torch nor vLLM, so it answers in well under a second.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from thinkeys.accounting import (
    AttentionGeometry,
    CapacityComparison,
    KVCacheDtype,
    KVFootprint,
    compare,
    format_bytes,
    format_bytes_both,
    format_gain,
    geometry_from_config,
    make_geometry,
    parse_bytes,
    parse_tokens,
    resolve_kv_dtype,
)
from thinkeys.checkpoint import ThinKeyError, is_thin_key_config

#: Presets: HF-style config.json files, one per model, named by file stem.
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "presets"
#: vLLM's default block size (CacheConfig.DEFAULT_BLOCK_SIZE); its CPU platform uses 128.
DEFAULT_BLOCK_SIZE = 16
#: vLLM 0.32 CPU's default max_num_batched_tokens for an OpenAI server; CPU runs no async scheduling, so this
#: is its max_in_flight_tokens, which sizes the blocks of sliding-window layers (see thinkeys.accounting).
DEFAULT_MAX_IN_FLIGHT_TOKENS = 2048


# --- inputs ---------------------------------------------------------------------------------


def list_presets(presets_dir: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in presets_dir.glob("*.json"))


def load_config(source: str, presets_dir: Path = PRESETS_DIR) -> tuple[str, dict[str, Any]]:
    """(name, config dict) for a preset name, a config.json path or a checkpoint folder."""
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ThinKeyError(f"{source}: folder has no config.json; pass a model folder or a config.json file")
    elif not path.is_file():
        preset = presets_dir / f"{source}.json"
        if not preset.is_file():
            known = ", ".join(list_presets(presets_dir)) or "none"
            raise ThinKeyError(
                f"{source!r} is neither a file nor a known preset (presets: {known}); "
                "pass a preset name or the path of a Hugging Face config.json"
            )
        path = preset
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ThinKeyError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise ThinKeyError(f"{path}: a config.json holds a JSON object, this holds {type(config).__name__}")
    name = source if path.parent == presets_dir else str(config.get("_name_or_path") or source)
    return name, config


def parse_rank(text: str, head_dim: int) -> int:
    """``"32"`` -> 32; ``"d/4"`` -> head_dim // 4 (the paper writes ranks as fractions of d)."""
    raw = text.strip().lower().replace(" ", "")
    if raw.isdigit():
        return int(raw)
    match = re.fullmatch(r"d/(\d+)", raw)
    if match and int(match.group(1)) > 0 and head_dim % int(match.group(1)) == 0:
        return head_dim // int(match.group(1))
    raise ThinKeyError(
        f"--rank {text!r}: write a whole number of key dims (e.g. 32) or d/N with N dividing head_dim {head_dim}"
    )


def auto_model_dtype(config_dtype: str | None) -> tuple[str, str | None]:
    """The dtype vLLM's ``--dtype auto`` serves a model in, and a note when it differs from the config.

    vLLM downcasts float32 checkpoints (and configs naming no dtype, read as float32) to the
    platform's preferred dtype, bfloat16 on current GPUs and CPUs (``config/model.py:_resolve_auto_dtype``).
    """
    if config_dtype in (None, "float32"):
        said = "names no dtype" if config_dtype is None else "is float32"
        return "bfloat16", f"the config {said}; vLLM's dtype 'auto' serves it in bfloat16"
    return config_dtype, None


# --- the answer -----------------------------------------------------------------------------


class ThinStock(BaseModel):
    model_config = ConfigDict(frozen=True)
    stock: int | float
    thin: int | float


class Plan(BaseModel):
    """What ``thinkeys plan --json`` prints."""

    model_config = ConfigDict(frozen=True)

    model: str
    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    rank: int
    shared_kv: bool = False
    kv_cache_dtype: str
    stock_kv_cache_dtype: str
    block_size: int
    context_tokens: int
    kv_memory_bytes: int
    bytes_per_token: ThinStock
    per_user_bytes: ThinStock
    per_user_saved_bytes: int
    per_user_saved_fraction: float
    capacity_tokens: ThinStock
    max_concurrency: ThinStock
    max_users: ThinStock
    concurrency_gain: float | None
    notes: list[str]

    @classmethod
    def from_comparison(cls, name: str, comparison: CapacityComparison, notes: list[str]) -> "Plan":
        c, g = comparison, comparison.thin_footprint.geometry
        return cls(
            model=name,
            num_layers=g.num_layers,
            num_query_heads=g.num_query_heads,
            num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            rank=g.rank,
            shared_kv=g.shared_kv,
            kv_cache_dtype=c.thin_footprint.kv_dtype.name,
            stock_kv_cache_dtype=c.stock_footprint.kv_dtype.name,
            block_size=c.thin.block_size,
            context_tokens=c.context_tokens,
            kv_memory_bytes=c.kv_memory_bytes,
            bytes_per_token=ThinStock(stock=c.stock_footprint.bytes_per_token, thin=c.thin_footprint.bytes_per_token),
            per_user_bytes=ThinStock(stock=c.stock.bytes_per_user, thin=c.thin.bytes_per_user),
            per_user_saved_bytes=c.per_user_saved_bytes,
            per_user_saved_fraction=c.per_user_saved_bytes / c.stock.bytes_per_user,
            capacity_tokens=ThinStock(stock=c.stock.capacity_tokens, thin=c.thin.capacity_tokens),
            max_concurrency=ThinStock(stock=c.stock.max_concurrency, thin=c.thin.max_concurrency),
            max_users=ThinStock(stock=c.stock.max_users, thin=c.thin.max_users),
            concurrency_gain=c.concurrency_gain,
            notes=notes,
        )


def make_plan(
    source: str,
    *,
    rank: str | int | None,
    kv_memory: str | int,
    context: str | int | None = None,
    kv_dtype: str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    presets_dir: Path = PRESETS_DIR,
    shared_kv: bool = False,
    max_in_flight_tokens: int = DEFAULT_MAX_IN_FLIGHT_TOKENS,
    hybrid_kv_cache_manager: bool = True,
) -> Plan:
    """The plan for one model (preset name or config path), rank, KV memory and context.

    ``kv_dtype`` is the cache dtype of the planned (thin or shared) model, e.g. ``fp8`` or
    ``int8_per_token_head``; the stock model it is compared with keeps the model's own dtype.
    ``shared_kv`` plans a shared K=V checkpoint (one cached vector per token and KV head; key
    width = head_dim, so ``rank`` must be left out or equal head_dim). ``max_in_flight_tokens`` and
    ``hybrid_kv_cache_manager`` matter for models with sliding-window layers (Gemma 3): vLLM's
    ``max_num_batched_tokens`` (times 2 with async scheduling) and whether its hybrid manager is on.
    """
    name, config = load_config(source, presets_dir)
    notes: list[str] = []
    base: AttentionGeometry = geometry_from_config(config, name=name)
    if shared_kv or base.shared_kv:
        if rank is not None and parse_rank(str(rank), base.head_dim) != base.head_dim:
            raise ThinKeyError(
                f"a shared K=V cache stores one vector of width head_dim ({base.head_dim}) as both key and value: "
                "leave --rank out with --shared-kv"
            )
        geometry = make_geometry(**{**base.model_dump(), "key_dim": base.head_dim, "shared_kv": True})
    elif is_thin_key_config(config):
        geometry = base if rank is None else geometry_from_config(config, rank=parse_rank(str(rank), base.head_dim), name=name)
    elif rank is None:
        raise ThinKeyError(f"{name} is a stock model: say which key rank to plan for, e.g. --rank {base.head_dim // 4}")
    else:
        geometry = base.with_rank(parse_rank(str(rank), base.head_dim))

    if context is None:
        if geometry.max_position_embeddings is None:
            raise ThinKeyError(f"{name} names no max_position_embeddings: pass --context, e.g. --context 32K")
        context_tokens = int(geometry.max_position_embeddings)
    else:
        context_tokens = parse_tokens(context)
    if block_size < 1:
        raise ThinKeyError(f"--block-size must be a positive number of tokens, got {block_size}")

    model_dtype, dtype_note = auto_model_dtype(geometry.model_dtype)
    if kv_dtype == "auto" and dtype_note:
        notes.append(dtype_note)
    cache_dtype: KVCacheDtype = resolve_kv_dtype(kv_dtype, model_dtype)
    if geometry.hybrid and hybrid_kv_cache_manager:
        notes.append(
            f"{geometry.num_sliding_layers} of {geometry.num_layers} layers attend within {geometry.sliding_window} tokens: "
            f"vLLM's hybrid KV-cache manager keeps only their window (counted with max_in_flight_tokens "
            f"{max_in_flight_tokens}); bytes/token counts every layer"
        )
    elif geometry.sliding_window and geometry.sliding_window < context_tokens:
        notes.append(
            f"the config sets sliding_window={geometry.sliding_window}: vLLM keeps at most the window in "
            "sliding-window layers, so these figures (every layer caches every token) are an upper bound"
        )
    if geometry.max_position_embeddings and context_tokens > geometry.max_position_embeddings:
        notes.append(
            f"context {context_tokens:,} is longer than the model's max_position_embeddings "
            f"{geometry.max_position_embeddings:,}"
        )
    footprint = KVFootprint(
        geometry=geometry, kv_dtype=cache_dtype, block_size=block_size,
        max_in_flight_tokens=max_in_flight_tokens, hybrid_kv_cache_manager=hybrid_kv_cache_manager,
    )
    comparison = compare(
        footprint,
        kv_memory_bytes=parse_bytes(kv_memory),
        context_tokens=context_tokens,
        stock_kv_dtype=resolve_kv_dtype("auto", model_dtype),
    )
    if comparison.stock.max_users == 0:
        notes.append("not one stock request of this context fits in this KV memory")
    return Plan.from_comparison(name, comparison, notes)


def format_plan(plan: Plan) -> str:
    """The plan as a small aligned table."""
    p = plan
    gqa = f"{p.num_query_heads} query / {p.num_kv_heads} KV heads"
    fraction = f" (r = d/{p.head_dim // p.rank})" if p.head_dim % p.rank == 0 and p.rank < p.head_dim else ""
    layout = "one shared K=V vector per token and KV head" if p.shared_kv else f"thin keys of rank {p.rank}{fraction}"
    label = "shared K=V" if p.shared_kv else f"thin (r={p.rank})"
    lines = [
        f"{p.model}: {p.num_layers} layers, {gqa}, head_dim {p.head_dim}; {layout}",
        f"KV cache {p.kv_cache_dtype} (stock: {p.stock_kv_cache_dtype}), block {p.block_size} tokens, KV memory "
        f"{format_bytes_both(p.kv_memory_bytes)}, context {p.context_tokens:,} tokens per user",
        "",
    ]
    saved_token = p.bytes_per_token.stock - p.bytes_per_token.thin
    rows = [
        ("", "stock", label, "saved / gain"),
        (
            "KV bytes per token",
            format_bytes(p.bytes_per_token.stock),
            format_bytes(p.bytes_per_token.thin),
            f"{format_bytes(saved_token)} ({p.per_user_saved_fraction:.1%})",
        ),
        (
            "KV bytes per user",
            format_bytes_both(p.per_user_bytes.stock),
            format_bytes_both(p.per_user_bytes.thin),
            format_bytes_both(p.per_user_saved_bytes),
        ),
        (
            "KV capacity (tokens)",
            f"{p.capacity_tokens.stock:,}",
            f"{p.capacity_tokens.thin:,}",
            f"{p.capacity_tokens.thin - p.capacity_tokens.stock:+,}",
        ),
        (
            "max concurrency",
            f"{p.max_concurrency.stock:.2f}x",
            f"{p.max_concurrency.thin:.2f}x",
            format_gain(p.concurrency_gain),
        ),
        (
            "max users (whole)",
            f"{p.max_users.stock:,}",
            f"{p.max_users.thin:,}",
            f"{p.max_users.thin - p.max_users.stock:+,}",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


# --- command --------------------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Per-user KV bytes and max concurrent users, stock vs thin keys, for a model and a KV memory budget. "
        f"Presets: {', '.join(list_presets()) or 'none found'}."
    )
    parser.add_argument("source", nargs="?", help="preset name, a config.json, or a checkpoint folder")
    parser.add_argument("--rank", help="cached key dims per head: a number (32) or a fraction of head_dim (d/4)")
    parser.add_argument(
        "--context", help="tokens per user (4096, 32K, 128K; K = 1024); default: the model's max_position_embeddings"
    )
    parser.add_argument("--kv-memory", required=True, help="memory for the KV cache, e.g. 80GiB, 24GB, 512MiB")
    parser.add_argument(
        "--kv-dtype",
        default="auto",
        help="KV cache dtype of the thin/shared model (vLLM's --kv-cache-dtype): auto (the model's), bfloat16, "
        "float16, float32, fp8 (= fp8_e4m3), fp8_e5m2, int8_per_token_head, fp8_per_token_head; "
        "the stock model is always counted at the model's dtype",
    )
    parser.add_argument(
        "--shared-kv",
        action="store_true",
        help="plan a shared K=V checkpoint (one cached vector per token and KV head, as `thinkeys convert --shared-kv` makes)",
    )
    parser.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help=f"tokens per KV block (vLLM default {DEFAULT_BLOCK_SIZE}; CPU uses 128)"
    )
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=DEFAULT_MAX_IN_FLIGHT_TOKENS,
        help="the engine's max_num_batched_tokens (sizes sliding-window layers' blocks, e.g. Gemma 3's; "
        f"default {DEFAULT_MAX_IN_FLIGHT_TOKENS}, vLLM CPU's for a server)",
    )
    parser.add_argument(
        "--disable-hybrid-kv-cache-manager", action="store_true",
        help="plan as vLLM runs with --disable-hybrid-kv-cache-manager: sliding-window layers cache every token",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    if not args.source:
        raise ThinKeyError(f"say which model to plan for: a preset ({', '.join(list_presets())}) or a config.json path")
    plan = make_plan(
        args.source,
        rank=args.rank,
        kv_memory=args.kv_memory,
        context=args.context,
        kv_dtype=args.kv_dtype,
        block_size=args.block_size,
        shared_kv=args.shared_kv,
        max_in_flight_tokens=args.max_num_batched_tokens,
        hybrid_kv_cache_manager=not args.disable_hybrid_kv_cache_manager,
    )
    print(plan.model_dump_json(indent=2) if args.json else format_plan(plan))
    return 0
