"""Chat templates by name (`data.chat_template`), for bases whose tokenizer has none or the wrong one.

`data.chat_template` is `base` (the tokenizer's own, the default), one of TEMPLATES, or the path of a
Jinja file. The template a run trained with is stored in the adapter's qtune.json (`chat_template`), and
generate, eval, serve and export render prompts with it.

Each named template renders system, user, assistant and tool turns; assistant turns may carry
`tool_calls` (OpenAI's shape: {"type": "function", "function": {"name", "arguments"}}), written as JSON;
the assistant's tokens are marked with `{% generation %}` so transformers' own assistant mask can be
compared with qtune's. Sources for the formats: ChatML (OpenAI; Qwen2.5's tool-call tags), Meta's
Llama 3 prompt format, Mistral's instruct format ([INST], [TOOL_CALLS], [TOOL_RESULTS]), Gemma's
turn format (no system role: the system text opens the first user turn), and Stanford Alpaca's prompt.
"""

from __future__ import annotations

from pathlib import Path

from qtune.errors import ConfigError

# An assistant turn's text: its content, then each tool call as one JSON object per line.
_REPLY = (
    "{{- message['content'] or '' -}}"
    "{%- for call in message.get('tool_calls') or [] -%}{%- set f = call.get('function', call) -%}"
    "{{- '\n' if not loop.first or message['content'] else '' -}}"
    "{%- set args = f.get('arguments') or {} -%}"
    '{{- \'{"name": "\' + f["name"] + \'", "arguments": \' + (args if args is string else (args | tojson)) + \'}\' -}}'
    "{%- endfor -%}"
)

TEMPLATES = {
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{% generation %}" + _REPLY + "{{- '<|im_end|>' -}}{% endgeneration %}"
        "{%- else -%}{{- message['content'] + '<|im_end|>' -}}{%- endif -%}"
        "{{- '\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
    ),
    "llama-3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}"
        "{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{% generation %}" + _REPLY + "{{- '<|eot_id|>' -}}{% endgeneration %}"
        "{%- else -%}{{- message['content'] + '<|eot_id|>' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
    ),
    "mistral": (
        "{{- bos_token -}}"
        "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- '[INST] ' + (system + '\n\n' if system and loop.index0 <= 1 else '') + message['content'] + '[/INST]' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{% generation %}{{- '[TOOL_CALLS] ' if message.get('tool_calls') else '' -}}"
        + _REPLY
        + "{{- eos_token -}}{% endgeneration %}"
        "{%- elif message['role'] == 'tool' -%}{{- '[TOOL_RESULTS] ' + message['content'] + '[/TOOL_RESULTS]' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    "gemma": (
        "{{- bos_token -}}"
        "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] != 'system' -%}"
        "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{% generation %}" + _REPLY + "{{- '<end_of_turn>\n' -}}{% endgeneration %}"
        "{%- else -%}"
        "{{- (system + '\n\n' if system and loop.index0 <= 1 else '') + message['content'] + '<end_of_turn>\n' -}}"
        "{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
    ),
    "alpaca": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{- message['content'] + '\n\n' -}}"
        "{%- elif message['role'] == 'user' -%}{{- '### Instruction:\n' + message['content'] + '\n\n' -}}"
        "{%- elif message['role'] == 'tool' -%}{{- '### Input:\n' + message['content'] + '\n\n' -}}"
        "{%- else -%}{{- '### Response:\n' -}}{% generation %}" + _REPLY + "{{- eos_token -}}{% endgeneration %}"
        "{{- '\n\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '### Response:\n' -}}{%- endif -%}"
    ),
}
BASE = "base"  # the tokenizer's own template


def resolve_template(spec: str | None) -> str | None:
    """The Jinja text for a `data.chat_template` value; None for `base` (keep the tokenizer's own)."""
    if spec in (None, "", BASE):
        return None
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec).expanduser()
    if path.suffix in (".jinja", ".j2", ".txt") or path.exists():
        if not path.is_file():
            raise ConfigError(f"data.chat_template: {path} is not a file")
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"data.chat_template: cannot read {path}: {e}") from None
    raise ConfigError(
        f"data.chat_template: unknown template {spec!r}; use {BASE} (the tokenizer's own), "
        f"{', '.join(TEMPLATES)}, or the path of a .jinja file"
    )


def apply_template(tokenizer, spec: str | None):
    """Set `data.chat_template` on the tokenizer (nothing for `base`); returns the tokenizer."""
    template = resolve_template(spec)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer
