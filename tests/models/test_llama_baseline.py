"""The Llama baseline: parameter matching, the MegalodonLM call convention, KV-cache streaming, run-dir helpers."""

from __future__ import annotations

import pytest
import torch

from megalodon_lm.models import MegalodonConfig
from megalodon_lm.models.llama_baseline import (
    LlamaLM,
    build_model,
    llama_config_for,
    llama_num_parameters,
    model_from_run_dir,
    run_arch,
    save_arch,
)

pytest.importorskip("transformers")

SMALL = dict(num_layers=2, model_dim=64, z_dim=32, value_dim=64, num_heads=1, ffn_hidden_dim=128, chunk_size=16,
             norm_num_groups=4)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def small_llama(seed: int = 0) -> LlamaLM:
    torch.manual_seed(seed)
    return LlamaLM(llama_config_for(MegalodonConfig.from_preset("nano", **SMALL), 64)).double().eval()


@pytest.mark.parametrize("preset", ["nano", "mini", "3M", "tiny", "11M", "200M"])
def test_parameter_count_matches_within_5_percent(preset):
    mcfg = MegalodonConfig.from_preset(preset)
    lcfg = llama_config_for(mcfg, 512)
    count = llama_num_parameters(lcfg.hidden_size, lcfg.intermediate_size, lcfg.num_hidden_layers, lcfg.vocab_size,
                                 lcfg.tie_word_embeddings)
    assert abs(count / mcfg.num_parameters() - 1) <= 0.05
    assert (lcfg.hidden_size, lcfg.num_hidden_layers, lcfg.vocab_size) == (mcfg.model_dim, mcfg.num_layers,
                                                                           mcfg.vocab_size)
    if preset in ("nano", "mini"):  # the formula is the real count (instantiating 200M would be slow)
        assert LlamaLM(lcfg).num_parameters() == count


def test_unmatchable_config_is_a_value_error():
    with pytest.raises(ValueError, match="within 5%"):
        llama_config_for(MegalodonConfig.from_preset("nano", **SMALL), 64, target_params=1000)
    with pytest.raises(ValueError, match="max_positions"):
        llama_config_for(MegalodonConfig.from_preset("nano"), 0)


def test_forward_matches_hf_and_aligned_loss():
    model = small_llama()
    x = torch.randint(0, 256, (2, 37))
    y = torch.randint(0, 256, (2, 37))
    y[0, :5] = -100
    with torch.no_grad():
        out = model(x, targets=y)
        ref = model.hf(input_ids=x).logits
    assert rel(out.logits, ref) < 1e-6
    expect = torch.nn.functional.cross_entropy(ref.flatten(0, 1).double(), y.flatten(), ignore_index=-100)
    assert abs(float(out.loss) - float(expect)) < 1e-6
    last = model(x, last_logits_only=True).logits
    assert last.shape == (2, 1, 256) and rel(last[:, 0], ref[:, -1]) < 1e-6


@pytest.mark.parametrize("split", [1, 15, 16, 17, 36])
def test_kv_cache_streaming_equals_one_shot(split):
    model = small_llama()
    x = torch.randint(0, 256, (1, 37))
    full = model(x).logits
    first = model(x[:, :split], return_state=True)
    second = model(x[:, split:], state=first.state, return_state=True)
    assert rel(torch.cat([first.logits, second.logits], 1), full) < 1e-10


def test_gradients_flow_to_every_parameter():
    model = small_llama().train()
    x = torch.randint(0, 256, (2, 17))
    model(x, targets=x).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_inputs():
    model = small_llama()
    x = torch.randint(0, 256, (1, 8))
    with pytest.raises(ValueError, match="last_logits_only"):
        model(x, targets=x, last_logits_only=True)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(x[0])
    with pytest.raises(ValueError, match="--arch"):
        build_model("gpt", MegalodonConfig.from_preset("nano", **SMALL), 64)


def test_run_dir_round_trip(tmp_path):
    mcfg = MegalodonConfig.from_preset("nano", **SMALL)
    torch.manual_seed(0)
    model = build_model("llama", mcfg, 64)
    assert run_arch(tmp_path) == "megalodon"
    save_arch(tmp_path, model)
    assert run_arch(tmp_path) == "llama"
    again = model_from_run_dir(tmp_path, mcfg)
    assert isinstance(again, LlamaLM) and again.hf.config._attn_implementation == "sdpa"
    again.load_state_dict(model.state_dict(), strict=True)
    assert again.config.intermediate_size == model.config.intermediate_size
    with pytest.raises(ValueError, match="differs from the architecture"):
        build_model("megalodon", mcfg, 64, source_dir=tmp_path)
