"""vllm-thinkeys: serve checkpoints with thin (factored, low-rank) attention keys through vLLM.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in the API server, the
engine core and every worker process, so it must be cheap and idempotent. It registers the
thin-key architectures lazily (by "module:Class" string) and the thin-key attention backend.
"""

__version__ = "0.1.0"

#: Name of our attention backend in vLLM's ``AttentionBackendEnum``.
ATTENTION_BACKEND_NAME = "THINKEYS"
ATTENTION_BACKEND_PATH = "thinkeys.attention.backend.ThinKeyAttentionBackend"
#: The backend of shared key-value (Q-K=V) checkpoints: one cached vector per token and KV head.
SHARED_KV_BACKEND_NAME = "THINKEYS_SHARED_KV"
SHARED_KV_BACKEND_PATH = "thinkeys.attention.shared.ThinKeySharedKVBackend"
#: The backend of rebuild-at-read checkpoints: keys rebuilt from a cached latent and rotated at read time.
REBUILD_BACKEND_NAME = "THINKEYS_REBUILD"
REBUILD_BACKEND_PATH = "thinkeys.attention.rebuild.ThinKeyRebuildBackend"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from thinkeys.checkpoint import VLLM_ARCHITECTURES

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in VLLM_ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    for name, path in (
        (ATTENTION_BACKEND_NAME, ATTENTION_BACKEND_PATH),
        (SHARED_KV_BACKEND_NAME, SHARED_KV_BACKEND_PATH),
        (REBUILD_BACKEND_NAME, REBUILD_BACKEND_PATH),
    ):
        if name not in AttentionBackendEnum.__members__:
            register_backend(name, path)
