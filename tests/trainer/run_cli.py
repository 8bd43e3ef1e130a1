"""`python -m tests.trainer.run_cli train ...` = `lowregret train ...` with the test data stub if needed."""

import sys

from tests.trainer._dataset_stub import install_if_missing

install_if_missing()

from flows.cli import main  # noqa: E402

sys.exit(main())
