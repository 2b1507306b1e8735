"""Record formats: recognise a file's format, map its columns, and validate every record into one of
{messages} / {prompt, completion} / {text}, or say exactly what is wrong (row and field).

  chat               {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  sharegpt           {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}
                     (also under `messages`; an optional top-level `system`); roles mapped by SHAREGPT_ROLES
  alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
  prompt_completion  {"prompt": ..., "completion": ...}  (strings, or lists of chat messages)
  text               {"text": ...}

`data.columns` names the file's own columns for these fields ({prompt: question, completion: answer}).
"""

from __future__ import annotations

from typing import Any

from qtune.errors import ConfigError, DataError

FORMATS = ("chat", "sharegpt", "alpaca", "prompt_completion", "text")
FORMAT_FIELDS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's `from` values as the common datasets and tools write them (FastChat, LLaMA-Factory, Axolotl), and
# the chat role each becomes. A function call is the assistant's (trained); its result is a tool turn (not trained).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "function": "tool",
    "function_response": "tool",
    "observation": "tool",
    "ipython": "tool",
}
MIXED = "mixed formats; a file holds one format, the first record's (or data.format's)"
# The fields data.columns may map, and what each alias stands for.
COLUMN_FIELDS = (
    "messages",
    "conversations",
    "system",
    "instruction",
    "input",
    "output",
    "prompt",
    "completion",
    "text",
)
_ALIASES = {"response": "completion"}  # the answer: completion, or output next to an instruction (column_fields)


def shown(value: Any, limit: int = 40) -> str:
    """A value of a record for an error message, in about `limit` characters: a huge one is never written out whole
    (a 50 MB string's repr is 50 MB more, kept with every error listed)."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    return type(value).__name__ if isinstance(value, (dict, list)) else repr(value)


def _field_names(record: dict, most: int = 20) -> str:
    """A record's field names for an error message: the first `most`, each as `shown`."""
    names = sorted(record)
    more = f", ... ({len(names)} fields)" if len(names) > most else ""
    return "[" + ", ".join(shown(n) for n in names[:most]) + more + "]"


def check_columns(columns: dict[str, str], fields: tuple[str, ...] = COLUMN_FIELDS) -> dict[str, str]:
    """data.columns checked: each key one of `fields` (by default the SFT formats'), or `response` standing for the
    answer (`completion`); an unknown one is a ConfigError naming the fields there are."""
    for name in columns:
        if _ALIASES.get(name, name) not in fields:
            alias = " (or response)" if "completion" in fields else ""
            raise ConfigError(
                f"data.columns.{name}: no such field; map one of {', '.join(fields)}{alias} "
                "to your file's column, e.g. data.columns={prompt: question, completion: answer}"
            )
    return dict(columns)


def column_fields(columns: dict[str, str], first: Any, row: int, file: str) -> dict[str, str]:
    """data.columns (as from `check_columns`) as field -> column for a file whose first record is `first`.

    `response` is the answer: `output` beside an instruction (Alpaca), else `completion`. A mapped column the
    first record lacks is an error naming it and the columns the file has; a later record without it is
    reported by validation as a missing field (its own field of that name, if any, is never used instead).
    """
    if not columns:
        return {}
    record = first if isinstance(first, dict) else {}
    alpaca = "instruction" in columns or "instruction" in record
    fields = {("output" if alpaca else "completion") if f == "response" else f: c for f, c in columns.items()}
    missing = [f"data.columns.{f}={c}" for f, c in columns.items() if c not in record]
    if isinstance(first, dict) and missing:
        raise DataError(f"{file}: row {row}: no column {', '.join(missing)}; its columns are {_field_names(record)}")
    return fields


def rename_record(record: Any, fields: dict[str, str]) -> Any:
    """A record with the file's columns renamed to the format's fields (`column_fields`)."""
    if not fields or not isinstance(record, dict):
        return record
    renamed = {k: v for k, v in record.items() if k not in fields.values() and k not in fields}
    renamed.update({f: record[c] for f, c in fields.items() if c in record})
    return renamed


def _sharegpt_key(record: dict) -> str:
    return "conversations" if "conversations" in record else "messages"


def sharegpt_turns(record: dict, row: int, errors: list[str]) -> list[dict] | None:
    """A ShareGPT conversation as chat messages, or None with the first problem added to `errors`."""
    key = _sharegpt_key(record)
    messages = []
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        errors.append(f"row {row}: field `system` must be text, got {type(system).__name__}")
        return None
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    found = turns(record.get(key), key, errors, row, sharegpt=True)
    return None if found is None else messages + found


def detect_format(row: int, first: Any, file: str) -> str:
    """The format of a file, from the fields of its first record (at `row`)."""
    if not isinstance(first, dict):
        raise DataError(f"{file}: row {row}: a record must be an object with named fields, got {type(first).__name__}")
    turns = first.get("messages")
    if "conversations" in first or (
        isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]
    ):
        return "sharegpt"
    for fmt, needed in FORMAT_FIELDS.items():
        if all(k in first for k in needed):
            return fmt
    raise DataError(
        f"{file}: row {row}: cannot tell the format from fields {_field_names(first)}; expected one of "
        "`messages` (chat), `conversations` with from/value (sharegpt), `instruction`+`output` (alpaca), "
        "`prompt`+`completion`, or `text`; set data.format, or map your columns with data.columns"
    )


# ---------------------------------------------------------------------------------------------
# Validation: turn a raw record into messages / prompt+completion / text, or say exactly what is wrong


def text_field(record: dict, key: str, errors: list[str], row: int, optional: bool = False) -> str | None:
    """A record's text field, or None with its problem (missing, not text, empty) added to `errors`; an optional
    one may be absent or empty."""
    if key not in record or record[key] is None:
        if not optional:
            errors.append(f"row {row}: field `{key}` is missing")
        return None
    value = record[key]
    if not isinstance(value, str):
        errors.append(f"row {row}: field `{key}` must be text, got {type(value).__name__}")
        return None
    if not optional and not value.strip():
        errors.append(f"row {row}: field `{key}` is empty")
        return None
    return value


def _tool_calls_ok(calls: Any, role: str, where: str, errors: list[str], row: int) -> bool:
    """OpenAI-shaped tool calls on an assistant turn: [{"type": "function", "function": {"name", "arguments"}}]."""
    if role != "assistant" or not isinstance(calls, list) or not calls:
        errors.append(f"row {row}: field `{where}` must be a non-empty list, on an assistant message")
        return False
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            errors.append(f"row {row}: field `{where}[{j}].function.name` is missing")
            return False
        if not isinstance(function.get("arguments", {}), (dict, str)):
            errors.append(f"row {row}: field `{where}[{j}].function.arguments` must be an object or a JSON string")
            return False
    return True


def turns(value: Any, key: str, errors: list[str], row: int, sharegpt: bool) -> list[dict] | None:
    """Chat messages ({role, content}) or ShareGPT turns ({from, value}) as chat messages, or None with the
    first problem added to `errors`."""
    role_key, text_key, other = ("from", "value", "role") if sharegpt else ("role", "content", "from")
    roles = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
    if not isinstance(value, list) or not value:
        errors.append(f"row {row}: field `{key}` must be a non-empty list of {{{role_key}, {text_key}}} messages")
        return None
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            errors.append(f"row {row}: field `{where}` must be an object with {role_key} and {text_key}")
            return None
        if sharegpt and key == "conversations" and "from" not in m and "role" in m:
            m = {**m, "from": m["role"]}  # ShareGPT files written with role/content turns: the same conversation
        if role_key not in m and other in m:
            this, file = ("a chat message (role/content)", "ShareGPT") if sharegpt else ("a ShareGPT turn", "chat")
            errors.append(f"row {row}: field `{where}` is {this} in a {file} file: {MIXED}")
            return None
        speaker = m.get(role_key)
        role = roles.get(speaker.strip().lower() if sharegpt else speaker) if isinstance(speaker, str) else None
        if role is None:
            allowed = ", ".join(roles)
            errors.append(f"row {row}: field `{where}.{role_key}` must be one of {allowed}, got {shown(speaker)}")
            return None
        calls = m.get("tool_calls") or None  # [] (as many exports write plain turns): no calls
        if calls is not None and not _tool_calls_ok(calls, role, f"{where}.tool_calls", errors, row):
            return None
        content = m.get(text_key, m.get("content"))
        if content is None and calls:
            content = ""  # an assistant turn that only calls tools (OpenAI writes its content as null)
        if content is None:
            errors.append(f"row {row}: field `{where}.{text_key}` is missing")
            return None
        if not isinstance(content, str):
            errors.append(f"row {row}: field `{where}.{text_key}` must be text, got {type(content).__name__}")
            return None
        if role == "assistant" and not content.strip() and not calls:
            errors.append(f"row {row}: field `{where}.{text_key}` is an empty {speaker} reply")
            return None
        message = {"role": role, "content": content}
        message.update({k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
        out.append({**message, "tool_calls": calls} if calls else message)
    return out


def validate(record: Any, fmt: str, row: int, errors: list[str]) -> dict | None:
    """Return a normalised record {'messages'} / {'prompt','completion'} / {'text'}, or None with errors added."""
    if not isinstance(record, dict):
        errors.append(f"row {row}: a record must be an object with named fields, got {type(record).__name__}")
        return None
    n = len(errors)
    if fmt == "sharegpt":
        messages = sharegpt_turns(record, row, errors)
        if messages is not None and not any(m["role"] == "assistant" for m in messages):
            errors.append(
                f"row {row}: field `{_sharegpt_key(record)}` has no assistant (gpt) turn, so nothing to learn"
            )
        return {"messages": messages} if len(errors) == n else None
    if fmt == "chat":
        messages = turns(record.get("messages"), "messages", errors, row, sharegpt=False)
        if messages is not None and not any(m["role"] == "assistant" for m in messages):
            errors.append(f"row {row}: field `messages` has no assistant message, so nothing to learn")
        return {"messages": messages} if len(errors) == n else None
    if fmt == "alpaca":
        instruction = text_field(record, "instruction", errors, row)
        extra = text_field(record, "input", errors, row, optional=True)
        output = text_field(record, "output", errors, row)
        if len(errors) > n:
            return None
        user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return {"messages": messages}
    if fmt == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            p = turns(prompt, "prompt", errors, row, sharegpt=False)
            c = turns(completion, "completion", errors, row, sharegpt=False)
            return {"messages": p + c, "n_prompt": len(p)} if len(errors) == n else None
        prompt = text_field(record, "prompt", errors, row)
        completion = text_field(record, "completion", errors, row)
        return {"prompt": prompt, "completion": completion} if len(errors) == n else None
    text = text_field(record, "text", errors, row)
    return {"text": text} if len(errors) == n else None
