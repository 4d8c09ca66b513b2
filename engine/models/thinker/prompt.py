"""Ming's chat format (spec §6.1), the processor's own template, not the Jinja one:

`<role>SYSTEM</role>{system}\\n\\ndetailed thinking off<|role_end|>` then, per message,
`<role>HUMAN|ASSISTANT</role>{content}<|role_end|>`, ending with the generation prefix
`<role>ASSISTANT</role>`. No BOS. engine.models.thinker.processor builds prompts from these pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import MingError

DEFAULT_SYSTEM_PROMPT = "你是一个友好的AI助手。"
THINKING_SUFFIX = "\n\ndetailed thinking {}"
ROLE_NAMES = {"user": "HUMAN", "human": "HUMAN", "assistant": "ASSISTANT", "system": "SYSTEM"}


class PromptError(MingError, ValueError):
    """Messages that cannot form a Ming prompt."""

    code = "invalid_request"


@dataclass
class ChatMessage:
    """A typed message; `content` is a string or a list of parts such as
    {"type": "text", "text": ...}, {"type": "image", "image": path | bytes | PIL | array},
    {"type": "video", "video": path | frame list | WebcamClip}, {"type": "audio", "audio": ..., "sample_rate": ...}."""

    role: str
    content: str | list[dict] = ""

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}
