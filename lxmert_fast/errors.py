"""Every error class of lxmert_fast, in one tree, so that a command reports any of them the same way
(``lxmert_fast.cli.run``: one line naming the file, record or flag at fault; exit status 2) and only a bug of ours
shows a traceback.

    LxmertFastError
    ├── InputError (ValueError): an input that cannot be used: a flag, a file, a record, a model folder
    │   ├── ConfigError          a flag, a config file or a value in one
    │   ├── JSONFileError        a JSON file that is not valid JSON (path:line:column)
    │   ├── TokenizerError       a tokenizer that is missing or did not really load
    │   ├── FeatureFormatError   a feature TSV row that cannot be trusted
    │   ├── AnnotationFormatError  an annotation record that cannot be used
    │   ├── CheckpointError      a checkpoint that cannot be read, written, or does not fit the model
    │   ├── PredictionError      input that prediction cannot use (model folder, question file, img_id)
    │   ├── ImageError           an image that cannot be read or used (its path first)
    │   ├── WeightsError         detector weights that cannot be found, trusted or loaded
    │   └── MissingDependencyError  an optional package a command needs is not installed (says how to get it)
    └── RunError (RuntimeError): a run that cannot go on; the message says why and what is kept
        ├── NonFiniteLossError   the loss became NaN or inf (not an fp16 overflow)
        ├── RankTimeoutError     the other ranks did not answer within the process-group timeout
        ├── StoreError           a feature store that is missing, incomplete or does not match its TSV
        └── DownloadError        a download that failed (the file and the cause)
"""


class LxmertFastError(Exception):
    """The base of every error lxmert_fast raises on purpose."""


class InputError(LxmertFastError, ValueError):
    """An input that cannot be used; the message names the file and the record (or the flag and its value)."""


class ConfigError(InputError):
    """A flag, a config file or a value in one that cannot be used; the message names it."""


class JSONFileError(InputError):
    """A JSON file that cannot be read or parsed; the message names the file, the place and the expected content."""


class TokenizerError(InputError):
    """A tokenizer that is missing or did not really load."""


class FeatureFormatError(InputError):
    """A feature TSV row that cannot be trusted."""


class AnnotationFormatError(InputError):
    """A pre-training or fine-tuning annotation record that cannot be used."""


class PredictionError(InputError):
    """Input prediction cannot use; the message names the model folder, file, record, img_id or flag."""


class ImageError(InputError):
    """An image that cannot be read or used; the message starts with its path."""


class WeightsError(InputError):
    """Detector weights that cannot be found, trusted or loaded; the message names the file."""


class MissingDependencyError(InputError, ImportError):
    """An optional package (matplotlib, Pillow) that a command needs is not installed; the message says how to
    install it."""


class RunError(LxmertFastError, RuntimeError):
    """A run that cannot go on (a non-finite loss, a checkpoint that cannot be written); the message says why and
    what is kept."""


class CheckpointError(InputError, RunError):
    """A checkpoint that cannot be read or written, or does not fit the model; the message names the file or folder
    and the cause (the keys, for weights that do not fit)."""


class NonFiniteLossError(RunError):
    """The loss became NaN or inf without being an fp16 overflow: training cannot go on meaningfully."""


class RankTimeoutError(RunError):
    """A collective waited longer than the process-group timeout: another rank froze, died or fell far behind."""


class StoreError(RunError):
    """A feature store that is missing, incomplete or does not match its TSV."""


class DownloadError(RunError):
    """A file of the release that could not be fetched; the message names it and the cause. ``transient``: worth
    another try (a dropped connection, HTTP 429 or 5xx)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


__all__ = [name for name, value in dict(globals()).items() if isinstance(value, type)]
