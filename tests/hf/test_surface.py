"""The usual `PreTrainedModel` surface: embeddings, resizing, hidden states, attention implementation,
maximum length, LoRA targets, bf16 loading."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from .helpers import hf_model, random_ids  # noqa: E402


@pytest.mark.parametrize("share_emb", [False, True])
def test_embedding_accessors_and_resize(tmp_path, share_emb):
    from transformers import AutoModelForCausalLM

    model = hf_model(share_emb=share_emb)
    assert model.get_input_embeddings() is model.model.embed
    head = model.get_output_embeddings()
    assert (head is None) if share_emb else (head is model.model.output.output)
    ids = random_ids(n=9)
    before = model(ids).logits
    model.resize_token_embeddings(300)
    assert model.config.vocab_size == model.model.config.vocab_size == 300
    assert model.model.output_weight.shape == (300, model.config.model_dim)
    after = model(torch.cat([ids, torch.tensor([[299], [280]])], 1)).logits
    assert after.shape[-1] == 300
    # Old tokens keep their rows: the first 256 logits of the old positions are unchanged.
    torch.testing.assert_close(after[:, :9, :256], before[:, :, :256], rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_hidden_states_layout():
    model = hf_model()
    ids = random_ids(n=10)
    out = model(ids, output_hidden_states=True)
    lm = model.model
    emb = lm.embed(ids)
    h = out.hidden_states
    assert len(h) == model.config.num_layers + 1 and all(t.shape == emb.shape for t in h)
    torch.testing.assert_close(h[0], emb)
    x1, _ = lm.layers[0](emb, None, _stream_info(ids), lm.rope.freqs)
    torch.testing.assert_close(h[1], x1, rtol=1e-5, atol=1e-5)
    # The last entry is after the final norm: the logits are its projection.
    torch.testing.assert_close(out.logits, h[-1] @ lm.output_weight.T, rtol=1e-5, atol=1e-5)
    assert model(ids).hidden_states is None


def _stream_info(ids):
    from megalodon_lm.modules.mega import StreamInfo

    return StreamInfo(None, torch.full((ids.shape[0],), ids.shape[1]), None, False)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_is_accepted_and_changes_nothing(byte_export, impl):
    from transformers import AutoModelForCausalLM

    _, folder, ref = byte_export
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=impl)
    assert model.config._attn_implementation == impl
    ids = random_ids(n=7)
    with torch.no_grad():  # bitwise on one path (with gradients the lean attention rounds differently, ~1e-7)
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_unbounded_max_length_and_lora_targets():
    import megalodon_lm.hf as hf

    model = hf_model()
    assert model.config.max_position_embeddings == hf.UNBOUNDED_CONTEXT == 2**31 - 1
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert set(model.lora_target_modules) == set(hf.LORA_TARGET_MODULES) <= names


def test_bf16_loading_generates(byte_export):
    from transformers import AutoModelForCausalLM

    _, folder, ref = byte_export
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.model.embed.weight.dtype == torch.bfloat16
    ids = random_ids(n=12)
    logits = model(ids).logits
    # bf16 weights: the same model up to bf16 rounding (a bound, not an exact value).
    assert float((logits - ref(ids).logits).abs().max().detach()) < 0.25
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 16)
