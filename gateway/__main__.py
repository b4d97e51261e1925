"""The `streamgate` command: serve, validate, explain, schema, fake-llm."""

from __future__ import annotations

import argparse
import sys

DEFAULT_CONFIG = "config/gateway.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamgate", description="An async streaming reverse proxy for LLM traffic."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})"
    )
    serve.add_argument(
        "--workers",
        type=_processes,
        metavar="N|auto",
        help="serving processes sharing the port, one per core (overrides server.workers; "
        "auto: one per available CPU)",
    )
    # How a supervisor starts each of its serving processes (processes/child.py); not for
    # operators, so not in --help.
    for flag, kind in (("--process-of", str), ("--process-index", int), ("--admin-port", int)):
        serve.add_argument(flag, type=kind, help=argparse.SUPPRESS)

    validate = commands.add_parser(
        "validate", help="check a config file; exit 1 listing every error"
    )
    validate.add_argument("path")

    explain = commands.add_parser(
        "explain", help="dry run: which route a request takes, its limits, upstreams, timeouts"
    )
    explain.add_argument("path", help="config file")
    explain.add_argument("--method", default=None, help="required unless --grpc (always POST)")
    explain.add_argument(
        "--grpc", action="store_true", help="a gRPC call (server.grpc_listen); --path: its method"
    )
    explain.add_argument("--path", dest="request_path", required=True, metavar="PATH")
    explain.add_argument("--header", action="append", default=[], metavar="K:V")
    explain.add_argument("--body", default=None, metavar="JSON")

    commands.add_parser(
        "schema", help="print the config file's JSON Schema (for editors: yaml-language-server)"
    )

    commands.add_parser(
        "fake-llm", help="the bundled reference worker (see `fake-llm --help`)", add_help=False
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fake-llm"]:
        from gateway.fake_llm import main as fake_llm_main

        return fake_llm_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "serve" and args.process_of is not None:
        from gateway.processes.child import serve_process

        return serve_process(args.process_of, args.process_index, args.admin_port)
    if args.command == "serve":
        from gateway.processes.serve import serve

        return serve(args.config, args.workers)
    if args.command == "validate":
        return validate(args.path)
    if args.command == "explain":
        from gateway.explain import explain

        if args.method is None and not args.grpc:
            print("explain: --method is required (or --grpc)", file=sys.stderr)
            return 2
        method = "POST" if args.grpc else args.method
        return explain(args.path, method, args.request_path, args.header, args.body, args.grpc)
    if args.command == "schema":
        return schema()
    return 2


def _processes(text: str) -> int:
    from gateway.config.scalars import parse_processes

    try:
        count = parse_processes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {count}")
    return count


def schema() -> int:
    import json

    from gateway.config.schema import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def validate(path: str) -> int:
    """Exit 0, or 1 with one `FILE:LINE:COL: ...` line per error, whatever the file holds."""
    from gateway.config.loader import load_config
    from gateway.errors import ConfigErrors, printable

    try:
        load_config(path)
    except ConfigErrors as errors:
        for error in errors.errors:
            print(error)
        return 1
    except OSError as exc:
        print(printable(f"{path}:1:1: cannot read config: {exc.strerror}"))
        return 1
    except Exception as exc:  # a bug of ours: still one line and exit 1, never a traceback
        print(printable(f"{path}:1:1: internal error while checking the config: {exc!r}"))
        return 1
    print(printable(f"{path}: ok"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
