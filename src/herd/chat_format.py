"""The Llama 3.1 chat format: dialogs -> token ids, and generated ids -> an assistant message with tool calls.

A message is `<|start_header_id|>ROLE<|end_header_id|>` + "\\n\\n" + content + `<|eot_id|>` (or `<|eom_id|>` when an
assistant message stops to wait for a tool result). Control tokens are inserted by id; every piece of content goes
through `Tokenizer.encode`, so special-token text inside content stays text. Roles: system, user, assistant and
ipython (tool results; "tool" is accepted as an alias).

Tools (`encode_dialog_prompt(..., tools=[...])`): strings name Meta's built-in tools, dicts are custom functions in
OpenAI shape. With tools, the system message starts with "Environment: ipython", "Tools: ..." (built-ins other than
code_interpreter), then the knowledge-cutoff and date lines; custom functions are described in a user message placed
before the first user turn (Meta's zero-shot format, JSON or `<function=...>`). The model answers a built-in call
with `<|python_tag|>brave_search.call(query="...")<|eom_id|>`, code with `<|python_tag|>CODE<|eom_id|>`, a JSON call
with `<|python_tag|>{"type": "function", "name": ..., "parameters": {...}}<|eom_id|>`, and a function-tag call with
`<function=NAME>{...}</function><|eot_id|>`.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .config import parse_json
from .tokenizer import Tokenizer

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
KNOWLEDGE_CUTOFF = "December 2023"
TOOL_FORMATS = ("json", "function_tag")
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "ipython": "ipython", "tool": "ipython"}


class DialogError(ValueError):
    """A dialog, message, tool definition or tool call that the Llama 3.1 format cannot express."""


@dataclass
class ToolCall:
    call_id: str
    tool_name: str
    arguments: dict

    @classmethod
    def from_dict(cls, d: Any, where: str = "tool call") -> "ToolCall":
        """herd shape {"call_id", "tool_name", "arguments"} or OpenAI {"id", "function": {"name", "arguments"}}."""
        if isinstance(d, ToolCall):
            return d
        if not isinstance(d, dict):
            raise DialogError(f"{where}: expected an object, got {type(d).__name__}")
        fn = d.get("function")
        if isinstance(fn, dict):
            name, args, call_id = fn.get("name"), fn.get("arguments", {}), d.get("id")
        else:
            name, args, call_id = d.get("tool_name"), d.get("arguments", {}), d.get("call_id")
        if isinstance(args, str):  # OpenAI sends arguments as a JSON string
            try:
                args = parse_json(args) if args.strip() else {}
            except ValueError as e:  # bounded: depth, digits (config.parse_json)
                raise DialogError(f"{where}: arguments are not valid JSON ({e})") from None
        if not isinstance(name, str) or not name:
            raise DialogError(f"{where}: missing tool name")
        if not isinstance(args, dict):
            raise DialogError(f"{where}: arguments must be an object, got {type(args).__name__}")
        return cls(call_id=str(call_id) if call_id else _new_call_id(), tool_name=name, arguments=args)

    def to_openai(self) -> dict:
        return {
            "id": self.call_id,
            "type": "function",
            "function": {"name": self.tool_name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclass
class Message:
    role: str
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    stop_reason: str | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "message") -> "Message":
        if isinstance(d, Message):
            calls = [ToolCall.from_dict(c, f"{where}, tool call {k}") for k, c in enumerate(d.tool_calls)]
            return cls(d.role, d.content, calls, d.stop_reason)
        if not isinstance(d, dict):
            raise DialogError(f"{where}: expected an object with 'role' and 'content', got {type(d).__name__}")
        role = d.get("role")
        if role not in _ROLES:
            raise DialogError(f"{where}: unknown role {role!r} (expected system, user, assistant, ipython or tool)")
        content = d.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # OpenAI content parts
            if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
                raise DialogError(f"{where}: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            if _ROLES[role] != "ipython" or not isinstance(content, dict):
                raise DialogError(f"{where}: content must be a string, got {type(content).__name__}")
            content = json.dumps(content, ensure_ascii=False)  # a tool result given as an object
        calls = d.get("tool_calls") or []
        if not isinstance(calls, list):
            raise DialogError(f"{where}: tool_calls must be a list")
        return cls(
            role=role,
            content=content,
            tool_calls=[ToolCall.from_dict(c, f"{where}, tool call {k}") for k, c in enumerate(calls)],
            stop_reason=d.get("stop_reason"),
        )


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---- tool definitions and the system prompt -----------------------------------------------------------------


def split_tools(tools: list[Any]) -> tuple[list[str], list[dict]]:
    """-> (built-in tool names, custom functions as {"type": "function", "function": {...}})."""
    if not isinstance(tools, list):
        raise DialogError(f"tools must be a list, got {type(tools).__name__}")
    builtin, custom = [], []
    for k, t in enumerate(tools):
        if isinstance(t, dict) and t.get("type") in BUILTIN_TOOLS:
            t = t["type"]
        if isinstance(t, str):
            if t not in BUILTIN_TOOLS:
                raise DialogError(f"tool {k}: unknown built-in tool {t!r} (known: {', '.join(BUILTIN_TOOLS)})")
            if t not in builtin:
                builtin.append(t)
            continue
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DialogError(f"tool {k}: expected a built-in tool name or a function with a 'name'")
        if not re.fullmatch(r"[A-Za-z_][\w.-]*", fn["name"]):
            raise DialogError(f"tool {k}: function name {fn['name']!r} must be an identifier")
        params = fn.get("parameters", {})
        if not isinstance(params, dict):
            raise DialogError(f"tool {k}: parameters must be an object (a JSON schema)")
        custom.append({"type": "function", "function": fn})
    return builtin, custom


def format_date(today: _dt.date | str | None) -> str:
    """The "Today Date" text: strftime "%d %B %Y", e.g. "21 September 2024"; a string is used as given."""
    if today is None:
        today = _dt.date.today()
    return today if isinstance(today, str) else today.strftime("%d %B %Y")


def system_prompt(
    system: str = "", *, builtin_tools: list[str] = (), ipython: bool = False, today: _dt.date | str | None = None
) -> str:
    """Llama 3.1's system prompt: tool lines, cutoff and date lines, blank line, `system`.

    Spacing follows Meta's prompt_format.md byte for byte: a blank line separates "Environment: ipython" from the
    date lines, but a "Tools: ..." line is followed directly by them (the output of Meta's 3.1 templates).
    """
    text = ""
    if ipython or builtin_tools:
        text = "Environment: ipython\n"
        named = [t for t in builtin_tools if t != "code_interpreter"]
        text += f"Tools: {', '.join(named)}\n" if named else "\n"
    text += f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {format_date(today)}"
    return f"{text}\n\n{system}" if system else text


def custom_tools_prompt(custom: list[dict], tool_format: str = "json") -> str:
    """The user-turn instructions describing custom functions (Meta's zero-shot tool format)."""
    fns = [t["function"] for t in custom]
    if tool_format == "json":
        return (
            "Answer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            "Here is a list of functions in JSON format:\n"
            + "\n".join(json.dumps(t, indent=4, ensure_ascii=False) for t in custom)
            + "\n\nReturn function calls in JSON format."
        )
    if tool_format == "function_tag":
        uses = "\n\n".join(
            f"Use the function '{f['name']}' to '{f.get('description', '')}':\n{json.dumps(f, ensure_ascii=False)}"
            for f in fns
        )
        return (
            f"You have access to the following functions:\n\n{uses}\n\n"
            "Think very carefully before calling functions.\n"
            "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
            '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
            "Reminder:\n"
            "- If looking for real time information use relevant functions before falling back to brave_search\n"
            "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
            "- Required parameters MUST be specified\n"
            "- Only call one function at a time\n"
            "- Put the entire function call reply on one line"
        )
    raise DialogError(f"unknown tool format {tool_format!r} (expected one of {TOOL_FORMATS})")


# ---- validation ---------------------------------------------------------------------------------------------


def validate_dialog(messages: list[Any], *, add_generation_prompt: bool = True) -> list[Message]:
    """Check a dialog and return it as Messages: system (optional) first, then a user turn, then user and
    assistant alternating, with ipython results only right after an assistant message; no empty content."""
    if not isinstance(messages, list) or not messages:
        raise DialogError("a dialog is a non-empty list of messages")
    msgs = [Message.from_dict(m, f"message {k}") for k, m in enumerate(messages)]
    prev = None
    for k, m in enumerate(msgs):
        role = _ROLES.get(m.role)
        where = f"message {k} ({m.role})"
        if role is None:
            raise DialogError(f"{where}: unknown role")
        if not isinstance(m.content, str):
            raise DialogError(f"{where}: content must be a string")
        if m.stop_reason is not None and m.stop_reason not in STOP_REASONS:
            raise DialogError(f"{where}: unknown stop_reason {m.stop_reason!r} (expected one of {STOP_REASONS})")
        if m.tool_calls and role != "assistant":
            raise DialogError(f"{where}: only assistant messages carry tool calls")
        if len(m.tool_calls) > 1:
            raise DialogError(f"{where}: Llama 3.1 makes one tool call per assistant message, got {len(m.tool_calls)}")
        if not m.content.strip() and not m.tool_calls:
            raise DialogError(f"{where}: empty content")
        if role == "system" and k != 0:
            raise DialogError(f"{where}: a system message may only come first")
        if role == "user" and prev not in (None, "system", "assistant"):
            raise DialogError(f"{where}: a user message must follow the system prompt or an assistant message")
        if role == "assistant" and prev not in ("user", "ipython"):
            raise DialogError(f"{where}: an assistant message must follow a user or ipython message")
        if role == "ipython" and prev != "assistant":
            raise DialogError(f"{where}: a tool result must follow an assistant message")
        prev = role
    if prev == "system":
        raise DialogError("the dialog has a system message but no user message")
    if add_generation_prompt and prev == "assistant":
        raise DialogError("the dialog ends with an assistant message; encode it with add_generation_prompt=False")
    return msgs


# ---- the format ---------------------------------------------------------------------------------------------

# One unambiguous path through each pattern, so matching stays linear on any model output.
_BUILTIN_CALL = re.compile(r'(\w+)\.call\(\s*((?:\w+="[^"]*"(?:\s*,\s*\w+="[^"]*")*)?)\s*\)')
_CALL_ARG = re.compile(r'(\w+)="([^"]*)"')
_FUNCTION_TAG = re.compile(r"<function=([A-Za-z_][\w.-]*)>")


class ChatFormat:
    def __init__(self, tokenizer: Tokenizer, *, tool_format: str = "json"):
        if tool_format not in TOOL_FORMATS:
            raise DialogError(f"unknown tool format {tool_format!r} (expected one of {TOOL_FORMATS})")
        self.tokenizer = tokenizer
        self.tool_format = tool_format
        self._headers = {role: self._header(role) for role in ("system", "user", "assistant", "ipython")}

    def _header(self, role: str) -> list[int]:
        t = self.tokenizer
        return [t.start_header_id, *t.encode(role), t.end_header_id, *t.encode("\n\n")]

    def encode_header(self, role: str) -> list[int]:
        return list(self._headers[_ROLES[role]])

    def encode_message(self, message: Message | dict) -> list[int]:
        """Header + content (+ the tool call) + eot/eom. No BOS."""
        m = Message.from_dict(message)
        role = _ROLES[m.role]
        t = self.tokenizer
        ids = self.encode_header(role)
        call_text, tagged = ("", False)
        if len(m.tool_calls) > 1:
            raise DialogError(f"Llama 3.1 makes one tool call per assistant message, got {len(m.tool_calls)}")
        if m.tool_calls:
            call_text, tagged = self._tool_call_text(m.tool_calls[0])
        if tagged:
            ids.append(t.python_tag_id)
        ids += t.encode(m.content)
        ids += t.encode(call_text)
        end = m.stop_reason
        if end is None:
            end = "end_of_message" if tagged else "end_of_turn"
        ids.append(t.eom_id if role == "assistant" and end == "end_of_message" else t.eot_id)
        return ids

    def _tool_call_text(self, call: ToolCall) -> tuple[str, bool]:
        """-> (text the model emits for the call, whether it follows <|python_tag|>)."""
        name, args = call.tool_name, call.arguments
        if name == "code_interpreter":
            if not isinstance(args.get("code"), str):
                raise DialogError("a code_interpreter call needs a string argument 'code'")
            return args["code"], True
        if name in BUILTIN_TOOLS:
            if not args or not all(isinstance(v, str) and '"' not in v for v in args.values()):
                raise DialogError(f'{name}.call(...) arguments must be strings without \'"\', got {args!r}')
            return f"{name}.call(" + ", ".join(f'{k}="{v}"' for k, v in args.items()) + ")", True
        if self.tool_format == "function_tag":
            return f"<function={name}>{json.dumps(args, ensure_ascii=False)}</function>", False
        return json.dumps({"type": "function", "name": name, "parameters": args}, ensure_ascii=False), True

    def dialog_messages(
        self, messages: list[Message | dict], tools: list[Any] | None = None, *, today=None,
        add_generation_prompt: bool = True,
    ) -> list[Message]:
        """Validated messages, with the system prompt and custom-tool instructions added when `tools` is given."""
        msgs = validate_dialog(messages, add_generation_prompt=add_generation_prompt)
        if tools is None:
            return msgs
        builtin, custom = split_tools(tools)
        system = msgs.pop(0).content if msgs[0].role == "system" else ""
        head = [Message("system", system_prompt(system, builtin_tools=builtin, ipython=bool(custom), today=today))]
        if custom:
            head.append(Message("user", custom_tools_prompt(custom, self.tool_format)))
        return head + msgs

    def encode_dialog_prompt(
        self,
        messages: list[Message | dict],
        tools: list[Any] | None = None,
        *,
        add_generation_prompt: bool = True,
        today: _dt.date | str | None = None,
    ) -> list[int]:
        """BOS + every message + an open assistant header. `tools=None` encodes the messages exactly as given;
        a list (even empty) adds Llama 3.1's system prompt lines, with `today` (default: today's date)."""
        ids = [self.tokenizer.bos_id]
        for m in self.dialog_messages(messages, tools, today=today, add_generation_prompt=add_generation_prompt):
            ids += self.encode_message(m)
        if add_generation_prompt:
            ids += self._headers["assistant"]
        return ids

    # ---- parsing the model's reply --------------------------------------------------------------------------

    def decode_assistant_message(self, ids: list[int], stop_reason: str | None = None) -> Message:
        """Generated ids (optionally starting with the assistant header) -> Message with text or one tool call.

        A trailing eot (or end_of_text) means end_of_turn, eom means end_of_message; without either the given
        `stop_reason` is kept (default out_of_tokens). A leading <|python_tag|> marks a tool call.
        """
        t = self.tokenizer
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
        header = self._headers["assistant"]
        if ids[: len(header)] == header:
            ids = ids[len(header) :]
        if ids and ids[-1] in (t.eot_id, t.eos_id):
            stop_reason, ids = "end_of_turn", ids[:-1]
        elif ids and ids[-1] == t.eom_id:
            stop_reason, ids = "end_of_message", ids[:-1]
        tagged = bool(ids) and ids[0] == t.python_tag_id
        if tagged:
            ids = ids[1:]
        text = t.decode(ids).strip(" ")
        call, content = parse_tool_call(text, tagged)
        return Message(
            role="assistant",
            content=content,
            tool_calls=[call] if call else [],
            stop_reason=stop_reason or "out_of_tokens",
        )


def parse_tool_call(text: str, python_tag: bool = False) -> tuple[ToolCall | None, str]:
    """Find one tool call in a reply -> (call or None, remaining text). Forms, in order: `<function=NAME>{json}`
    anywhere; a whole-reply JSON object with "name" and "parameters"; a whole-reply `tool.call(k="v")`; and, after
    <|python_tag|>, anything else is code for code_interpreter."""
    m = _FUNCTION_TAG.search(text)
    if m:
        try:
            args, end = json.JSONDecoder().raw_decode(text, m.end())
        except (ValueError, RecursionError):  # model output: invalid, or nested deeper than Python recurses
            args, end = None, m.end()
        if isinstance(args, dict):
            if text.startswith("</function>", end):
                end += len("</function>")
            rest = (text[: m.start()] + text[end:]).strip()
            return ToolCall(_new_call_id(), m.group(1), args), rest
    body = text.strip()
    if body.startswith("{"):
        try:
            obj = parse_json(body)
        except ValueError:  # invalid, or over config.parse_json's depth / digit limits
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = obj.get("parameters", obj.get("arguments"))
            if isinstance(args, dict):
                return ToolCall(_new_call_id(), obj["name"], args), ""
    m = _BUILTIN_CALL.fullmatch(body)
    if m:
        args = dict(_CALL_ARG.findall(m.group(2)))
        if python_tag or m.group(1) in BUILTIN_TOOLS:
            return ToolCall(_new_call_id(), m.group(1), args), ""
    if python_tag and body:
        return ToolCall(_new_call_id(), "code_interpreter", {"code": text}), ""
    return None, text


# Jinja rendering of herd's Llama 3.1 chat format (chat_format.ChatFormat) for llama.cpp and Ollama. Without tools
# the messages are rendered as given; with tools the system prompt gets the Environment/Tools/date lines and custom
# functions are described in a user turn before the first question (JSON format). Tests render it and compare with
# ChatFormat's ids.
LLAMA31_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- set tools = tools if tools is defined and tools else none %}
{%- set sys = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}
{%- set rest = messages[1:] if sys is not none else messages %}
{%- if tools is not none %}
{%- set d = date_string if date_string is defined else strftime_now('%d %B %Y') %}
{{- '<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: ' + d }}
{%- if sys is not none %}{{- '\n\n' + sys }}{%- endif %}
{{- '<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n' }}
{{- "Answer the user's question by making use of the following functions if needed.\nIf none of the function can be used, please say so.\nHere is a list of functions in JSON format:" }}
{%- for t in tools %}{{- '\n' + t | tojson(indent=4) }}{%- endfor %}
{{- '\n\nReturn function calls in JSON format.<|eot_id|>' }}
{%- elif sys is not none %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' + sys + '<|eot_id|>' }}
{%- endif %}
{%- for m in rest %}
{%- set role = 'ipython' if m['role'] in ('tool', 'ipython') else m['role'] %}
{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' }}
{%- if m.get('tool_calls') %}
{%- set f = m['tool_calls'][0]['function'] %}
{%- set a = f['arguments'] if f['arguments'] is string else f['arguments'] | tojson %}
{{- '<|python_tag|>' + (m['content'] or '') + '{"type": "function", "name": "' + f['name'] + '", "parameters": ' + a + '}<|eom_id|>' }}
{%- else %}
{{- m['content'] + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"""
