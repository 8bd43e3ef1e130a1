"""The data layer: model references and the one tokenizer loader (sources), dataset readers and
formats and the one chat renderer (dataset), the token cache, the built-in datasets, the user-error
type and the output-path checks. The lowest layer: it imports no other LowRegret package
(the import-linter contract in pyproject.toml), and nothing heavy at import.
"""
