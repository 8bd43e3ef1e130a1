"""evaluation/ runs on the GPU machine, which has no Prefect or MLflow; its CLI module stays light."""

import subprocess
import sys


def test_evaluation_imports_no_prefect_mlflow_and_cli_no_torch():
    code = (
        "import sys, importlib, pkgutil, evaluation\n"
        "import evaluation.cli\n"
        "light = [m for m in ('torch', 'transformers', 'matplotlib', 'scipy') if m in sys.modules]\n"
        "for m in pkgutil.iter_modules(evaluation.__path__):\n"
        "    importlib.import_module('evaluation.' + m.name)\n"
        "flows = [m for m in ('prefect', 'mlflow') if m in sys.modules]\n"
        "print(','.join(light) + '|' + ','.join(flows))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "|"
