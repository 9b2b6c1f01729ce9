"""The one error type that the entry point turns into a single clear line and a non-zero exit."""


class ConfigError(ValueError):
    """Bad user input: names the offending key and what to do about it."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")
