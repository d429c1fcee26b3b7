"""Small parts of the server: chat template, stop strings, sampler state, model directories, the CLI's checks."""

from __future__ import annotations

import json

import pytest
import torch

from megalodon_lm.cli import main
from megalodon_lm.data.tokenizer import ByteTokenizer
from megalodon_lm.serve.loading import load_model_dir, model_fingerprint
from megalodon_lm.serve.sampling import RowSampler, generator_from_bytes, new_generator, rng_bytes
from megalodon_lm.serve.template import ChatTemplate
from megalodon_lm.serve.text import StopTracker


def test_template_render_continuation_and_file(tmp_path):
    t = ChatTemplate()
    msgs = [("system", "Be brief."), ("user", "Hi")]
    assert t.render(msgs) == "System: Be brief.\nUser: Hi\nAssistant: "
    assert t.stops == ("\nSystem:", "\nUser:", "\nAssistant:")
    # After a reply cut at "\nUser:" the marker is already in the stream: not fed twice.
    assert t.continuation([("user", "More")], "\nUser:") == " More\nAssistant: "
    assert t.continuation([("user", "More")], "") == "\nUser: More\nAssistant: "
    assert t.continuation([("user", "More")], "END") == "\nUser: More\nAssistant: "
    assert ChatTemplate.from_dir(tmp_path) == t
    (tmp_path / "chat_template.json").write_text(json.dumps(
        {"markers": {"system": "<s>", "user": "<u>", "assistant": "<a>"}, "end": "</>"}))
    own = ChatTemplate.from_dir(tmp_path)
    assert own.render([("user", "x")]) == "<u>x</><a>" and own.stops == ("</><s>", "</><u>", "</><a>")
    (tmp_path / "chat_template.json").write_text("{}")
    with pytest.raises(ValueError, match="chat_template.json"):
        ChatTemplate.from_dir(tmp_path)


def _feed(tracker, text):
    return "".join(tracker.add(b) for b in text.encode())


def test_stop_tracker_holds_back_possible_stops_and_cuts_at_one():
    tok = ByteTokenizer()
    t = StopTracker(tok, ["\nUser:", "STOP"])
    assert _feed(t, "Hello\nUs") == "Hello"  # "\nUs" may become "\nUser:"
    assert _feed(t, "e") == ""
    assert _feed(t, "d it") == "\nUsed it"  # it did not
    assert _feed(t, " ST") == " "
    assert _feed(t, "O") == "" and not t.stopped
    assert _feed(t, "P") == "" and t.stopped
    assert t.reply == "Hello\nUsed it " and t.tail == "STOP"
    t = StopTracker(tok, [])
    out = "".join(t.add(b) for b in "é".encode())  # two bytes: nothing until the character is whole
    assert out == "é" and t.finish() == ""
    t = StopTracker(tok, ["\nUser:"])
    assert _feed(t, "abc\n") == "abc" and t.finish() == "\n" and t.reply == "abc\n"


def test_sampler_state_round_trip_continues_the_same_draws():
    g = new_generator(3)
    logits = torch.randn(257)
    a = RowSampler(1.0, 50, 0.9, 1.3, g, 257)
    first = [a.sample(logits) for _ in range(5)]
    saved = rng_bytes(a.generator)
    more = [a.sample(logits) for _ in range(5)]
    b = RowSampler(1.0, 50, 0.9, 1.3, generator_from_bytes(saved), 257)
    b.observe(first)
    assert [b.sample(logits) for _ in range(5)] == more
    assert RowSampler(0.0, None, None, None, new_generator(None), 257).sample(logits) == int(logits.argmax())


@pytest.mark.slow  # transformers' import and save_pretrained: tens of seconds on 2 cores
def test_run_and_hf_directories_load_the_same_model(run_dir, tmp_path):
    pytest.importorskip("transformers", reason="export-hf needs transformers")
    from megalodon_lm.hf.convert import export_hf

    model, tok = load_model_dir(run_dir)
    hf_model, hf_tok = load_model_dir(export_hf(run_dir, tmp_path / "hf"))
    assert model_fingerprint(model, tok) == model_fingerprint(hf_model, hf_tok)
    other = type(model)(model.config)
    assert model_fingerprint(other, tok) != model_fingerprint(model, tok)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_model_dir(tmp_path)


@pytest.mark.parametrize("argv,message", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--port", "70000"], "--port must lie in"),
    (["--prefill-chunk", "-1"], "--prefill-chunk must be >= 1"),
])
def test_cli_rejects_bad_options(run_dir, capsys, argv, message):
    assert main(["serve", str(run_dir), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_missing_directory(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "model directory not found" in capsys.readouterr().err
