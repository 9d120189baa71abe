"""One exception type per kind of user mistake.

Raised deep in the code, caught once at the CLI boundary (`impl.cli`, `golden.cli`) and printed
as one line on stderr with exit code 2. Tests assert on the type and on the message.
"""


class Llama3GoldenError(Exception):
    """Base class: bad input from the user. The message is one line naming the problem."""

    exit_code = 2


class UnknownModelError(Llama3GoldenError):
    """A model name that is neither a preset nor an existing path."""


class AssetError(Llama3GoldenError):
    """A missing, unreadable or corrupt file (including a sha256 mismatch)."""


class NetworkError(Llama3GoldenError):
    """A download was needed and the network (or the Hugging Face Hub) could not be reached."""


class AccessError(Llama3GoldenError):
    """The Hub answered, but refused access (gated repository, no or wrong token)."""


class ConfigError(Llama3GoldenError):
    """A config (params.json / config.json / GGUF metadata) that is incomplete or inconsistent."""


class ShapeError(Llama3GoldenError):
    """A tensor in a checkpoint whose shape contradicts the config; the message names the tensor."""


class PromptError(Llama3GoldenError):
    """An empty prompt, or one longer than the model's context."""
