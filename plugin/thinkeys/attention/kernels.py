"""The compiled CPU kernels for thin-key attention: built on first use, cached, optional.

``csrc/paged_attention.cpp`` is compiled with ``torch.utils.cpp_extension.load`` the first time a
process needs it (about a minute on two cores) into ``$XDG_CACHE_HOME/thinkeys/kernels/`` (or
``$THINKEYS_KERNEL_CACHE``), keyed by torch version and instruction set; later processes only load
the shared library. It registers ``torch.ops.thinkeys.paged_attention`` and
``torch.ops.thinkeys.write_kv``, which read and write plain float slots and the 8-bit slots of
``quant.py`` in place (``cache_format``: ``plain``, ``fp8_e4m3``, ``fp8_e5m2`` with per-tensor
scales, ``int8_per_token_head``, ``fp8_per_token_head`` with the scales inside each slot).

Instruction set: no ``-march=native``. ``-mavx2 -mfma -mf16c`` (the kernel's intrinsics path) is
added only when torch's own runtime CPU detection (``torch.backends.cpu.get_cpu_capability()``)
reports AVX2 or better; otherwise the portable loops are built. When torch also reports AVX512_BF16
(``torch.cpu._is_avx512_bf16_supported()``: Cooper Lake, Sapphire Rapids and later, Zen 4),
``-DTHINKEYS_BF16_FORM`` compiles one more section of the .cpp for AVX512-BF16 (a target pragma;
everything else is the same AVX2 code), and bf16 queries (plain bf16 or 8-bit caches) take
the kernel's bf16 form: bf16 pair dot products (vdpbf16ps) for decodes, oneDNN's AMX brgemm for
prefill tiles where the CPU has AMX, no widening of the cache to fp32 (see the .cpp); float32 and
float16 run the AVX2 code as before. ``THINKEYS_KERNEL_ISA`` (``avx2`` or
``baseline``) caps that choice, e.g. to time the AVX2 form on an AVX512 machine. The build
directory is named after the choice, so a cache directory shared by machines of different CPUs
stays correct; ``torch.ops.thinkeys.kernel_isa()`` names the form a loaded library runs.
AMX tiles run prefill tiles (16+ rows) wherever the CPU has AMX (opt-in from session 6 until
session 10, whose Xeon ran the tests on these paths and measured prefill attention 2-3.5x faster
than by vdpbf16ps); ``THINKEYS_KERNEL_NO_AMX=1`` or ``THINKEYS_KERNEL_AMX=0`` (read once per
process) keeps AMX CPUs on the vdpbf16ps paths every AVX512-BF16 CPU runs.

The hot loops both this kernel and the rebuild-at-read kernel (``rebuild_kernel.py``) use live in
``csrc/attention_common.h``; :func:`build_and_load` builds either with the same flags
(:func:`build_flags`, which include the header's digest, so editing the header alone rebuilds).

``THINKEYS_ATTENTION_KERNEL`` picks the implementation: ``auto`` (default: the compiled kernel,
falling back to the PyTorch path in ``paged.py`` with a warning when it cannot be built),
``compiled`` (fail with a clear error instead of falling back) or ``torch`` (always the fallback).
It is read on every :func:`available` call, so an engine started with ``torch`` in the environment
runs the fallback even in a process that loaded the kernel before.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from thinkeys.checkpoint import ThinKeyError

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
ENV_CHOICE = "THINKEYS_ATTENTION_KERNEL"
ENV_CACHE = "THINKEYS_KERNEL_CACHE"
CHOICES = ("auto", "compiled", "torch")

# torch's CPU capabilities that include AVX2 + FMA + F16C: the kernel's intrinsics path. Everything
# else builds with the compiler's baseline for the platform (the portable loops).
AVX2_CAPABILITIES = {"AVX2", "AVX512", "AVX512_BF16", "AVX512_VNNI", "AMX", "AVX512_FP16"}
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
# the bf16 form's section of the .cpp compiles for AVX512 under a target pragma; the rest stays AVX2
AVX512BF16_FLAGS = [*AVX2_FLAGS, "-DTHINKEYS_BF16_FORM"]
ENV_ISA = "THINKEYS_KERNEL_ISA"
ISAS = ("avx512bf16", "avx2", "baseline")  # best first


def kernel_choice() -> str:
    choice = os.environ.get(ENV_CHOICE, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ThinKeyError(f"{ENV_CHOICE}={choice!r} is not one of {', '.join(CHOICES)}: unset it or pick one of those")
    return choice


def detected_isa() -> str:
    """What torch's runtime CPU detection allows: ``avx512bf16``, ``avx2`` or ``baseline``."""
    try:
        capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # noqa: BLE001 - older/other builds
        capability = "DEFAULT"
    if capability not in AVX2_CAPABILITIES:
        return "baseline"
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return "avx512bf16" if capability != "AVX2" and bf16() else "avx2"


def cpu_isa() -> str:
    """The instruction set the kernels are built for: :func:`detected_isa`, capped by ``THINKEYS_KERNEL_ISA``."""
    detected = detected_isa()
    cap = os.environ.get(ENV_ISA, "").strip().lower()
    if not cap:
        return detected
    if cap not in ISAS:
        raise ThinKeyError(f"{ENV_ISA}={cap!r} is not one of {', '.join(ISAS)}: unset it or pick one of those")
    return max(detected, cap, key=ISAS.index)  # the lesser of the two


def isa_flags(isa: str) -> list[str]:
    """Compiler flags for an instruction set of :data:`ISAS`."""
    return {"avx512bf16": AVX512BF16_FLAGS, "avx2": AVX2_FLAGS}.get(isa, [])


def build_dir(isa: str) -> Path:
    root = os.environ.get(ENV_CACHE) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "thinkeys" / "kernels"
    torch_tag = torch.__version__.replace("+", "_")
    return Path(root) / f"torch-{torch_tag}-{isa}"


HEADER = SOURCE.with_name("attention_common.h")  # shared by paged_attention.cpp and rebuild_attention.cpp


def build_flags(isa: str) -> list[str]:
    """Compiler flags for a kernel of ``csrc/``: optimisation, OpenMP, the instruction set's flags, and the
    shared header's digest (so an edit of the header alone gives a new build, not a stale library)."""
    digest = hashlib.sha1(HEADER.read_bytes()).hexdigest()[:12]
    return ["-O3", "-fopenmp", "-DNDEBUG", *isa_flags(isa), f"-DTHINKEYS_COMMON_DIGEST={digest}"]


def build_and_load(name: str, source: Path, directory: Path, isa: str) -> None:
    """Compile (first time) and load ``source`` as the library ``{name}_{isa}`` in ``directory``; then ask for
    the AMX tile state (:func:`request_amx`), which the bf16 forms' brgemm calls need."""
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=f"{name}_{isa}",
        sources=[str(source)],
        extra_cflags=build_flags(isa),
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    request_amx()


@functools.lru_cache(maxsize=2)
def _load(choice: str) -> bool:
    """Build (first time) and load the kernel library; True when ``torch.ops.thinkeys`` has it."""
    isa = cpu_isa()
    directory = build_dir(isa)
    try:
        started = time.perf_counter()
        logger.info("thin keys: loading the CPU attention kernel (%s; compiled once into %s, ~1 min)", isa, directory)
        build_and_load("thinkeys_attention", SOURCE, directory, isa)
        logger.info("thin keys: CPU attention kernel ready in %.1f s", time.perf_counter() - started)
        return True
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers, read-only cache, ...
        reason = _first_error_line(exc)
        if choice == "compiled":
            raise ThinKeyError(
                f"{ENV_CHOICE}=compiled but the CPU attention kernel could not be built in {directory}: {reason} "
                f"(install g++ and ninja, set {ENV_CACHE} to a writable folder, or use {ENV_CHOICE}=torch)"
            ) from exc
        logger.warning(
            "thin keys: CPU attention kernel unavailable (%s); using the slower PyTorch path. "
            "Install g++ and ninja (or set %s to a writable folder) to enable it.",
            reason, ENV_CACHE,
        )
        return False


def request_amx() -> None:
    """Ask Linux for the AMX tile state (``arch_prctl``), which a process needs before its first
    AMX instruction: the kernel's prefill tiles run oneDNN's AMX brgemm on bf16 caches. vLLM's
    engine gets it through oneDNN as well; a bare process (tests, benchmarks) would die on SIGILL."""
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        torch.cpu._init_amx()


def _first_error_line(exc: Exception) -> str:
    """The compiler's first ``error:`` line if there is one, else the exception's last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return f"{type(exc).__name__}: {(errors or lines or [''])[0 if errors else -1]}"


def available() -> bool:
    """Whether the compiled kernel is in use (builds it on the first call; False with ``torch``)."""
    choice = kernel_choice()
    return choice != "torch" and _load(choice)


def kernel_isa() -> str:
    """The form the loaded kernel runs: ``avx512bf16`` (bf16 plain caches by vdpbf16ps), ``avx2`` or ``portable``."""
    return torch.ops.thinkeys.kernel_isa()


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    output: torch.Tensor,
    cache_format: str = "plain",
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of ``query`` ``[T, H, r]`` over the paged cache into ``output`` ``[T, H, d]`` (in place).

    ``block_table`` ``[num_reqs, max_blocks]``, ``query_start_loc`` ``[num_reqs + 1]`` and ``seq_lens``
    ``[num_reqs]`` are int32 CPU tensors as vLLM's ``CommonAttentionMetadata`` holds them. A plain
    cache has the query's dtype; an 8-bit one (``cache_format`` other than ``plain``) is a 1-byte
    tensor whose slots are decoded as they are read (``k_scale`` / ``v_scale``: per-tensor fp8 scales).
    """
    torch.ops.thinkeys.paged_attention(
        query, kv_cache, block_table, query_start_loc, seq_lens, float(scale), output, cache_format, float(k_scale), float(v_scale)
    )
    return output


def write_kv(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    cache_format: str = "plain",
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store keys ``[T, H_kv, r]`` and values ``[T, H_kv, d]`` at their slots (-1 = padding, skipped),
    quantized for an 8-bit ``cache_format`` with the rounding of ``quant.KVCodec.encode``."""
    torch.ops.thinkeys.write_kv(kv_cache, key, value, slot_mapping, cache_format, float(k_scale), float(v_scale))
