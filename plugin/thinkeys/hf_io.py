"""Reading and writing Hugging Face checkpoint folders, for the offline tools (converter, reference, trainer).

* :func:`load_state_dict` reads every weight of a folder: ``model.safetensors``, sharded
  safetensors (``model.safetensors.index.json``), or the older ``pytorch_model.bin`` (sharded or
  not, read with ``torch.load(weights_only=True)`` so a pickle cannot run code).
* :func:`save_state_dict` writes safetensors through ``huggingface_hub.save_torch_state_dict``
  (sharding at 5 GB and de-duplication of tied tensors, the same way ``save_pretrained`` does).
* :func:`atomic_directory` makes a folder appear complete or not at all: everything is written to
  a temporary folder beside the destination and renamed into place at the end, so an interrupted
  or failed run never leaves a half-written checkpoint that a server could pick up. While it is
  open, SIGTERM (``docker stop``, ``kill``, a job scheduler) raises ``SystemExit(143)`` instead of
  killing the process on the spot, so the temporary folder is removed as for Ctrl-C (SIGINT).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import torch

from thinkeys.checkpoint import ThinKeyError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_FILE = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"

#: Files that make up a tokenizer (any of the formats transformers reads) and its chat template.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
#: A folder has a usable tokenizer when it has one of these (the vocabulary itself).
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
#: Carried along unchanged by a conversion: sampling defaults and the model's licence terms.
SIDECAR_FILES = ("generation_config.json", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md")


def weight_files(folder: Path) -> list[Path]:
    """The weight files of ``folder`` in the order they should be read; raises if there are none."""
    folder = Path(folder)
    for index_name in (SAFETENSORS_INDEX, PYTORCH_INDEX):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise ThinKeyError(f"{index}: lists shard(s) that are missing: {', '.join(missing)}; re-download the checkpoint")
            return [folder / n for n in names]
    for single in (SAFETENSORS_FILE, PYTORCH_FILE):
        if (folder / single).is_file():
            return [folder / single]
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return loose
    raise ThinKeyError(
        f"{folder}: no weights found (expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {PYTORCH_FILE} or "
        f"{PYTORCH_INDEX}); point at a Hugging Face checkpoint folder"
    )


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint folder, by name, in their stored dtype, on CPU."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(folder)):
        if path.suffix == ".safetensors":
            part = load_file(path, device="cpu")
        else:
            part = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(part, dict):
                raise ThinKeyError(f"{path}: not a state dict ({type(part).__name__}); expected name -> tensor")
        duplicated = tensors.keys() & part.keys()
        if duplicated:
            raise ThinKeyError(f"{path}: tensor(s) also found in another shard: {sorted(duplicated)[:3]}")
        tensors.update(part)
    return tensors


def save_state_dict(state_dict: dict[str, torch.Tensor], folder: str | Path, *, max_shard_size: str = "5GB") -> None:
    """Write ``state_dict`` as (possibly sharded) safetensors into ``folder``, the way ``save_pretrained`` does."""
    from huggingface_hub import save_torch_state_dict

    contiguous = {name: t.detach().contiguous() for name, t in state_dict.items()}
    save_torch_state_dict(contiguous, Path(folder), max_shard_size=max_shard_size, safe_serialization=True)


def set_config_dtype(config: dict, dtype: torch.dtype) -> None:
    """Record ``dtype`` as a config's weight dtype (``dtype``, and ``torch_dtype`` where the config has it)."""
    config["dtype"] = str(dtype).removeprefix("torch.")
    if "torch_dtype" in config:
        config["torch_dtype"] = config["dtype"]


def write_checkpoint(dst: str | Path, state_dict: dict[str, torch.Tensor], config: dict, tokenizer_src: str | Path, *, force: bool = False) -> list[str]:
    """Write a complete Hugging Face folder atomically: weights, ``config.json``, tokenizer and sidecars.

    Returns the names of the files in it.
    """
    with atomic_directory(dst, force=force) as tmp:
        save_state_dict(state_dict, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_and_sidecars(tokenizer_src, tmp)
        return sorted(p.name for p in tmp.iterdir())


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_VOCAB_FILES)


def copy_tokenizer_and_sidecars(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer files, chat template, generation config and licence files from ``src`` to ``dst``."""
    copied = []
    for name in TOKENIZER_FILES + SIDECAR_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def _default_permissions(folder: Path) -> None:
    """Give ``folder`` and its files the permissions a plain mkdir/open would (mkdtemp and temp files use 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` for the block, so ``finally``/``except`` clean-ups run.

    Only where Python can install handlers (the main thread) and only over the default action: a
    program that handles SIGTERM itself (e.g. to save a training checkpoint) keeps its handler.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_directory(dst: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dst``; on success it becomes ``dst``, on error it is removed.

    ``dst`` must not exist unless ``force`` (then the old folder is replaced, and only once the new
    one is complete). The temporary folder is a hidden sibling so the rename stays on one file system.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not force:
        raise ThinKeyError(f"{dst}: already exists; choose another destination or pass --force to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_raises():
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        try:
            yield tmp
            _default_permissions(tmp)
            if dst.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
                dst.rename(old / dst.name)
                tmp.rename(dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
