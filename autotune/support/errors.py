"""Exceptions autotune raises for people: each says what was wrong, what was expected, what to do."""


class AutotuneError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ImportFailed(AutotuneError):
    pass


class TuningFailed(AutotuneError):
    pass


class BuildFailed(AutotuneError):
    pass


class ArtifactError(AutotuneError):
    pass


class InputError(AutotuneError, ValueError):
    pass


class TargetError(AutotuneError, ValueError):
    pass
