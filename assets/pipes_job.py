"""The far side of Dagster Pipes: `python -m assets.pipes_job <module> <flags...>`.

Runs one stage's job (in a subprocess or a pod) and reports back through
Pipes: its log lines, and a custom message with the output directory and
row count. It imports nothing of Dagster but `dagster_pipes`, so a slim job
image can run it.
"""

import importlib
import logging
import sys

from dagster_pipes import open_dagster_pipes


class _PipesLogHandler(logging.Handler):
    """Forwards the job's Python log records to the Dagster run's event log."""

    def __init__(self, pipes):
        super().__init__(level=logging.INFO)
        self.pipes = pipes

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.WARNING:
            self.pipes.log.warning(message)
        else:
            self.pipes.log.info(message)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m assets.pipes_job <stage module> [stage flags...]")
    module_name, flags = argv[0], argv[1:]
    with open_dagster_pipes() as pipes:
        handler = _PipesLogHandler(pipes)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.getLogger("curation").addHandler(handler)
        logging.getLogger("pipelines").addHandler(handler)
        pipes.log.info(f"{module_name} starting: {' '.join(flags)}")
        result = importlib.import_module(module_name).run(flags)
        output = str(getattr(result, "output", ""))
        rows = getattr(result, "rows", None)
        pipes.log.info(f"{module_name} finished: {rows} rows -> {output}")
        pipes.report_custom_message({"output": output, "rows": rows})


if __name__ == "__main__":
    main(sys.argv[1:])
