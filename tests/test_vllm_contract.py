"""Every vLLM internal we touch, checked by name and shape, so a vLLM upgrade fails here, loudly.

vLLM's plugin, attention-backend and model-building APIs are internal and change between releases;
we pin vllm(-cpu)==0.32.0 in pyproject.toml. Each test names the thinkeys module that relies on it.
"""

import inspect
from importlib.metadata import entry_points

import pytest
import torch


def test_pinned_vllm_version():
    import vllm

    assert vllm.__version__ == "0.32.0", "thinkeys pins vLLM 0.32.0: re-check every test in this file before bumping"


def test_entry_points_are_installed():
    general = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    endpoint = {ep.name: ep.value for ep in entry_points(group="vllm.endpoint_plugins")}
    assert general.get("thinkeys") == "thinkeys:register"
    assert endpoint.get("thinkeys_savings", "").startswith("thinkeys.server.")


def test_register_is_idempotent_and_registers_everything():
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import thinkeys
    from thinkeys.checkpoint import VLLM_ARCHITECTURES

    thinkeys.register()
    thinkeys.register()
    assert set(VLLM_ARCHITECTURES) <= set(ModelRegistry.get_supported_archs())
    backend = AttentionBackendEnum[thinkeys.ATTENTION_BACKEND_NAME].get_class()
    assert backend.get_name() == thinkeys.ATTENTION_BACKEND_NAME


def test_attention_layer_takes_backend_and_value_width():  # models/thin_attention.py
    from vllm.model_executor.layers.attention import Attention

    params = inspect.signature(Attention.__init__).parameters
    assert {"attn_backend", "head_size_v", "num_kv_heads", "prefix"} <= set(params)


def test_kv_cache_spec_pages_hold_thin_keys_and_full_values():  # accounting + capacity
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=16, num_kv_heads=3, head_size=16, head_size_v=64, dtype=torch.bfloat16)
    assert spec.page_size_bytes == 16 * 3 * (16 + 64) * 2


def test_qkv_linear_takes_value_head_size():  # models/thin_attention.py
    from vllm.model_executor.layers.linear import QKVParallelLinear

    assert "v_head_size" in inspect.signature(QKVParallelLinear.__init__).parameters


def test_llama_decoder_layer_takes_attention_class():  # models/llama.py
    from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

    assert "attn_layer_type" in inspect.signature(LlamaDecoderLayer.__init__).parameters
    assert "layer_type" in inspect.signature(LlamaForCausalLM.__init__).parameters


def test_gpt2_block_builds_attention_by_module_name():  # models/gpt2.py swaps that name
    from vllm.model_executor.models import gpt2

    assert "GPT2Attention(" in inspect.getsource(gpt2.GPT2Block.__init__)
    assert list(inspect.signature(gpt2.GPT2Attention.__init__).parameters)[:5] == [
        "self", "config", "cache_config", "quant_config", "prefix",
    ]


def test_attention_backend_interface():  # attention/backend.py
    from vllm.v1.attention.backend import AttentionBackend, AttentionImpl, AttentionMetadataBuilder, CommonAttentionMetadata
    from vllm.v1.kv_cache_interface import KVCacheLayout

    for name in ("get_name", "get_impl_cls", "get_builder_cls", "supported_kv_cache_layouts", "get_supported_kernel_block_sizes"):
        assert hasattr(AttentionBackend, name), name
    assert AttentionBackend.forward_includes_kv_cache_update is True  # we override it to False
    assert "reorder_batch_threshold" in vars(AttentionMetadataBuilder)
    assert list(inspect.signature(AttentionImpl.forward).parameters)[:8] == [
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
    ]
    fields = set(CommonAttentionMetadata.__dataclass_fields__)
    assert {"query_start_loc_cpu", "seq_lens", "num_reqs", "num_actual_tokens", "block_table_tensor", "slot_mapping", "causal"} <= fields
    assert {KVCacheLayout.LBNHC, KVCacheLayout.LBHNC} <= set(KVCacheLayout)


def test_attention_layer_calls_do_kv_cache_update():  # backend writes the cache there
    from vllm.model_executor.layers.attention import attention

    assert "do_kv_cache_update" in inspect.getsource(attention.unified_kv_cache_update)


def test_cpu_platform_ignores_attention_backend_flag():  # why models pass attn_backend= themselves
    from vllm.platforms.cpu import CpuPlatform

    assert "CPU_ATTN" in inspect.getsource(CpuPlatform.get_attn_backend_cls)


def test_endpoint_plugin_interface():  # server/endpoint.py
    from vllm.plugins.endpoint_plugins import interface

    src = inspect.getsource(interface)
    for name in ("attach_router", "init_state", "required_tasks", "name"):
        assert name in src, name


def test_cache_config_reports_capacity():  # server endpoint reads vLLM's own capacity
    from vllm.config import CacheConfig

    fields = set(CacheConfig.__dataclass_fields__) if hasattr(CacheConfig, "__dataclass_fields__") else set(vars(CacheConfig))
    assert {"num_gpu_blocks", "block_size", "cache_dtype"} <= fields
    from vllm.v1.core import kv_cache_utils

    assert "kv_cache_size_tokens" in inspect.getsource(kv_cache_utils)
