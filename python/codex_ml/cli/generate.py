"""codex-generate: text from a trained model, streamed as it comes.

  generate --checkpoint=runs/default-20261128-1200 --prompt='def fib(n):'
  generate --checkpoint=models/my-llama --adapter=runs/lora-.../adapter --prompt=... --temperature=0.8 --top_p=0.95
  echo 'import os' | generate --checkpoint=RUN_OR_FOLDER --prompt=- --stop=$'\\n\\n' --max_new_tokens=200

--checkpoint is a run directory (its newest valid checkpoint), a checkpoint directory, or a Hugging Face
model folder (with --adapter, a LoRA adapter folder). Greedy by default (temperature 0). Text matching a
secret pattern is withheld unless --nofilter_secrets. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from codex_ml.cli.common import enter_working_directory, parse_flags


def define_flags(fv: flags.FlagValues) -> None:
    """generate's flags."""
    flags.DEFINE_string("checkpoint", None, "run directory, checkpoint directory, or HF model folder", flag_values=fv)
    flags.DEFINE_string("adapter", None, "a LoRA adapter folder (for a Hugging Face --checkpoint)", flag_values=fv)
    flags.DEFINE_string("prompt", None, "the prompt text, or - to read it from standard input", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 128, "the most tokens to generate", flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "0 is greedy", flag_values=fv)
    flags.DEFINE_integer("top_k", 0, "sample among the k likeliest tokens (0: off)", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1: off)", flag_values=fv)
    flags.DEFINE_multi_string("stop", [], "stop before this string (repeatable)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "the sampling seed", flag_values=fv)
    flags.DEFINE_bool("cache", True, "use the KV cache", flag_values=fv)
    flags.DEFINE_bool("filter_secrets", True,
                      "withhold text that matches a secret pattern (API keys, private keys, tokens)", flag_values=fv)
    flags.DEFINE_string("device", "cpu", "cpu, cuda, cuda:N or auto", flag_values=fv)
    flags.DEFINE_string("dtype", "float32", "float32, bfloat16 or float16 (Hugging Face models)", flag_values=fv)
    flags.DEFINE_bool("json", False, "print one JSON object at the end instead of streaming", flag_values=fv)


def check_device(device: str, error: type[Exception]) -> None:
    """Raises `error` unless --device is auto, cpu, or a CUDA device this machine has (torch would otherwise fail
    later with its own text, or, for a meta device, produce nothing)."""
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise error(f"--device={device!r} is not a device: use cpu, cuda, cuda:N or auto.") from None
    if dev.type not in ("cpu", "cuda"):
        raise error(f"--device={device!r}: generate runs on cpu, cuda, cuda:N or auto.")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (dev.index or 0) >= count:
        fix = f"use cuda:0 to cuda:{count - 1}, or auto" if count else "use cpu or auto"
        raise error(f"--device={device!r} but this machine has {count} CUDA device(s): {fix}.")


def main(argv: list[str] | None = None) -> int:
    """Runs the command on `argv` (default: sys.argv[1:]); returns the exit status."""
    args, _ = parse_flags("generate", __doc__, define_flags, sys.argv[1:] if argv is None else argv,
                          required=("checkpoint", "prompt"))
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
        check_device(args.device, GenerationError)
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
