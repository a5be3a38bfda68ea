"""vllm-thinkeys: serve checkpoints with thin (factored, low-rank) attention keys through vLLM.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in the API server, the
engine core and every worker process, so it must be cheap and idempotent. It registers the
thin-key architectures lazily (by "module:Class" string) and the thin-key attention backend.
"""

__version__ = "0.1.0"

#: Name of our attention backend in vLLM's ``AttentionBackendEnum``.
ATTENTION_BACKEND_NAME = "THINKEYS"
ATTENTION_BACKEND_PATH = "thinkeys.attention.backend.ThinKeyAttentionBackend"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from thinkeys.checkpoint import VLLM_ARCHITECTURES

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in VLLM_ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    if ATTENTION_BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(ATTENTION_BACKEND_NAME, ATTENTION_BACKEND_PATH)
