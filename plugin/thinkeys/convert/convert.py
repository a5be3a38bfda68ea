"""Convert a Hugging Face checkpoint folder into a thin-key checkpoint folder.

Every check runs before any weight is read or anything is written, and the destination is
written through :func:`thinkeys.hf_io.atomic_directory`, so a refused or failed conversion leaves
no destination (and no temporary folder) behind.

The result is a normal HF folder: the source's tensors under the same names with thinner q/k
(:mod:`thinkeys.convert.families`), one RoPE frequency table per layer for RoPE families,
config.json with ``architectures`` = the thin twin and ``thin_keys`` = :class:`ThinKeyConfig`,
plus the tokenizer, chat template and generation config.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from thinkeys import hf_io
from thinkeys.checkpoint import (
    CONFIG_KEY,
    QK_NORM_STRATEGIES,
    SUPPORTED_SOURCES,
    RopeStrategy,
    ThinKeyConfig,
    ThinKeyError,
    rebuild_table_name,
    rope_freqs_name,
)
from thinkeys.convert.calibration import DEFAULT_CALIBRATION_TOKENS, Calibration, collect_calibration
from thinkeys.convert.qk_norm import PostNormCalibration
from thinkeys.convert.families import Geometry, layout_for
from thinkeys.convert.mixed import DEFAULT_NOPE_CONTEXT, build_thin_layer
from thinkeys.convert.rebuild import rebuild_factors, rebuild_layer
from thinkeys.convert.rope_strategies import layer_inv_freqs, thin_basis
from thinkeys.convert.svd import absorb, retained_key_energy

#: Config key (beside ``thin_keys``) recording how a data-aware conversion was made.
PROVENANCE_KEY = "thin_keys_provenance"
#: Strategies that read calibration statistics (``pairs`` and ``rebuild`` optionally, ``mixed`` always).
CALIBRATED = (RopeStrategy.PAIRS, RopeStrategy.MIXED, RopeStrategy.REBUILD)

#: Architectures people ask for that the converter refuses, and why (one line each).
UNSUPPORTED_SOURCES = {
    "Qwen3MoeForCausalLM": "Qwen3-MoE (mixture-of-experts MLPs and expert routing are not served by the thin-key models; dense Qwen3ForCausalLM is)",
    "Qwen2MoeForCausalLM": "Qwen2-MoE (mixture-of-experts MLPs are not served by the thin-key models; dense Qwen2ForCausalLM is)",
    "MixtralForCausalLM": "Mixtral (mixture-of-experts MLPs are not served by the thin-key models; dense MistralForCausalLM is)",
    "Gemma3ForConditionalGeneration": "Gemma 3 with vision (multimodal models are not supported: the image tower and its bidirectional image-token attention are not served by the thin-key models; convert the text-only Gemma3ForCausalLM)",
    "Gemma2ForCausalLM": "Gemma 2 (sliding-window layers and attention-logit soft-capping are not supported by the thin-key backend)",
    "GptOssForCausalLM": "gpt-oss (attention sinks and sliding-window layers are not supported by the thin-key backend)",
    "DeepseekV2ForCausalLM": "DeepSeek-V2 (MLA already caches a compressed latent; there is no per-head key projection to thin)",
    "DeepseekV3ForCausalLM": "DeepSeek-V3 (MLA already caches a compressed latent; there is no per-head key projection to thin)",
    "Phi3ForCausalLM": "Phi-3 (fused qkv_proj weights and partial/LongRoPE rotary embeddings are not mapped by the converter)",
}

#: --dtype choices.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ConversionReport:
    """What a conversion did, for the CLI summary and for callers that want figures."""

    src: Path
    dst: Path
    source_architecture: str
    thin: ThinKeyConfig
    geometry: Geometry
    dtype: torch.dtype
    #: Kept share of each KV head's key-projection energy, ``[layers, Hkv]`` (see ``retained_key_energy``).
    retained_energy: torch.Tensor
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def kv_bytes_per_token(self, rank: int | None = None) -> int:
        """KV-cache bytes per token over all layers, keys at ``rank`` (source: ``head_dim``) and values at head_dim."""
        g = self.geometry
        key_width = g.head_dim if rank is None else rank
        return g.num_layers * g.num_kv_heads * (key_width + g.head_dim) * self.dtype.itemsize

    def summary(self) -> str:
        g, t = self.geometry, self.thin
        before, after = self.kv_bytes_per_token(), self.kv_bytes_per_token(t.rank)
        energy = self.retained_energy
        return (
            f"Converted {self.src} ({self.source_architecture}: {g.num_layers} layers, {g.num_heads} query / "
            f"{g.num_kv_heads} KV heads, head dim {g.head_dim}) into {self.dst} ({t.thin_architecture}) in "
            f"{self.seconds:.1f} s: keys are {t.rank} wide instead of {g.head_dim}, RoPE strategy '{t.rope.value}' "
            f"({t.rope_dims} rotated dims), weights {str(self.dtype).removeprefix('torch.')} in "
            f"{len([f for f in self.files if f.endswith('.safetensors')])} safetensors file(s). "
            f"The thin keys keep {100 * energy.mean():.1f}% of the key projections' energy on average "
            f"(lowest head {100 * energy.min():.1f}%). KV cache per token: {before:,} -> {after:,} bytes "
            f"({100 * (1 - after / before):.1f}% smaller, {before / after:.2f}x the tokens in the same memory). "
            "Below full rank (and with 'svd' RoPE at any rank) the model is an approximation: measure its "
            "perplexity with `thinkeys eval` and recover with `thinkeys finetune`."
        )


@dataclass
class _Plan:
    src: Path
    dst: Path
    raw_config: dict[str, Any]
    hf_config: Any
    architecture: str
    geometry: Geometry
    thin: ThinKeyConfig
    dtype: torch.dtype | None
    inv_freq: torch.Tensor | None  # [d/2] of layer 0 (every layer's, except in models with per-layer-type RoPE)
    layer_inv_freq: list[torch.Tensor] | None = None  # [d/2] per layer (Gemma 3: local base on sliding layers)


def _check_calibration(strategy: RopeStrategy, calibration: Any, architecture: str, hf_config: Any) -> None:
    """Refuse calibration where it does not apply, and ``mixed`` without it."""
    if strategy == RopeStrategy.MIXED and calibration is None:
        raise ThinKeyError(
            "--rope mixed is fitted to real activations: give --calibration TEXT "
            "(text from the tune split, e.g. data/wiki/tune.txt)"
        )
    if calibration is None:
        return
    if strategy not in CALIBRATED:
        raise ThinKeyError(
            f"--calibration applies to --rope pairs, mixed or rebuild, not {strategy.value!r}; leave it out"
        )
    collected = isinstance(calibration, (Calibration, PostNormCalibration))
    if not collected and not Path(calibration).is_file():
        raise ThinKeyError(f"--calibration {calibration}: no such text file (use the tune split, e.g. data/wiki/tune.txt)")
    post_norm = SUPPORTED_SOURCES[architecture].qk_norm
    if collected and isinstance(calibration, PostNormCalibration) != post_norm:
        raise ThinKeyError(
            f"the calibration statistics were taken {'after' if not post_norm else 'before'} a q/k norm, but "
            f"{architecture} needs them {'after' if post_norm else 'before'} one; collect them from this source model"
        )
    if collected and calibration.num_layers != hf_config.num_hidden_layers:
        raise ThinKeyError(
            f"the calibration statistics have {calibration.num_layers} layers but {architecture} has "
            f"{hf_config.num_hidden_layers}; collect them from this source model"
        )


def _plan(src: str | Path, dst: str | Path, rank: int, rope: str | RopeStrategy | None, dtype: str | None, force: bool, calibration: Any = None) -> _Plan:
    """All checks of a conversion request, before any weight is read or anything is written."""
    src, dst = Path(src).absolute(), Path(dst).absolute()
    if not src.is_dir():
        raise ThinKeyError(f"{src}: not a folder; SRC must be a Hugging Face checkpoint folder")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ThinKeyError(f"{config_path}: missing; SRC must be a Hugging Face checkpoint folder with a config.json")
    raw = json.loads(config_path.read_text())
    if CONFIG_KEY in raw:
        raise ThinKeyError(
            f"{src}: already a thin-key checkpoint ({CONFIG_KEY}: rank {raw[CONFIG_KEY].get('rank')}); "
            "convert the original model instead"
        )
    if "quantization_config" in raw:
        raise ThinKeyError(f"{config_path}: quantized checkpoints cannot be factored; convert a full-precision checkpoint")
    archs = raw.get("architectures") or []
    supported = ", ".join(sorted(SUPPORTED_SOURCES))
    if len(archs) == 1 and archs[0] in UNSUPPORTED_SOURCES:
        raise ThinKeyError(f"{config_path}: {archs[0]} is not supported: {UNSUPPORTED_SOURCES[archs[0]]}")
    if len(archs) != 1 or archs[0] not in SUPPORTED_SOURCES:
        raise ThinKeyError(f"{config_path}: architecture {archs or 'unset'} is not supported; supported: {supported}")
    arch = archs[0]
    family = SUPPORTED_SOURCES[arch]

    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ThinKeyError(f"rank must be an integer, got {rank!r}")
    if rope is None:
        strategy = RopeStrategy.PAIRS if family.rotary else RopeStrategy.NONE
    else:
        try:
            strategy = RopeStrategy(rope)
        except ValueError:
            raise ThinKeyError(f"--rope {rope!r} is not one of: {', '.join(s.value for s in RopeStrategy)}") from None
    if not family.rotary and strategy != RopeStrategy.NONE:
        raise ThinKeyError(f"{arch} has no rotary embedding: --rope {strategy.value} does not apply (leave --rope out)")
    if family.rotary and strategy == RopeStrategy.NONE:
        raise ThinKeyError(f"{arch} uses RoPE: choose --rope pairs (exact on kept pairs) or --rope svd (the paper's)")
    if family.qk_norm and strategy not in QK_NORM_STRATEGIES:
        raise ThinKeyError(
            f"--rope {strategy.value} does not apply to {arch}: its keys are normalised per head before RoPE, so the "
            "thin basis must keep RoPE exact after the norm; choose --rope pairs, mixed or rebuild"
        )
    _refuse_unsupported_attention(config_path, arch, raw)
    if dtype is not None and dtype not in DTYPES:
        raise ThinKeyError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")

    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(src)
    except (OSError, ValueError, KeyError) as exc:
        raise ThinKeyError(f"{config_path}: transformers cannot read it ({exc})") from None
    geo = Geometry.from_config(hf_config)
    d = geo.head_dim
    if not 1 <= rank <= d:
        raise ThinKeyError(f"rank {rank} is out of range: choose 1 <= rank <= head_dim ({d})")
    if strategy == RopeStrategy.REBUILD and d % rank:
        divisors = [r for r in range(2, d + 1, 2) if d % r == 0]
        raise ThinKeyError(f"--rope rebuild needs a rank that divides head_dim {d}: choose one of {divisors}")
    if family.rotary and rank % 2:
        raise ThinKeyError(f"rank {rank} is odd: RoPE rotates pairs of dims, so with RoPE the rank must be even")
    if not family.rotary and (getattr(hf_config, "scale_attn_by_inverse_layer_idx", False) or getattr(hf_config, "add_cross_attention", False)):
        raise ThinKeyError(f"{config_path}: scale_attn_by_inverse_layer_idx / add_cross_attention are not supported")
    layer_inv_freq = layer_inv_freqs(arch, hf_config, d) if family.rotary else None
    inv_freq = layer_inv_freq[0] if layer_inv_freq else None
    _check_calibration(strategy, calibration, arch, hf_config)
    if not hf_io.has_tokenizer(src):
        raise ThinKeyError(
            f"{src}: no tokenizer (expected one of {', '.join(hf_io.TOKENIZER_VOCAB_FILES)}); a served model needs one"
        )
    hf_io.weight_files(src)  # raises when there are none

    if dst == src or dst in src.parents or src in dst.parents:
        raise ThinKeyError(f"{dst}: DST must be a separate folder, not SRC or a folder inside/around it")
    if dst.exists() and not force:
        raise ThinKeyError(f"{dst}: already exists; choose another destination or pass --force to replace it")
    thin = ThinKeyConfig(
        rank=rank,
        head_dim=d,
        rope=strategy,
        rope_dims=d if strategy == RopeStrategy.REBUILD else rank if strategy != RopeStrategy.NONE else 0,
        source_architecture=arch,
    )
    return _Plan(src, dst, raw, hf_config, arch, geo, thin, DTYPES[dtype] if dtype else None, inv_freq, layer_inv_freq)


def _refuse_unsupported_attention(config_path: Path, arch: str, raw: dict[str, Any]) -> None:
    """Attention features of a supported architecture that thin keys do not carry (one line each)."""
    layer_types = raw.get("layer_types") or []
    if arch == "Gemma3ForCausalLM":
        # Gemma 3's sliding-window layers are served (the backend honours the window); what it does not carry:
        if raw.get("attn_logit_softcapping") is not None:
            raise ThinKeyError(
                f"{config_path}: Gemma3ForCausalLM with attn_logit_softcapping is not supported: "
                "the thin-key attention backend does not soft-cap attention logits"
            )
        if raw.get("use_bidirectional_attention"):
            raise ThinKeyError(
                f"{config_path}: Gemma3ForCausalLM with use_bidirectional_attention is not supported: "
                "the thin-key attention backend serves causal decoders only"
            )
        return _refuse_sinks(config_path, raw)
    # Mistral configs apply their sliding_window by default; Qwen configs only with use_sliding_window.
    mistral_window = arch == "MistralForCausalLM" and raw.get("sliding_window") is not None
    if raw.get("use_sliding_window") or "sliding_attention" in layer_types or mistral_window:
        raise ThinKeyError(
            f"{config_path}: {arch} with sliding-window layers is not supported: the thin-key attention "
            "backend honours sliding windows only for Gemma 3 so far; convert a checkpoint with use_sliding_window false"
        )
    _refuse_sinks(config_path, raw)


def _refuse_sinks(config_path: Path, raw: dict[str, Any]) -> None:
    if raw.get("attention_sinks") or raw.get("sinks") or raw.get("dual_chunk_attention_config"):
        raise ThinKeyError(
            f"{config_path}: attention sinks / dual-chunk attention are not supported by the thin-key attention backend"
        )


def _source_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most of the floating-point weights are stored in (the weights, not config.json, are the truth)."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__)


def run_conversion(
    src: str | Path,
    dst: str | Path,
    rank: int,
    rope: str | RopeStrategy | None = None,
    dtype: str | None = None,
    force: bool = False,
    *,
    progress: bool = True,
    calibration: str | Path | Calibration | PostNormCalibration | None = None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    nope_context: float = DEFAULT_NOPE_CONTEXT,
) -> ConversionReport:
    """Convert SRC to a thin-key checkpoint at DST and return what was done (see :func:`convert_checkpoint`)."""
    start = time.monotonic()
    plan = _plan(src, dst, rank, rope, dtype, force, calibration)
    geo, thin = plan.geometry, plan.thin
    if calibration is not None and not isinstance(calibration, (Calibration, PostNormCalibration)):
        calibration = collect_calibration(plan.src, calibration, tokens=calibration_tokens, progress=progress)
    usage = {"kept_pairs": 0, "shared_band_slots": 0, "unrotated_dims": 0}  # summed over heads (mixed / calibrated pairs)

    state = hf_io.load_state_dict(plan.src)
    out_dtype = plan.dtype or _source_dtype(state)
    state = {n: t.to(out_dtype) if t.is_floating_point() else t for n, t in state.items()}
    layout = layout_for(plan.architecture, geo, state)

    energy = torch.empty(geo.num_layers, geo.num_kv_heads, dtype=torch.float64)
    qk_norm = thin.family.qk_norm  # the maps act after q/k norm and are stored, not absorbed
    for i in tqdm(range(geo.num_layers), desc="converting layers", unit="layer", disable=not progress):
        qk = layout.read(state, i)
        inv_freq = plan.layer_inv_freq[i] if plan.layer_inv_freq else None  # this layer's RoPE (Gemma 3: per layer type)
        # What the strategies look at: q/k themselves, or a linear stand-in for the normalised q/k.
        seen = layout.post_norm_proxy(state, i, qk) if qk_norm else qk
        if thin.rope == RopeStrategy.REBUILD:  # cached latent B k, rebuilt A^T c at read (convert/rebuild.py)
            q_m = k_m = None
            if calibration is not None:
                moments = calibration.layer_moments(i, qk)
                q_m, k_m = moments.q_moment, moments.k_moment
            # QK-norm: B acts on the normalised key (data-free: the SVD of its linear stand-in)
            b, expand = rebuild_factors("joint" if calibration is not None else "svd", seen.k_weight, thin.rank, q_m, k_m)
            energy[i] = retained_key_energy(seen.k_weight, torch.linalg.qr(expand).Q)
            thin_qk = None if qk_norm else rebuild_layer(qk, b)
            q_map, k_map = None, b  # QK-norm: the latent is B k_norm(k); queries are the source's
            state[rebuild_table_name(layout.layer_prefix(i))] = expand.to(torch.float32).contiguous()  # [Hkv, d, r]
            freqs = inv_freq.to(torch.float32)[None].expand(geo.num_kv_heads, -1)  # the source's own RoPE
        elif calibration is not None:  # data-aware: calibrated pairs, or mixed (thinkeys.convert.mixed)
            layer = build_thin_layer(
                seen, thin.rank, inv_freq, calibration.layer_moments(i, qk),
                nope_context=nope_context if thin.rope == RopeStrategy.MIXED else None,
            )
            u, sv, _ = torch.linalg.svd(layer.key_map.transpose(1, 2), full_matrices=False)  # u: [Hkv, d, r]
            key_basis = u * (sv > 1e-9 * sv.amax(-1, keepdim=True))[:, None, :]  # the key subspace kept
            energy[i] = retained_key_energy(seen.k_weight, key_basis)
            for head in layer.plans:
                usage["kept_pairs"] += len(head.rotary)
                usage["shared_band_slots"] += head.slots_used - len(head.rotary)
                usage["unrotated_dims"] += head.unrotated_rank
            thin_qk, freqs = layer.qk, layer.freqs
            q_map, k_map = layer.query_map, layer.key_map  # [Hkv, r, d]
        else:
            basis = thin_basis(thin.rope, seen, thin.rank, inv_freq)  # basis: [Hkv, d, r]
            energy[i] = retained_key_energy(seen.k_weight, basis.basis)
            thin_qk, freqs = (None if qk_norm else absorb(qk, basis.basis)), basis.freqs
            q_map = k_map = basis.basis.transpose(1, 2)  # [Hkv, r, d]
        if qk_norm:
            layout.write_maps(state, i, None if q_map is None else q_map.to(out_dtype), k_map.to(out_dtype))
        else:
            for name in ("q_weight", "k_weight", "q_bias", "k_bias"):
                t = getattr(thin_qk, name)
                setattr(thin_qk, name, None if t is None else t.to(out_dtype).contiguous())
            layout.write(state, i, thin_qk)
        if freqs is not None:
            # a copy of its own: with one KV head, expand() is a no-op and the layers sharing a RoPE base would
            # store one tensor under several names, which the safetensors writer keeps only once
            state[rope_freqs_name(layout.layer_prefix(i))] = freqs.clone(memory_format=torch.contiguous_format)  # [Hkv, r/2] float32

    config = dict(plan.raw_config)
    config["architectures"] = [thin.thin_architecture]
    config["head_dim"] = geo.head_dim
    hf_io.set_config_dtype(config, out_dtype)
    config[CONFIG_KEY] = thin.to_dict()
    if calibration is not None:
        config[PROVENANCE_KEY] = {
            "strategy": thin.rope.value,
            **({"rebuild_kind": "joint"} if thin.rope == RopeStrategy.REBUILD else {}),
            "calibration": calibration.describe(),
            **({"nope_context": nope_context} if thin.rope == RopeStrategy.MIXED else {}),
            "per_head_mean": {k: v / (geo.num_layers * geo.num_kv_heads) for k, v in usage.items()},
        }

    files = hf_io.write_checkpoint(plan.dst, state, config, plan.src, force=force)

    return ConversionReport(
        src=plan.src,
        dst=plan.dst,
        source_architecture=plan.architecture,
        thin=thin,
        geometry=geo,
        dtype=out_dtype,
        retained_energy=energy,
        files=files,
        seconds=time.monotonic() - start,
    )


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    rank: int,
    rope: str | RopeStrategy | None = None,
    dtype: str | None = None,
    force: bool = False,
    *,
    progress: bool = True,
    calibration: str | Path | Calibration | None = None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    nope_context: float = DEFAULT_NOPE_CONTEXT,
) -> Path:
    """Convert the HF checkpoint folder ``src`` into a thin-key checkpoint folder ``dst``; returns ``dst``.

    ``rank``: width r of every key (and query) head, 1 <= r <= head_dim, even with RoPE.
    ``rope``: ``"pairs"`` (default for RoPE families), ``"svd"`` (the paper's), ``"none"`` (GPT-2, the
    only choice there). ``dtype``: ``float32`` / ``float16`` / ``bfloat16``; default: the source's.
    ``force``: replace an existing ``dst``. Raises :class:`ThinKeyError` (leaving no ``dst``) on bad input.
    ``calibration``: a text file (tune split; ``calibration_tokens`` of it are run through the source)
    or precollected :class:`~thinkeys.convert.calibration.Calibration`; makes ``pairs`` choose its pairs
    from real activations and is required by ``"mixed"`` (see :mod:`thinkeys.convert.mixed`, whose
    ``nope_context`` says which pairs turn slowly enough to be folded into the unrotated part).
    """
    return run_conversion(
        src, dst, rank, rope, dtype, force, progress=progress,
        calibration=calibration, calibration_tokens=calibration_tokens, nope_context=nope_context,
    ).dst
