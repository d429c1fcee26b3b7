"""lm-evaluation-harness model "megalodon" and `megalodon-lm eval harness`, offline: local task YAMLs over
local jsonl files (a multiple-choice task, a rolling-perplexity task, a generation task)."""

from __future__ import annotations

import json
import os

import pytest

# Nothing may be downloaded: data sets and hub files are local or absent. Set before lm_eval/datasets load.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install "
                                                "'megalodon-lm[eval]')")

import torch  # noqa: E402

from megalodon_lm import MegalodonConfig, MegalodonLM, generate  # noqa: E402
from megalodon_lm.data.tokenizer import ByteTokenizer  # noqa: E402
from megalodon_lm.evals.ppl import bpb_vs_context  # noqa: E402

DOCS = [
    "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. ∑ x² 🦈",
    "It was the best of times, it was the worst of times, it was the age of wisdom. " * 34,  # 2720 bytes > 2048
]
MC = [
    {"question": "The sky is", "choices": ["blue", "a fish", "seven"], "answer": 0},
    {"question": "It was the best of", "choices": ["times", "dogs", "zebras and more"], "answer": 0},
    {"question": "Call me", "choices": ["Ishmael", "later", "x"], "answer": 0},
    {"question": "", "choices": ["hello", "world"], "answer": 1},
]
GEN = [{"prompt": "It was the best of", "target": " times"}, {"prompt": "Call me", "target": " Ishmael"},
       {"prompt": "Q", "target": "x"}]

TASKS = {
    "tiny_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
               "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "tiny_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
                "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
    "tiny_gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
                "generation_kwargs:\n  until: ['.', ',']\n  max_gen_toks: 12\n  do_sample: false\n"
                "metric_list:\n  - metric: exact_match\n",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from megalodon_lm.data.tokenizer import save_tokenizer
    from megalodon_lm.training.checkpoint import TOKENIZER_DIR, init_run_dir, save_checkpoint

    path = tmp_path_factory.mktemp("harness_run")
    cfg = MegalodonConfig.from_preset("nano", chunk_size=8, num_layers=2, vocab_size=257)
    torch.manual_seed(0)
    model = MegalodonLM(cfg)
    init_run_dir(path, cfg, {}, resume=False)
    save_tokenizer(ByteTokenizer(), path / TOKENIZER_DIR)
    save_checkpoint(path, 1, model, None, None, {"step": 1})
    return path


@pytest.fixture(scope="module")
def model(run_dir):
    from megalodon_lm.training.checkpoint import load_run

    return load_run(run_dir)[0]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """Task YAMLs with absolute data paths and a private data set cache."""
    d = tmp_path_factory.mktemp("harness_tasks")
    data = {"tiny_mc": MC, "tiny_ppl": [{"text": t} for t in DOCS], "tiny_gen": GEN}
    for name, body in TASKS.items():
        jsonl = d / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in data[name]), encoding="utf-8")
        head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {jsonl}\n"
                f"  cache_dir: {d / 'hf_datasets'}\ntest_split: test\n")
        (d / f"{name}.yaml").write_text(head + body, encoding="utf-8")
    return d


def _manager(tasks_dir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


class _EOSFirst(ByteTokenizer):
    """The byte tokenizer with EOS (0 bytes) before each document: `eval ppl` then streams what lm-eval's
    rolling loglikelihood streams (the first token is predicted after EOS, lm-eval's prefix token)."""

    def encode_bytes(self, data: bytes) -> list[int]:
        return [self.eos_id, *data]


def _eval_ppl_whole_bpb(model, docs: list[str]) -> float:
    """`eval ppl`'s whole-prefix bits per byte of `docs` (each streamed after EOS, every byte scored)."""
    whole = bpb_vs_context(model, _EOSFirst(), [d.encode() for d in docs], [None], score_tokens=10**9)["results"][0]
    assert whole["n_bytes"] == sum(len(d.encode()) for d in docs)
    return whole["bpb"]


def test_rolling_bits_per_byte_equals_eval_ppl_whole_prefix(run_dir, model, tasks_dir):
    """Registered name "megalodon" from the Python API; the 2720-byte document is not truncated at 2048."""
    out = lm_eval.simple_evaluate(model="megalodon", model_args=f"pretrained={run_dir},piece_tokens=512",
                                  batch_size=2, tasks=["tiny_ppl"], task_manager=_manager(tasks_dir))
    bpb = out["results"]["tiny_ppl"]["bits_per_byte,none"]
    assert abs(bpb - _eval_ppl_whole_bpb(model, DOCS)) < 1e-4


def _instances(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args_list)]


def _direct_loglikelihood(model, ctx: str, cont: str) -> tuple[float, bool]:
    ctx_ids = list(ctx.encode()) or [256]
    ids = torch.tensor([ctx_ids + list(cont.encode())])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).logits[0].double(), -1)
    n = len(cont.encode())
    targets = ids[0, -n:]
    return float(logp[-n:].gather(-1, targets[:, None]).sum()), bool((logp[-n:].argmax(-1) == targets).all())


def test_loglikelihood_batches_equal_direct_scores(run_dir, model):
    from megalodon_lm.evals.lm_eval_model import MegalodonEvalLM

    # The trailing-space rule (lm-eval moves a context's trailing spaces to the continuation) is avoided here.
    pairs = [("The sky is", " blue"), ("", "hello"), ("It was the best of times, " * 12 + "it was the", " age"),
             ("a", "b")]
    for batch_size in (1, 3):
        lm = MegalodonEvalLM(pretrained=str(run_dir), batch_size=batch_size, piece_tokens=100)
        got = lm.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
        for (ctx, cont), (lp, greedy) in zip(pairs, got, strict=True):
            ref_lp, ref_greedy = _direct_loglikelihood(model, ctx, cont)
            assert lp == pytest.approx(ref_lp, abs=1e-4) and greedy == ref_greedy


def test_generate_until_stop_strings_and_batches(run_dir, model):
    from megalodon_lm.evals.lm_eval_model import MegalodonEvalLM

    prompts = ["It was the best of", "Call me", "Q"]
    # Stop strings taken from what the model really generates, so that cutting is exercised.
    free = [ByteTokenizer().decode(generate(model, [list(p.encode())], max_new_tokens=12, temperature=0)[0])
            for p in prompts]
    stop = free[0][3:5] if len(free[0]) >= 5 else "\x00"
    gen_kwargs = {"until": [stop], "max_gen_toks": 12, "do_sample": False}
    expect = [f.split(stop, 1)[0] for f in free]
    for batch_size in (1, 3):
        lm = MegalodonEvalLM(pretrained=str(run_dir), batch_size=batch_size)
        got = lm.generate_until(_instances("generate_until", [(p, dict(gen_kwargs)) for p in prompts]),
                                disable_tqdm=True)
        assert got == expect
    assert len(expect[0]) == 3  # the first row really stopped at its stop string


def test_cli_prints_lm_eval_table_for_an_exported_folder(run_dir, model, tasks_dir, tmp_path, capsys):
    """Acceptance: `megalodon-lm eval harness` on a transformers folder (--limit 2: the two short documents)."""
    pytest.importorskip("transformers")
    from megalodon_lm.cli import main
    from megalodon_lm.hf import export_hf

    export_hf(run_dir, tmp_path / "hf")
    out_json = tmp_path / "results.json"
    code = main(["eval", "harness", str(tmp_path / "hf"), "--tasks", "tiny_mc,tiny_ppl,tiny_gen",
                 "--include-path", str(tasks_dir), "--batch-size", "2", "--limit", "2", "--out", str(out_json)])
    assert code == 0
    table = capsys.readouterr().out
    print(table)
    for needle in ("Tasks", "|tiny_mc |", "acc_norm", "bits_per_byte", "exact_match"):
        assert needle in table, table
    results = json.loads(out_json.read_text())["results"]
    assert abs(results["tiny_ppl"]["bits_per_byte,none"] - _eval_ppl_whole_bpb(model, DOCS[:2])) < 1e-4
    assert results["tiny_mc"]["acc,none"] in (0, 0.5, 1)


def test_cli_errors(run_dir, tmp_path):
    from megalodon_lm.cli import main

    assert main(["eval", "harness", str(run_dir), "--tasks", "x", "--include-path", str(tmp_path / "no")]) == 2
    assert main(["eval", "harness", str(tmp_path), "--tasks", "x"]) == 2  # neither a run nor a folder
    assert main(["eval", "harness", str(run_dir), "--tasks", " , "]) == 2
