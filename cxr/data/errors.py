"""The one error type for input that cannot become an image."""


class BadImageError(ValueError):
    """An input file that cannot be turned into an image: names the file and the reason.

    Jobs turn it into an ``error`` row and go on; it is never a reason to stop a job.
    """

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


def describe(error: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``: an unexpected error as one input's error row says it."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:limit] if lines else 'no message'}"
