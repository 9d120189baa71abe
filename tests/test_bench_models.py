"""The whole-model benchmarks hold one weight set per (model, dtype), shared by every side, and let the others go
before building a set that needs the room (the 8B-shaped model's fp32 set alone is 5.1 GB). On the tiny preset."""

import pytest

from benchmarks import cases, models


@pytest.fixture
def no_held(monkeypatch):
    monkeypatch.setattr(models, "_HELD", {})


def _storage(t):
    return t.untyped_storage().data_ptr()


def test_held_set_is_shared_by_user_impl_and_transformers(no_held, monkeypatch):
    monkeypatch.setenv("LLAMA3_GOLDEN_ENGINE", "torch")  # plain generation weights (packed ones are a second copy)
    h = models.held("tiny", "fp32")
    eager, sdpa = models.hf_model("tiny", "fp32", "eager"), models.hf_model("tiny", "fp32", "sdpa")
    w = h.weights
    assert _storage(eager.model.embed_tokens.weight) == _storage(w["tok_embeddings.weight"])
    assert _storage(eager.model.layers[0].mlp.down_proj.weight) == _storage(w["layers.0.feed_forward.w2.weight"])
    assert _storage(eager.model.layers[0].self_attn.q_proj.weight) == _storage(
        sdpa.model.layers[0].self_attn.q_proj.weight)  # one permuted copy of q for both attentions
    # the plain wq and w1 are row views of impl's stacked matrices
    assert _storage(w["layers.0.attention.wq.weight"]) == _storage(h.generation["layers.0.attention.wqkv.weight"])
    assert _storage(w["layers.0.feed_forward.w1.weight"]) == _storage(h.generation["layers.0.feed_forward.w13.weight"])


def test_held_lets_other_sets_go_before_building_one_that_needs_the_room(no_held, monkeypatch):
    monkeypatch.setattr(models, "HOLD_BYTES", models.weight_bytes("tiny", "fp32") + 1)
    models.held("tiny", "fp32")
    held_while_building = []
    load = models.load_checkpoint
    monkeypatch.setattr(models, "load_checkpoint", lambda *a, **k: held_while_building.append(list(models._HELD))
                        or load(*a, **k))
    cases.inputs(cases.Shape("smollm2-135m", 1), "fp32")  # the one-layer groups' caches go too
    models.held("tiny", "bf16")
    assert held_while_building == [[]] and list(models._HELD) == [("tiny", "bf16")]
    assert cases.inputs.cache_info().currsize == 0


def test_held_keeps_sets_that_fit_together(no_held):
    models.held("tiny", "fp32")
    models.held("tiny", "bf16")
    assert list(models._HELD) == [("tiny", "fp32"), ("tiny", "bf16")]
