"""`imm-kernels convert`: a released IMM checkpoint (.pkl) as a model folder (safetensors + JSON), nothing executed."""

from __future__ import annotations

from .common import SETUP_ERRORS, add_official_options, fail


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "convert",
        help="an official IMM checkpoint (.pkl/.pt) as a model folder (safetensors + model.json)",
        description="Reads an official IMM checkpoint without executing code from it, rebuilds the network with "
        "this library's classes (strict weight load) and writes model.safetensors and model.json to OUT_DIR.",
    )
    parser.add_argument("checkpoint", metavar="OFFICIAL", help="the official .pkl (or torch.save .pt) file")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the model folder to write")
    add_official_options(parser)
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.set_defaults(run=run)


def run(args) -> None:
    from ..model_files import convert_official

    try:
        out = convert_official(
            args.checkpoint, args.out_dir, key=args.key, overrides=dict(args.overrides), overwrite=args.force
        )
    except SETUP_ERRORS as err:
        fail("convert", err)
    print(f"converted {args.checkpoint} ({args.key}) -> {out}")
