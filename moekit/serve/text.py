"""Text at the server's edge: tokenizer, chat template (Jinja2, sandboxed), stop ids, detokenizing.

The chat template comes from the model directory's `tokenizer_config.json` ("chat_template", a
string or a list of {name, template}), a `chat_template.jinja` file, or a GGUF's
`tokenizer.chat_template`; a model without one gets
`DEFAULT_TEMPLATE` (role-tagged turns). A model without a tokenizer takes token ids only: a
string prompt must then be space-separated ids, and output text is the ids joined by spaces.
"""

from __future__ import annotations

import json
from pathlib import Path

from moekit.serve.errors import APIError

DEFAULT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<eos>")


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class TextCodec:
    """Encode prompts, render chat, decode outputs for one model."""

    def __init__(self, tokenizer, model_dir: Path | None, vocab_size: int, extra: dict | None = None):
        """`extra`: tokenizer-config keys from elsewhere (a GGUF's chat_template / eos_token)."""
        self.tok = tokenizer
        self.vocab_size = vocab_size
        cfg = dict(extra or {})
        if model_dir is not None and (model_dir / "tokenizer_config.json").is_file():
            cfg.update(json.loads((model_dir / "tokenizer_config.json").read_text()))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default" or the first
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and model_dir is not None and (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text()
        self.has_template = template is not None
        self.bos = _token_str(cfg.get("bos_token")) or ""
        self.eos = _token_str(cfg.get("eos_token")) or ""
        self.template = self._compile(template or DEFAULT_TEMPLATE)
        self.stop_ids: set[int] = set()
        if tokenizer is not None:
            for t in ([self.eos] if self.eos else []) + list(EOS_CANDIDATES):
                i = tokenizer.token_to_id(t) if t else None
                if i is not None:
                    self.stop_ids.add(i)
                    if t == self.eos:
                        break
            if not self.eos and self.stop_ids:
                self.eos = tokenizer.id_to_token(min(self.stop_ids)) or ""

    @staticmethod
    def _compile(source: str):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(source)

    # ------------------------------------------------------------------ encode
    def encode(self, text: str, special: bool = True) -> list[int]:
        if self.tok is None:
            try:
                return [int(t) for t in text.replace(",", " ").split()]
            except ValueError:
                raise APIError(400, "this model has no tokenizer: give the prompt as token ids "
                                    "(a list of integers, or a string of space-separated ids)", "prompt") from None
        try:
            return self.tok.encode(text, add_special_tokens=special).ids
        except Exception as e:  # e.g. lone surrogates the Rust tokenizer cannot take
            raise APIError(400, f"the prompt cannot be tokenized: {str(e)[:200]}", "prompt") from None

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        if self.tok is None:
            raise APIError(400, "this model has no tokenizer, so it cannot serve chat; use /v1/completions "
                                "with token ids", "messages")
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos, eos_token=self.eos)
        except TemplateError as e:
            raise APIError(400, f"chat template error: {str(e)[:300]}", "messages") from None

    def check_ids(self, ids: list[int], param: str = "prompt") -> None:
        if not ids:
            raise APIError(400, "the prompt is empty: give a non-empty prompt", param)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of vocabulary (valid ids are 0..{self.vocab_size - 1})", param)

    # ------------------------------------------------------------------ decode
    def decode(self, ids: list[int]) -> str:
        if self.tok is None:
            return "".join(f" {t}" for t in ids)
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_text(self, t: int) -> str:
        return self.decode([t])


class Detokenizer:
    """Incremental text of a growing token list, holding back an unfinished UTF-8 character
    (decoded as U+FFFD) and anything that may still become a stop string."""

    WINDOW = 8  # tokens of left context re-decoded with each step (merges across boundaries)

    def __init__(self, codec: TextCodec, stops: list[str]):
        self.codec, self.stops = codec, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.prefix_off = 0  # ids[prefix_off:read_off] produced text already in self.text
        self.read_off = 0
        self.sent = 0

    def add(self, t: int) -> str | None:
        """Append one token; returns the matched stop string when the text now contains one."""
        self.ids.append(t)
        prev = self.codec.decode(self.ids[self.prefix_off:self.read_off])
        cur = self.codec.decode(self.ids[self.prefix_off:])
        if len(cur) > len(prev) and not cur.endswith("\ufffd"):
            start = max(0, len(self.text) - self.hold - len(cur))
            self.text += cur[len(prev):]
            self.prefix_off = max(self.prefix_off, len(self.ids) - self.WINDOW)
            self.read_off = len(self.ids)
            for s in self.stops:
                i = self.text.find(s, start)
                if i >= 0:
                    self.text = self.text[:i]
                    return s
        return None

    def flush(self, final: bool) -> str:
        """New text safe to send (all of it when `final`)."""
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out
