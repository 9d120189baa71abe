"""One exception type per kind of user mistake.

Raised deep in the code, caught once at the CLI boundary (`impl.cli`, `golden.cli`) and printed
as one line on stderr with exit code 2. Tests assert on the type and on the message. `check_prompt`
is the one home of the prompt-length rule, beside the error it raises.
"""

from __future__ import annotations

from collections.abc import Sized


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


def check_prompt(prompt: Sized, context: int | None = None, *, start_pos: int = 0, new_tokens: int = 0,
                 model: str = "the model") -> None:
    """The one prompt check (empty, or too long for the context), for forward, generate, the CLI and the recorder.

    prompt: token ids (a list, a 1-d tensor); or its text before tokenising, where only emptiness can be told
    (context None). Positions [0, start_pos + len(prompt) + new_tokens) must fit `context`: start_pos tokens
    already in a KV cache, and new_tokens that the caller still needs room for (generation: one).
    """
    if len(prompt) == 0:
        raise PromptError("empty prompt: nothing to run")
    if context is not None and start_pos + len(prompt) + new_tokens > context:
        cached = f" after {start_pos} cached" if start_pos else ""
        raise PromptError(f"the prompt is {len(prompt)} tokens{cached}; the context of {model} is {context}")
