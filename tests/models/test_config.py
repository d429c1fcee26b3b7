"""MegalodonConfig: presets, parameter counts, validation messages, JSON round trips."""

from __future__ import annotations

import json

import pytest
import torch

from megalodon_lm import PRESETS, MegalodonConfig, MegalodonLM

from .helpers import nano_config


def test_presets_exist():
    for name in ("nano", "tiny", "200M", "1.3B", "7B"):
        assert name in PRESETS
        cfg = MegalodonConfig.from_preset(name)
        assert isinstance(cfg, MegalodonConfig)


def test_tiny_parameter_count():
    cfg = MegalodonConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = MegalodonLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == 11_582_976
    assert model.num_parameters() == n
    assert cfg.num_parameters() == n


def test_3m_preset_is_the_jax_port_shape():
    """4 layers x 256, 1 head, z 128, value 512, SwiGLU FFN 364, CEMA 16, chunk 128, 32 groups, untied: 3.3M."""
    cfg = MegalodonConfig.from_preset("3M")
    assert (cfg.num_heads, cfg.z_dim, cfg.value_dim, cfg.ffn_hidden_dim, cfg.swiglu, cfg.cema_ndim, cfg.chunk_size,
            cfg.norm_num_groups, cfg.share_emb) == (1, 128, 512, 364, True, 16, 128, 32, False)
    assert cfg.num_parameters() == 3_296_256  # + 2 x 256 = 3,296,768 with the trainer's 257-id byte vocabulary
    assert MegalodonConfig.from_preset("3M", vocab_size=257).num_parameters() == 3_296_768


def test_11m_preset_is_3m_shape_at_tiny_size():
    tiny, big = MegalodonConfig.from_preset("tiny"), MegalodonConfig.from_preset("11M")
    assert (big.num_layers, big.model_dim, big.value_dim, big.chunk_size) == (tiny.num_layers, tiny.model_dim,
                                                                               tiny.value_dim, tiny.chunk_size)
    assert (big.num_heads, big.z_dim, big.swiglu, big.ffn_hidden_dim) == (1, 192, True, 640)
    assert big.num_parameters() == 11_437_440  # 11,438,208 with the trainer's 257-id byte vocabulary


def test_reference_preset_counts():
    """Spec §1.7: mega200M 220.6M, mega1.3B 1.343B, mega7.3B 7,385,817,088 (V = 32000)."""
    assert round(MegalodonConfig.from_preset("200M").num_parameters() / 1e6, 1) == 220.6
    assert round(MegalodonConfig.from_preset("1.3B").num_parameters() / 1e9, 3) == 1.343
    seven = MegalodonConfig.from_preset("7B")
    assert seven.num_parameters() == 7_385_817_088
    # The paper's 7B differs from mega7.3B in chunk size and RoPE base only: no parameter changes.
    assert seven.chunk_size == 4096 and seven.rope_base == 1e5 and seven.swiglu
    assert seven.vocab_size == 32000
    mega73 = MegalodonConfig.from_preset("7B", chunk_size=2048, rope_base=None)
    assert mega73.num_parameters() == 7_385_817_088


def test_pg19_style_tied_count():
    """mega1.3B_pg19 (SwiGLU F=3584, tied, scaled embedding): 1.328B in docs/architecture.md §6.2."""
    cfg = MegalodonConfig.from_preset(
        "1.3B", ffn_hidden_dim=3584, swiglu=True, scale_emb=True, share_emb=True
    )
    assert round(cfg.num_parameters() / 1e9, 3) == 1.328


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"swiglu": True},
        {"rescale_nffn": True},
        {"share_emb": True},
        {"norm_affine": False},
        {"output_size": 300},
        {"num_heads": 4, "z_dim": 32, "value_dim": 64, "cema_ndim": 4, "num_layers": 3},
        {"swiglu": True, "rescale_nffn": True, "share_emb": True, "norm_affine": False},
    ],
)
def test_formula_matches_instantiated_model(overrides):
    cfg = nano_config(**overrides)
    model = MegalodonLM(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())
    if "output_size" in overrides:
        with torch.no_grad():
            assert model(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 300)


def test_derived_sizes():
    cfg = nano_config()
    assert cfg.head_dim == cfg.z_dim // cfg.num_heads
    assert cfg.value_head_dim == cfg.value_dim // cfg.num_heads
    assert cfg.effective_output_size == cfg.vocab_size
    assert cfg.effective_rope_base == 10000.0
    assert nano_config(rope_base=1e5).effective_rope_base == 1e5


def test_defaults_follow_reference_modelconf():
    cfg = MegalodonConfig()
    assert (cfg.num_layers, cfg.model_dim, cfg.z_dim, cfg.value_dim, cfg.num_heads) == (8, 1024, 256, 2048, 1)
    assert (cfg.ffn_hidden_dim, cfg.cema_ndim, cfg.chunk_size, cfg.norm_num_groups) == (2048, 16, 2048, 32)
    assert cfg.init_mode == "he" and cfg.efficient_attn is None and cfg.rope_base is None
    assert cfg.norm_eps == 1e-5 and cfg.norm_affine and cfg.output_size == -1
    assert not (cfg.swiglu or cfg.rescale_nffn or cfg.scale_emb or cfg.share_emb or cfg.layerwise_ckpt)
    assert cfg.dropout == cfg.hidden_dropout == cfg.attention_dropout == 0.0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"z_dim": 60, "num_heads": 8}, r"z_dim \(60\).*divisible.*num_heads \(8\)"),
        ({"value_dim": 255}, r"value_dim \(255\).*divisible.*num_heads \(2\)"),
        ({"norm_num_groups": 24}, r"model_dim \(128\).*divisible.*norm_num_groups \(24\)"),
        ({"z_dim": 6, "num_heads": 2}, r"even"),
        ({"num_layers": 0}, r"num_layers must be positive"),
        ({"model_dim": -128}, r"model_dim must be positive"),
        ({"chunk_size": 0}, r"chunk_size must be positive"),
        ({"vocab_size": 0}, r"vocab_size must be positive"),
        ({"output_size": 0}, r"output_size"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"hidden_dropout": -0.1}, r"hidden_dropout must be in \[0, 1\)"),
        ({"attention_dropout": 1.5}, r"attention_dropout"),
        ({"init_mode": "kaiming"}, r"init_mode must be one of.*'kaiming'"),
        ({"efficient_attn": "flash"}, r"efficient_attn"),
        ({"norm_eps": 0.0}, r"norm_eps must be positive"),
        ({"rope_base": 1.0}, r"rope_base"),
        ({"share_emb": True, "output_size": 300}, r"share_emb"),
    ],
)
def test_validation_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        nano_config(**overrides)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"model_dim": 128.0}, r"model_dim must be an int"),
        ({"num_heads": True}, r"num_heads must be an int"),
        ({"swiglu": 1}, r"swiglu must be a bool"),
    ],
)
def test_type_errors(overrides, match):
    with pytest.raises(TypeError, match=match):
        nano_config(**overrides)


def test_unknown_field_in_from_dict():
    data = nano_config().to_dict()
    data["num_layer"] = 3
    with pytest.raises(ValueError, match="unknown MegalodonConfig field.*num_layer"):
        MegalodonConfig.from_dict(data)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*nano"):
        MegalodonConfig.from_preset("huge")


def test_unknown_override_in_preset():
    with pytest.raises(ValueError, match="unknown MegalodonConfig field.*chunksize"):
        MegalodonConfig.from_preset("nano", chunksize=16)


def test_preset_overrides():
    before = dict(PRESETS["nano"])
    cfg = MegalodonConfig.from_preset("nano", chunk_size=16, swiglu=True)
    assert cfg.chunk_size == 16 and cfg.swiglu
    assert cfg.model_dim == PRESETS["nano"]["model_dim"]
    assert PRESETS["nano"] == before  # overrides do not leak into the preset table
    assert MegalodonConfig.from_preset("nano").chunk_size == before["chunk_size"] != 16


CONFIGS = [
    MegalodonConfig(),
    MegalodonConfig.from_preset("7B"),
    MegalodonConfig.from_preset("nano", chunk_size=16, swiglu=True, share_emb=True, scale_emb=True,
                                rope_base=12345.5, dropout=0.1, init_mode="bert", norm_affine=False,
                                efficient_attn="swift", output_size=-1, layerwise_ckpt=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "7B", "custom"])
def test_json_round_trip_string(cfg):
    text = cfg.to_json()
    assert json.loads(text) == cfg.to_dict()
    back = MegalodonConfig.from_json(text)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    assert MegalodonConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "7B", "custom"])
def test_json_round_trip_file(cfg, tmp_path):
    path = tmp_path / "config.json"
    text = cfg.to_json(path)
    assert path.read_text().strip() == text.strip()
    assert MegalodonConfig.from_json(path) == cfg
    assert MegalodonConfig.from_json(str(path)) == cfg


def test_reference_style_partial_dict():
    """A reference config naming only some fields (like the golden json) fills in the defaults."""
    cfg = MegalodonConfig.from_dict({"model_dim": 32, "z_dim": 16, "value_dim": 48, "num_heads": 2,
                                     "norm_num_groups": 4, "vocab_size": 50})
    assert cfg.num_layers == 8 and cfg.chunk_size == 2048 and cfg.vocab_size == 50


def test_model_rejects_non_config():
    with pytest.raises(TypeError, match="MegalodonConfig"):
        MegalodonLM({"model_dim": 128})
