"""The one exception codecs raise; its `reason` names the counter that goes up."""


class MalformedError(ValueError):
    """A header that cannot be what it claims to be. `reason` is a counter suffix."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
