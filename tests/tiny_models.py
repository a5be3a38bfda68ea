"""Small random-weight Hugging Face checkpoints, written at test time.

Every builder writes a complete HF folder (fp32 safetensors, config.json, generation_config.json,
tokenizer files with a chat template) that loads in transformers and in stock vLLM 0.32 CPU, and
returns its Path. Head dim is 32 because vLLM's CPU attention kernels accept no smaller head.

Weights are drawn from a fixed seed with a larger spread than HF's default init (0.15 for q/k
projections, 0.1 for q/k/v biases), so attention patterns are sharp rather than near-uniform:
an exactness test on a uniform-attention model would prove little.

Import from a test as ``from tiny_models import make_tiny_llama`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: A little English for the tokenizer to learn merges from (public-domain style prose).
_TRAINING_TEXT = """\
It was a bright cold day in April, and the clocks were striking thirteen. The small town lay
quiet under a thin layer of snow, and the people of the town went about their business slowly.
A key opens a door; a value is what you find behind it. Attention asks many questions and keeps
only the answers that matter. The quick brown fox jumps over the lazy dog near the river bank.
Once upon a time there was a little model that wanted to learn the language of the world.
She read every book in the library, from the first page to the last, and wrote down each word.
The weather today is mild, with a light breeze from the west and a chance of rain this evening.
In the beginning the students asked the teacher why the sky is blue and why the sea is salty.
Numbers such as one, two, three, four, five, six, seven, eight, nine and ten are easy to count.
The market opened at nine in the morning, and by noon the bread and the apples were all sold.
Good morning! How are you today? I am fine, thank you, and I hope that you are well too.
The system reads the question, thinks about it for a while, and then writes a short answer.
"""

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
#: Minimal role-tagged chat format, enough for vLLM's /v1/chat/completions.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

#: Init spreads (see the module docstring for why they are larger than HF's 0.02).
QK_STD = 0.15
BIAS_STD = 0.1
OTHER_STD = 0.05
EMBED_STD = 0.1


def make_tokenizer(dir: str | Path, *, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE (~512 tokens) on built-in text; save it as a PreTrainedTokenizerFast with <s>/</s>/<pad> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # <|endoftext|> is in the vocab because transformers' Qwen2 tokenizer class adds it as unk
        # otherwise (one id past the model's vocab).
        special_tokens=[PAD, BOS, EOS, "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT.splitlines() * 4, trainer)
    bos_id = tok.token_to_id(BOS)
    # Plain prompts get a BOS like Llama's tokenizer; chat prompts get it from the template.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )
    fast.model_max_length = 2048
    fast.save_pretrained(dir)
    return dir


def _special_ids(dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dir)
    return {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


@torch.no_grad()
def _spread_init(model: torch.nn.Module, seed: int, *, qk_cols: int | None = None) -> None:
    """Re-draw every weight from ``seed``: q/k projections at QK_STD, biases at BIAS_STD, norms at 1.

    ``qk_cols`` is for GPT-2's fused Conv1D ``c_attn`` ([D, 3D]): its first ``qk_cols`` output
    columns (q | k) get QK_STD, the v columns OTHER_STD.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(p: torch.Tensor, std: float) -> None:
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)

    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            normal(p, BIAS_STD if ("q_proj" in name or "k_proj" in name or "v_proj" in name or "c_attn" in name) else 0.02)
        elif "q_proj" in name or "k_proj" in name:
            normal(p, QK_STD)
        elif "c_attn" in name and qk_cols is not None:
            normal(p, OTHER_STD)
            p[:, :qk_cols] = torch.randn((p.shape[0], qk_cols), generator=gen) * QK_STD
        elif "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
            normal(p, EMBED_STD)
        else:
            normal(p, OTHER_STD)


def _save(model: Any, dir: Path) -> Path:
    model.to(torch.float32).save_pretrained(dir, safe_serialization=True)
    model.generation_config.save_pretrained(dir)
    return dir


def make_tiny_llama(
    dir: str | Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    arch: str = "LlamaForCausalLM",
    seed: int = 0,
    rope_parameters: dict[str, Any] | None = None,
    tie_word_embeddings: bool = False,
) -> Path:
    """Tiny Llama (or, with ``arch="MistralForCausalLM"``, Mistral) with GQA; ``rope_parameters`` overrides the default RoPE (theta 1e4); ``tie_word_embeddings`` as SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    if arch not in ("LlamaForCausalLM", "MistralForCausalLM"):
        raise ValueError(f"arch must be LlamaForCausalLM or MistralForCausalLM, not {arch!r}")
    dir = make_tokenizer(dir)
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "LlamaForCausalLM" else (MistralConfig, MistralForCausalLM)
    extra: dict[str, Any] = {"sliding_window": None} if arch == "MistralForCausalLM" else {}
    config = cfg_cls(
        **_special_ids(dir),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tie_word_embeddings,
        torch_dtype="float32",
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    _spread_init(model, seed)
    return _save(model, dir)


def make_tiny_qwen2(
    dir: str | Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Tiny Qwen2 with GQA and q/k/v biases (drawn at BIAS_STD so the bias handling is really exercised)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dir = make_tokenizer(dir)
    config = Qwen2Config(
        **_special_ids(dir),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_sliding_window=False,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    _spread_init(model, seed)
    return _save(model, dir)


def make_tiny_gpt2(dir: str | Path, *, hidden: int = 128, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """Tiny GPT-2 (absolute positions, fused Conv1D c_attn, tied embeddings), n_embd 128 / 4 heads = head dim 32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    dir = make_tokenizer(dir)
    ids = _special_ids(dir)
    config = GPT2Config(
        vocab_size=ids["vocab_size"],
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=1024,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    _spread_init(model, seed, qk_cols=2 * hidden)
    return _save(model, dir)


def make_tiny_qwen3(
    dir: str | Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Tiny Qwen3 with GQA and per-head q/k RMSNorm, no biases; ``config_overrides`` go to ``Qwen3Config``.

    The q_norm / k_norm gains are drawn from [0.5, 1.5] (not HF's 1.0), so a converter that ignores
    them, or applies the thin basis before the norm, is caught.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dir = make_tokenizer(dir)
    config = Qwen3Config(
        **_special_ids(dir),
        **{
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "use_sliding_window": False,
            "attention_bias": False,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            **config_overrides,
        },
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    _spread_init(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return _save(model, dir)


def make_tiny_gemma3(
    dir: str | Path,
    *,
    hidden: int = 128,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    sliding_window: int = 16,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Tiny text-only Gemma 3 (``Gemma3ForCausalLM``): QK-norm, sliding-window and global layers, GQA.

    What sets it apart from the Qwen3 builder, each chosen so a converter or server that ignores it fails:
    layers ``sliding, full, sliding`` (window ``sliding_window`` = 16 tokens, far below the test prompts), a
    RoPE base per layer type (10^4 local, 10^6 global), ``query_pre_attn_scalar`` 24 (the softmax scale is
    24^-0.5, not head_dim^-0.5), Gemma's ``1 + weight`` norms with q/k norm weights drawn from [-0.5, 0.5]
    (gains 0.5-1.5), tied embeddings scaled by sqrt(hidden).
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    dir = make_tokenizer(dir)
    layer_types = ["sliding_attention" if i % 3 != 1 else "full_attention" for i in range(layers)]
    config = Gemma3TextConfig(
        **_special_ids(dir),
        **{
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "query_pre_attn_scalar": 24,
            "sliding_window": sliding_window,
            "layer_types": layer_types,
            "max_position_embeddings": 2048,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
            **config_overrides,
        },
    )
    config.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    _spread_init(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.rand(p.shape, generator=gen) - 0.5)  # gain 1 + w in [0.5, 1.5]
            elif "norm" in name:
                p.zero_()  # Gemma's RMSNorm scales by 1 + weight: gain 1
    return _save(model, dir)
