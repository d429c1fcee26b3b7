"""The chat template: messages as plain text with role markers, for base (not instruction-tuned) models.

Default (documented in docs/serving.md)::

    System: {content}
    User: {content}
    Assistant: {content}
    Assistant: <- the generation prompt; the reply follows it

Each message is `marker + content + "\\n"`. Generation stops at the next role marker at the start of a
line ("\\nUser:", ...), at EOS or at a request's `stop` string. A run or HF directory may carry its own
template as `chat_template.json` with the same fields: {"markers": {"system": ..., "user": ...,
"assistant": ...}, "end": "\\n"}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATE_FILE = "chat_template.json"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """markers: text before each role's content; end: text after each message."""

    markers: dict[str, str] = field(default_factory=lambda: {"system": "System: ", "user": "User: ",
                                                             "assistant": "Assistant: "})
    end: str = "\n"

    def __post_init__(self) -> None:
        missing = [r for r in ROLES if not isinstance(self.markers.get(r), str) or not self.markers[r].strip()]
        if missing or not isinstance(self.end, str) or not self.end:
            raise ValueError(f"chat template needs a non-empty marker for each role {ROLES} and a non-empty end "
                             f"(missing or empty: {missing or ['end']})")

    @property
    def generation_prompt(self) -> str:
        return self.markers["assistant"]

    @property
    def stops(self) -> tuple[str, ...]:
        """Role markers at the start of a line: the model has finished its turn when it writes one."""
        return tuple(self.end + m.rstrip() for m in self.markers.values())

    def render(self, messages: list[tuple[str, str]]) -> str:
        """(role, content) pairs -> text, ending with the generation prompt."""
        return "".join(self.markers[r] + c + self.end for r, c in messages) + self.generation_prompt

    def continuation(self, messages: list[tuple[str, str]], tail: str) -> str:
        """The text to feed after a previous reply in a session, whose stream already holds `tail` (the text
        the model wrote after its reply, e.g. a stop marker "\\nUser:"): that part is not repeated."""
        text = self.end + self.render(messages)
        return text[len(tail):] if tail and text.startswith(tail) else text

    @classmethod
    def from_dir(cls, directory: str | Path) -> ChatTemplate:
        """The directory's chat_template.json, else the default."""
        path = Path(directory) / TEMPLATE_FILE
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(markers=dict(raw["markers"]), end=raw.get("end", "\n"))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a chat template ({exc}); expected "
                             '{"markers": {"system": ..., "user": ..., "assistant": ...}, "end": ...}') from exc
