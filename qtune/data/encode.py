"""Tokenize one validated record with its label mask: loss on the assistant replies (or the completion) only,
each ending in one EOS, with at most one BOS, unless `data.loss_on` is "all".

Chat-like records are rendered with the tokenizer's chat template and split into trained and untrained pieces
(`chat_segments`); each piece is tokenized on its own, so the prompt's tokens are the ones generation later sees.
Loading a whole source (streaming, validation, `datasets` map) is qtune/data/load.py.
"""

from __future__ import annotations

from contextlib import contextmanager

from qtune.data.store import Example
from qtune.data.templates import TEMPLATES
from qtune.errors import DataError

IGNORE = -100


# ---------------------------------------------------------------------------------------------
# Tokenization with label masks


def _adds_bos(tokenizer) -> bool:
    """Does this tokenizer put BOS in front of plain text by convention (Llama-2/3 do, SmolLM2 does not)?"""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


@contextmanager
def _template_errors():
    """A broken template, or one that refuses these roles (raise_exception): a DataError for the record's row."""
    from jinja2 import TemplateError

    try:
        yield
    except TemplateError as e:
        raise DataError(f"the chat template cannot render this conversation: {e} (see data.chat_template)") from None


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    with _template_errors():
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(tokenizer, messages: list[dict], first_trained: int = 0) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained) pieces.

    A trained piece is an assistant reply (at message index >= `first_trained`): what the template
    adds after the generation prompt, up to and including the first EOS. Text after that EOS (a
    newline, say) is untrained, one piece with the prompt that follows it, as a prompt is tokenized when
    generating. If the template does not end a reply with EOS, an EOS is inserted, written as the piece
    ("", True).
    """
    if tokenizer.chat_template in _MARKED:
        marked = _marked_segments(tokenizer, messages, first_trained)
        if marked is not None:
            return marked
    full = _render(tokenizer, messages, False)
    eos = tokenizer.eos_token
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_trained:
            continue
        prefix = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= pos):
            raise DataError(
                "the chat template does not render conversations as growing prefixes, so assistant turns "
                "cannot be located; set data.loss_on=all or use a template without history rewriting"
            )
        segments.append((full[pos : len(prefix)], False))
        reply = upto[len(prefix) :]
        cut = reply.find(eos) if eos else -1
        if cut >= 0:
            segments.append((reply[: cut + len(eos)], True))
            pos = len(prefix) + cut + len(eos)
        else:
            segments += [(reply, True), ("", True)]
            pos = len(upto)
    segments.append((full[pos:], False))
    return segments


_MARKED = set(TEMPLATES.values())  # qtune's named templates: each reply in one {% generation %} block


def _marked_segments(tokenizer, messages: list[dict], first_trained: int) -> list[tuple[str, bool]] | None:
    """`chat_segments` from one render, for qtune's named templates: their {% generation %} blocks start where the
    generation prompt ends, so each block's text up to its first EOS is the trained reply (tests/test_formats.py
    compares it with the prefix renders). None where a block holds no EOS: the caller renders prefixes then."""
    from transformers.utils.chat_template_utils import render_jinja_template

    with _template_errors():
        (full,), (spans,) = render_jinja_template(
            [messages],
            chat_template=tokenizer.chat_template,
            return_assistant_tokens_mask=True,
            **tokenizer.special_tokens_map,
        )
    eos = tokenizer.eos_token
    skip = sum(m["role"] == "assistant" for m in messages[:first_trained])
    segments: list[tuple[str, bool]] = []
    pos = 0
    for start, end in spans[skip:]:
        cut = full.find(eos, start, end) if eos else -1
        if cut < 0:
            return None
        segments += [(full[pos:start], False), (full[start : cut + len(eos)], True)]
        pos = cut + len(eos)
    segments.append((full[pos:], False))
    return segments


def _segments(tokenizer, record: dict) -> tuple[list[tuple[str, bool]], str | None]:
    """The (text, trained) pieces of a normalised record, and its reference answer if it has one."""
    if "text" in record:
        return [(record["text"], True), ("", True)], None
    if "prompt" in record:
        return [(record["prompt"], False), (record["completion"], True), ("", True)], record["completion"]
    messages = record["messages"]
    answer = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")  # (a call-only turn: "")
    if tokenizer.chat_template:
        segments = chat_segments(tokenizer, messages, record.get("n_prompt", 0))
        first = record.get("n_prompt", 0)
        for i, m in enumerate(messages[first:], first):
            if m.get("tool_calls"):  # a template that ignores tool_calls would train an empty or partial reply
                without = [*messages[:i], {k: v for k, v in m.items() if k != "tool_calls"}]
                if _render(tokenizer, messages[: i + 1], False) == _render(tokenizer, without, False):
                    raise DataError(
                        "the chat template leaves tool_calls out of the text: set data.chat_template to one that "
                        "renders them (chatml, llama-3, mistral, gemma, alpaca)"
                    )
        return segments, answer
    raise DataError("chat messages need a base whose tokenizer has a chat template; this one has none")


# How far a long text is tokenized when only its first `max_tokens` ids are used: first as many characters as
# that many tokens (and a margin) could span, more where that gave too few ids (a tokenizer with long tokens).
CHARS_PER_TOKEN = 8
MARGIN = 64  # ids before the cut that are kept out of the result: only the last few can differ from a whole text's


def _token_ids(tokenizer, texts: list[str], max_tokens: int | None) -> list[list[int]]:
    """Each text's token ids, in one batched call (never special tokens: the template wrote them).

    With `max_tokens`, a long text is tokenized from its start only, and gives its first `max_tokens` ids: a 50 MB
    record tokenized whole takes gigabytes of memory, to be cut to data.max_length anyway.
    """

    def ids(batch: list[str]) -> list[list[int]]:
        return tokenizer(batch, add_special_tokens=False)["input_ids"]

    if not texts or max_tokens is None:
        return ids(texts) if texts else []
    chars = (max_tokens + MARGIN) * CHARS_PER_TOKEN
    out = ids([text[:chars] for text in texts])
    for i, text in enumerate(texts):
        cut = chars
        while len(text) > cut and len(out[i]) < max_tokens + MARGIN:
            cut *= 4
            out[i] = ids([text[:cut]])[0]
        if len(text) > cut:
            out[i] = out[i][:max_tokens]
    return out


def encode(tokenizer, record: dict, loss_on: str = "assistant", max_tokens: int | None = None) -> Example:
    """Tokenize one normalised record into input_ids and labels (-100 where no loss is taken).

    Pieces are tokenized separately, so the prompt tokens equal what generation later sees. With `max_tokens`,
    a record longer than that comes back with more than `max_tokens` ids, but not all of them: only its first
    `max_tokens` are sure to be the ones it has (what truncation keeps).
    """
    segments, answer = _segments(tokenizer, record)
    texts = [text for text, _ in segments if text]
    tokenized = iter(_token_ids(tokenizer, texts, None if max_tokens is None else max_tokens + 1))
    ids: list[int] = []
    labels: list[int] = []
    reply_start = None
    eos = tokenizer.eos_token_id
    for text, trained in segments:
        if text:
            piece = next(tokenized)
        else:  # the reply's EOS, unless its own text ended in it (a completion written with it): one EOS, not two
            piece = [eos] if trained and not (ids and ids[-1] == eos) else []
        if trained and text:
            reply_start = len(ids)
        ids.extend(piece)
        labels.extend(piece if (trained or loss_on == "all") else [IGNORE] * len(piece))
    bos = tokenizer.bos_token_id
    if _adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids.insert(0, bos)
        labels.insert(0, IGNORE)
        reply_start = None if reply_start is None else reply_start + 1
    while len(ids) > 1 and bos is not None and ids[0] == ids[1] == bos:
        ids.pop(0)  # a text that already starts with BOS: keep exactly one
        labels.pop(0)
        reply_start = None if reply_start is None else reply_start - 1
    prompt_ids = ids[:reply_start] if (answer is not None and reply_start) else None
    return Example(input_ids=ids, labels=labels, row=0, prompt_ids=prompt_ids, answer=answer)
