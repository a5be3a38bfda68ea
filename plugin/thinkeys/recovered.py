"""Recovered thin-key weights as a small file that ships with the repository, applied to a fetched base model.

A recovered thin-key checkpoint differs from its base model only in the attention's query/key
projections (and their biases) and the per-layer RoPE tables; everything else (embeddings, MLPs,
values, norms: ~95% of the bytes) is the base model's. So the repository ships only the difference:

``<name>.safetensors``
    the tensors that differ from the base (thin ``q_proj``/``k_proj`` and ``thin_rope_freqs``), with
    the checkpoint's ``architectures`` and ``thin_keys`` config in the safetensors metadata, and
    the sha256 of the base tensors it must be applied to;
``<name>.json``
    its manifest: the delta file's sha256 (checked before use), the licence note, the exact
    command that regenerates it, and the figures measured on it.

With ``--low-rank K`` a changed tensor that keeps the base's shape (the d-wide query projection of a
rebuild checkpoint trained with ``thinkeys finetune --train-queries --query-rank K``) is stored as
two factors ``<name>.low_rank_u`` ``[out, K]`` / ``<name>.low_rank_v`` ``[K, in]`` of its change
(truncated SVD), and ``apply`` rebuilds ``base + U V``; for a change trained at rank K that is exact up
to the checkpoint's rounding, and the manifest records how much of the change the factors keep.

``thinkeys recovered apply DELTA --base ORIGINAL --out DST`` rebuilds the full thin-key checkpoint
in seconds (atomically, through :func:`thinkeys.hf_io.write_checkpoint`), refusing a delta whose
checksum does not match its manifest or a base whose tensors are not the ones it was made from.
``thinkeys recovered make THIN --base ORIGINAL --out DELTA`` writes the pair from a recovered
checkpoint (``make recover-default`` runs the whole recipe).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from thinkeys import hf_io
from thinkeys.checkpoint import CONFIG_KEY, ThinKeyConfig, ThinKeyError, is_thin_key_config

FORMAT = "thinkeys-recovered/1"
LOW_RANK_U, LOW_RANK_V = ".low_rank_u", ".low_rank_v"
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Shipped deltas of the default model, one per rank and strategy: ``<SHIPPED_PREFIX>-r<R>-<rope>.safetensors``.
SHIPPED_DIR = REPO_ROOT / "configs" / "recovered"
SHIPPED_PREFIX = "smollm2-135m-instruct-thin"


def shipped_delta(name: str) -> Path:
    """A shipped delta by short name (``r32-rebuild``), or ``name`` itself when it is a path."""
    if name.endswith(".safetensors") or "/" in name:
        return Path(name)
    path = SHIPPED_DIR / f"{SHIPPED_PREFIX}-{name}.safetensors"
    if not path.is_file():
        have = sorted(p.stem.removeprefix(SHIPPED_PREFIX + "-") for p in SHIPPED_DIR.glob("*.safetensors"))
        raise ThinKeyError(f"no shipped recovered weights named {name!r} (shipped: {', '.join(have) or 'none'}); "
                           "give one of those or a delta file from `thinkeys recovered make`")
    return path


#: The shipped delta of the default model (`make serve` applies it).
DEFAULT_DELTA = SHIPPED_DIR / f"{SHIPPED_PREFIX}-r32-rebuild.safetensors"


class RecoveredManifest(BaseModel):
    format: str = FORMAT
    name: str
    delta_file: str
    delta_sha256: str
    delta_bytes: int
    base_model: str = Field(description="what the delta applies to, for people")
    base_tensors_sha256: str = Field(description="digest of the base tensors kept as they are (see tensors_digest)")
    thin_keys: dict[str, Any]
    license: str
    regenerate: str = Field(description="the exact command that regenerates the delta")
    figures: dict[str, Any] = Field(default_factory=dict, description="measured on the checkpoint the delta rebuilds")
    low_rank: int | None = Field(None, description="rank of the factored changes (--low-rank), None when none is factored")
    low_rank_kept: float | None = Field(None, description="least share of a factored change's energy the factors keep")


def tensors_digest(state: dict[str, torch.Tensor], names: list[str]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``names`` (sorted): the base's identity, whatever its file layout."""
    digest = hashlib.sha256()
    for name in sorted(names):
        t = state[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _differing(thin: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n for n, t in thin.items() if n not in base or base[n].shape != t.shape or not torch.equal(base[n].to(t.dtype), t))


def _factor(change: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` factors ``U [out, K]``, ``V [K, in]`` of ``change`` (truncated SVD, split evenly) and the
    share of its energy (squared Frobenius norm) they keep."""
    u, s, vh = torch.linalg.svd(change.double(), full_matrices=False)
    total = float(s.pow(2).sum())
    kept = float(s[:rank].pow(2).sum()) / total if total > 0 else 1.0
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float(), kept


def _rebuild(base: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (base.float() + u.float() @ v.float()).to(base.dtype)


def make_delta(thin_dir: str | Path, base_dir: str | Path, out: str | Path, *, license: str, regenerate: str,
               figures: dict[str, Any] | None = None, base_model: str | None = None,
               low_rank: int | None = None) -> RecoveredManifest:
    """Write ``out`` (.safetensors) and its manifest (.json beside it) from a thin checkpoint and its base
    (with ``low_rank``: the changes of base-shaped tensors as rank-K factors, see the module docstring)."""
    from safetensors.torch import save_file

    thin_dir, base_dir, out = Path(thin_dir), Path(base_dir), Path(out)
    if out.suffix != ".safetensors":
        raise ThinKeyError(f"--out {out}: name the delta file *.safetensors (its manifest is written beside it as .json)")
    config = json.loads((thin_dir / "config.json").read_text())
    if not is_thin_key_config(config):
        raise ThinKeyError(f"{thin_dir}: not a thin-key checkpoint (no '{CONFIG_KEY}' in config.json)")
    thin, base = hf_io.load_state_dict(thin_dir), hf_io.load_state_dict(base_dir)
    changed = _differing(thin, base)
    factored = sorted(n for n in changed if low_rank is not None and n in base and base[n].shape == thin[n].shape
                      and thin[n].dim() == 2)
    if low_rank is not None and not factored:
        raise ThinKeyError(f"--low-rank {low_rank}: no changed tensor of {thin_dir} keeps its base shape (only a rebuild "
                           "checkpoint trained with --train-queries has one); drop --low-rank")
    if low_rank is not None and not 1 <= low_rank <= min(min(base[n].shape) for n in factored):
        raise ThinKeyError(f"--low-rank {low_rank}: must be between 1 and {min(min(base[n].shape) for n in factored)}")
    delta: dict[str, torch.Tensor] = {n: thin[n].contiguous() for n in changed if n not in factored}
    kept_share = 1.0
    for n in factored:
        u, v, share = _factor(thin[n].double() - base[n].double(), low_rank)
        delta[n + LOW_RANK_U], delta[n + LOW_RANK_V] = u.to(thin[n].dtype).contiguous(), v.to(thin[n].dtype).contiguous()
        kept_share = min(kept_share, share)
    kept = [n for n in thin if n not in changed or n in factored]  # a factored tensor's base must match too
    dropped = sorted(set(base) - set(thin))  # base tensors the thin model does not use (none for Llama)
    metadata = {
        "format": FORMAT,
        "architectures": json.dumps(config.get("architectures")),
        CONFIG_KEY: json.dumps(config[CONFIG_KEY]),
        "base_tensors_sha256": tensors_digest(base, kept),
        "dropped": json.dumps(dropped),
        "low_rank": json.dumps(factored),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest_path = out.with_suffix(".json")
    with tempfile.TemporaryDirectory(prefix=f".{out.stem}.", dir=out.parent) as tmp:
        tmp_delta, tmp_manifest = Path(tmp) / out.name, Path(tmp) / manifest_path.name
        save_file(delta, tmp_delta, metadata=metadata)
        manifest = RecoveredManifest(
            name=out.stem,
            delta_file=out.name,
            delta_sha256=hf_io.sha256_file(tmp_delta),
            delta_bytes=tmp_delta.stat().st_size,
            base_model=base_model or str(base_dir),
            base_tensors_sha256=metadata["base_tensors_sha256"],
            thin_keys=config[CONFIG_KEY],
            license=license,
            regenerate=regenerate,
            figures=figures or {},
            low_rank=low_rank if factored else None,
            low_rank_kept=round(kept_share, 6) if factored else None,
        )
        tmp_manifest.write_text(manifest.model_dump_json(indent=2) + "\n")
        tmp_delta.chmod(0o644)  # safetensors writes 0600; a shipped file is read by other users (containers)
        os.replace(tmp_delta, out)
        os.replace(tmp_manifest, manifest_path)
    return manifest


def read_manifest(delta: str | Path) -> RecoveredManifest:
    delta = Path(delta)
    path = delta.with_suffix(".json")
    if not delta.is_file():
        raise ThinKeyError(f"{delta}: no such recovered-weights file")
    if not path.is_file():
        raise ThinKeyError(f"{path}: the manifest of {delta.name} is missing; it carries the checksum, so the delta is not used without it")
    try:
        return RecoveredManifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise ThinKeyError(f"{path}: not a recovered-weights manifest ({exc.__class__.__name__})") from None


def apply_delta(delta: str | Path, base_dir: str | Path, dst: str | Path, *, force: bool = False) -> RecoveredManifest:
    """Rebuild the full thin-key checkpoint ``dst`` from ``base_dir`` and a shipped delta (see the module docstring)."""
    from safetensors import safe_open

    delta, base_dir = Path(delta), Path(base_dir)
    manifest = read_manifest(delta)
    actual = hf_io.sha256_file(delta)
    if actual != manifest.delta_sha256:
        raise ThinKeyError(f"{delta}: sha256 {actual[:12]}... does not match its manifest ({manifest.delta_sha256[:12]}...): "
                           "the file is damaged or was replaced; restore it from the repository (git checkout)")
    with safe_open(str(delta), framework="pt") as f:
        meta = f.metadata() or {}
        changed = {n: f.get_tensor(n) for n in f.keys()}
    if meta.get("format") != FORMAT:
        raise ThinKeyError(f"{delta}: format {meta.get('format')!r}, expected {FORMAT!r}")
    base_config_path = base_dir / "config.json"
    if not base_config_path.is_file():
        raise ThinKeyError(f"{base_dir}: not a model folder (no config.json); fetch the base model first (`thinkeys fetch`)")
    base = hf_io.load_state_dict(base_dir)
    for name in json.loads(meta.get("dropped", "[]")):
        base.pop(name, None)
    factored = json.loads(meta.get("low_rank", "[]"))
    kept = [n for n in base if n not in changed]
    if tensors_digest(base, kept) != meta.get("base_tensors_sha256"):
        raise ThinKeyError(f"{base_dir}: its weights are not the base model {delta.name} was made from "
                           f"({manifest.base_model}); fetch that model (`thinkeys fetch`) or regenerate the delta: {manifest.regenerate}")
    config = json.loads(base_config_path.read_text())
    config["architectures"] = json.loads(meta["architectures"])
    config[CONFIG_KEY] = json.loads(meta[CONFIG_KEY])
    ThinKeyConfig.from_hf_config(config, where=str(delta))  # validates the contract before anything is written
    for name in factored:
        changed[name] = _rebuild(base[name], changed.pop(name + LOW_RANK_U), changed.pop(name + LOW_RANK_V))
    state = {**{n: base[n] for n in kept}, **changed}
    hf_io.write_checkpoint(dst, state, config, base_dir, force=force)
    return manifest


# ---------------------------------------------------------------- CLI: thinkeys recovered

def build_parser(parser):  # noqa: ANN001 - argparse
    parser.description = "Ship recovered thin-key weights as a small delta file, and rebuild checkpoints from it."
    sub = parser.add_subparsers(dest="action", required=True)
    apply = sub.add_parser("apply", help="rebuild a thin-key checkpoint from a base model and a delta")
    apply.add_argument("delta", nargs="?", default=str(DEFAULT_DELTA),
                       help="delta .safetensors, or the short name of a shipped one (r32-rebuild, r32-mixed; default: the shipped default)")
    apply.add_argument("--base", required=True, help="the base model folder the delta was made from")
    apply.add_argument("--out", required=True, help="thin-key checkpoint folder to write")
    apply.add_argument("--force", action="store_true", help="replace --out if it exists")
    path = sub.add_parser("path", help="print the file of a shipped delta by short name (exit 2 when none ships)")
    path.add_argument("name", help="short name, e.g. r32-rebuild")
    make = sub.add_parser("make", help="write a delta (+ manifest) from a recovered thin-key checkpoint")
    make.add_argument("thin", help="recovered thin-key checkpoint folder")
    make.add_argument("--base", required=True, help="its base model folder")
    make.add_argument("--out", required=True, help="delta file, *.safetensors; the manifest goes beside it as .json")
    make.add_argument("--license", required=True, help="licence note, e.g. the base model's licence")
    make.add_argument("--regenerate", required=True, help="the exact command that regenerates this delta")
    make.add_argument("--base-model", default=None, help="the base model's name, for people")
    make.add_argument("--figures", default=None, help="JSON file of figures measured on the checkpoint, stored in the manifest")
    make.add_argument("--low-rank", type=int, default=None, metavar="K",
                      help="store changed base-shaped tensors (a rebuild checkpoint's trained query projection) as rank-K "
                      "factors of their change: for `thinkeys finetune --query-rank K` checkpoints")


def run(args) -> int:  # noqa: ANN001 - argparse
    if args.action == "apply":
        m = apply_delta(shipped_delta(args.delta), args.base, args.out, force=args.force)
        print(f"thinkeys recovered: {args.out} = {args.base} + {m.delta_file} (r = {m.thin_keys.get('rank')}, {m.thin_keys.get('rope')})")
        return 0
    if args.action == "path":
        print(shipped_delta(args.name))
        return 0
    figures = json.loads(Path(args.figures).read_text()) if args.figures else None
    m = make_delta(args.thin, args.base, args.out, license=args.license, regenerate=args.regenerate, figures=figures,
                   base_model=args.base_model, low_rank=args.low_rank)
    factored = f", changes stored at rank {m.low_rank} keeping >= {100 * m.low_rank_kept:.2f}% of their energy" if m.low_rank else ""
    print(f"thinkeys recovered: {args.out} ({m.delta_bytes / 1e6:.1f} MB, sha256 {m.delta_sha256[:12]}...{factored})")
    return 0
