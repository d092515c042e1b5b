"""Settings of the data layer: where the data is, how it is checked, tokenized, sampled and packed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

BadLinePolicy = Literal["stop", "skip"]


@dataclass
class DataConfig:
    """Every field the data layer reads. Validated on construction; errors name the field."""

    # JSONL files of teacher demonstrations (schema in uniapl_megatron/data/schema.py).
    # Empty for algorithms without an SFT term (grpo, a_grpo).
    demo_paths: list[str] = field(default_factory=list)
    # JSONL files of RL prompts with the constraints their rollouts are verified against.
    # Empty for pure SFT.
    prompt_paths: list[str] = field(default_factory=list)
    # JSONL files of held-out prompts (the prompt files' format), never trained on: the trainer samples
    # them through its rollout engine before the first and after the last step (and every
    # `train.eval_every` steps) and logs their mean reward as eval/heldout_reward. A prompt that also
    # appears in a training file stops the run at start-up.
    eval_prompt_paths: list[str] = field(default_factory=list)
    # Folder holding the student's tokenizer (tokenizer.json / tokenizer_config.json with the chat
    # template). None: the trainer uses the student model's own folder.
    tokenizer_path: str | None = None
    # Qwen3's thinking switch, passed to the chat template. Off: the generation prompt ends with an
    # empty <think></think> block, so the student answers directly (what the demos contain).
    enable_thinking: bool = False
    # The token that ends an assistant turn; appended to every demo response and trained on.
    # None: found from the chat template (Qwen3: <|im_end|>).
    eot_token: str | None = None
    # Longest prompt, in tokens after the chat template (generation prompt included). Longer lines
    # are bad lines ("too_long"), in both files.
    max_prompt_tokens: int = 1024
    # Longest demonstration, prompt + response + end-of-turn, in tokens. Longer lines are bad lines.
    max_demo_tokens: int = 2048
    # What a bad line does: "stop" raises at the first one (file:line and reason); "skip" logs each,
    # skips it, counts it per reason and logs a summary per file.
    on_bad_line: BadLinePolicy = "stop"
    # RL prompts must carry a "teacher_response" (the discriminator's reference). Set it for the
    # adversarial presets (a_grpo, a_chord, uniapl); a line without one is then a bad line.
    require_teacher_response: bool = False
    # Lines tokenized together (one fast-tokenizer batch call); bounds the memory of reading.
    read_chunk_lines: int = 512
    # RL prompts drawn per optimizer step (each is rolled out G times). 0 = no RL term.
    prompts_per_step: int = 8
    # Demonstrations drawn per optimizer step. 0 = no SFT term. With prompts_per_step this sets the
    # SFT:RL mix of a step (e.g. 8 and 4: one demo for every two prompts).
    demos_per_step: int = 8
    # Seed of the sampler's shuffles; the same seed gives the same batches on every rank and run.
    seed: int = 1234
    # Shuffle each epoch (a fresh permutation per epoch); False: file order, every epoch.
    shuffle: bool = True
    # Token budget of one micro-batch of the student's forward (sum of the packed, aligned lengths).
    max_tokens_per_micro_batch: int = 8192
    # Each packed sequence is padded to a multiple of this (1 = no padding). Context parallelism
    # needs 2 * cp_size, sequence parallelism tp_size; see packing.required_pad_multiple.
    pad_multiple: int = 1

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"DataConfig.{name}: {why} (got {getattr(self, name)!r})")

        for name in ("demo_paths", "prompt_paths", "eval_prompt_paths"):
            value = getattr(self, name)
            if isinstance(value, str):  # a single path given where a list is expected
                setattr(self, name, [value])
            elif not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
                raise bad(name, "expected a list of file paths")
            else:
                setattr(self, name, list(value))
        if self.on_bad_line not in ("stop", "skip"):
            raise bad("on_bad_line", "expected 'stop' or 'skip'")
        for name in ("max_prompt_tokens", "max_demo_tokens", "read_chunk_lines",
                     "max_tokens_per_micro_batch", "pad_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "expected an integer >= 1")
        for name in ("prompts_per_step", "demos_per_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(name, "expected an integer >= 0")
        if self.prompts_per_step == 0 and self.demos_per_step == 0:
            raise bad("demos_per_step", "prompts_per_step and demos_per_step are both 0: a step would be empty")
        if self.max_demo_tokens > self.max_tokens_per_micro_batch:
            raise bad("max_demo_tokens", f"a demo this long cannot fit max_tokens_per_micro_batch="
                      f"{self.max_tokens_per_micro_batch}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise bad("seed", "expected an integer >= 0")
