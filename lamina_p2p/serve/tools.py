"""Tool calls (OpenAI `tools` / `tool_choice`) by constrained decoding.

`tool_choice` "required" or a named function makes the output a tool call whatever the model's own
tool-call format: the grammar only allows the call's JSON (for a named function, its arguments
object, as in vLLM; for "required", an array of {"name", "arguments"}), and the answer carries it as
`message.tool_calls` with finish_reason "tool_calls". The tools are given to the chat template
(`tools=`, the Hugging Face convention), so a template that lists them shows them to the model.
"auto" (the default when tools are given) needs the model's own format to tell a call from text,
which differs per model family: it is refused with a 400 naming tool_choice. "none" generates text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from lamina_p2p.serve.api import APIError, bad

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_TOOLS = 128


@dataclass
class Tools:
    tools: list[dict]  # as sent: what the chat template renders
    schema: dict | None  # what the output must be (None: text, tool_choice "none")
    name: str | None = None  # a named tool_choice: the output is this function's arguments

    def calls(self, text: str) -> list[dict] | None:
        """The OpenAI tool_calls of a finished output, or None if it is not a whole call."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        pairs = [(self.name, value)] if self.name else [(c["name"], c["arguments"]) for c in value]
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)}} for n, a in pairs]


def _param_error(message: str, param: str = "tools") -> APIError:
    return bad(message, param, "invalid_value")


def parse_tools(body: dict) -> Tools | None:
    """Validate tools / tool_choice / parallel_tool_calls; None when no tool is involved."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise bad("'tools' must be an array", "tools", "invalid_type")
    if not tools:
        if choice not in (None, "none"):
            raise _param_error("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise _param_error(f"'tools' takes at most {MAX_TOOLS} functions")
    functions = {}
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict):
            raise _param_error(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = f.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise _param_error(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'")
        params = f.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise _param_error(f"tools[{i}].function.parameters must be a JSON schema object")
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise _param_error(f"tools[{i}].function.description must be a string")
        if name in functions:
            raise _param_error(f"tools[{i}]: function {name!r} is defined twice")
        functions[name] = params
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls", "invalid_type")
    if choice == "none":
        return Tools(tools, None)
    if choice is None or choice == "auto":
        raise bad("tool_choice 'auto' (the default when tools are given) is not supported: it needs the model's "
                  "own tool-call format; send tool_choice 'required', 'none' or "
                  "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice", "unsupported_parameter")
    if choice == "required":
        call = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": p},
                           "required": ["name", "arguments"], "additionalProperties": False}
                          for n, p in functions.items()]}
        schema = {"type": "array", "items": call, "minItems": 1}
        if parallel is False:
            schema["maxItems"] = 1
        return Tools(tools, schema)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str) or name not in functions:
            raise _param_error(f"tool_choice names function {name!r}, which is not in 'tools'", "tool_choice")
        return Tools(tools, functions[name], name)
    raise bad("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
              "{\"name\": ...}}", "tool_choice", "invalid_value")
