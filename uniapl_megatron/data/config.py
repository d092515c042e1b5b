"""Settings of the data layer: where the data is, how it is checked, tokenized, sampled and packed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from ..config_fields import Ge, MinLen, check_fields
from .report import DataError

BadLinePolicy = Literal["stop", "skip"]
Paths = Annotated[list[Annotated[str, MinLen(1)]], "a list of file paths"]
Positive = Annotated[int, Ge(1)]
Count = Annotated[int, Ge(0)]


@dataclass
class DataConfig:
    """Every field the data layer reads. Checked on construction; errors name the field."""

    demo_paths: Paths = field(default_factory=list)
    """JSONL files of teacher demonstrations (schema in uniapl_megatron/data/schema.py). Empty for algorithms
    without an SFT term (grpo, a_grpo). A single path is taken as a list of one."""
    prompt_paths: Paths = field(default_factory=list)
    """JSONL files of RL prompts with the constraints their rollouts are verified against. Empty for pure SFT."""
    eval_prompt_paths: Paths = field(default_factory=list)
    """JSONL files of held-out prompts (the prompt files' format), never trained on: the trainer samples
    them through its rollout engine before the first and after the last step (and every
    `train.eval_every` steps) and logs their mean reward as eval/heldout_reward. A prompt that also
    appears in a training file stops the run at start-up."""
    tokenizer_path: str | None = None
    """Folder holding the student's tokenizer (tokenizer.json / tokenizer_config.json with the chat
    template). None: the trainer uses the student model's own folder."""
    enable_thinking: bool = False
    """Qwen3's thinking switch, passed to the chat template. Off: the generation prompt ends with an
    empty <think></think> block, so the student answers directly (what the demos contain)."""
    eot_token: str | None = None
    """The token that ends an assistant turn; appended to every demo response and trained on.
    None: found from the chat template (Qwen3: <|im_end|>)."""
    max_prompt_tokens: Positive = 1024
    """Longest prompt, in tokens after the chat template (generation prompt included). Longer lines
    are bad lines ("too_long"), in both files."""
    max_demo_tokens: Positive = 2048
    """Longest demonstration, prompt + response + end-of-turn, in tokens. Longer lines are bad lines."""
    on_bad_line: BadLinePolicy = "stop"
    """What a bad line does: "stop" raises at the first one (file:line and reason); "skip" logs each,
    skips it, counts it per reason and logs a summary per file."""
    require_teacher_response: bool = False
    """RL prompts must carry a "teacher_response" (the discriminator's reference). Set it for the
    adversarial presets (a_grpo, a_chord, uniapl); a line without one is then a bad line."""
    read_chunk_lines: Positive = 512
    """Lines tokenized together (one fast-tokenizer batch call); bounds the memory of reading."""
    prompts_per_step: Count = 8
    """RL prompts drawn per optimizer step (each is rolled out G times). 0 = no RL term."""
    demos_per_step: Count = 8
    """Demonstrations drawn per optimizer step. 0 = no SFT term. With prompts_per_step this sets the
    SFT:RL mix of a step (e.g. 8 and 4: one demo for every two prompts)."""
    seed: Count = 1234
    """Seed of the sampler's shuffles; the same seed gives the same batches on every rank and run."""
    shuffle: bool = True
    """Shuffle each epoch (a fresh permutation per epoch); False: file order, every epoch."""
    max_tokens_per_micro_batch: Positive = 8192
    """Token budget of one micro-batch of the student's forward (sum of the packed, aligned lengths)."""
    pad_multiple: Positive = 1
    """Each packed sequence is padded to a multiple of this (1 = no padding). Context parallelism
    needs 2 * cp_size, sequence parallelism tp_size; see packing.required_pad_multiple (FP8 pads the
    packed row instead, packing.row_pad_multiple)."""

    def __post_init__(self) -> None:
        for name in ("demo_paths", "prompt_paths", "eval_prompt_paths"):
            value = getattr(self, name)
            if isinstance(value, str):  # a single path given where a list is expected
                setattr(self, name, [value])
            elif isinstance(value, tuple):
                setattr(self, name, list(value))
        check_fields(self, "data", DataError)
        if self.prompts_per_step == 0 and self.demos_per_step == 0:
            raise DataError(
                "data.prompts_per_step and data.demos_per_step are both 0: a step would be empty; set one of them >= 1"
            )
        if self.max_demo_tokens > self.max_tokens_per_micro_batch:
            raise DataError(
                f"data.max_demo_tokens={self.max_demo_tokens}: a demo this long cannot fit "
                f"data.max_tokens_per_micro_batch={self.max_tokens_per_micro_batch}; raise the budget or lower "
                "max_demo_tokens"
            )
