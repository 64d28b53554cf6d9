"""Errors a person can act on. Their message is shown as-is (CLI line, ephemeral Discord reply)."""


class EmakiError(Exception):
    """Base class: the message names the problem and what to change."""


class InvalidRequest(EmakiError):
    """A request option is out of range or refers to something that does not exist."""


class ModelLoadError(EmakiError):
    """A model id or local folder could not be loaded."""


class ResourceError(EmakiError):
    """The machine lacks something the job needs (disk space, a device)."""


class JobCancelled(EmakiError):
    """The job was cancelled by its owner; raised from inside the step loop."""
