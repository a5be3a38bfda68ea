"""Every vLLM internal we touch, checked by name and shape, so a vLLM upgrade fails here, loudly.

vLLM's plugin, attention-backend and model-building APIs are internal and change between releases;
we pin vllm(-cpu)==0.32.0 in pyproject.toml. Each test names the thinkeys module that relies on it.
"""

import inspect
import re
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


def test_kv_quant_modes_and_storage_dtypes():  # attention/quant.py, backend.py, accounting.py
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.kv_cache_interface import KVQuantMode, get_kv_quant_mode

    for name in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        assert get_kv_quant_mode(name) == KVQuantMode.FP8_PER_TENSOR
        assert STR_DTYPE_TO_TORCH_DTYPE[name] == torch.uint8
    assert get_kv_quant_mode("int8_per_token_head") == KVQuantMode.INT8_PER_TOKEN_HEAD
    assert get_kv_quant_mode("fp8_per_token_head") == KVQuantMode.FP8_PER_TOKEN_HEAD
    assert STR_DTYPE_TO_TORCH_DTYPE["int8_per_token_head"] == torch.int8
    assert STR_DTYPE_TO_TORCH_DTYPE["fp8_per_token_head"] == torch.uint8


def test_per_token_head_page_matches_vllm_and_the_accounting():  # backend.customize_spec vs accounting
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode

    from thinkeys.accounting import KVFootprint, make_geometry, resolve_kv_dtype
    from thinkeys.attention.backend import ThinKeyAttentionBackend

    spec = FullAttentionSpec(
        block_size=128, num_kv_heads=3, head_size=16, head_size_v=64, dtype=torch.int8,
        kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD,
    )
    ours = ThinKeyAttentionBackend.customize_spec(spec)
    assert ours.page_size_bytes == TritonAttentionBackend.customize_spec(spec).page_size_bytes == 128 * 3 * (80 + 8)
    geometry = make_geometry(num_layers=1, num_query_heads=9, num_kv_heads=3, head_dim=64, key_dim=16)
    assert KVFootprint(geometry=geometry, kv_dtype=resolve_kv_dtype("int8_per_token_head"), block_size=128).page_size_bytes == ours.page_size_bytes
    plain = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=16, head_size_v=64, dtype=torch.uint8,
                              kv_quant_mode=KVQuantMode.FP8_PER_TENSOR)
    assert ThinKeyAttentionBackend.customize_spec(plain).page_size_bytes == 128 * 3 * 80  # per-tensor scales live outside


def test_shared_kv_spec_holds_one_vector():  # attention/shared.py: customize_spec + state_content_bytes
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode, compute_layer_kv_cache_shape_bytes

    from thinkeys.attention.shared import ThinKeySharedKVBackend

    spec = ThinKeySharedKVBackend.customize_spec(
        FullAttentionSpec(block_size=16, num_kv_heads=3, head_size=64, head_size_v=64, dtype=torch.bfloat16)
    )
    assert spec.page_size_bytes == 16 * 3 * 64 * 2
    assert compute_layer_kv_cache_shape_bytes(spec, 10) == (10, 3, 16, 128)  # [B, H, N, C bytes] -> view [.., 64] bf16
    int8 = ThinKeySharedKVBackend.customize_spec(
        FullAttentionSpec(block_size=16, num_kv_heads=3, head_size=64, head_size_v=64, dtype=torch.int8,
                          kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD)
    )
    assert int8.page_size_bytes == 16 * 3 * (64 + 4)


def test_model_runner_applies_customize_spec_to_full_attention():  # why customize_spec sizes our pages
    from vllm.v1.worker import utils
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    assert "customize_attention_spec" in inspect.getsource(CPUModelRunner.get_kv_cache_spec)
    assert "backend.customize_spec(spec)" in inspect.getsource(utils.customize_attention_spec)


def test_attention_layer_has_default_kv_scales():  # backend reads _k_scale_float / _v_scale_float
    from vllm.model_executor.layers.attention import attention

    src = inspect.getsource(attention.set_default_quant_scales)
    assert "_k_scale_float" in src and "_v_scale_float" in src


def test_shared_kv_backend_is_registered():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import thinkeys

    thinkeys.register()
    backend = AttentionBackendEnum[thinkeys.SHARED_KV_BACKEND_NAME].get_class()
    assert backend.get_name() == thinkeys.SHARED_KV_BACKEND_NAME


def test_rebuild_backend_is_registered():  # attention/rebuild.py
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import thinkeys

    thinkeys.register()
    backend = AttentionBackendEnum[thinkeys.REBUILD_BACKEND_NAME].get_class()
    assert backend.get_name() == thinkeys.REBUILD_BACKEND_NAME


def test_attention_forward_views_query_by_head_size_and_passes_it_on():  # attention/rebuild.py: the d-wide query
    """The rebuild layer builds Attention(head_size=r, head_size_v=d) and hands it a flat [T, H * d] query:
    vLLM must only *view* it as [-1, H, r] (a reshape of the same memory, undone by the backend), size the
    output by head_size_v, and pass the viewed query to the impl unchanged."""
    from vllm.model_executor.layers.attention import Attention, attention

    forward = inspect.getsource(Attention.forward)
    assert "query = query.view(-1, self.num_heads, self.head_size)" in forward
    assert "output_shape = torch.Size((num_tokens, self.num_heads * self.head_size_v))" in forward
    assert "key = key.view(-1, self.num_kv_heads, self.head_size)" in forward
    assert "self.impl.forward(\n        self,\n        query," in inspect.getsource(attention.unified_attention_with_output)


def test_qkv_linear_q_shard_is_heads_times_head_size():  # models/thin_attention.py: rebuild's H * d / r query "heads"
    from vllm.model_executor.layers.linear import QKVParallelLinear

    src = inspect.getsource(QKVParallelLinear.__init__)
    assert "self.num_heads * self.head_size * tp_size,  # q_proj" in src
    assert "self.num_kv_heads * self.head_size * tp_size,  # k_proj" in src
    loader = inspect.getsource(QKVParallelLinear.weight_loader)
    assert 'if loaded_shard_id == "q":\n                shard_offset = 0\n                shard_size = self.num_heads * self.head_size' in loader


def test_weights_loader_uses_parameter_weight_loader():  # models/thin_attention.py: thin_rope_freqs / thin_rebuild tables
    from vllm.model_executor.models.llama import LlamaModel
    from vllm.model_executor.models.utils import AutoWeightsLoader

    assert "AutoWeightsLoader(self)" in inspect.getsource(LlamaModel.load_weights)
    src = inspect.getsource(AutoWeightsLoader._load_param)
    assert 'weight_loader = getattr(param, "weight_loader", default_weight_loader)' in src


def test_qwen3_blocks_the_thin_model_reuses():  # models/qwen3.py
    from vllm.model_executor.models import qwen2, qwen3

    # Qwen3Model builds its layers from the class attribute decoder_layer_type, with these keywords
    assert "decoder_layer_type=self.decoder_layer_type" in inspect.getsource(qwen3.Qwen3Model)  # (its __init__ is wrapped by torch.compile)
    assert "decoder_layer_type(\n                config=config,\n                cache_config=cache_config," in inspect.getsource(
        qwen2.Qwen2Model
    )
    # the thin decoder layer builds these blocks itself and keeps vLLM's forward, which uses exactly them
    forward = inspect.getsource(qwen3.Qwen3DecoderLayer.forward)
    for block in ("self.input_layernorm(", "self.self_attn(", "self.post_attention_layernorm(", "self.mlp("):
        assert block in forward
    init = inspect.getsource(qwen3.Qwen3DecoderLayer.__init__)
    assert set(re.findall(r"self\.(\w+) = ", init)) == {
        "hidden_size", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm"
    }
    # the thin CausalLM sets what vLLM's __init__ sets, with the thin model class
    causal = inspect.getsource(qwen3.Qwen3ForCausalLM.__init__)
    assert set(re.findall(r"self\.(\w+) = ", causal)) == {
        "config", "vllm_config", "quant_config", "model", "lm_head", "logits_processor", "make_empty_intermediate_tensors"
    }
    assert qwen3.Qwen3ForCausalLM.forward.__qualname__ == "Qwen3ForCausalLM.forward"


def test_gemma3_blocks_the_thin_model_reuses():  # models/gemma3.py
    from vllm.model_executor.models import gemma3

    # Gemma3Model builds its layers by the module-level name Gemma3DecoderLayer (the thin model rebinds it while
    # vLLM's __init__ runs), and Gemma3ForCausalLM builds Gemma3Model by name too
    model_init = inspect.getsource(gemma3.Gemma3Model)
    assert "lambda prefix: Gemma3DecoderLayer(\n                config, cache_config, quant_config, prefix=prefix\n            )" in model_init
    assert "self.model = Gemma3Model(" in inspect.getsource(gemma3.Gemma3ForCausalLM.__init__)
    assert "normalizer = self.config.hidden_size**0.5" in model_init  # embedding x sqrt(hidden): vLLM's, kept
    # the thin decoder layer builds these blocks itself and keeps vLLM's forward, which uses exactly them
    forward = inspect.getsource(gemma3.Gemma3DecoderLayer.forward)
    for block in ("self.input_layernorm(", "self.self_attn(", "self.post_attention_layernorm(",
                  "self.pre_feedforward_layernorm(", "self.mlp(", "self.post_feedforward_layernorm("):
        assert block in forward
    init = inspect.getsource(gemma3.Gemma3DecoderLayer.__init__)
    assert set(re.findall(r"self\.(\w+) = ", init)) == {
        "hidden_size", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
        "pre_feedforward_layernorm", "post_feedforward_layernorm",
    }
    # what the stock attention takes from the config and the thin one must take the same way
    attn = inspect.getsource(gemma3.Gemma3Attention.__init__)
    assert "self.scaling = config.query_pre_attn_scalar**-0.5" in attn
    assert 'sliding_window = config.sliding_window if self.is_sliding else None' in attn
    assert "rope_parameters = config.rope_parameters[layer_type]" in attn
    assert "per_layer_sliding_window=sliding_window" in attn
    assert "GemmaRMSNorm" in inspect.getsource(gemma3) and "self.q_norm = GemmaRMSNorm(" in attn


def test_gemma_rms_norm_scales_by_one_plus_weight():  # convert/families.py GemmaQKNormLayout.norm_offset
    from vllm.model_executor.layers.layernorm import GemmaRMSNorm

    assert "weight = self.weight.float() + 1.0" in inspect.getsource(GemmaRMSNorm.forward_native)
    assert "torch.zeros(hidden_size)" in inspect.getsource(GemmaRMSNorm.__init__)


def test_sliding_window_layers_get_their_spec_and_the_impl_its_window():  # models/qwen3.py, attention/backend.py
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    init = inspect.getsource(Attention.__init__)
    assert "per_layer_sliding_window" in inspect.signature(Attention.__init__).parameters
    assert "sliding_window = per_layer_sliding_window" in init
    spec_src = inspect.getsource(Attention.get_kv_cache_spec)
    assert "SlidingWindowSpec(" in spec_src and "sliding_window=self.sliding_window" in spec_src
    # the impl is built with the window as its sixth positional argument (after alibi_slopes)
    impl_call = init[init.index("self.impl = impl_cls("):]
    assert re.match(r"self\.impl = impl_cls\([^\n]*\n\s*num_heads,\s*head_size,\s*scale,\s*num_kv_heads,\s*alibi_slopes,\s*sliding_window,", impl_call)
    assert "sliding_window" in {f.name for f in __import__("dataclasses").fields(SlidingWindowSpec)}


def test_hybrid_kv_cache_rules_the_accounting_mirrors():  # accounting.py: KVFootprint with sliding layers
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    assert CpuPlatform.support_hybrid_kv_cache()  # the hybrid manager stays on for CPU
    grouping = inspect.getsource(kv_cache_utils._get_kv_cache_groups_uniform_page_size)
    assert "group_size = min_num_layers" in grouping and "if max_num_layers < min_num_layers * 1.5:" in grouping
    admission = inspect.getsource(SlidingWindowSpec.max_admission_blocks_per_request)
    assert "self.sliding_window - 1 + self.extra_retained_tokens + max_in_flight_tokens" in admission
    assert "return cdiv(num_tokens, self.block_size) + 1" in admission
    concurrency = inspect.getsource(kv_cache_utils.get_max_concurrency_for_kv_cache_config)
    assert "group.kv_cache_spec.max_memory_usage_bytes(vllm_config)" in concurrency
