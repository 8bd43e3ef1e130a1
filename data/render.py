"""The one renderer: how a tokenizer turns rows into training examples, requests into generation
prompts, and which tokens end a completion.

In the spirit of tinker-cookbook's `Renderer`: one object per tokenizer, used by the token cache
(training examples, data/token_cache.py), the profile, RL's prompts, the MLflow pyfunc model and
the server, so a prompt is tokenized the same way when it is trained, sampled, evaluated and
served. The rules:

- Conversation rows (chat, and alpaca / sharegpt read as chat by `data.dataset.as_messages`) are
  rendered with the tokenizer's chat template; the trained tokens are each assistant turn (its text
  from the end of the generation prompt, e.g. `<|im_start|>assistant\\n`, to the end of its content)
  plus the special token that closes the turn (`<|im_end|>`, `<|eot_id|>`, ...).
- Prompt/completion rows are the prompt (with the tokenizer's own special tokens, e.g. BOS), the
  completion and EOS; completion and EOS are trained. Text rows are the text (with the tokenizer's
  special tokens) and EOS, all trained.
- A generation prompt is a chat rendered up to the opened assistant turn (the template's generation
  prompt, no special tokens added: the template writes them), or a raw text with the tokenizer's
  special tokens: exactly the prompt tokens of a training example of the same turns.
- A completion ends at the tokenizer's EOS or any end id in the model's generation config (Llama 3
  instruct ends turns with `<|eot_id|>`, not its EOS).

Text is tokenized piece by piece (prompt parts and completion parts separately, with
`add_special_tokens=False` for template text), so a token never straddles a label boundary.

Rust tokenizers raise "Already borrowed" when two threads use one instance at once (the server's
event loop encodes while its generation thread decodes), so every call goes through one lock.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from data import guard
from data.dataset import IGNORE_INDEX, Format, TokenizedExample, as_messages, check_row
from data.errors import UserError


class Renderer:
    """A tokenizer's rendering of examples, prompts and stop tokens (see the module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer (`data.sources.load_tokenizer`: pad = EOS).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._lock = threading.RLock()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    # ------------------------------------------------------------------------------- training

    def example(self, row: dict, fmt: Format, max_length: int, *, row_index: int | None = None
                ) -> TokenizedExample:
        """Token ids and loss labels for one row, cut to `max_length`.

        Args:
            row: one row in format `fmt`.
            fmt: one of `FORMATS` (see `data.dataset.detect_format`).
            max_length: keep the first `max_length` tokens.
            row_index: the row's index, named in error messages.

        Raises:
            UserError: a conversation row and a tokenizer without a chat template; a template whose
                rendering of a conversation prefix is not a prefix of the whole conversation; a
                prompt that alone fills `max_length`.
        """
        check_max_length(max_length)
        at = f"Row {row_index}" if row_index is not None else "A row"
        check_row(row, fmt, at)
        (example,) = self.examples([row], fmt, row_indices=None if row_index is None else [row_index])
        return truncate_example(example, max_length, row_index=row_index)

    def examples(self, rows: list[dict], fmt: Format, *, row_indices: list[int] | None = None
                 ) -> list[TokenizedExample]:
        """`example` without truncation for many rows already checked by `detect_format`.

        The text pieces of all rows go through two batched tokenizer calls (with and without special
        tokens), which a fast tokenizer encodes in parallel; the result is the same as one row at a
        time.

        Raises:
            UserError: as `example` (except the max_length check: see `truncate_example`).
        """
        tokenizer = self.tokenizer
        indices = row_indices if row_indices is not None else [None] * len(rows)
        with self._lock:
            pieces = [_pieces(tokenizer, row, fmt, "A row" if i is None else f"Row {i}")
                      for row, i in zip(rows, indices, strict=True)]
            encoded = {}
            for special in (False, True):
                texts = [text for row_pieces in pieces for text, _, sp in row_pieces if _is_text(text) and sp is special]
                ids = tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []
                encoded[special] = iter(ids)
        examples = []
        for row_pieces, i in zip(pieces, indices, strict=True):
            input_ids: list[int] = []
            labels: list[int] = []
            for text, trained, special in row_pieces:
                ids = list(next(encoded[special])) if _is_text(text) else list(text)
                input_ids.extend(ids)
                labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
            if all(label == IGNORE_INDEX for label in labels):
                raise UserError(
                    f"{'A row' if i is None else f'Row {i}'}: the assistant turns are empty and the chat template "
                    f"closes them with no special token, so there is nothing to train: drop the row."
                )
            examples.append(TokenizedExample(input_ids, labels, False))
        return examples

    # ----------------------------------------------------------------------------- generation

    def prompt(self, request: str | list[dict], *, at: str = "The prompt") -> list[int]:
        """The tokens a completion of `request` starts from.

        A string is raw text, encoded with the tokenizer's special tokens (BOS, ...). A list of
        `{"role", "content"}` messages is rendered with the chat template up to the opened assistant
        turn, as the prompt part of a training example of the same turns.

        Raises:
            UserError: a chat and a tokenizer without a chat template, or a template that rejects
                the messages (`at` names them).
        """
        with self._lock:
            if isinstance(request, str):
                return list(self.tokenizer(request, add_special_tokens=True)["input_ids"])
            if not self.has_chat_template:
                raise UserError(
                    f"{at} is a chat, and the tokenizer has no chat template to render it: send plain text "
                    "(a string prompt), or use a model whose tokenizer has a chat template."
                )
            with _template_deadline(at):
                text = _render(self.tokenizer, request, at, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def stop_ids(self, generation_config=None) -> list[int]:
        """Tokens that end a completion: the tokenizer's EOS and the generation config's EOS ids."""
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return sorted(i for i in ids if i is not None)

    @property
    def pad_id(self) -> int:
        """The id a left-padded prompt batch is filled with (pad, else EOS)."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------ helpers


def check_max_length(max_length) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"max_length must be a positive integer, got {max_length!r}.")


def prompt_length(labels: list[int]) -> int:
    """Tokens before the first trained one (the prompt, for a single-turn example)."""
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def truncate_example(example: TokenizedExample, max_length: int, *, row_index: int | None = None,
                     prompt_tokens: int | None = None) -> TokenizedExample:
    """`example` cut to its first `max_length` tokens, `truncated` set when anything was cut.

    Raises:
        UserError: the prompt alone fills max_length (no completion token would be trained).
    """
    first_trained = prompt_length(example.labels) if prompt_tokens is None else prompt_tokens
    if first_trained >= max_length:
        raise prompt_too_long(first_trained, max_length, row_index)
    if len(example.input_ids) <= max_length:
        return example
    return TokenizedExample(example.input_ids[:max_length], example.labels[:max_length], True)


def prompt_too_long(prompt_tokens: int, max_length: int, row_index: int | None) -> UserError:
    at = f"Row {row_index}" if row_index is not None else "A row"
    return UserError(
        f"{at}: the prompt alone is {prompt_tokens} tokens, which fills max_length={max_length}, so "
        f"no completion token would be trained. Raise max_length (to at least "
        f"{prompt_tokens + 1}, better more) or shorten the prompt."
    )


def _is_text(piece) -> bool:
    """A non-empty string to encode; an empty one is no tokens (not even BOS), a list is token ids."""
    return isinstance(piece, str) and bool(piece)


# A piece of an example: text (or token ids), whether it is trained, whether the tokenizer adds its
# own special tokens (BOS, ...) when encoding it.
_Piece = tuple[str | list[int], bool, bool]


def _pieces(tokenizer, row: dict, fmt: Format, at: str) -> list[_Piece]:
    if fmt in ("prompt_completion", "text"):
        if tokenizer.eos_token_id is None:
            raise UserError(
                "The tokenizer has no EOS token, so the end of a text cannot be trained: "
                "use a model's own tokenizer."
            )
        eos = [tokenizer.eos_token_id]
        if fmt == "text":
            return [(row["text"], True, True), (eos, True, False)]
        return [(row["prompt"], False, True), (row["completion"], True, False), (eos, True, False)]
    with _template_deadline(at):
        chat = _chat_pieces(tokenizer, as_messages(row, fmt), at, fmt)
    return [(text, trained, False) for text, trained in chat]


class _TemplateTimeout(BaseException):
    """Raised by the deadline's alarm inside a chat template (a BaseException: no `except Exception` in
    jinja or transformers swallows it)."""


@contextlib.contextmanager
def _template_deadline(at: str):
    """Stop a chat template that runs longer than the `template_s` limit (a model's own Jinja template
    can loop: two nested range(100000) loops render for hours and fill memory). SIGALRM, so only on the
    main thread and when no other timer is set; a legit template renders in well under a millisecond."""
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0]:
        yield
        return
    seconds = guard.limit("template_s")

    def expire(signum, frame):
        raise _TemplateTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _TemplateTimeout:
        raise UserError(f"{at}: the tokenizer's chat template was still rendering after {seconds} s, the limit "
                        "(template_s; raise it with LOWREGRET_LIMIT_TEMPLATE_S=N if this is intended): the template "
                        "loops or grows without end. Use the model's published template, or prompt/completion rows.") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _render(tokenizer, messages: list[dict], at: str, *, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja2 TemplateError and friends: the template rejected the turns
        raise UserError(
            f"{at}: the tokenizer's chat template failed on this conversation ({exc}). "
            f"Check the roles and their order."
        ) from exc


def _special_strings(tokenizer) -> list[str]:
    """Special-token strings, longest first, to recognise the token that closes a turn."""
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((s for s in specials if s), key=len, reverse=True)


def _chat_pieces(tokenizer, messages: list[dict], at: str, fmt: str = "chat") -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces.

    The start of assistant turn i is found by rendering messages[:i] with the generation prompt
    and checking it is a prefix of the whole rendering (true for ChatML, Llama 3, Gemma, Mistral
    templates); the end is the turn's content (searched for, as templates may trim it) plus a
    special token that directly follows it, after optional whitespace. A conversation that opens
    with the assistant trains that turn's content and closing token only.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"The tokenizer has no chat template, so {fmt} rows (conversations) cannot be rendered: use "
            "prompt/completion rows, or a model whose tokenizer has a chat template."
        )
    full = _render(tokenizer, messages, at, add_generation_prompt=False)
    specials = _special_strings(tokenizer)
    spans: list[tuple[int, int]] = []
    position = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"].strip()
        if i == 0:
            # transformers refuses to render an empty conversation, so an opening assistant turn
            # has no generation prompt to measure: its content is the last occurrence of the text
            # in the rendering of that one message (header and default system prompt untrained).
            if not content:
                continue  # an empty opening turn teaches nothing, and has nothing to anchor on
            opening = _render(tokenizer, messages[:1], at, add_generation_prompt=False)
            start = opening.rfind(content) if full.startswith(opening) else -1
            span_start = start
        else:
            prefix = _render(tokenizer, messages[:i], at, add_generation_prompt=True)
            if not full.startswith(prefix) or len(prefix) < position:
                raise UserError(
                    f"{at}: the chat template renders the conversation up to assistant message {i} "
                    f"differently from the whole conversation, so its tokens cannot be located. Use "
                    f"prompt/completion rows, or split the conversation so it ends at that turn."
                )
            start = full.find(content, len(prefix))
            span_start = len(prefix)
        if start < 0:
            raise UserError(
                f"{at}: the chat template dropped or rewrote the content of assistant message {i}; "
                f"use prompt/completion rows for this data."
            )
        end = start + len(content)
        gap = len(full[end:]) - len(full[end:].lstrip())
        closing = next((s for s in specials if full.startswith(s, end + gap)), None)
        if closing is not None:
            end += gap + len(closing)
        spans.append((span_start, end))
        position = end
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for start, end in spans:
        pieces += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    pieces.append((full[cursor:], False))
    return [(text, trained) for text, trained in pieces if text]


