"""Perplexity evaluation: windowing, the PyTorch path on tiny real models, the server path's protocol.

The PyTorch path is checked against transformers' own loss (``labels=``), and on a thin-key
checkpoint at r = d against its source model. The server path's response parsing is checked
against responses built with vLLM's own pydantic response classes (serialized as vLLM's router
does), so a change of vLLM's format shows up here without starting an engine; one engine-marked
test runs it against the shared real server.
"""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch

from thinkeys.checkpoint import ThinKeyError
from thinkeys.cli import main as cli_main
from thinkeys.evaluate.perplexity import PerplexityResult, evaluate_windows, make_windows
from thinkeys.evaluate.server_backend import (
    ServerClient,
    base_url,
    completion_request,
    perplexity_server,
    window_nll_from_response,
)
from thinkeys.evaluate.torch_backend import (
    load_causal_lm,
    load_tokenizer,
    perplexity_torch,
    tokenize_text,
    torch_window_scorer,
)
from tiny_models import make_tiny_llama

TEXT = (
    "The river rose in the spring and the town moved its market to the hill above the bridge.\n"
    "Farmers brought apples, bread and wool, and the children counted the boats on the water.\n"
    "In the evening the bells rang twice, and the keepers of the lamps walked along the quay.\n"
) * 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, its thin-key conversion at r = d (exact) and a text file."""
    from thinkeys.convert.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("eval")
    src = make_tiny_llama(root / "llama")
    full = convert_checkpoint(src, root / "llama-full", 32, "pairs", progress=False)
    text = root / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return {"src": src, "full": full, "text": text}


# --- windowing ---------------------------------------------------------------------------------


def test_windows_are_consecutive_and_non_overlapping():
    assert make_windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # a 1-token tail scores nothing and is dropped
    assert make_windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert make_windows(list(range(100)), 8, max_tokens=20) == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]


@pytest.mark.parametrize(
    ("ids", "window", "max_tokens", "message"),
    [(list(range(5)), 1, None, "at least 2 tokens"), ([7], 4, None, "nothing to score"), (list(range(5)), 4, 1, "--max-tokens 1")],
)
def test_windowing_rejects_what_cannot_be_scored(ids, window, max_tokens, message):
    with pytest.raises(ThinKeyError, match=message):
        make_windows(ids, window, max_tokens)


# --- PyTorch path ------------------------------------------------------------------------------


def _reference_nll(model_dir, text: str, window: int) -> tuple[float, int]:
    """NLL sum and scored count from transformers' own shifted loss, window by window."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenize_text(load_tokenizer(model_dir), text)
    total, scored = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        t = torch.tensor([chunk])
        with torch.no_grad():
            loss = model(input_ids=t, labels=t).loss  # mean over len-1 shifted targets
        total += float(loss) * (len(chunk) - 1)
        scored += len(chunk) - 1
    return total, scored


def test_pytorch_ppl_matches_transformers_loss(tiny):
    result = perplexity_torch(tiny["src"], tiny["text"], window=64)
    n_ids = len(tokenize_text(load_tokenizer(tiny["src"]), TEXT))
    assert n_ids > 3 * 64  # several windows plus a partial one
    n_windows = math.ceil(n_ids / 64) - (1 if n_ids % 64 == 1 else 0)
    assert (result.windows, result.tokens) == (n_windows, n_ids)
    assert result.tokens_scored == n_ids - n_windows
    ref_nll, ref_scored = _reference_nll(tiny["src"], TEXT, 64)
    assert ref_scored == result.tokens_scored
    assert result.nll == pytest.approx(ref_nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(ref_nll / ref_scored), rel=1e-5)
    assert len(result.window_nll) == result.windows and math.fsum(result.window_nll) == pytest.approx(result.nll)
    # a random tiny model is far from uniform over its vocab, but not better than a real LM
    assert 1.0 < result.ppl < 10 * len(load_tokenizer(tiny["src"]))


def test_max_tokens_limits_the_tokens_used(tiny):
    result = perplexity_torch(tiny["src"], tiny["text"], window=50, max_tokens=120)
    assert (result.tokens, result.windows, result.tokens_scored) == (120, 3, 117)


def test_thin_key_checkpoint_at_full_rank_has_the_source_ppl(tiny):
    """r = d with rotary pairs is the source model exactly: the thin-key path must give the same PPL."""
    src = perplexity_torch(tiny["src"], tiny["text"], window=64)
    full = perplexity_torch(tiny["full"], tiny["text"], window=64)
    assert getattr(load_causal_lm(tiny["full"]), "thin_keys", None) is not None  # really the thin-key reference
    assert full.tokens_scored == src.tokens_scored
    assert full.ppl == pytest.approx(src.ppl, rel=1e-4)


def test_concurrent_scoring_keeps_window_order(tiny):
    model = load_causal_lm(tiny["src"])
    ids = tokenize_text(load_tokenizer(tiny["src"]), TEXT)
    kwargs = dict(backend="pytorch", model="m", text_path=tiny["text"], window=40)
    serial = evaluate_windows(ids, torch_window_scorer(model), workers=1, **kwargs)
    threaded = evaluate_windows(ids, torch_window_scorer(model), workers=3, **kwargs)
    assert threaded.window_nll == pytest.approx(serial.window_nll, rel=1e-6)
    assert threaded.ppl == pytest.approx(serial.ppl, rel=1e-6)


def test_cli_json_output_is_the_result_model(tiny, capsys):
    code = cli_main(["eval", "ppl", "--model", str(tiny["src"]), "--text", str(tiny["text"]), "--window", "64", "--json"])
    assert code == 0
    result = PerplexityResult.model_validate_json(capsys.readouterr().out)
    assert result.backend == "pytorch" and result.dtype == "float32" and result.window == 64
    code = cli_main(["eval", "ppl", "--model", str(tiny["src"]), "--text", str(tiny["text"]), "--window", "64"])
    out = capsys.readouterr().out
    assert code == 0 and f"{result.ppl:.4f}" in out and "tokens scored" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--text", "{text}"], "exactly one of --model"),
        (["--model", "{src}", "--server", "http://127.0.0.1:1", "--text", "{text}"], "exactly one of --model"),
        (["--server", "http://127.0.0.1:1", "--text", "{text}"], "needs --served-model"),
        (["--model", "{src}", "--text", "{missing}"], "no such text file"),
        (["--model", "{text}", "--text", "{text}"], "not a checkpoint folder"),
    ],
)
def test_cli_errors_are_one_clean_line(tiny, capsys, argv, message):
    fill = {"text": tiny["text"], "src": tiny["src"], "missing": tiny["text"].parent / "nope.txt"}
    code = cli_main(["eval", "ppl", *[a.format(**fill) for a in argv]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


# --- server path: protocol -----------------------------------------------------------------


def _vllm_response_body(window: list[int], logprobs: list[float], *, echo_ids: list[int] | None = None) -> dict:
    """A /v1/completions body exactly as vLLM 0.32's router serializes its CompletionResponse."""
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionResponseChoice
    from vllm.entrypoints.serve.engine.protocol import UsageInfo
    from vllm.logprobs import Logprob

    prompt_logprobs = [None] + [{tok: Logprob(logprob=lp, rank=1, decoded_token="x")} for tok, lp in zip(window[1:], logprobs)]
    choice = CompletionResponseChoice(
        index=0, text="!", finish_reason="length", prompt_logprobs=prompt_logprobs, prompt_token_ids=echo_ids, token_ids=[5]
    )
    response = CompletionResponse(model="m", choices=[choice], usage=UsageInfo(prompt_tokens=len(window), completion_tokens=1, total_tokens=len(window) + 1))
    return json.loads(json.dumps(response.model_dump()))  # JSONResponse(content=model_dump()): int keys become strings


def test_server_response_parsing_with_vllm_protocol(tiny):
    model = load_causal_lm(tiny["src"])
    window = tokenize_text(load_tokenizer(tiny["src"]), TEXT)[:48]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0, :-1].float(), -1)
    token_logprobs = logp.gather(1, torch.tensor(window[1:])[:, None])[:, 0].tolist()
    body = _vllm_response_body(window, token_logprobs, echo_ids=window)
    assert window_nll_from_response(window, body) == pytest.approx(torch_window_scorer(model)(window), rel=1e-5)
    # the request asks for exactly what is parsed
    request = completion_request("m", window)
    assert request["prompt"] == window and request["prompt_logprobs"] == 0 and request["max_tokens"] == 1


def test_server_response_problems_are_named():
    window = [3, 4, 5]
    with pytest.raises(ThinKeyError, match="different prompt token ids"):
        window_nll_from_response(window, _vllm_response_body(window, [-1.0, -2.0], echo_ids=[3, 4, 6]))
    body = _vllm_response_body(window, [-1.0, -2.0])
    body["choices"][0]["prompt_logprobs"][2] = {"9": {"logprob": -0.5, "rank": 1, "decoded_token": "y"}}
    with pytest.raises(ThinKeyError, match="lack the prompt token 5 at position 2"):
        window_nll_from_response(window, body)
    body["choices"][0]["prompt_logprobs"] = None
    with pytest.raises(ThinKeyError, match="no prompt_logprobs"):
        window_nll_from_response(window, body)
    with pytest.raises(ThinKeyError, match="not in vLLM's format"):
        window_nll_from_response(window, {"object": "error"})


def test_server_url_forms():
    assert base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert base_url("http://h:1") == "http://h:1"
    with pytest.raises(ThinKeyError, match="give a URL"):
        base_url("127.0.0.1:8000")


def test_unreachable_server_is_a_clean_error(tiny):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ThinKeyError, match=f"cannot reach the server at http://127.0.0.1:{port}"):
        perplexity_server(f"http://127.0.0.1:{port}", "m", tiny["text"], timeout=5)


# --- server path: a real server ------------------------------------------------------------


@pytest.mark.engine
def test_server_ppl_matches_pytorch(thin_server, checkpoints):
    """The same windows through the shared thin-key server and through the PyTorch reference."""
    text = checkpoints["llama-thin"].parent / "eval-text.txt"
    text.write_text(TEXT, encoding="utf-8")
    with ServerClient(thin_server.base_url, thin_server.served_model_name) as client:
        server_ids = client.tokenize(TEXT)
        assert client.max_model_len() == 512
    assert server_ids == tokenize_text(load_tokenizer(checkpoints["llama-thin"]), TEXT)
    served = perplexity_server(thin_server.base_url, thin_server.served_model_name, text, window=128)
    local = perplexity_torch(checkpoints["llama-thin"], text, window=128)
    assert (served.windows, served.tokens_scored) == (local.windows, local.tokens_scored)
    assert served.ppl == pytest.approx(local.ppl, rel=5e-3)
    with pytest.raises(ThinKeyError, match="does not serve 'nope'"):
        perplexity_server(thin_server.base_url, "nope", text)
    with pytest.raises(ThinKeyError, match="does not fit the served model's context"):
        perplexity_server(thin_server.base_url, thin_server.served_model_name, text, window=512)
