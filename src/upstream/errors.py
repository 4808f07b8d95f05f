"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class UpstreamError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM arrived: the stage stops as it does on Ctrl-C (``signum`` says which)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
