"""Prefect flows, MLflow tracking/registry and the `lowregret` CLI.

Importing this package is cheap: prefect and mlflow are imported by the modules that use them.
"""
