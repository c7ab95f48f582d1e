"""The one exception type for bad user input: it names the bad value and what would be valid."""


class HspaceError(ValueError):
    """Bad input to hspace: the message names the value and what is valid."""


def check_choice(name: str, value, valid) -> None:
    """Raise HspaceError unless ``value`` is one of ``valid``."""
    valid = list(valid)
    if value not in valid:
        raise HspaceError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, valid))}")
