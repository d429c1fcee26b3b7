"""Exported folders in plain transformers: `trust_remote_code=True` in a fresh interpreter, the Auto classes
after `import megalodon_lm`, the byte-level tokenizer.json, and the error when the package is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from megalodon_lm import generate  # noqa: E402


def _run_script(script: str, *args: str, tmp_path) -> subprocess.CompletedProcess:
    # A private HF cache: transformers copies the loader files into its modules cache; nothing is downloaded.
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)


FRESH = """
    import json, sys
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    # First as if the package were not installed: the loader file's error names the pip command.
    sys.modules["megalodon_lm"] = None
    try:
        AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
    except ImportError as err:
        missing = str(err)
    del sys.modules["megalodon_lm"]
    results = {"missing": missing}
    for folder in sys.argv[1:]:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        batch = tok(["hello world", "the lazy dog jumps over"], return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
        results[folder] = {"ids": batch["input_ids"].tolist(), "mask": batch["attention_mask"].tolist(),
                           "out": out.tolist(), "padding_side": tok.padding_side, "pad": tok.pad_token_id,
                           "eos": tok.eos_token_id, "class": type(model).__name__}
    print(json.dumps(results))
"""


def test_fresh_interpreter_loads_byte_and_bpe_exports(tmp_path, byte_export, bpe_export):
    """Acceptance: no megalodon_lm import in the script; AutoModelForCausalLM/AutoTokenizer generate.
    The script first hides the package: loading then fails with our message."""
    assert "import megalodon_lm" not in FRESH
    folders = {str(byte_export[1]): (byte_export[2], None), str(bpe_export[1]): (bpe_export[2], bpe_export[3])}
    proc = _run_script(FRESH, *folders, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["missing"].startswith("this model needs the megalodon-lm package: pip install 'megalodon-lm[hf]'")
    for folder, (ref_model, bpe) in folders.items():
        r = results[folder]
        assert r["class"] == "MegalodonForCausalLM" and r["padding_side"] == "left"
        eos = 256 if bpe is None else bpe.eos_id
        assert r["pad"] == r["eos"] == eos
        ids, mask, out = torch.tensor(r["ids"]), torch.tensor(r["mask"]), torch.tensor(r["out"])
        prompts = [row[m.bool()] for row, m in zip(ids, mask, strict=True)]
        encode = (lambda s: list(s.encode())) if bpe is None else bpe.encode
        assert [p.tolist() for p in prompts] == [encode("hello world"), encode("the lazy dog jumps over")]
        ref = generate(ref_model, prompts, max_new_tokens=6, temperature=0, eos_token_id=eos)
        n = out.shape[1] - ids.shape[1]
        assert torch.equal(out[:, ids.shape[1]:], ref[:, :n])


AFTER_IMPORT = """
    import sys
    import megalodon_lm
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"transformers", "peft", "lm_eval"})
    assert not heavy, f"import megalodon_lm imported {heavy}"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    assert AutoConfig.for_model("megalodon_lm").model_type == "megalodon_lm"
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])  # no trust_remote_code: registered locally
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    assert type(model).__module__ == "megalodon_lm.hf.modeling", type(model).__module__
    print(model.generate(**tok(["abc"], return_tensors="pt"), max_new_tokens=3, do_sample=False).shape)
"""


def test_auto_classes_after_import_megalodon_lm(tmp_path, byte_export):
    proc = _run_script(AFTER_IMPORT, str(byte_export[1]), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("torch.Size([1, 6])")


def test_export_folder_files(byte_export, bpe_export):
    from megalodon_lm.data.tokenizer import load_tokenizer

    for folder in (byte_export[1], bpe_export[1]):
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_megalodon.MegalodonForCausalLM"
        assert config["max_position_embeddings"] == 2**31 - 1
        for name in ("configuration_megalodon.py", "modeling_megalodon.py", "tokenizer.json"):
            assert (folder / name).is_file()
    assert load_tokenizer(byte_export[1]).kind == "byte"  # our loader still reads the folder
    assert load_tokenizer(bpe_export[1]).fingerprint() == bpe_export[3].fingerprint()


def test_byte_level_tokenizer_json_is_the_byte_tokenizer(byte_export):
    from transformers import AutoTokenizer

    from megalodon_lm.data.tokenizer import ByteTokenizer

    tok = AutoTokenizer.from_pretrained(byte_export[1])
    ours = ByteTokenizer()
    text = "héllo wörld\n\t <|endoftext|> ∑ 🦈 \x00 end "
    ids = tok(text)["input_ids"]
    assert ids == ours.encode(text)  # "<|endoftext|>" in text stays bytes, as in our tokenizer
    assert tok.decode(ids) == text
    assert tok.decode(ids + [256], skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens(256) == "<|endoftext|>" and len(tok) == 257
    all_bytes = bytes(range(256))
    assert tok.backend_tokenizer.decode(list(all_bytes)) == all_bytes.decode("utf-8", errors="replace")


def test_saving_a_loaded_model_keeps_the_loader_files(tmp_path, byte_export):
    """transformers registers remote classes for auto-saving; ours must not copy the package's modules."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(byte_export[1], trust_remote_code=True)
    model.save_pretrained(tmp_path / "again")
    files = sorted(p.name for p in (tmp_path / "again").glob("*.py"))
    assert files == ["configuration_megalodon.py", "modeling_megalodon.py"]
    assert "auto_map" in json.loads((tmp_path / "again" / "config.json").read_text())
