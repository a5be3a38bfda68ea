"""``thinkeys convert SRC DST --shared-kv``: shared key-value (Q-K=V) checkpoints.

A model whose value projection IS its key projection (trained that way, as in the QKV-variants
paper) needs one cached vector per token and KV head instead of two. This turns such a model
(Llama / Mistral / Qwen2 / GPT-2, with ``v_proj == k_proj`` exactly in every layer) into a
thin-key checkpoint with ``shared_kv: true`` (see ``thinkeys.checkpoint``): weights unchanged
(``v_proj`` stays, equal to ``k_proj``), ``rank = head_dim``, and for RoPE models the source's own
frequencies as ``thin_rope_freqs`` (``rope: pairs`` over all dims, which is the source's rotation).
Models whose value and key projections differ are refused: sharing them would change the model.

:func:`tie_value_to_key` makes such a source from any model by overwriting ``v_proj`` with
``k_proj``. That is a different model (its quality is not the original's); it exists for tests
and for capacity measurements.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from thinkeys import hf_io
from thinkeys.checkpoint import CONFIG_KEY, RopeStrategy, ThinKeyError, rope_freqs_name
from thinkeys.convert.convert import ConversionReport, _plan, _source_dtype
from thinkeys.convert.families import Geometry, GPT2Layout, layout_for


def _key_value_tensors(layout, state: dict[str, torch.Tensor], i: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, key tensor, value tensor) pairs of layer ``i``: weights, and biases where present."""
    if isinstance(layout, GPT2Layout):
        p, D = f"{layout.layer_prefix(i)}.attn.c_attn", layout.geo.hidden
        w, b = state[f"{p}.weight"], state[f"{p}.bias"]
        return [(f"{p}.weight", w[:, D : 2 * D], w[:, 2 * D :]), (f"{p}.bias", b[D : 2 * D], b[2 * D :])]
    p = f"{layout.layer_prefix(i)}.self_attn"
    pairs = [(f"{p}.v_proj.weight", state[f"{p}.k_proj.weight"], state[f"{p}.v_proj.weight"])]
    if f"{p}.k_proj.bias" in state or f"{p}.v_proj.bias" in state:
        k_b, v_b = state.get(f"{p}.k_proj.bias"), state.get(f"{p}.v_proj.bias")
        if k_b is None or v_b is None:
            raise ThinKeyError(f"layer {i}: only one of k_proj / v_proj has a bias, so they are not one projection")
        pairs.append((f"{p}.v_proj.bias", k_b, v_b))
    return pairs


def check_shared(layout, state: dict[str, torch.Tensor], num_layers: int) -> None:
    """Raise unless every layer's value projection equals its key projection exactly."""
    for i in range(num_layers):
        for name, k, v in _key_value_tensors(layout, state, i):
            if k.shape != v.shape or not torch.equal(k, v):
                diff = "shapes differ" if k.shape != v.shape else f"max |v - k| = {(v.float() - k.float()).abs().max():.3g}"
                raise ThinKeyError(
                    f"layer {i}: the value projection is not the key projection ({name}: {diff}). --shared-kv is for "
                    "models trained with one shared key-value projection (Q-K=V); convert this model with "
                    "`thinkeys convert SRC DST --rank R` instead"
                )


def _head_dim(src: Path) -> int:
    """head_dim of SRC, or 2 when it cannot be read (``_plan`` then reports what is wrong)."""
    try:
        from transformers import AutoConfig

        return Geometry.from_config(AutoConfig.from_pretrained(src)).head_dim
    except Exception:  # noqa: BLE001 - _plan gives the user-facing error
        return 2


def convert_shared_kv(
    src: str | Path, dst: str | Path, dtype: str | None = None, force: bool = False
) -> ConversionReport:
    """Write the shared K=V checkpoint of SRC (whose ``v_proj == k_proj``) to DST."""
    start = time.monotonic()
    src = Path(src).absolute()
    d = _head_dim(src)
    plan = _plan(src, dst, d, None, dtype, force)
    thin = plan.thin.model_copy(update={"shared_kv": True})
    thin = type(thin).model_validate(thin.model_dump())  # re-run the checks with shared_kv set
    geo = plan.geometry

    state = hf_io.load_state_dict(plan.src)
    out_dtype = plan.dtype or _source_dtype(state)
    state = {n: t.to(out_dtype) if t.is_floating_point() else t for n, t in state.items()}
    layout = layout_for(plan.architecture, geo, state)
    check_shared(layout, state, geo.num_layers)
    if thin.rope != RopeStrategy.NONE:
        table = plan.inv_freq.to(torch.float32).expand(geo.num_kv_heads, -1).contiguous()  # [Hkv, d/2]
        for i in range(geo.num_layers):
            state[rope_freqs_name(layout.layer_prefix(i))] = table.clone()

    config = dict(plan.raw_config)
    config["architectures"] = [thin.thin_architecture]
    config["head_dim"] = geo.head_dim
    hf_io.set_config_dtype(config, out_dtype)
    config[CONFIG_KEY] = thin.to_dict()
    files = hf_io.write_checkpoint(plan.dst, state, config, plan.src, force=force)
    return ConversionReport(
        src=plan.src,
        dst=plan.dst,
        source_architecture=plan.architecture,
        thin=thin,
        geometry=geo,
        dtype=out_dtype,
        retained_energy=torch.ones(geo.num_layers, geo.num_kv_heads, dtype=torch.float64),
        files=files,
        seconds=time.monotonic() - start,
    )


def shared_summary(report: ConversionReport) -> str:
    g = report.geometry
    before = g.num_layers * g.num_kv_heads * 2 * g.head_dim * report.dtype.itemsize
    after = before // 2
    return (
        f"Converted {report.src} ({report.source_architecture}: {g.num_layers} layers, {g.num_heads} query / "
        f"{g.num_kv_heads} KV heads, head dim {g.head_dim}; value projection = key projection) into {report.dst} "
        f"({report.thin.thin_architecture}, shared_kv) in {report.seconds:.1f} s. The cache stores one "
        f"{g.head_dim}-wide vector per token and KV head: {before:,} -> {after:,} bytes per token (2x the tokens "
        "in the same memory; 4x with --kv-cache-dtype fp8). Same model, same outputs."
    )


def tie_value_to_key(src: str | Path, dst: str | Path, force: bool = False) -> Path:
    """A copy of SRC with every ``v_proj`` overwritten by ``k_proj``: a DIFFERENT model, for tests and capacity figures."""
    src = Path(src).absolute()
    plan = _plan(src, dst, _head_dim(src), None, None, force)
    state = hf_io.load_state_dict(plan.src)
    layout = layout_for(plan.architecture, plan.geometry, state)
    for i in range(plan.geometry.num_layers):
        if isinstance(layout, GPT2Layout):
            p, D = f"{layout.layer_prefix(i)}.attn.c_attn", plan.geometry.hidden
            for name in (f"{p}.weight", f"{p}.bias"):
                t = state[name].clone()
                t[..., 2 * D :] = t[..., D : 2 * D]
                state[name] = t
            continue
        p = f"{layout.layer_prefix(i)}.self_attn"
        state[f"{p}.v_proj.weight"] = state[f"{p}.k_proj.weight"].clone()
        if f"{p}.k_proj.bias" in state:
            state[f"{p}.v_proj.bias"] = state[f"{p}.k_proj.bias"].clone()
        else:
            state.pop(f"{p}.v_proj.bias", None)
    hf_io.write_checkpoint(plan.dst, state, plan.raw_config, plan.src, force=force)
    return plan.dst
