"""`lowregret train` and `lowregret rl-train` (flows/commands.py registers them)."""

from __future__ import annotations

from flows.commands import STANDALONE_EXPERIMENT


def run_train(args) -> int:
    import json

    from data.dataset import check_local_file
    from data.paths import check_output_dir
    from trainer.config import load_config

    config = load_config(args.config, args.overrides)  # UserError here, before any work
    # Before torch is imported: a bad output path or data file fails at once.
    check_output_dir(config.output_dir, "output_dir")
    for source in filter(None, (config.dataset, config.eval_dataset)):
        check_local_file(source, config.columns)
    callbacks = []
    if config.report_to == "mlflow":
        from flows.settings import load_settings
        from flows.training_log import MlflowCallback

        callbacks.append(MlflowCallback(load_settings(), STANDALONE_EXPERIMENT))
        callbacks[0].check()
    from trainer.launch import run

    try:
        result = run(config, progress=not args.no_progress, callbacks=callbacks)
    except BaseException:
        for callback in callbacks:
            callback.fail()
        raise
    if result is None:  # a node other than 0 whose output_dir is not node 0's
        print(f"node {config.launch.node_rank} of {config.launch.nodes} done; node 0 holds the run's files.")
        return 0
    if callbacks:
        print(f"MLflow: run {callbacks[0].run_id} in experiment {STANDALONE_EXPERIMENT} "
              f"({callbacks[0].settings.tracking_uri})")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    return 0


def run_rl_train(args) -> int:
    import json

    from trainer.launch import run
    from trainer.rl_config import load_rl_config

    result = run(load_rl_config(args.config, args.overrides), progress=not args.no_progress)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    return 0
