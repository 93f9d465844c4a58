"""Chat formatting with the model's own template, and the post-instruction token positions.

Post-instruction tokens (Arditi et al. 2024) are the chat-template tokens that follow the user's text, e.g. for
Qwen ``<|im_end|>\\n<|im_start|>assistant\\n`` (5 tokens). They are found here from the tokens themselves: the
template is rendered around the instruction and every token whose first character lies after the instruction
text (by the tokenizer's offset mapping) is post-instruction. Nothing is hard-coded per model.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ToolkitError

_PROBES = ("Tell me a short story about a cat.", "What is 2 + 2? Answer briefly!")


@dataclass
class ChatFormat:
    """Formats instructions with a tokenizer's chat template.

    Attributes:
        tokenizer: a ``transformers`` tokenizer with a chat template (fast tokenizer for offsets).
        system: optional system prompt; ``None`` keeps the template's default behaviour.
        n_post: number of post-instruction tokens (constant for the template, verified on two probes).
        post_ids: their token ids (identical for every instruction).
    """

    tokenizer: object
    system: str | None = None
    n_post: int = 0
    post_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not getattr(self.tokenizer, "chat_template", None):
            raise ToolkitError("the tokenizer has no chat template; this toolkit studies chat models")
        found = [self._post_tokens(p) for p in _PROBES]
        if found[0] != found[1] or not found[0]:
            raise ToolkitError(
                "could not find constant post-instruction tokens in this chat template "
                f"(probes gave {found[0]} and {found[1]})"
            )
        self.post_ids = tuple(found[0])
        self.n_post = len(self.post_ids)

    def messages(self, instruction: str) -> list[dict]:
        """The chat messages for one instruction (with the system prompt if set)."""
        msgs = []
        if self.system is not None:
            msgs.append({"role": "system", "content": self.system})
        msgs.append({"role": "user", "content": instruction})
        return msgs

    def render(self, instruction: str) -> str:
        """The prompt text: template around the instruction, ending with the assistant turn opener.

        Raises:
            ToolkitError: the template rejects the messages (e.g. no system role).
        """
        try:
            return self.tokenizer.apply_chat_template(
                self.messages(instruction), tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # jinja raises TemplateError for unsupported roles
            raise ToolkitError(f"chat template failed: {str(e).splitlines()[0]}") from None

    def _post_tokens(self, instruction: str) -> list[int]:
        text = self.render(instruction)
        start = text.rfind(instruction)
        if start < 0:
            raise ToolkitError("the chat template does not contain the instruction text verbatim")
        end = start + len(instruction)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        post = []
        for tid, (a, b) in zip(ids, offs):
            if a >= end or (a == b == 0 and post):  # zero-width special tokens after the instruction
                post.append(tid)
            elif post:
                raise ToolkitError("post-instruction tokens are not contiguous at the end of the prompt")
        return post

    def encode(self, instructions: list[str]) -> list[list[int]]:
        """Token ids of each formatted prompt (no padding). Shape: list of ``[pos]``."""
        texts = [self.render(i) for i in instructions]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def post_positions(self) -> list[int]:
        """Post-instruction positions as negative indices from the end of the prompt, e.g. ``[-5, ..., -1]``."""
        return list(range(-self.n_post, 0))
