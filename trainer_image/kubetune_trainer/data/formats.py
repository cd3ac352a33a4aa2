"""Row formats → one normalized example shape.

Every converter takes a raw row and returns a plain dict (cheap to pickle between processes):

- chat:     {"messages": [{"role", "content"}...], "tools": str | None}
- pairs:    chat + {"chosen": str, "rejected": str}  (messages end with the user turn)
- unpaired: chat + {"completion": str, "label": bool}  (messages end with the user turn)
- text:     {"text": str}

``check_for_stage`` turns a converted row into what its stage trains on (a paired row given to
kto becomes two unpaired ones).

A row that does not fit raises ``BadRow`` with a reason a person can act on. Column and tag
names follow LLaMA-Factory's ``dataset_info.json`` so its registries load unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.stages import STAGES


class BadRow(ValueError):
    """This row does not fit its declared format."""


# LLaMA-Factory's defaults when an entry gives no `columns` / `tags`.
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output",
               "history": "history", "system": "system"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools"},
    "messages": {"messages": "messages", "tools": "tools"},
    "promptCompletion": {"prompt": "prompt", "completion": "completion", "system": "system",
                         "kto_tag": "label"},
    "text": {"prompt": "text"},
    # TRL's preference rows: prompt (optional: implicit in conversational chosen/rejected)
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
                   "system": "system", "tools": "tools"},
    # OpenAI's preference fine-tuning JSONL
    "openaiPreference": {"messages": "input", "chosen": "preferred_output",
                         "rejected": "non_preferred_output"},
}
REQUIRED_COLUMN = {"alpaca": "prompt", "sharegpt": "messages", "messages": "messages",
                   "promptCompletion": "prompt", "text": "prompt", "preference": "chosen",
                   "openaiPreference": "messages"}
PAIRED_FORMATS = ("preference", "openaiPreference")
KNOWN_COLUMNS = {"prompt", "query", "response", "history", "messages", "system", "tools",
                 "chosen", "rejected", "kto_tag", "completion", "text"}
DEFAULT_TAGS = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system",
}


@dataclass(frozen=True)
class Layout:
    """How to read one data set's rows: its format, column names and ShareGPT tags."""

    format: str
    columns: dict[str, str]
    tags: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TAGS))
    ranking: bool = False

    @classmethod
    def build(cls, fmt: str, columns: dict[str, str] | None, tags: dict[str, str] | None,
              ranking: bool) -> Layout:
        for what, given in (("columns", columns), ("tags", tags)):
            if given is not None and not (
                    isinstance(given, dict)
                    and all(isinstance(v, str) and v for v in given.values())):
                raise ValueError(f"{what} must map names to non-empty strings, got "
                                 f"{show(given)}")
        unknown = set(columns or {}) - KNOWN_COLUMNS
        if unknown:
            raise ValueError(f"unknown column role(s) {sorted(unknown)}; known: "
                             f"{sorted(KNOWN_COLUMNS)}")
        unknown_tags = set(tags or {}) - set(DEFAULT_TAGS)
        if unknown_tags:
            raise ValueError(f"unknown tag(s) {sorted(unknown_tags)}; known: "
                             f"{sorted(DEFAULT_TAGS)}")
        if columns is None:
            cols = dict(DEFAULT_COLUMNS[fmt])
        else:  # as in LLaMA-Factory: given columns replace the defaults, but for the main one
            req = REQUIRED_COLUMN[fmt]
            cols = {req: DEFAULT_COLUMNS[fmt][req], **columns}
        ranking = ranking or fmt in PAIRED_FORMATS
        if ranking:
            cols.setdefault("chosen", "chosen")
            cols.setdefault("rejected", "rejected")
        return cls(fmt, cols, {**DEFAULT_TAGS, **(tags or {})}, ranking)


def detect_format(row: dict[str, Any]) -> str | None:
    """Guess the format from a row's keys (used when the spec gives none)."""
    if "preferred_output" in row and "non_preferred_output" in row:
        return "openaiPreference"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "chosen" in row and "rejected" in row and not ({"instruction", "conversations"} & set(row)):
        return "preference"
    if "prompt" in row and "completion" in row:
        return "promptCompletion"
    if "text" in row:
        return "text"
    if "prompt" in row:  # prompt-only rows (grpo), other columns for the rewards
        return "promptCompletion"
    return None


def show(value: Any, limit: int = 60) -> str:
    """A user's value in a message: its repr, cut short."""
    text = repr(value) if not isinstance(value, list | dict) or len(value) < 20 else \
        f"<{type(value).__name__} of {len(value)}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        # OpenAI content parts: keep the text ones.
        texts = [p.get("text", "") for p in value if p.get("type", "text") == "text"]
        if not all(isinstance(t, str) for t in texts):
            raise BadRow(f"{what}: a text part's text must be a string")
        return "".join(texts)
    raise BadRow(f"{what} must be a string, got {type(value).__name__}")


def _role(value: Any) -> str | None:
    """A role or ShareGPT tag as written, or None when it is not a string."""
    return value if isinstance(value, str) else None


def _col(row: dict[str, Any], layout: Layout, role: str) -> Any:
    name = layout.columns.get(role)
    return row.get(name) if name else None


def _tool_call_text(call: Any) -> str:
    if isinstance(call, str):
        return f"<tool_call>\n{call}\n</tool_call>"
    fn = call.get("function", call) if isinstance(call, dict) else call
    return "<tool_call>\n" + json.dumps(fn, ensure_ascii=False) + "\n</tool_call>"


def _extras(row: dict[str, Any], layout: Layout, out: dict[str, Any]) -> dict[str, Any]:
    tools = _col(row, layout, "tools")
    if tools:
        if isinstance(tools, str):
            try:
                decoded = json.loads(tools)
            except json.JSONDecodeError as err:
                raise BadRow(f"tools is not valid JSON: {err.msg}") from None
        else:
            decoded = tools
        if isinstance(decoded, dict):  # one tool: the templates take a list
            decoded = tools = [decoded]
        if not (isinstance(decoded, list) and all(isinstance(t, dict) for t in decoded)):
            raise BadRow(f"tools must be a JSON list of tool definitions, got "
                         f"{type(decoded).__name__}")
        if not isinstance(tools, str):
            tools = json.dumps(decoded, ensure_ascii=False)
    out["tools"] = tools or None
    if "kto_tag" in layout.columns and (layout.format != "promptCompletion"
                                        or layout.columns["kto_tag"] in row):
        tag = _col(row, layout, "kto_tag")
        if not isinstance(tag, bool):
            raise BadRow(f"{layout.columns['kto_tag']} must be true or false, got {show(tag)}")
        out["label"] = tag
    if layout.ranking:
        for key in ("chosen", "rejected"):
            out[key] = _answer(_col(row, layout, key), layout, key)
        if out["chosen"] == out["rejected"]:
            raise BadRow("chosen and rejected are the same answer")
    return out


def _answer(value: Any, layout: Layout, key: str) -> str:
    """One answer of a pair: a string, a ShareGPT turn, or OpenAI assistant message(s)."""
    if isinstance(value, dict):  # ShareGPT: {"from": "gpt", "value": ...}; OpenAI message
        value = value.get(layout.tags["content_tag"], value.get("content"))
    elif isinstance(value, list) and value and all(
            isinstance(m, dict) and "role" in m for m in value):
        if any(m["role"] != "assistant" for m in value):
            raise BadRow(f"{key} must hold assistant messages only")
        value = "".join(_text(m.get("content"), key) for m in value)
    value = _text(value, key)
    if not value.strip():
        raise BadRow(f"{key} is empty")
    return value


def from_alpaca(row: dict[str, Any], layout: Layout) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    system = _text(_col(row, layout, "system"), "system")
    if system:
        messages.append({"role": "system", "content": system})
    history = _col(row, layout, "history") or []
    if not isinstance(history, list):
        raise BadRow("history must be a list of [instruction, response] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise BadRow(f"history[{i}] must be an [instruction, response] pair")
        messages += [{"role": "user", "content": _text(pair[0], f"history[{i}][0]")},
                     {"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")}]
    prompt = _text(_col(row, layout, "prompt"), "instruction")
    query = _text(_col(row, layout, "query"), "input")
    content = "\n".join(p for p in (prompt, query) if p)
    if not content.strip():
        raise BadRow(f"{layout.columns['prompt']!r} is empty or missing")
    messages.append({"role": "user", "content": content})
    if not layout.ranking:
        response = _text(_col(row, layout, "response"), "output")
        if response:
            messages.append({"role": "assistant", "content": response})
    return _extras(row, layout, {"messages": messages})


def from_sharegpt(row: dict[str, Any], layout: Layout) -> dict[str, Any]:
    tags = layout.tags
    raw = _col(row, layout, "messages")
    if not isinstance(raw, list) or not raw:
        raise BadRow(f"{layout.columns['messages']!r} must be a non-empty list of turns")
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant",
             tags["observation_tag"]: "tool", tags["function_tag"]: "function_call",
             tags["system_tag"]: "system"}
    messages: list[dict[str, str]] = []
    system = _text(_col(row, layout, "system"), "system")
    turns = list(raw)
    first = turns[0] if isinstance(turns[0], dict) else {}
    if first.get(tags["role_tag"]) == tags["system_tag"]:
        system = _text(first.get(tags["content_tag"]), "system turn")
        turns = turns[1:]
        if not turns:
            raise BadRow("the conversation has only a system turn")
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(f"turn {i} is not an object")
        tag = turn.get(tags["role_tag"])
        role = roles.get(_role(tag))
        # Turns alternate: user/observation, then assistant/function_call.
        expected = ("user", "tool") if i % 2 == 0 else ("assistant", "function_call")
        if role not in expected:
            want = [k for k, v in roles.items() if v in expected]
            raise BadRow(f"turn {i} has role {show(tag)}; expected one of {want}")
        content = _text(turn.get(tags["content_tag"]), f"turn {i} content")
        if role == "function_call":
            messages.append({"role": "assistant", "content": _tool_call_text(content)})
        else:
            messages.append({"role": role, "content": content})
    return _extras(row, layout, {"messages": messages})


_OPENAI_ROLES = {"system", "user", "assistant", "tool"}


def from_messages(row: dict[str, Any], layout: Layout) -> dict[str, Any]:
    raw = _col(row, layout, "messages")
    if not isinstance(raw, list) or not raw:
        raise BadRow(f"{layout.columns['messages']!r} must be a non-empty list of messages")
    tags = layout.tags
    role_key = tags["role_tag"] if tags["role_tag"] != "from" else "role"
    content_key = tags["content_tag"] if tags["content_tag"] != "value" else "content"
    messages = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise BadRow(f"message {i} is not an object")
        role = _role(msg.get(role_key))
        if role not in _OPENAI_ROLES:
            raise BadRow(f"message {i} has role {show(msg.get(role_key))}; expected one of "
                         f"{sorted(_OPENAI_ROLES)}")
        content = _text(msg.get(content_key), f"message {i} content")
        calls = msg.get("tool_calls") or []
        if not isinstance(calls, list):
            raise BadRow(f"message {i} tool_calls must be a list, got {type(calls).__name__}")
        content += "".join(("\n" if content else "") + _tool_call_text(c) for c in calls)
        messages.append({"role": role, "content": content})
    return _extras(row, layout, {"messages": messages})


def from_prompt_completion(row: dict[str, Any], layout: Layout) -> dict[str, Any]:
    prompt, completion = _col(row, layout, "prompt"), _col(row, layout, "completion")
    messages: list[dict[str, str]] = []
    system = _text(_col(row, layout, "system"), "system")
    if system:
        messages.append({"role": "system", "content": system})
    if isinstance(prompt, list):  # conversational prompt, as TRL allows
        messages += from_messages({"messages": prompt}, Layout.build("messages", None, None,
                                                                     False))["messages"]
    else:
        text = _text(prompt, "prompt")
        if not text.strip():
            raise BadRow("prompt is empty or missing")
        messages.append({"role": "user", "content": text})
    if isinstance(completion, list):  # conversational: assistant message(s)
        if not all(isinstance(m, dict) for m in completion):
            raise BadRow("completion must be a string or a list of assistant messages")
        completion = "".join(_text(m.get("content"), "completion") for m in completion)
    if not layout.ranking and completion is not None:  # none: a prompt-only row (grpo)
        messages.append({"role": "assistant", "content": _text(completion, "completion")})
    return _extras(row, layout, {"messages": messages})


def from_preference(row: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """TRL's preference rows: explicit prompt (text or messages) or implicit (chosen and
    rejected are whole conversations that share the prompt turns)."""
    prompt = _col(row, layout, "prompt")
    chosen, rejected = _col(row, layout, "chosen"), _col(row, layout, "rejected")
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise BadRow("without a prompt, chosen and rejected must be conversations that "
                          "share their prompt turns")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise BadRow("chosen and rejected share no prompt turn")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        row = {**row, layout.columns["chosen"]: chosen, layout.columns["rejected"]: rejected}
    messages: list[dict[str, str]] = []
    system = _text(_col(row, layout, "system"), "system")
    if system:
        messages.append({"role": "system", "content": system})
    if isinstance(prompt, list):
        messages += _openai_messages(prompt, "prompt")
    else:
        text = _text(prompt, "prompt")
        if not text.strip():
            raise BadRow("prompt is empty")
        messages.append({"role": "user", "content": text})
    return _extras(row, layout, {"messages": messages})


def from_openai_preference(row: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """OpenAI preference fine-tuning: input.messages (+ tools), preferred_output,
    non_preferred_output (each a list with the assistant message)."""
    inp = _col(row, layout, "messages")
    if not isinstance(inp, dict) or not isinstance(inp.get("messages"), list):
        raise BadRow(f"{layout.columns['messages']!r} must be an object with a messages list")
    row = {**row, "tools": inp.get("tools")}
    layout = Layout(layout.format, {**layout.columns, "tools": "tools"}, layout.tags, True)
    return _extras(row, layout, {"messages": _openai_messages(inp["messages"], "input")})


def _openai_messages(raw: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise BadRow(f"{what} must be a non-empty list of messages")
    return from_messages({"messages": raw}, Layout.build("messages", None, None,
                                                         False))["messages"]


def from_text(row: dict[str, Any], layout: Layout) -> dict[str, Any]:
    text = _text(_col(row, layout, "prompt"), layout.columns["prompt"])
    if not text.strip():
        raise BadRow(f"{layout.columns['prompt']!r} is empty or missing")
    return {"text": text}


CONVERTERS: dict[str, Callable[[dict[str, Any], Layout], dict[str, Any]]] = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "promptCompletion": from_prompt_completion,
    "text": from_text,
    "preference": from_preference,
    "openaiPreference": from_openai_preference,
}


def check_for_stage(example: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    """What the stage trains on, from one converted row: usually the row itself; a paired
    row for kto gives a desirable and an undesirable example."""
    rows = STAGES[stage].rows
    if rows == "text":
        if "text" in example:
            return [example]
        msgs = example["messages"]
        if not msgs:
            raise BadRow("the conversation has no turns")
        if len(msgs) == 1:
            return [{"text": msgs[0]["content"]}]
        return [example]  # rendered with the chat template and trained on whole
    if "text" in example:
        raise BadRow(f"stage {stage} needs conversations, this row is plain text")
    msgs = example["messages"]
    if not msgs:
        raise BadRow("the conversation has no turns")
    if rows == "pairs":
        if "chosen" not in example:
            raise BadRow(f"stage {stage} needs chosen/rejected answers (ranking: true, or "
                         "prompt/chosen/rejected columns)")
        _ends_with_user(msgs)
        return [example]
    if rows == "unpaired":
        if "chosen" in example:  # a pair: one good and one bad answer to the same prompt
            _ends_with_user(msgs)
            base = {k: v for k, v in example.items() if k not in ("chosen", "rejected")}
            return [{**base, "completion": example["chosen"], "label": True},
                    {**base, "completion": example["rejected"], "label": False}]
        if "label" not in example:
            raise BadRow(f"stage {stage} needs a label (kto_tag) or a chosen/rejected pair")
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise BadRow("the conversation does not end with a non-empty assistant answer")
        _ends_with_user(msgs[:-1])
        return [{**example, "messages": msgs[:-1], "completion": msgs[-1]["content"]}]
    if rows == "prompts":  # the prompt; an answer given in the data goes to the rewards
        answer = example.get("chosen")
        if msgs[-1]["role"] == "assistant":
            answer, msgs = msgs[-1]["content"], msgs[:-1]
        _ends_with_user(msgs)
        base = {k: v for k, v in example.items() if k not in ("chosen", "rejected", "label")}
        return [{**base, "messages": msgs, **({"answer": answer} if answer else {})}]
    if "chosen" in example:
        raise BadRow(f"stage {stage} trains on single answers; this row is a preference pair")
    if msgs[-1]["role"] != "assistant":
        raise BadRow("the conversation does not end with an assistant turn")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise BadRow("no assistant turn has content")
    return [example]


def with_columns(example: dict[str, Any], row: dict[str, Any], layout: Layout
                 ) -> dict[str, Any]:
    """A prompt row's other columns (e.g. answer), for the reward functions: strings as they
    are, other values as JSON text (one type per column, as a data set table needs)."""
    used = set(layout.columns.values())
    columns = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
               for k, v in row.items() if k not in used and isinstance(k, str) and v is not None}
    if "answer" in example:
        columns.setdefault("answer", example.pop("answer"))
    return {**example, "columns": columns}


def _ends_with_user(msgs: list[dict[str, str]]) -> None:
    if not msgs or msgs[-1]["role"] not in ("user", "tool"):
        raise BadRow("a preference prompt must end with a user (or tool) turn")


def fill_placeholders(value: Any, placeholders: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, sub in placeholders.items():
            value = value.replace("{{" + key + "}}", sub)
        return value
    if isinstance(value, list):
        return [fill_placeholders(v, placeholders) for v in value]
    if isinstance(value, dict):
        return {k: fill_placeholders(v, placeholders) for k, v in value.items()}
    return value
