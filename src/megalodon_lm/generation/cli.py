"""`megalodon-lm generate RUN_DIR`: sample text from a trained run, streamed to stdout as it is produced."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..device import resolve_device
from ..runtime import add_threads_argument, check_threads, set_threads

GENERATE_HELP = {
    "run_dir": "a run directory written by `megalodon-lm train`",
    "step": "load the checkpoint of this step [the latest]",
    "prompt": "prompt text [stdin when it is not a terminal, else start a new document]",
    "prompt_file": "read the prompt from this UTF-8 file",
    "max_new_tokens": "tokens to generate [256]",
    "temperature": "sampling temperature; 0 = greedy [0.8]",
    "top_k": "sample among the k most likely tokens; 0 = no top-k filter [50]",
    "top_p": "nucleus sampling: keep the smallest set of tokens with this much probability [-]",
    "repetition_penalty": "CTRL repetition penalty; > 1 discourages tokens already in the prompt or output [-]",
    "seed": "sampling seed [0; with --load-state, the saved sampler state]",
    "stop_at_eos": "stop at the tokenizer's end-of-text token [on]",
    "echo": "print the prompt before the generated text [off: only the new text]",
    "save_state": "afterwards, write the stream state here (continue later with --load-state)",
    "load_state": "continue the stream saved by --save-state; the prompt (may be empty) continues that text",
    "device": "auto, cpu, cuda or cuda:N [auto]",
    "prefill_chunk": "prompt tokens per forward in the prefill; bounds memory [4096]",
}


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `generate` subcommand on an argparse subparsers object; returns its parser."""
    h = GENERATE_HELP
    p = subparsers.add_parser("generate", help="generate text from a trained run (streamed to stdout)",
                              description="Generate text from a run directory's checkpoint. The text goes to "
                                          "stdout as it is produced, a speed summary to stderr. Defaults in "
                                          "brackets.")
    p.add_argument("run_dir", metavar="RUN_DIR", help=h["run_dir"])
    p.add_argument("--step", type=int, default=None, metavar="N", help=h["step"])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None, metavar="TEXT", help=h["prompt"])
    source.add_argument("--prompt-file", default=None, metavar="FILE", help=h["prompt_file"])
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help=h["max_new_tokens"])
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help=h["temperature"])
    p.add_argument("--top-k", type=int, default=50, metavar="K", help=h["top_k"])
    p.add_argument("--top-p", type=float, default=None, metavar="P", help=h["top_p"])
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R", help=h["repetition_penalty"])
    p.add_argument("--seed", type=int, default=None, help=h["seed"])
    p.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True, help=h["stop_at_eos"])
    p.add_argument("--echo", action=argparse.BooleanOptionalAction, default=False, help=h["echo"])
    p.add_argument("--save-state", default=None, metavar="PATH", help=h["save_state"])
    p.add_argument("--load-state", default=None, metavar="PATH", help=h["load_state"])
    p.add_argument("--device", default="auto", help=h["device"])
    p.add_argument("--prefill-chunk", type=int, default=4096, metavar="N", help=h["prefill_chunk"])
    add_threads_argument(p)
    p.set_defaults(func=run_generate)
    return p


def _prompt_text(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file not found: {path}")
        return path.read_text(encoding="utf-8", errors="replace")
    if sys.stdin is not None and not sys.stdin.isatty():
        return sys.stdin.read()
    return ""


def _emit(text: str) -> None:
    """Write to stdout now, even where its encoding cannot represent every character."""
    if not text:
        return
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        enc = sys.stdout.encoding or "ascii"
        sys.stdout.write(text.encode(enc, errors="replace").decode(enc))
    sys.stdout.flush()


class _TextStream:
    """Prints a growing token sequence's text: whole-sequence decode, new suffix printed.

    A trailing U+FFFD is held back (it is usually a multi-byte character whose bytes are not all generated
    yet) and printed only if it is still there at the end.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.n_printed = 0  # characters of the decoded text already on stdout

    def add(self, token: int) -> None:
        self.ids.append(token)
        self._show(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def finish(self) -> None:
        self._show(self.tokenizer.decode(self.ids))

    def _show(self, text: str) -> None:
        # Byte-level decoders only ever extend the text. Should a decoder rewrite earlier text, what was
        # printed stays and printing goes on from the same character count.
        _emit(text[self.n_printed:])
        self.n_printed = max(self.n_printed, len(text))


def _resolve_start(args, model, tokenizer, device, prompt: str):
    """(prompt ids, state or None, sampling generator) for a new or a continued stream."""
    from .state_io import load_state, read_state_info

    ids = tokenizer.encode(prompt)
    rng = torch.Generator(device="cpu").manual_seed(0 if args.seed is None else args.seed)
    if args.load_state is None:
        return ids or [tokenizer.eos_id], None, rng  # no prompt: start a new document
    state = load_state(args.load_state, model, device)
    if state.batch_size != 1:
        raise ValueError(f"--load-state {args.load_state} holds {state.batch_size} streams; generate continues one")
    info = read_state_info(args.load_state)
    if info.next_tokens is not None:
        ids = info.next_tokens + ids  # the token that was pending when the state was saved comes first
    elif not ids:
        raise ValueError(f"--load-state {args.load_state} has no pending token: give a prompt to continue with")
    if args.seed is None and info.rng_state is not None:
        rng.set_state(info.rng_state)
    return ids, state, rng


def _print_stream(stream, out: _TextStream) -> tuple[object, int | None, float | None, int]:
    """Print tokens as they come -> (last state, last token, time of the first token, exit code)."""
    state, token, first = None, None, None
    try:
        for tokens, step_state in stream:
            first = first or time.perf_counter()
            state, token = step_state, int(tokens[0])
            out.add(token)
    except KeyboardInterrupt:  # stop cleanly: the state of the last complete step is still consistent
        return state, token, first, 130
    return state, token, first, 0


def run_generate(args: argparse.Namespace) -> int:
    """Handler of `megalodon-lm generate`; returns the exit code (130 when interrupted)."""
    from .. import load_run
    from ..outputs import check_output_file
    from .decoding import _check_options, generate, stream_generate
    from .state_io import save_state

    device = resolve_device(args.device)
    if args.top_k is not None and args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = no top-k filter), got {args.top_k}")
    # Bad options fail before the (possibly large) model is loaded.
    _check_options(args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, args.repetition_penalty,
                   args.prefill_chunk)
    check_threads(args.threads)
    if args.save_state is not None:  # before generating: a state that cannot be written would be lost
        check_output_file(args.save_state, "--save-state")
    set_threads(args.threads)
    model, tokenizer = load_run(args.run_dir, device=device, step=args.step)
    prompt = _prompt_text(args)
    ids, state, rng = _resolve_start(args, model, tokenizer, device, prompt)
    if args.echo:
        _emit(prompt)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                   eos_token_id=tokenizer.eos_id if args.stop_at_eos else None, seed=rng, state=state,
                   prefill_chunk=args.prefill_chunk)
    out = _TextStream(tokenizer)
    start = time.perf_counter()
    if args.max_new_tokens == 0:  # nothing to print; the prefilled state can still be saved
        _, final_state = generate(model, [ids], **options, return_state=True)
        last, first, code = None, None, 0
    else:
        final_state, last, first, code = _print_stream(stream_generate(model, [ids], **options, return_state=True),
                                                       out)
    out.finish()
    elapsed = time.perf_counter() - start
    if sys.stdout.isatty():
        _emit("\n")
    if args.save_state is not None and final_state is None:
        print(f"megalodon-lm: interrupted before the first token; {args.save_state} not written", file=sys.stderr)
    elif args.save_state is not None:
        # The pending token: the last generated one, or the prompt's last when nothing was generated.
        save_state(final_state, args.save_state, model, next_tokens=[ids[-1] if last is None else last], rng=rng)
    n = len(out.ids)
    first_s = f", first after {first - start:.2f} s" if first is not None else ""
    print(f"megalodon-lm: {n} tokens in {elapsed:.2f} s ({n / max(elapsed, 1e-9):.1f} tokens/s; "
          f"prompt {len(ids)} tokens{first_s})", file=sys.stderr)
    return code
