"""The `bitllava` command line. Each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_model_info(args) -> int:
    from model.presets import describe

    info = describe(args.preset)
    if args.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return 0


def _cmd_generate(args) -> int:
    from PIL import Image

    from model.chat import generate_reply
    from model.checkpoint import load_model

    images = []
    for path in args.image:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
    loaded = load_model(args.model)
    reply = generate_reply(
        loaded,
        args.prompt,
        images,
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps({"text": reply.text, "token_ids": reply.token_ids}))
    else:
        print(reply.text)
    return 0


def _cmd_demo(args) -> int:
    from pipelines.demo import run_demo

    summary = run_demo(out_dir=args.out, steps=args.steps, seed=args.seed)
    print(json.dumps(summary))
    return 0 if summary["learned"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitllava", description="Train and serve ternary multimodal LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect model presets").add_subparsers(dest="model_command", required=True)
    info = model.add_parser("info", help="parameter counts and shapes of a preset")
    info.add_argument("--preset", required=True, help="preset name: 1b or tiny")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_cmd_model_info)

    gen = sub.add_parser("generate", help="one-shot generation from a model folder or hub id")
    gen.add_argument("--model", required=True, help="model folder (bitllava or OLMo-Bitnet layout) or hub id")
    gen.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    gen.add_argument("--prompt", required=True, help="user text; <image> marks where images go")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]}')
    gen.set_defaults(func=_cmd_generate)

    demo = sub.add_parser("demo", help="the laptop demo on the tiny preset")
    demo.add_argument("--out", default="demo_out", help="output folder")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"bitllava: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
