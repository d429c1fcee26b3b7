"""transformers adapter: logits, save/load, generate, gradient checkpointing, export/import."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megalodon_lm import generate  # noqa: E402

from .helpers import hf_model, make_run, random_ids  # noqa: E402


def _hf():
    import megalodon_lm.hf as hf

    return hf


_model = hf_model
_ids = random_ids


def test_config_fields_and_registration():
    hf = _hf()
    from transformers import AutoConfig

    cfg = hf.MegalodonHFConfig(num_layers=2, model_dim=128, z_dim=64, value_dim=256, num_heads=2,
                               ffn_hidden_dim=256, norm_num_groups=16, share_emb=True, eos_token_id=7)
    assert cfg.model_type == "megalodon_lm"
    assert cfg.tie_word_embeddings is True and cfg.hidden_size == 128 and cfg.num_hidden_layers == 2
    assert cfg.to_megalodon_config().share_emb is True
    assert AutoConfig.for_model("megalodon_lm").__class__ is hf.MegalodonHFConfig
    with pytest.raises(ValueError):
        hf.MegalodonHFConfig(share_emb=True, tie_word_embeddings=False)
    with pytest.raises(ValueError):
        hf.MegalodonHFConfig(z_dim=100, num_heads=3)


def test_logits_and_labels_match_library():
    model = _model()
    ids = _ids()
    assert [n for n, _ in model.named_parameters()][0].startswith("model.")
    ref = model.model(ids).logits
    out = model(ids, labels=ids, use_cache=False)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
    expect = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expect)
    labels = ids.clone()
    labels[:, :5] = -100
    expect = F.cross_entropy(ref[:, 4:-1].reshape(-1, ref.shape[-1]), ids[:, 5:].reshape(-1))
    torch.testing.assert_close(model(ids, labels=labels).loss, expect)


@pytest.mark.parametrize("share_emb", [False, True])
def test_save_pretrained_round_trip(tmp_path, share_emb):
    from transformers import AutoModelForCausalLM

    model = _model(share_emb=share_emb)
    ids = _ids()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_cache_streaming_equals_full_forward():
    model = _model()
    ids = _ids(n=20)
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :11], use_cache=True)
    cache = out.cache
    assert isinstance(cache, _hf().MegalodonCache) and cache.get_seq_length() == 11
    step = model(ids[:, 11:], past_key_values=cache, use_cache=True)
    assert step.cache is cache and cache.get_seq_length() == 20
    torch.testing.assert_close(torch.cat([out.logits, step.logits], 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generate_matches_library(batch):
    model = _model()
    ids = _ids(b=batch, n=9)
    seen: list[int] = []
    handle = model.model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    finally:
        handle.remove()
    ref = generate(model.model, ids, max_new_tokens=12, temperature=0)
    assert torch.equal(out[:, :9], ids)
    assert torch.equal(out[:, 9:], ref)
    assert seen[0] == 9 and set(seen[1:]) == {1}  # prefill once, then one new token per step


def test_generate_with_eos_matches_library():
    model = _model()
    ids = _ids(b=2, n=9)
    ref = generate(model.model, ids, max_new_tokens=10, temperature=0)
    eos = int(ref[0, 3])  # a token the model does produce
    ref = generate(model.model, ids, max_new_tokens=10, temperature=0, eos_token_id=eos)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos)
    n = out.shape[1] - 9
    assert torch.equal(out[:, 9:], ref[:, :n])
    assert bool((ref[:, n:] == eos).all())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the deprecated alias is the API under test
def test_gradient_checkpointing_same_loss_and_grads():
    model = _model().train()
    ids = _ids()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.model.gradient_checkpointing
    loss2 = model(ids, labels=ids).loss
    loss2.backward()
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6)
    model.gradient_checkpointing_disable()
    assert not model.model.gradient_checkpointing


def test_export_import_byte_run(tmp_path):
    hf = _hf()
    from megalodon_lm.data.tokenizer import ByteTokenizer, load_tokenizer
    from megalodon_lm.training.checkpoint import load_run

    ref = make_run(tmp_path / "run", ByteTokenizer(), 257)
    ids = _ids(n=10)
    hf.export_hf(tmp_path / "run", tmp_path / "hf")
    loaded = hf.MegalodonForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.config.eos_token_id == 256
    with torch.no_grad():  # bitwise on one path (with gradients the lean attention rounds differently, ~1e-7)
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert load_tokenizer(tmp_path / "hf").kind == "byte"
    hf.import_hf(tmp_path / "hf", tmp_path / "run2")
    model2, tok2 = load_run(tmp_path / "run2")
    assert tok2.kind == "byte"
    torch.testing.assert_close(model2(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_export_import_bpe_run_and_cli(tmp_path):
    _hf()  # skips without transformers
    import argparse

    from transformers import PreTrainedTokenizerFast

    from megalodon_lm.training.checkpoint import load_run

    from .helpers import make_bpe

    tok = make_bpe(tmp_path / "bpe.json")
    ref = make_run(tmp_path / "run", tok, tok.vocab_size)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    from megalodon_lm.hf_cli import add_hf_parsers

    add_hf_parsers(sub)
    args = parser.parse_args(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert args.func(args) == 0
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    assert fast.encode("hello world", add_special_tokens=False) == tok.encode("hello world")
    args = parser.parse_args(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run2")])
    assert args.func(args) == 0
    model2, tok2 = load_run(tmp_path / "run2")
    assert tok2.fingerprint() == tok.fingerprint()
    ids = torch.tensor([tok.encode("hello world, the lazy dog")])
    torch.testing.assert_close(model2(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_hf_config_declares_every_megalodon_field_with_the_same_default():
    """The HF config repeats MegalodonConfig's fields (transformers configs declare them on the class):
    this guard fails when the two drift apart."""
    import dataclasses

    hf = _hf()
    from megalodon_lm import MegalodonConfig

    ours = {f.name: f.default for f in dataclasses.fields(MegalodonConfig)}
    cfg = hf.MegalodonHFConfig()
    assert {name: getattr(cfg, name) for name in ours} == ours
    assert cfg.to_megalodon_config() == MegalodonConfig()
