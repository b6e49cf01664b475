"""InputError: the base of the errors that refuse a bad input (a data file, a tokenizer, a model config), so that
the commands can report any of them as one line, like a bad flag."""


class InputError(ValueError):
    """An input that cannot be used; the message names the file and the record (or the flag and its value)."""


class ConfigError(InputError):
    """A flag, a config file or a value in one that cannot be used; the message names it."""


__all__ = ["ConfigError", "InputError"]
