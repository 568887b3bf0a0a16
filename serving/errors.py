"""Exceptions raised by llm-cluster; each carries a message meant for the person running it."""


class LLMClusterError(Exception):
    """Base class of every error llm-cluster raises on purpose."""


class ModelSourceError(LLMClusterError):
    """A model source cannot be found, fetched or converted."""


class UnsupportedModelError(LLMClusterError):
    """The model exists but uses an architecture or feature the engine does not implement."""


class InvalidRequestError(LLMClusterError):
    """A request's prompt or sampling parameters are invalid; `param` names the culprit."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested output exceed the model's context length."""


class EngineDeadError(LLMClusterError):
    """The engine loop stopped after an internal fault; requests in flight are failed with it."""


class ChatTemplateError(LLMClusterError):
    """The model has no chat template, or rendering it failed."""


class DeploymentError(LLMClusterError):
    """The Serve application could not be deployed; the message carries a replica's own error."""
