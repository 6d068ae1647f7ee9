"""gptqlab.evaluate.perplexity: which tokens are scored, with what context, and how the totals are formed."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gptqlab.errors import GptqlabError
from gptqlab.evaluate import PerplexityResult, perplexity, window_plan

SEQLEN = 8
TEXT = "迈向充满希望的新世纪——一九九八年新年讲话"  # 21 characters, 63 UTF-8 bytes


class ByteTokenizer:
    """UTF-8 bytes as ids 1..256, with an optional BOS id 0: enough tokenizer for perplexity()."""

    def __init__(self, bos: bool) -> None:
        self.bos_token_id = 0 if bos else None

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        assert not add_special_tokens
        return {"input_ids": [b + 1 for b in text.encode("utf-8")]}


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def reference_nll(model, ids: list[int], context_start) -> float:
    """Sum over targets t = 1 .. len(ids) - 1 of -log p(ids[t] | ids[context_start(t) : t]), one pass each."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            ctx = torch.tensor([ids[context_start(t) : t]])
            total -= torch.log_softmax(model(ctx).logits[0, -1].float(), -1)[ids[t]].item()
    return total


@pytest.mark.parametrize("n_ids", [2, 3, SEQLEN, SEQLEN + 1, SEQLEN + 2, 5 * SEQLEN + 3])
@pytest.mark.parametrize("stride", [1, 3, SEQLEN - 1, SEQLEN])
def test_window_plan_scores_every_target_once_within_seqlen(n_ids, stride):
    plan = window_plan(n_ids, SEQLEN, stride)
    scored = [t for _, end, n_new in plan for t in range(end - n_new + 1, end + 1)]
    assert scored == list(range(1, n_ids))
    for begin, end, n_new in plan:
        assert 0 <= begin < end <= n_ids - 1
        assert end - begin <= SEQLEN  # a window reads at most seqlen ids
        assert 1 <= n_new <= end - begin  # and scores only predictions made inside it


def test_stride_equal_to_seqlen_reads_disjoint_windows():
    plan = window_plan(3 * SEQLEN + 1, SEQLEN, SEQLEN)
    assert plan == [(0, SEQLEN, SEQLEN), (SEQLEN, 2 * SEQLEN, SEQLEN), (2 * SEQLEN, 3 * SEQLEN, SEQLEN)]


def test_disjoint_windows_match_a_token_by_token_loop(model):
    tok = ByteTokenizer(bos=True)
    ids = [0, *tok(TEXT, add_special_tokens=False)["input_ids"]]
    # target t is read in the window that starts at the multiple of seqlen below t
    want = reference_nll(model, ids, lambda t: (t - 1) // SEQLEN * SEQLEN)
    got = perplexity(model, tok, TEXT, seqlen=SEQLEN, progress=False)
    assert got.tokens == len(ids) - 1 == 63  # every byte of the text, none twice, the BOS never
    assert got.nll_sum == pytest.approx(want, rel=1e-5)


def test_stride_one_gives_every_target_a_full_window(model):
    tok = ByteTokenizer(bos=True)
    ids = [0, *tok(TEXT, add_special_tokens=False)["input_ids"]]
    want = reference_nll(model, ids, lambda t: max(0, t - SEQLEN))
    got = perplexity(model, tok, TEXT, seqlen=SEQLEN, stride=1, progress=False)
    assert got.tokens == 63
    assert got.nll_sum == pytest.approx(want, rel=1e-5)


def test_without_bos_the_first_token_is_context_only(model):
    tok = ByteTokenizer(bos=False)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    want = reference_nll(model, ids, lambda t: (t - 1) // SEQLEN * SEQLEN)
    got = perplexity(model, tok, TEXT, seqlen=SEQLEN, progress=False)
    assert got.tokens == 62
    assert got.nll_sum == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("stride", [3, SEQLEN])
def test_batching_windows_does_not_change_the_result(model, stride):
    tok = ByteTokenizer(bos=True)
    one = perplexity(model, tok, TEXT, seqlen=SEQLEN, stride=stride, progress=False)
    many = perplexity(model, tok, TEXT, seqlen=SEQLEN, stride=stride, progress=False, batch_size=4)
    assert many.tokens == one.tokens
    assert many.nll_sum == pytest.approx(one.nll_sum, rel=1e-5)


def test_totals_are_formed_from_the_nll(model):
    r = perplexity(model, ByteTokenizer(bos=True), TEXT, seqlen=SEQLEN, stride=5, progress=False)
    assert isinstance(r, PerplexityResult)
    assert (r.seqlen, r.stride, r.chars) == (SEQLEN, 5, len(TEXT)) == (SEQLEN, 5, 21)
    assert r.bits_per_char == pytest.approx(r.nll_sum / math.log(2) / r.chars, rel=1e-12)
    assert r.ppl == pytest.approx(math.exp(r.nll_sum / r.tokens), rel=1e-12)
    # a random model over 257 ids is close to uniform: about 8 bits per byte, 3 bytes per character
    assert 20 < r.bits_per_char < 28


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seqlen": 65}, "seqlen 65 is longer than the model's context of 64 tokens"),
        ({"seqlen": 1}, "seqlen must be at least 2"),
        ({"seqlen": 8, "stride": 9}, "stride must be between 1 and seqlen=8, got 9"),
        ({"seqlen": 8, "stride": 0}, "stride must be between 1 and seqlen=8, got 0"),
        ({"text": ""}, "empty text"),
        ({"text": "a"}, "no token to score"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
    ],
)
def test_bad_arguments_raise_one_line_errors(model, kwargs, message):
    args = {"text": TEXT, "seqlen": SEQLEN, "progress": False, **kwargs}
    with pytest.raises(GptqlabError, match=message) as err:
        perplexity(model, ByteTokenizer(bos=False), **args)
    assert "\n" not in str(err.value)


def test_spread_takes_whole_lines_from_across_the_text():
    from gptqlab.evaluate import spread

    lines = [f"{i:04d}" + "x" * 95 for i in range(100)]  # 100 lines of 100 characters (99 + newline)
    text = "\n".join(lines)
    assert spread(text, len(text)) == text
    out = spread(text, 2000, pieces=4)
    got = [line for line in out.split("\n") if line]
    assert got == [lines[i] for q in (0, 25, 50, 75) for i in range(q, q + 5)]  # whole lines from each quarter


def test_threads_default_to_one_for_small_models_on_the_cpu(monkeypatch):
    import os

    from gptqlab.loader import SMALL_MODEL_PARAMS, default_cpu_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    assert default_cpu_threads(5_000_000) == 1
    assert default_cpu_threads(SMALL_MODEL_PARAMS) is None
    assert default_cpu_threads(None) is None


def test_evaluate_scores_the_embedded_model_and_restores_threads():
    from gptqlab.evaluate import evaluate

    before = torch.get_num_threads()
    rows, device, threads = evaluate("tiny-zh-llama", ["reviews-heldout"], seqlen=128, max_chars=3000, progress=False)
    assert torch.get_num_threads() == before and threads == 1 and device.type == "cpu"
    # an explicit thread count reaches the scoring (gptqlab.load must not reset it to its default)
    _, _, threads = evaluate("tiny-zh-llama", ["reviews-heldout"], seqlen=128, max_chars=500, threads=2, progress=False)
    assert threads == 2 and torch.get_num_threads() == before
    (row,) = rows
    assert row["model"] == "tiny-zh-llama" and row["dataset"] == "reviews-heldout"
    assert 2990 <= row["chars"] <= 3010 and row["tokens"] > 1000
    assert 100 < row["ppl"] < 2000  # the card's held-out perplexity is 467.9
    with pytest.raises(GptqlabError, match="--threads must be positive"):
        evaluate("tiny-zh-llama", threads=0)
