"""Errors that the command line reports as one line instead of a traceback."""


class UserInputError(ValueError):
    """Bad user input; the CLI prints the message on one line and exits non-zero.

    Raised for an unknown dataset or model name, a missing data dir, a class id out
    of range, a weights file that does not fit its architecture, an unknown config
    argument, or an impossible budget.
    """


class Interrupted(Exception):  # noqa: N818 - the run was, the name says so
    """A termination signal (SIGTERM) arrived; the CLI reports where the run got to.

    Sweeps set `progress` ("N of M chunks") on it and on KeyboardInterrupt.
    """

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum
