"""Chat prompts in Ming's own format (spec §6.1): the processor's template, not the Jinja one.

`<role>SYSTEM</role>{system}\\n\\ndetailed thinking off<|role_end|>` then, per message,
`<role>HUMAN|ASSISTANT</role>{content}<|role_end|>`, ending with the generation prefix
`<role>ASSISTANT</role>`. No BOS. User text is tokenised with special-token parsing off, so
text a user types can never forge a role or a media placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.tokenizer import ROLE_END_TAG, ROLE_START, TURN_END, MingTokenizer

DEFAULT_SYSTEM_PROMPT = "你是一个友好的AI助手。"
THINKING_SUFFIX = "\n\ndetailed thinking {}"
ROLE_NAMES = {"user": "HUMAN", "human": "HUMAN", "assistant": "ASSISTANT", "system": "SYSTEM"}


class PromptError(ValueError):
    """Messages that cannot form a Ming prompt."""


@dataclass
class ChatMessage:
    role: str  # "user" | "assistant" | "system"
    content: str | list[dict] = ""

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            kind = part.get("type")
            if kind in ("text", "input_text"):
                parts.append(str(part.get("text", "")))
            else:
                raise PromptError(f"content part of type '{kind}' is not supported by this engine yet "
                                  "(text only; images, video and audio come with the multimodal engine)")
        return "".join(parts)


@dataclass
class Prompt:
    """The prompt as (text, is_template) pieces, its full string, and its token ids."""

    pieces: list[tuple[str, bool]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)


def _role(tag: str) -> str:
    return f"{ROLE_START}{tag}{ROLE_END_TAG}"


def build_chat_prompt(messages: list[ChatMessage | dict], tokenizer: MingTokenizer,
                      system_prompt: str | None = None, thinking: bool = False) -> Prompt:
    msgs = [m if isinstance(m, ChatMessage) else ChatMessage(m.get("role", ""), m.get("content", "")) for m in messages]
    for m in msgs:
        if m.role not in ROLE_NAMES:
            raise PromptError(f"unknown role '{m.role}' (use user, assistant or system)")
    system_texts = [m.text() for m in msgs if m.role == "system"]
    turns = [m for m in msgs if m.role != "system"]
    if not turns:
        raise PromptError("no user message")
    if ROLE_NAMES[turns[-1].role] != "HUMAN":
        raise PromptError("the last message must come from the user")
    system = system_prompt if system_prompt is not None else ("\n".join(system_texts) or DEFAULT_SYSTEM_PROMPT)

    pieces: list[tuple[str, bool]] = [(_role("SYSTEM"), True), (system, False),
                                      (THINKING_SUFFIX.format("on" if thinking else "off") + TURN_END, True)]
    for m in turns:
        pieces += [(_role(ROLE_NAMES[m.role]), True), (m.text(), False), (TURN_END, True)]
    pieces.append((_role("ASSISTANT"), True))
    ids: list[int] = []
    for text, is_template in pieces:
        if text:
            ids += tokenizer.encode(text) if is_template else tokenizer.encode_plain(text)
    return Prompt(pieces=pieces, ids=ids)
