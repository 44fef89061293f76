"""The command line: ``sampler-core sample | tokenize | models | serve``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from sampler_core.errors import SamplerError
from sampler_core.inputs import to_parts
from sampler_core.settings import SampleSettings
from sampler_core.tokens import RunSummary, Token, TokenType


def _visible(text: str) -> str:
    """Whitespace made visible for the per-token table."""
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·")


def _table_row(token: Token) -> str:
    alts = "  ".join(f"{_visible(t.token_str)!s}:{t.raw_prob:.3f}" for t in token.top_k[:5])
    raw = f"{token.raw_prob:.4f}" if token.raw_prob is not None else "-"
    kind = "user" if token.token_type == TokenType.USER else "model"
    return (f"{token.position if token.position is not None else '':>5}  {kind:<5}  "
            f"{_visible(token.token_str)[:18]:<18}  {token.token_id:>6}  {token.prob:>7.4f}  "
            f"{raw:>7}  {token.rank if token.rank is not None else '-':>5}  {alts}")


def cmd_sample(args: argparse.Namespace) -> int:
    from sampler_core.engine import get_engine

    engine = get_engine(args.model, device=args.device)
    prompt = engine.chat_prompt(args.prompt) if args.chat else args.prompt
    settings = SampleSettings(
        max_len=args.max_len, temperature=args.temperature, nucleus_p=args.nucleus_p,
        rng_seed=args.seed, top_k=args.top_k, stop_tokens=tuple(args.stop_token),
        stop_strings=tuple(args.stop), score_prompt=args.score_prompt,
        allowed_tokens=tuple(args.allow), disallowed_tokens=tuple(args.ban),
        prefill=args.prefill)
    tokens: list[Token] = []
    summary: RunSummary | None = None
    if not args.json:
        print(prompt, end="", flush=True)
    for event in engine.start(to_parts(prompt), settings):
        if isinstance(event, RunSummary):
            summary = event
            continue
        tokens.append(event)
        if not args.json and event.token_type == TokenType.MODEL:
            print(event.token_str, end="", flush=True)
    if args.json:
        print(json.dumps({"tokens": [t.to_dict() for t in tokens],
                          "finish_reason": summary.finish_reason.value if summary else None,
                          "notes": list(summary.notes) if summary else []}))
        return 0
    print("\n")
    print(f"{'pos':>5}  {'type':<5}  {'token':<18}  {'id':>6}  {'prob':>7}  {'raw':>7}  "
          f"{'rank':>5}  top alternatives (raw prob)")
    for token in tokens:
        print(_table_row(token))
    if summary is not None:
        print(f"\nfinished: {summary.finish_reason.value}"
              + (f" ({summary.stop_match!r})" if summary.stop_match else "")
              + f"; {summary.num_generated_tokens} tokens")
        for note in summary.notes:
            print(f"note: {note}")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from sampler_core.engine import get_engine

    tokens = get_engine(args.model, device=args.device).tokenize(args.text)
    for token in tokens:
        print(f"{token.position:>5}  {token.token_id:>6}  {_visible(token.token_str)}")
    print(f"{len(tokens)} tokens")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from sampler_core.engine.models import _registry

    for name in sorted(_registry):
        print(f"{name:<28} {_registry[name].description}")
    print("(also: any local .gguf file or Hugging Face model folder, by path)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sampler_core.wire.server import serve_from_args

    if args.device is not None:  # the server loads models through get_engine, which reads it
        from sampler_core.engine.devices import DEVICE_ENV, choose_device

        choose_device(args.device)  # a bad value fails here, naming it
        os.environ[DEVICE_ENV] = args.device
    if not set_prompt_cache_env(args.prompt_cache_mb):
        print(f"error: --prompt-cache-mb must be a whole number of MB >= 0 (0 turns prompt "
              f"reuse off), got {args.prompt_cache_mb}", file=sys.stderr)
        return 2
    return serve_from_args(args)


def set_prompt_cache_env(megabytes: int | None) -> bool:
    """Hand ``--prompt-cache-mb`` to the engines the server loads (they read
    ``$PROMPT_IDE_PROMPT_CACHE_MB``); False for a negative value. None leaves it as it is."""
    from sampler_core.engine.prompt_cache import BUDGET_ENV

    if megabytes is None:
        return True
    if megabytes < 0:
        return False
    os.environ[BUDGET_ENV] = str(megabytes)
    return True


def _add_device_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--device", default=None,
                         help="auto (a GPU when there is one), cpu, cuda or cuda:N; "
                              "default $PROMPT_IDE_DEVICE, else auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sampler-core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sample = sub.add_parser("sample", help="sample a completion and print a per-token table")
    sample.add_argument("prompt")
    sample.add_argument("--model", default="", help="model name, alias or local path")
    sample.add_argument("--max-len", type=int, default=32)
    sample.add_argument("--temperature", type=float, default=0.7)
    sample.add_argument("--nucleus-p", type=float, default=0.95)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--top-k", type=int, default=5)
    sample.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sample.add_argument("--stop-token", action="append", default=[],
                        help="stop token (repeatable)")
    sample.add_argument("--allow", action="append", default=[], help="allowed token")
    sample.add_argument("--ban", action="append", default=[], help="disallowed token")
    sample.add_argument("--score-prompt", action="store_true")
    sample.add_argument("--prefill", default="",
                        help="how a prompt over 32 tokens computes: float32 (exact "
                             "arithmetic), fixed16 (faster, ~1e-3 off) or fast (faster "
                             "still, ~0.1 off); default: $PROMPT_IDE_PREFILL, else float32")
    sample.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    sample.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_device_option(sample)
    sample.set_defaults(func=cmd_sample)

    tokenize = sub.add_parser("tokenize", help="print a text's tokens")
    tokenize.add_argument("text")
    tokenize.add_argument("--model", default="")
    _add_device_option(tokenize)
    tokenize.set_defaults(func=cmd_tokenize)

    models = sub.add_parser("models", help="list the known models")
    models.set_defaults(func=cmd_models)

    serve = sub.add_parser("serve", help="serve the Sampler gRPC API")
    try:
        from sampler_core.wire.server import add_serve_arguments
    except ImportError:  # the wire layer is optional until grpc is installed
        add_serve_arguments = None
    if add_serve_arguments is not None:
        add_serve_arguments(serve)
    _add_device_option(serve)
    serve.add_argument("--prompt-cache-mb", type=int, default=None,
                       help="memory for prompts' prefills kept for reuse (0: off); default "
                            "$PROMPT_IDE_PROMPT_CACHE_MB, else 256")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sampler-core`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SamplerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
