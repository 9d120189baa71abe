"""impl's fast forward (what generate runs) against transformers directly: fp32 logits, greedy text, the KV cache,
and the three loaders."""

from __future__ import annotations

import pytest
import torch

from golden import compare
from golden.record import load_reference
from impl import model
from impl.formats.gguf import save_gguf
from impl.formats.hf import save_hf
from impl.formats.meta import save_meta
from impl.generate import generate
from impl.weights import load_checkpoint

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def smollm2():
    return load_checkpoint("smollm2-135m", dtype=torch.float32)


@pytest.fixture(scope="module")
def smollm2_hf():
    with load_reference("smollm2-135m", "fp32", "sdpa") as ref:
        yield ref


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2):
    from impl.tokenizer import load_tokenizer

    return load_tokenizer(smollm2.tokenizer)


@pytest.mark.parametrize("name", ["tiny", "tiny-scaled"])
def test_tiny_fp32_logits_match_transformers(name):
    ckpt = load_checkpoint(name)
    tokens = torch.arange(1000, 1023)
    with load_reference(name, "fp32") as ref:
        expected = ref.hf_model(tokens[None]).logits[0]
    torch.testing.assert_close(model.forward_fast(tokens, ckpt.weights, ckpt.config), expected, rtol=1e-4, atol=1e-5)


def test_smollm2_fp32_logits_match_transformers(smollm2, smollm2_hf, smollm2_tokenizer):
    tokens = torch.tensor(smollm2_tokenizer.encode(PROMPTS[2]))
    with torch.inference_mode():
        expected = smollm2_hf.hf_model(tokens[None]).logits[0]
    got = model.forward_fast(tokens, smollm2.weights, smollm2.config)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# The default suite compares one prompt; the other two (32 tokens of transformers' CPU generate each, the heaviest
# cases of this file) are slow.
@pytest.mark.parametrize("prompt", [pytest.param(PROMPTS[0], id="france"),
                                    pytest.param(PROMPTS[1], id="code", marks=pytest.mark.slow),
                                    pytest.param(PROMPTS[2], id="story", marks=pytest.mark.slow)])
def test_smollm2_greedy_tokens_equal_transformers(smollm2, smollm2_hf, smollm2_tokenizer, prompt):
    ids = smollm2_tokenizer.encode(prompt)
    eos = smollm2_hf.hf_model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    with torch.inference_mode():
        hf_out = smollm2_hf.hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                              pad_token_id=0)[0, len(ids):].tolist()
    ours = generate(ids, smollm2.weights, smollm2.config, max_new_tokens=32, stop_ids=eos)
    assert len(hf_out) >= 24, "too short a continuation to compare: pick another prompt"
    assert ours == hf_out, f"{smollm2_tokenizer.decode(ours)!r} != {smollm2_tokenizer.decode(hf_out)!r}"


def test_smollm2_greedy_continues_with_paris(smollm2, smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("The capital of France is")
    out = generate(ids, smollm2.weights, smollm2.config, max_new_tokens=3)
    assert smollm2_tokenizer.decode(out).startswith(" Paris")


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m"])
def test_kv_cache_decode_equals_full_forward_at_every_position(name, smollm2):
    ckpt = smollm2 if name == "smollm2-135m" else load_checkpoint(name)
    tokens = torch.arange(2000, 2020)
    full = model.forward_fast(tokens, ckpt.weights, ckpt.config)  # (seq, vocab)
    cache = model.KVCache.empty(ckpt.config, len(tokens), torch.float32)
    rows = [model.forward_fast(tokens[:5], ckpt.weights, ckpt.config, cache=cache)]  # prefill 5, then one by one
    for pos in range(5, len(tokens)):
        rows.append(model.forward_fast(tokens[pos:pos + 1], ckpt.weights, ckpt.config, start_pos=pos, cache=cache))
    # fp32 noise only: decode sums over keys in another order than the full causal pass.
    m = compare.stage_metrics(torch.cat(rows), full)
    assert m.rel < 1e-5, f"KV-cache logits differ from the full forward: {m}"
    assert torch.equal(torch.cat(rows).argmax(-1), full.argmax(-1))


def test_generate_stops_at_a_stop_token(smollm2, smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("The capital of France is")
    free = generate(ids, smollm2.weights, smollm2.config, max_new_tokens=8)
    stop = free[2]
    out = generate(ids, smollm2.weights, smollm2.config, max_new_tokens=8, stop_ids={stop})
    assert out == free[:3]


@pytest.fixture(scope="module")
def tiny_saved_three_ways(tmp_path_factory):
    ckpt = load_checkpoint("tiny")
    root = tmp_path_factory.mktemp("formats")
    save_meta(root / "meta", ckpt.weights, ckpt.config)
    save_hf(root / "hf", ckpt.weights, ckpt.config)
    save_gguf(root / "tiny.gguf", ckpt.weights, ckpt.config)
    return {"meta": root / "meta", "hf": root / "hf", "gguf": root / "tiny.gguf"}


@pytest.mark.parametrize("fmt", ["meta", "hf", "gguf"])
def test_each_format_passes_the_golden_check(goldens, tiny_saved_three_ways, fmt):
    from golden.check import impl_forward, run_implementation

    ckpt = load_checkpoint(tiny_saved_three_ways[fmt])
    g = goldens("tiny", "fp32")
    actual = run_implementation(impl_forward, g.tokens, ckpt.weights, ckpt.config)
    report = compare.compare(g.tensors, actual, "fp32")
    assert report.passed, report.first_failure


def test_three_formats_give_identical_outputs(tiny_saved_three_ways):
    tokens = torch.arange(300, 317)
    outs = {}
    for fmt, path in tiny_saved_three_ways.items():
        ckpt = load_checkpoint(path)
        outs[fmt] = model.forward_fast(tokens, ckpt.weights, ckpt.config)
    assert torch.equal(outs["meta"], outs["hf"]) and torch.equal(outs["meta"], outs["gguf"])
