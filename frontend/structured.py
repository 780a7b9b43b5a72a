"""Structured output requests → the engine's `Guide` (issue 22), one translation per dialect.

Every dialect names the same few things differently: OpenAI's `response_format`, TGI's `parameters.grammar`,
kiln's native `json_schema` / `regex` / `choice` / `grammar` fields. Each is validated here as far as the
frontend can (a JSON schema against its meta-schema, a regex with Python's `re`), so that a mistake is a 400
naming the field the client wrote, before anything reaches an engine; what remains (a schema the grammar
library cannot compile) fails the request in the engine with its own error. The result is always the native
request's guide fields (`GuideFields`), which `GenerateRequest.guide()` turns into the `Guide` on the wire.

The last check is the engine's own grammar library (llguidance, engine_core/guided.py), building and checking
the grammar without a tokenizer: milliseconds, and it catches what a Python-side check cannot (a regex
feature Rust's `regex` lacks, such as look-around; a schema keyword the library does not take).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
from llguidance import LLMatcher
from llguidance.gbnf_to_lark import any_to_lark

from frontend.api import ApiError

# kiln's native guide fields, at most one per request; `json_schema: {}` asks for any JSON value
GUIDE_FIELDS = ("json_schema", "regex", "choice", "grammar")
JSON_OBJECT_SCHEMA = {"type": "object"}  # OpenAI's JSON mode answers a JSON object, never a bare value
MAX_SHOWN_ERROR_CHARS = 300
# a schema the grammar library refuses gets the meta-schema's clearer message when it is at most this long
META_CHECK_FIRST_BYTES = 64 * 1024

GuideFields = dict[str, Any]  # {} or one of GUIDE_FIELDS → its value, as GenerateRequest takes them


def _shown(message: str) -> str:
    return message if len(message) <= MAX_SHOWN_ERROR_CHARS else message[:MAX_SHOWN_ERROR_CHARS] + "…"


def check_json_schema(schema: Any, field: str) -> dict:
    """A JSON object that is a valid JSON Schema (checked against the meta-schema it names, else 2020-12)."""
    if not isinstance(schema, dict):
        raise ApiError(400, f"`{field}` must be a JSON Schema object, not {type(schema).__name__}", field)
    try:
        text = json.dumps(schema)
    except RecursionError:
        raise ApiError(400, f"`{field}` is nested too deeply", field) from None
    # The library first: Rust, bounded by its own size limits, it refuses a 2.8 MB schema in 80 ms, where
    # the meta-schema check (pure Python) takes 11 s of a core. Its refusal of a small schema waits for the
    # meta-schema check, whose message names the wrong keyword's path.
    try:
        _check_with_library(lambda: LLMatcher.grammar_from_json_schema(text), field, "JSON schema")
    except ApiError:
        if len(text) <= META_CHECK_FIRST_BYTES:
            _check_meta_schema(schema, field)
        raise
    _check_meta_schema(schema, field)
    return schema


def _check_meta_schema(schema: dict, field: str) -> None:
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in exc.absolute_path)
        raise ApiError(400, _shown(f"`{field}{where}` is not a valid JSON Schema: {exc.message}"), field) from None
    except RecursionError:
        raise ApiError(400, f"`{field}` is nested too deeply", field) from None


def _check_with_library(build, field: str, what: str) -> None:
    """The grammar as the engine's library builds it (a 400 naming `field` if it cannot)."""
    try:
        error = LLMatcher.validate_grammar(build())
    except Exception as exc:  # the library's own refusal, raised instead of returned
        error = str(exc) or type(exc).__name__
    if error:
        raise ApiError(400, _shown(f"`{field}` is not a {what} this server can enforce: {error.strip()}"), field)


def check_regex(pattern: Any, field: str) -> str:
    """A non-empty string that compiles with Python's `re` (a first check: the engine's regex dialect is close)."""
    if not isinstance(pattern, str) or not pattern:
        raise ApiError(400, f"`{field}` must be a non-empty regular expression string", field)
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ApiError(400, _shown(f"`{field}` is not a valid regular expression: {exc}"), field) from None
    _check_with_library(lambda: LLMatcher.grammar_from_regex(pattern), field, "regular expression")
    return pattern


def check_choice(choices: Any, field: str) -> list[str]:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ApiError(400, f"`{field}` must be a non-empty list of non-empty strings", field)
    return choices


def check_grammar(grammar: Any, field: str) -> str:
    if not isinstance(grammar, str) or not grammar.strip():
        raise ApiError(400, f"`{field}` must be a non-empty grammar string", field)
    _check_with_library(lambda: LLMatcher.grammar_from_lark(any_to_lark(grammar)), field, "Lark or GBNF grammar")
    return grammar


# ---- kiln's native body ----


def has_guide(body) -> bool:
    """Whether a native body sets any guide field (only then is `native_guide` worth a thread)."""
    return any(getattr(body, name) is not None for name in GUIDE_FIELDS)


def native_guide(body) -> GuideFields:
    """The native request's guide fields, validated; at most one of them may be set."""
    given = [name for name in GUIDE_FIELDS if getattr(body, name) is not None]
    if len(given) > 1:
        raise ApiError(400, f"`{given[1]}` cannot be combined with `{given[0]}`; send one of them", given[1])
    if not given:
        return {}
    name = given[0]
    value = getattr(body, name)
    check = {"json_schema": check_json_schema, "regex": check_regex, "choice": check_choice, "grammar": check_grammar}
    return {name: check[name](value, name)}


# ---- OpenAI's response_format (and TGI's variants of it, which huggingface_hub's chat_completion sends) ----


def response_format_guide(response_format: Any, field: str = "response_format") -> GuideFields:
    """OpenAI: `{"type": "text"}`, `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name",
    "schema", "strict"}}`. TGI: `{"type": "json" | "json_object", "value": schema}`, `{"type": "regex", "value"}`,
    `{"type": "json_schema", "value": {"name", "schema"}}`. `strict` is accepted: constrained decoding is
    always strict."""
    if response_format is None:
        return {}
    if not isinstance(response_format, dict):
        raise ApiError(400, f"`{field}` must be an object with a `type`", field)
    kind = response_format.get("type")
    extra = set(response_format) - {"type", "json_schema", "value"}
    if extra:
        name = f"{field}.{sorted(extra)[0]}"
        raise ApiError(400, f"`{name}` is not a supported field", name)
    if kind == "text":
        return {}
    if kind in ("json_object", "json"):
        if response_format.get("value") is None:
            return {"json_schema": JSON_OBJECT_SCHEMA}
        return {"json_schema": _schema_value(response_format["value"], f"{field}.value")}
    if kind == "json_schema":
        spec_field = f"{field}.value" if "value" in response_format else f"{field}.json_schema"
        spec = response_format.get("json_schema", response_format.get("value"))
        if not isinstance(spec, dict):
            raise ApiError(400, f"`{spec_field}` must be an object with a `schema`", spec_field)
        unknown = set(spec) - {"name", "description", "schema", "strict"}
        if unknown:
            name = f"{spec_field}.{sorted(unknown)[0]}"
            raise ApiError(400, f"`{name}` is not a supported field", name)
        if spec.get("name") is not None and not isinstance(spec["name"], str):
            raise ApiError(400, f"`{spec_field}.name` must be a string", f"{spec_field}.name")
        if "schema" not in spec:  # OpenAI makes it optional; without it, any JSON object
            return {"json_schema": JSON_OBJECT_SCHEMA}
        return {"json_schema": check_json_schema(spec["schema"], f"{spec_field}.schema")}
    if kind == "regex":
        return {"regex": check_regex(response_format.get("value"), f"{field}.value")}
    raise ApiError(
        400,
        f"`{field}.type` is {str(kind)[:40]!r}; it must be text, json_object, json_schema (or TGI's json, regex)",
        f"{field}.type",
    )


def _schema_value(value: Any, field: str) -> dict:
    """TGI sends a schema as an object or as its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ApiError(400, f"`{field}` is a string but not JSON text of a schema", field) from None
    return check_json_schema(value, field)


# ---- TGI's parameters.grammar ----


def tgi_grammar_guide(grammar: Any, field: str = "parameters.grammar") -> GuideFields:
    """TGI's `{"type": "json", "value": schema object or its JSON text}`, `{"type": "regex", "value": pattern}`
    and `{"type": "json_schema", "value": {"name", "schema"}}`."""
    if grammar is None:
        return {}
    if not isinstance(grammar, dict) or set(grammar) - {"type", "value"}:
        raise ApiError(400, f'`{field}` must be {{"type": "json" | "regex" | "json_schema", "value": ...}}', field)
    kind, value = grammar.get("type"), grammar.get("value")
    if kind == "json":
        return {"json_schema": _schema_value(value, f"{field}.value")}
    if kind == "regex":
        return {"regex": check_regex(value, f"{field}.value")}
    if kind == "json_schema":
        if not isinstance(value, dict) or "schema" not in value:
            raise ApiError(400, f'`{field}.value` must be {{"name", "schema"}}', f"{field}.value")
        return {"json_schema": check_json_schema(value["schema"], f"{field}.value.schema")}
    raise ApiError(400, f"`{field}.type` is {str(kind)[:40]!r}; it must be json, regex or json_schema", f"{field}.type")
