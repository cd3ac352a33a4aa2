"""Chat templates: which one a run uses (the tokenizer's own, or one shipped in
``templates/``), and the ``Renderer`` that turns a conversation into text with it.

The renderer gives a conversation's text and the character span of every assistant turn (the
prefix up to the turn with the generation prompt, and up to its end; the last turn ends where
the text ends), so it works with any prefix-stable template, with no special markers in it;
``preprocess`` turns the spans into the loss mask. It also gives a prompt alone (grpo,
predict) and a prompt with one answer (the preference stages).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.errors import KubetuneError

NAMED_TEMPLATES = ("chatml", "llama3", "alpaca")
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


def no_template() -> KubetuneError:
    return KubetuneError("the model's tokenizer has no chat template; name one: "
                         + ", ".join(NAMED_TEMPLATES), field="spec.template")


def resolve_template(tokenizer: Any, name: str) -> str:
    """The Jinja chat template to use: the tokenizer's own ("auto") or a named one."""
    if name == "auto":
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise no_template()
        return template if isinstance(template, str) else template.get("default")
    if name not in NAMED_TEMPLATES:
        raise KubetuneError(f"unknown template {name!r}; use auto or one of "
                            + ", ".join(NAMED_TEMPLATES), field="spec.template")
    return (TEMPLATES / f"{name}.jinja").read_text()


CHECKED_RENDERS = 32  # compiled renders compared with apply_chat_template's


def _compiled(template: str) -> Any:
    """transformers' own compiled Jinja template (its sandbox, filters and globals), or None
    when this transformers has no such function."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(template)
    except Exception:  # noqa: BLE001 - another transformers: apply_chat_template it is
        return None


@dataclass
class Renderer:
    tokenizer: Any
    template: str

    def __post_init__(self) -> None:
        self.takes_tools = "tools" in self.template
        self._compiled = _compiled(self.template)
        self._checks = CHECKED_RENDERS
        if self._compiled is not None:
            # What Template.render puts in every context, flattened once (it copies a
            # ChainMap per call), and the special tokens apply_chat_template passes.
            self._context = {**self._compiled.globals,
                             **(getattr(self.tokenizer, "special_tokens_map", None) or {})}

    def _render(self, messages: list[dict[str, str]], tools: list | None, gen: bool) -> str:
        """The template transformers compiled, rendered without apply_chat_template's
        per-call conversions (a third of the time); the first renders are checked against
        apply_chat_template, and anything unusual (an error) goes through it."""
        compiled = self._compiled
        if compiled is None:
            return self._apply(messages, tools, gen)
        try:
            ctx = compiled.new_context({**self._context, "messages": messages, "tools": tools,
                                        "documents": None, "add_generation_prompt": gen},
                                       shared=True)
            text = compiled.environment.concat(compiled.root_render_func(ctx))
        except Exception:  # noqa: BLE001 - apply_chat_template says it properly
            return self._apply(messages, tools, gen)
        if self._checks <= 0:
            return text
        self._checks -= 1
        if text == self._apply(messages, tools, gen):
            return text
        self._compiled = None
        return self._apply(messages, tools, gen)

    def _apply(self, messages: list[dict[str, str]], tools: list | None, gen: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=self.template, tokenize=False,
            add_generation_prompt=gen)

    def _with_tools(self, example: dict[str, Any]) -> tuple[list[dict[str, str]], list | None]:
        messages, tools = example["messages"], example.get("tools")
        if not tools:
            return messages, None
        tools_list = json.loads(tools)
        if self.takes_tools:
            return messages, tools_list
        # The template ignores `tools`: say them in the system turn so the model sees them.
        note = "You can call these tools:\n<tools>\n" + tools + "\n</tools>"
        if messages and messages[0]["role"] == "system":
            first = {"role": "system", "content": messages[0]["content"] + "\n\n" + note}
            return [first, *messages[1:]], None
        return [{"role": "system", "content": note}, *messages], None

    def render(self, example: dict[str, Any], spans: str = "all"
               ) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation as text, and the character spans of assistant turns:
        ``spans`` "all", "last" (the last turn only) or "none" (no renders beyond the text).
        """
        messages, tools = self._with_tools(example)
        text = self._render(messages, tools, False)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if spans == "none":
            turns = []
        elif spans == "last":
            turns = turns[-1:]
        out = []
        for i in turns:
            before = self._render(messages[:i], tools, True) if i else ""
            # The conversation up to the end of this turn; for its last turn that is `text`.
            upto = text if i == len(messages) - 1 else self._render(messages[: i + 1], tools,
                                                                    False)
            # Templates that rewrite earlier turns (e.g. drop reasoning) would put the span
            # on the wrong characters: refuse them instead of training on the wrong tokens.
            if not (upto.startswith(before) and text.startswith(upto)):
                raise KubetuneError(
                    "the chat template does not render a conversation as a prefix of its "
                    "continuation, so answers cannot be located; use a named template "
                    f"({', '.join(NAMED_TEMPLATES)})", field="spec.template")
            out.append((len(before), len(upto)))
        return text, out

    def prompt(self, example: dict[str, Any]) -> str:
        """The conversation up to the assistant's generation prompt (grpo's prompts)."""
        messages, tools = self._with_tools(example)
        return self._render(messages, tools, True)

    def prompt_and_answer(self, example: dict[str, Any], answer: str) -> tuple[str, str]:
        """A preference row as text: the prompt up to the assistant's generation prompt, and
        one answer as the template renders it (its end-of-turn marker included)."""
        messages, tools = self._with_tools(example)
        prompt = self._render(messages, tools, True)
        whole = self._render([*messages, {"role": "assistant", "content": answer}], tools,
                             False)
        if not whole.startswith(prompt):
            raise KubetuneError(
                "the chat template does not render a prompt as a prefix of the prompt with its "
                "answer, so answers cannot be located; use a named template "
                f"({', '.join(NAMED_TEMPLATES)})", field="spec.template")
        return prompt, whole[len(prompt):]
