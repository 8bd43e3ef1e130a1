"""`lowregret promote | rollback | models | deploy` (flows/commands.py registers them)."""

from __future__ import annotations

import re
from pathlib import Path

from data.errors import UserError
from flows.commands import _prefect_server, _settings


def _registry(settings, name: str):
    """A client on the existing registry, after checking `name` is registered there (UserError), and
    the lock on `name`'s read-modify-write."""
    from flows.config import check_model_name
    from flows.locks import registry_lock
    from flows.registry import open_registry, registered_model

    check_model_name(name, "NAME")
    client = open_registry(settings)
    registered_model(client, name)
    return client, registry_lock(settings, name)


def run_promote(args) -> int:
    from flows import registry

    client, lock = _registry(_settings(args), args.name)
    with lock:
        decision = registry.promote(client, args.name, args.version, args.reason)
    print(f"{args.name} v{decision.version}: {'champion' if decision.promoted else 'unchanged'} ({decision.reason})")
    return 0


def run_rollback(args) -> int:
    from flows import registry

    client, lock = _registry(_settings(args), args.name)
    with lock:
        decision = registry.rollback(client, args.name, args.reason)
    print(f"{args.name}: champion is v{decision.version} again ({decision.reason})")
    return 0


def run_models(args) -> int:
    from flows.settings import load_settings

    settings = load_settings(args.workdir)
    uri = settings.registry_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        if args.name:
            from data.errors import UserError

            raise UserError(f"No registered model named {args.name!r}: there is no registry at {uri} yet "
                            "(run from the folder that holds .lowregret/, or pass --workdir).")
        print(f"No registered models: there is no registry at {uri} yet. A pipeline (lowregret demo, "
              "lowregret pipeline) registers each adapter that passes the regret gate.")
        return 0
    from flows import registry

    rows = registry.list_versions(registry.client_for(settings), args.name)
    if not rows:
        print(f"No registered models in {uri}.")
        return 0
    print(format_versions(rows))
    return 0


def format_versions(rows) -> str:
    """The `lowregret models` table: one line per registered version."""
    import datetime

    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    def regret(row):
        if row.regret is None:
            return "-"
        interval = "" if row.regret_ci is None else f" [{row.regret_ci[0]:+.4f}, {row.regret_ci[1]:+.4f}]"
        return f"{row.regret:+.4f}{interval}"

    table = [("model", "version", "aliases", "eval loss", "regret (nats/tok) [interval]", "verdict", "created")]
    for row in rows:
        aliases = " ".join([",".join(row.aliases)] * bool(row.aliases) + ["(rolled back)"] * row.rolled_back)
        created = datetime.datetime.fromtimestamp(row.created_ms / 1000).strftime("%Y-%m-%d %H:%M")
        table.append((row.name, row.version, aliases or "-", number(row.eval_loss, ".4f"), regret(row),
                      row.verdict or "-", created))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table)


def run_deploy(args) -> int:
    from flows.config import load_pipeline_config
    from flows.settings import apply_environment, load_settings, prepare_folders

    # A work pool's --workdir is a folder of the workers (e.g. /data/lowregret): nothing is checked
    # or created here. Served runs happen in this process, in a folder that must exist.
    settings = load_settings(args.workdir) if args.work_pool else _settings(args)
    config = load_pipeline_config(args.config, args.overrides)
    apply_environment(settings, create_folders=False)  # Prefect reads these when it is imported
    _check_cron(args.cron)
    if not args.work_pool:
        prepare_folders(settings)
    from flows import deploy

    workdir = str(settings.home.parent)
    if args.work_pool:
        with _prefect_server(settings):
            deployment_id = deploy.deploy_to_work_pool(config, args.cron, args.name, args.work_pool, workdir)
        print(f"Deployment lowregret-pipeline/{args.name} ({deployment_id}) on work pool {args.work_pool!r}, "
              f"cron {args.cron!r}. Start a worker: prefect worker start --pool {args.work_pool}")
        return 0
    print(f"Serving lowregret-pipeline/{args.name} on cron {args.cron!r} from this process (Ctrl-C stops).")
    with _prefect_server(settings):
        deploy.serve_pipeline(config, args.cron, args.name, workdir)
    return 0


_CRON_ITEM = re.compile(r"^(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?$")
_CRON_MACRO = re.compile(r"^@(yearly|annually|monthly|weekly|daily|midnight|hourly)$")


def _check_cron(cron: str) -> None:
    """Five cron fields (checked here without importing Prefect, which creates its home folder), then
    Prefect's own validation of the values."""
    fields = cron.split()
    shaped = _CRON_MACRO.match(cron.strip()) or (
        len(fields) == 5 and all(_CRON_ITEM.match(item) for field in fields for item in field.split(",")))
    try:
        if not shaped:
            raise ValueError(cron)
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=cron)
    except ValueError:
        raise UserError(f'--cron {cron!r} is not a cron expression: five fields, e.g. "0 2 * * *" (02:00 daily).') from None
