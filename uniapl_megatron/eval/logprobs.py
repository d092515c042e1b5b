"""Teacher-forced log-probs of given answers under a Hugging Face model (for the analyses).

Each answer is scored after its chat-formatted prompt, exactly as the trainer lays sequences
out (``data.chat.ChatFormatter``: prompt with generation prompt, then the answer's tokens and
the end-of-turn token). fp32, temperature 1, one forward per batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def answer_token_logprobs(
    model_dir: str,
    prompts: Sequence[str],
    answers: Sequence[str],
    tokenizer_dir: str | None = None,
    batch_size: int = 8,
    enable_thinking: bool = False,
) -> list[np.ndarray]:
    """Per answer, the log-prob of each of its tokens (end-of-turn included) given the prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from uniapl_megatron.data.chat import ChatFormatter, load_tokenizer

    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    fmt = ChatFormatter(load_tokenizer(tokenizer_dir or model_dir), enable_thinking=enable_thinking)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a model from {model_dir}: {exc}") from exc
    model.eval()
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    prompt_ids = fmt.encode_prompts(conversations)
    answer_ids = fmt.encode_responses(conversations, list(answers))
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = list(zip(prompt_ids[start : start + batch_size], answer_ids[start : start + batch_size]))
            seqs = [np.concatenate([p, a]) for p, a in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), fmt.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):  # right padding: positions of real tokens stay 0..len-1
                ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
                mask[i, : len(s)] = 1
            # Project only the answer positions onto the vocabulary (a 151k-word head over every
            # prompt position would dominate the cost): final hidden states, then the output layer.
            hidden = model(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1
            ).hidden_states[-1]
            head = model.get_output_embeddings()
            for i, (p, a) in enumerate(chunk):
                # token t is predicted at position t - 1
                pos = slice(len(p) - 1, len(p) - 1 + len(a))
                logp = torch.log_softmax(head(hidden[i, pos]).float(), dim=-1)
                target = torch.as_tensor(a, dtype=torch.long)
                out.append(logp.gather(-1, target[:, None]).squeeze(-1).numpy().astype(np.float64))
    return out


def token_lengths(tokenizer_dir: str, texts: Sequence[str]) -> list[int]:
    """Number of tokens of each text (no special tokens)."""
    from uniapl_megatron.data.chat import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    return [len(x) for x in tok(list(texts), add_special_tokens=False)["input_ids"]]
