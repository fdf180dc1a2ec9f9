"""codex-generate: text from a trained model, streamed as it comes.

  generate --checkpoint=runs/default-20261128-1200 --prompt='def fib(n):'
  generate --checkpoint=models/my-llama --adapter=runs/lora-.../adapter --prompt=... --temperature=0.8 --top_p=0.95
  echo 'import os' | generate --checkpoint=RUN_OR_FOLDER --prompt=- --stop=$'\\n\\n' --max_new_tokens=200

--checkpoint is a run directory (its newest valid checkpoint), a checkpoint directory, or a Hugging Face
model folder (with --adapter, a LoRA adapter folder). Greedy by default (temperature 0). Text matching a
secret pattern is withheld unless --no-filter_secrets. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from codex_ml.cli.common import ArgumentParser, enter_working_directory


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="generate", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory, or HF model folder")
    p.add_argument("--adapter", help="a LoRA adapter folder (for a Hugging Face --checkpoint)")
    p.add_argument("--prompt", required=True, help="the prompt text, or - to read it from standard input")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True, help="use the KV cache")
    p.add_argument("--filter_secrets", action=argparse.BooleanOptionalAction, default=True,
                   help="withhold text that matches a secret pattern (API keys, private keys, tokens)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (Hugging Face models)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    enter_working_directory()
    from codex_ml.checkpoint import CheckpointError
    from codex_ml.models.generation import GenerationError, SamplingConfig, load_model, stream
    from codex_ml.models.hf import HFModelError
    from codex_ml.tokenization import TokenizerError
    from codex_ml.tokenization.tokenizer import check_utf8

    try:
        # Checked before the model loads. Standard input is read as bytes: a text stream would raise
        # UnicodeDecodeError, or pass lone surrogates on, for input that is not UTF-8.
        if args.prompt == "-":
            prompt = check_utf8(sys.stdin.buffer.read(), "the prompt on standard input")
        else:
            prompt = check_utf8(args.prompt, "--prompt")
        config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, stop=tuple(args.stop), seed=args.seed, use_cache=args.cache,
                                filter_secrets=args.filter_secrets)
        model, tokenizer = load_model(args.checkpoint, adapter=args.adapter, device=args.device, dtype=args.dtype)
        info: dict = {}
        pieces = stream(model, tokenizer, prompt, config, result=info)  # raises for a bad prompt, before the echo
        if args.json:
            text = "".join(pieces)
            print(json.dumps({"prompt": prompt, "text": text, **info}))
        else:
            sys.stdout.write(prompt)
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            if info.get("withheld"):
                print(f"[{len(info['withheld'])} secret(s) withheld: {', '.join(sorted(set(info['withheld'])))}]",
                      file=sys.stderr)
    except (GenerationError, CheckpointError, HFModelError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
