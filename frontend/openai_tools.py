"""OpenAI tool calling on a chat request: `tools`, `tool_choice`, `parallel_tool_calls` → how the prompt shows
the tools, which guide constrains the answer, and which reader takes the calls out of it.

How tools reach the model depends on its chat template:
- a template that takes `tools` (it mentions the variable, as transformers' `apply_chat_template(tools=...)`
  expects) renders them itself, and renders `tool` turns and assistant `tool_calls` in the history. Its
  family decides the reader: `<tool_call>` in the template means Hermes/Qwen-style tagged calls; any other
  (Llama 3.1+, Mistral) answers with bare JSON calls.
- any other template (the default model's) gets kiln's fallback: a system prompt listing the tools and the
  tagged-call format (`FALLBACK_PROMPT`), the history's calls written as `<tool_call>` blocks in assistant
  turns and tool results as `<tool_response>` blocks in user turns, and the tagged reader.

tool_choice "auto" generates freely and reads calls out of the text; "required" and a named function are
guaranteed by constrained decoding: a JSON schema for a list of calls, or for the named function's arguments.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from frontend.api import ApiError
from frontend.chat_template import ChatTemplate
from frontend.structured import GuideFields, check_json_schema
from frontend.tool_calls import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    BareJsonCalls,
    CallReader,
    NamedCall,
    PlainContent,
    RequiredCalls,
    TaggedCalls,
)

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_CHOICES = ("none", "auto", "required")
ANY_OBJECT = {"type": "object"}

FALLBACK_PROMPT = """You can call functions. The functions you may call, as JSON Schema, one per line:
<tools>
{tools}
</tools>
To call a function, answer with one line per call, each exactly:
<tool_call>{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}</tool_call>
Results come back in <tool_response></tool_response> blocks. Answer without a call when none is needed."""
FALLBACK_REQUIRED = "\nYou must call at least one function."
FALLBACK_NAMED = "\nYou must call the function {name}."


@dataclass(frozen=True)
class ToolUse:
    """A chat request's tools, as checked: what to render and how to read and constrain the answer."""

    tools: list[dict]  # OpenAI's shape, as templates take them; [] when none were sent
    choice: str  # "none", "auto", "required" or "named"
    named: str | None  # the function tool_choice names
    parallel: bool
    tagged: bool  # calls come as <tool_call> blocks (Hermes/Qwen templates, the fallback), else as bare JSON
    fallback: bool  # the template does not take tools: kiln's system prompt shows them

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def names(self) -> frozenset[str]:
        return frozenset(tool["function"]["name"] for tool in self.tools)

    def reader(self) -> CallReader:
        """A fresh reader for one choice."""
        if not self.active:
            return PlainContent()
        if self.choice == "named":
            return NamedCall(self.named)
        if self.choice == "required":
            return RequiredCalls(self.names, self.parallel)
        return (TaggedCalls if self.tagged else BareJsonCalls)(self.names, self.parallel)

    def guide(self) -> GuideFields:
        """The constraint for "required" (a list of calls of offered functions) and a named function (its
        arguments); none for "auto" and "none"."""
        if not self.active or self.choice == "auto":
            return {}
        parameters = {t["function"]["name"]: t["function"].get("parameters") or ANY_OBJECT for t in self.tools}
        if self.choice == "named":
            return {"json_schema": parameters[self.named]}
        call = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": schema},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, schema in parameters.items()
        ]
        calls = {"type": "array", "minItems": 1, "items": call[0] if len(call) == 1 else {"anyOf": call}}
        if not self.parallel:
            calls["maxItems"] = 1
        return {"json_schema": calls}

    def messages(self, messages: list[dict]) -> list[dict]:
        """The messages as the template takes them: unchanged when it renders tools itself, else with the
        fallback system prompt and the history's calls and results written as text."""
        if not self.fallback:
            return messages
        written = [_written_out(m) for m in messages]
        merged: list[dict] = []
        for message in written:  # several tool results in a row: one user turn
            if merged and message.get("tool_result") and merged[-1].get("tool_result"):
                merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n" + message["content"]}
            else:
                merged.append(message)
        merged = [{k: v for k, v in m.items() if k != "tool_result"} for m in merged]
        if not self.active:
            return merged
        prompt = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in self.tools))
        if self.choice == "required":
            prompt += FALLBACK_REQUIRED
        elif self.choice == "named":
            prompt += FALLBACK_NAMED.format(name=self.named)
        if merged and merged[0]["role"] == "system":
            return [{**merged[0], "content": merged[0]["content"] + "\n\n" + prompt}, *merged[1:]]
        return [{"role": "system", "content": prompt}, *merged]

    def template_tools(self) -> list[dict] | None:
        """What the template's `tools` variable gets: the tools when it renders them and they may be called."""
        return self.tools if self.active and not self.fallback else None


def _written_out(message: dict) -> dict:
    """One message for a template that knows no tools: calls as <tool_call> blocks, a result as a user turn."""
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>", "tool_result": 1}
    if message.get("tool_calls"):
        blocks = [
            TOOL_CALL_START
            + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
            + TOOL_CALL_END
            for c in message["tool_calls"]
        ]
        content = "\n".join(filter(None, [message["content"], *blocks]))
        return {"role": message["role"], "content": content}
    return message


def takes_tools(template: ChatTemplate) -> bool:
    return "tools" in template.variables


def writes_tagged_calls(template: ChatTemplate) -> bool:
    return TOOL_CALL_START in template.source


def checked_tools(tools: Any) -> list[dict]:
    """`tools` checked (a 400 names the field), their parameter schemas included: the costly part of a
    tool request, which the frontend runs off its loop (frontend/guide_checks.py)."""
    checked = [_check_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools or [])]
    names = [t["function"]["name"] for t in checked]
    duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if duplicate is not None:
        raise ApiError(400, f"`tools` names the function {duplicate!r} twice", "tools")
    return checked


def tool_use(
    checked: list[dict],
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    template: ChatTemplate,
    messages: list[dict],
    control_tokens=(),
) -> ToolUse:
    """Tools (from `checked_tools`) and `tool_choice` (checked here, a 400 names the field) resolved against
    the chat template; `messages` (from check_messages): their tool fields must not carry control tokens."""
    names = [t["function"]["name"] for t in checked]
    choice, named = _check_tool_choice(tool_choice, names)
    fallback = not takes_tools(template)
    if not fallback:  # tool text goes into template text, where control tokens are recognized
        check_control_text(json.dumps(checked, ensure_ascii=False), "tools", control_tokens)
        for index, message in enumerate(messages):
            fields = {key: value for key, value in message.items() if key not in ("role", "content")}
            if fields:
                check_control_text(json.dumps(fields, ensure_ascii=False), f"messages[{index}]", control_tokens)
    return ToolUse(
        tools=checked,
        choice=choice,
        named=named,
        parallel=parallel_tool_calls is not False,
        tagged=fallback or writes_tagged_calls(template),
        fallback=fallback,
    )


def check_control_text(text: str, field: str, control_tokens) -> None:
    """Client text a template writes itself is tokenized with control tokens recognized: refuse any in it,
    so that a tool description cannot open a system turn."""
    found = next((token for token in control_tokens if token in text), None)
    if found is not None:
        raise ApiError(400, f"`{field}` contains the control token text {found!r}", field)


def _check_tool(tool: Any, field: str) -> dict:
    if not isinstance(tool, dict):
        raise ApiError(400, f'`{field}` must be an object {{"type": "function", "function": {{...}}}}', field)
    unknown = set(tool) - {"type", "function"}
    if unknown:
        raise ApiError(400, f"`{field}.{sorted(unknown)[0]}` is not a supported field", f"{field}.{sorted(unknown)[0]}")
    if tool.get("type") != "function":
        raise ApiError(400, f'`{field}.type` must be "function" (the only kind of tool)', f"{field}.type")
    function = tool.get("function")
    where = f"{field}.function"
    if not isinstance(function, dict):
        raise ApiError(400, f"`{where}` must be an object with a `name`", where)
    unknown = set(function) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise ApiError(400, f"`{where}.{sorted(unknown)[0]}` is not a supported field", f"{where}.{sorted(unknown)[0]}")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise ApiError(400, f"`{where}.name` must be 1 to 64 letters, digits, underscores or dashes", f"{where}.name")
    if function.get("description") is not None and not isinstance(function["description"], str):
        raise ApiError(400, f"`{where}.description` must be a string", f"{where}.description")
    if function.get("strict") is not None and not isinstance(function["strict"], bool):
        raise ApiError(400, f"`{where}.strict` must be a boolean", f"{where}.strict")
    if function.get("parameters") is not None:
        check_json_schema(function["parameters"], f"{where}.parameters")
    return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


def _check_tool_choice(tool_choice: Any, names: list[str]) -> tuple[str, str | None]:
    if tool_choice is None:
        return ("auto" if names else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ApiError(
                400,
                f"`tool_choice` is {tool_choice[:40]!r}; it must be none, auto, required or "
                '{"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        if tool_choice != "none" and not names:
            raise ApiError(400, f'`tool_choice` "{tool_choice}" needs `tools`', "tool_choice")
        return tool_choice, None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function":
        raise ApiError(
            400, '`tool_choice` must be a string or {"type": "function", "function": {"name"}}', "tool_choice"
        )
    function = tool_choice.get("function")  # the Responses API's shape puts `name` beside `type`
    name = function.get("name") if isinstance(function, dict) else tool_choice.get("name")
    if name not in names:
        offered = ", ".join(names) or "none"
        raise ApiError(
            400,
            f"`tool_choice.function.name` {str(name)[:64]!r} is not one of the functions in `tools` ({offered})",
            "tool_choice.function.name",
        )
    return "named", name
