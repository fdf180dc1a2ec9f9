"""codex-export: a native checkpoint as a Hugging Face Llama folder (codex_ml.models.export.export_hf).

  export --checkpoint=runs/default-20261128-1200 --out=models/my-llama [--dtype=float32|bfloat16|float16]

--checkpoint is a checkpoint directory or a run directory (its newest valid checkpoint); --out must be absent or
an empty directory. `transformers.AutoModelForCausalLM.from_pretrained(OUT)` then loads it, offline. Exit codes:
0 done, 2 bad input.
"""

from __future__ import annotations

import sys

from absl import flags

from codex_ml.cli.common import enter_working_directory, parse_flags


def define_flags(fv: flags.FlagValues) -> None:
    """export's flags."""
    flags.DEFINE_string("checkpoint", None, "a checkpoint directory or a run directory", flag_values=fv)
    flags.DEFINE_string("out", None, "the folder to create (absent or empty)", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float16", "float32"], "dtype of the stored weights",
                      flag_values=fv)


def main(argv: list[str] | None = None) -> int:
    """Runs the command on `argv` (default: sys.argv[1:]); returns the exit status."""
    args, _ = parse_flags("export", __doc__, define_flags, sys.argv[1:] if argv is None else argv,
                          required=("checkpoint", "out"))
    enter_working_directory()
    from codex_ml.checkpoint import CheckpointError
    from codex_ml.models.export import ExportError, export_hf
    from codex_ml.tokenization import TokenizerError

    try:
        out = export_hf(args.checkpoint, args.out, dtype=args.dtype)
    except (ExportError, CheckpointError, TokenizerError, OSError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
