"""Prefect flows, the CLI and their glue.

What a run logs under ``tasks.*`` reaches the Prefect UI beside Prefect's own records: the
contract's verdict, the memory check, the schedule, training progress, the gate's decision. A
record logged outside any flow run (a CLI command's) stays in the terminal, without a warning.
"""

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,flows")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
