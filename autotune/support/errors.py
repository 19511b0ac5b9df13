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


class HardwareError(AutotuneError, RuntimeError):
    """This machine cannot do what was asked of it (e.g. Linux refused AMX tile state)."""
