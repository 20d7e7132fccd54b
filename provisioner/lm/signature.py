"""Read a DSPy adapter prompt back into fields, types and values, and write answers in its format.

The mock LM has no access to the Python signature object: the engine only sees the
``dspy.lm15.Request`` the adapter rendered. Every DSPy adapter writes the signature into the
system prompt in a stable shape::

    Your input fields are:
    1. `question` (str): ...
    Your output fields are:
    1. `answer` (int): ...
    ...
    [[ ## answer ## ]]
    {answer}        # note: the value you produce must be a single int value

(JSONAdapter writes the same notes inside a JSON skeleton, XMLAdapter as ``<answer>`` tags.)
From that we recover each output field's name, declared type and note, which is enough to
produce a value of the right type, and the input values from the last user message, which is
what mock rules match on. This module is pure stdlib so it is cheap to import in workers.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

AdapterFormat = Literal["chat", "json", "xml", "plain"]

_FIELD_LINE = re.compile(r"^\d+\. `(?P<name>[^`]+)` \((?P<type>.+?)\):(?: |$)")
_NOTE = re.compile(r"\{(?P<name>[^{}\s]+)\}\s+# note: the value you produce (?P<note>.*)$")
_JSON_SKELETON_LINE = re.compile(r'^\s*"(?P<name>[^"]+)": (?P<value>".*")\s*,?\s*$')
_CHAT_MARKER = re.compile(r"\[\[ ## (?P<name>[^\]#]+?) ## \]\]")
_JSON_NOTE_INTRO = "Outputs will be a JSON object"
_JSON_USER_INTRO = "Respond with a JSON object"

MOCK_TIMESTAMP = "2000-01-01T00:00:00Z"


@dataclass(frozen=True)
class OutputField:
    """One output field as the prompt describes it."""

    name: str
    type_str: str
    note: str = ""


@dataclass
class PromptView:
    """What a request says about the signature behind it."""

    format: AdapterFormat
    input_names: list[str] = field(default_factory=list)
    outputs: list[OutputField] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    # The text rules with ``"*"`` match against when there is no signature: the last user turn.
    last_user_text: str = ""


def _section(system: str, start: str, stop_markers: tuple[str, ...]) -> list[str]:
    index = system.find(start)
    if index < 0:
        return []
    lines: list[str] = []
    for line in system[index + len(start):].splitlines():
        if any(line.startswith(marker) for marker in stop_markers):
            break
        lines.append(line)
    return lines


def _field_lines(lines: list[str]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for line in lines:
        match = _FIELD_LINE.match(line)
        if match:
            found.append((match["name"], match["type"]))
    return found


def _notes(system: str) -> dict[str, str]:
    """Each output field's ``# note: the value you produce ...`` text, in any adapter's layout."""
    notes: dict[str, str] = {}
    for line in system.splitlines():
        skeleton = _JSON_SKELETON_LINE.match(line)
        if skeleton:
            try:
                line = json.loads(skeleton["value"])
            except ValueError:
                continue
        match = _NOTE.search(line)
        if match:
            notes.setdefault(match["name"], match["note"].strip())
    return notes


def _detect_format(system: str, user: str, output_names: list[str], json_requested: bool) -> AdapterFormat:
    if not output_names:
        return "plain"
    if json_requested or _JSON_NOTE_INTRO in system or _JSON_USER_INTRO in user:
        return "json"
    first = output_names[0]
    if f"[[ ## {first} ## ]]" in system:
        return "chat"
    if f"<{first}>" in system:
        return "xml"
    return "chat"


def _parse_inputs(fmt: AdapterFormat, user: str, input_names: list[str]) -> dict[str, str]:
    """Input values from the last user message (ChatAdapter and JSONAdapter share this layout)."""
    values: dict[str, str] = {}
    if not input_names:
        return values
    known = set(input_names)
    if fmt == "xml":
        for name in input_names:
            match = re.search(rf"<{re.escape(name)}>\n?(.*?)\n?</{re.escape(name)}>", user, re.S)
            if match:
                values[name] = match.group(1).replace("&lt;", "<").replace("&amp;", "&")
        return values
    markers = [m for m in _CHAT_MARKER.finditer(user) if m["name"] in known]
    for index, marker in enumerate(markers):
        end = markers[index + 1].start() if index + 1 < len(markers) else len(user)
        chunk = user[marker.end():end]
        if index + 1 == len(markers):
            # The adapter appends its instruction ("Respond with ...") after the last input.
            cut = chunk.rfind("\n\nRespond with")
            if cut >= 0:
                chunk = chunk[:cut]
        values[marker["name"]] = chunk.strip("\n")
    return values


def parse_prompt(system: str, messages: list[tuple[str, str]], *, json_requested: bool = False) -> PromptView:
    """Describe a rendered request: adapter format, input values and typed output fields."""
    user = next((text for role, text in reversed(messages) if role == "user"), "")
    inputs_section = _section(system, "Your input fields are:", ("Your output fields are:",))
    outputs_section = _section(
        system, "Your output fields are:", ("All interactions will be structured", "In adhering to", "[[ ##")
    )
    input_names = [name for name, _ in _field_lines(inputs_section)]
    output_specs = _field_lines(outputs_section)
    notes = _notes(system)
    outputs = [OutputField(name, type_str, notes.get(name, "")) for name, type_str in output_specs]
    fmt = _detect_format(system, user, [o.name for o in outputs], json_requested)
    return PromptView(
        format=fmt,
        input_names=input_names,
        outputs=outputs,
        inputs=_parse_inputs(fmt, user, input_names),
        last_user_text=user,
    )


# -- default values ----------------------------------------------------------------------------


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        if isinstance(target, dict):
            merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
            return merged
    return schema


_STRING_FORMATS = {
    "date-time": MOCK_TIMESTAMP,
    "date": "2000-01-01",
    "time": "00:00:00",
    "duration": "P0D",
    "email": "mock@example.com",
    "uri": "https://example.invalid/",
    "uuid": "00000000-0000-0000-0000-000000000000",
}


def value_from_schema(schema: dict[str, Any], text_default: str, root: dict[str, Any] | None = None,
                      depth: int = 0) -> Any:
    """A deterministic value that validates against a (pydantic-generated) JSON schema."""
    root = root if root is not None else schema
    schema = _resolve(schema, root)
    if depth > 12:  # recursive models: stop with the smallest valid-looking value
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            non_null = [o for o in options if isinstance(o, dict) and _resolve(o, root).get("type") != "null"]
            chosen = non_null[0] if non_null else options[0]
            return value_from_schema(chosen, text_default, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "string":
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _STRING_FORMATS:
            return _STRING_FORMATS[fmt]
        text = text_default
        min_length = schema.get("minLength")
        if isinstance(min_length, int) and len(text) < min_length:
            text = text + "x" * (min_length - len(text))
        max_length = schema.get("maxLength")
        if isinstance(max_length, int):
            text = text[:max_length]
        return text
    if kind in ("integer", "number"):
        low: float = 0
        if isinstance(schema.get("minimum"), (int, float)):
            low = max(low, math.ceil(schema["minimum"]))
        if isinstance(schema.get("exclusiveMinimum"), (int, float)):
            low = max(low, math.floor(schema["exclusiveMinimum"]) + 1)
        return int(low) if kind == "integer" else float(low)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    if kind == "array":
        items = schema.get("items")
        count = int(schema.get("minItems", 0))
        if isinstance(schema.get("prefixItems"), list):
            return [value_from_schema(s, text_default, root, depth + 1) for s in schema["prefixItems"]]
        if isinstance(items, dict):
            return [value_from_schema(items, text_default, root, depth + 1) for _ in range(count)]
        return []
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        required = schema.get("required")
        names = list(properties) if required is None else [n for n in properties if n in required]
        return {name: value_from_schema(properties[name], text_default, root, depth + 1) for name in names}
    return text_default


def _literal_choices(type_str: str) -> list[Any] | None:
    match = re.fullmatch(r"Literal\[(.*)\]", type_str.strip())
    if not match:
        return None
    try:
        parsed = ast.literal_eval(f"[{match.group(1)}]")
    except (ValueError, SyntaxError):
        return None
    return list(parsed) if parsed else None


def default_value(output: OutputField, text_default: str) -> Any:
    """The per-type default for an output field: what the mock answers when no rule names it."""
    note = output.note
    if note.startswith("must be True or False"):
        return False
    if note.startswith("must be a single int value"):
        return 0
    if note.startswith("must be a single float value"):
        return 0.0
    if note.startswith("must exactly match (no extra characters) one of:"):
        choices = _literal_choices(output.type_str)
        if choices:
            return choices[0]
        return note.split("one of:", 1)[1].split(";")[0].strip()
    if note.startswith("must be one of:"):
        return note.split("one of:", 1)[1].split(";")[0].strip()
    if note.startswith("must adhere to the JSON schema:"):
        raw = note.split("JSON schema:", 1)[1].strip()
        try:
            schema = json.loads(raw)
        except ValueError:
            return text_default
        if isinstance(schema, dict):
            return value_from_schema(schema, text_default)
    # XMLAdapter describes nested types as an XML skeleton, not a JSON schema: go by the type name.
    # (A pydantic model then gets no usable default here; XMLAdapter's JSON fallback covers it.)
    type_str = output.type_str.strip()
    if type_str == "list" or type_str.startswith(("list[", "List[")):
        return []
    if type_str == "dict" or type_str.startswith(("dict[", "Dict[")):
        return {}
    return text_default


# -- rendering answers -------------------------------------------------------------------------


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def render_answer(view: PromptView, values: dict[str, Any]) -> str:
    """Write output values the way the request's adapter parses them."""
    names = [o.name for o in view.outputs]
    if view.format == "plain":
        return _as_text(values.get("*", next(iter(values.values()), "")))
    if view.format == "json":
        return json.dumps({name: values[name] for name in names}, ensure_ascii=False)
    if view.format == "xml":
        return "\n".join(f"<{n}>\n{_as_text(values[n])}\n</{n}>" for n in names)
    parts = [f"[[ ## {n} ## ]]\n{_as_text(values[n])}" for n in names]
    parts.append("[[ ## completed ## ]]")
    return "\n\n".join(parts)
