#!/usr/bin/env python
"""Move Qwen3 / Qwen3-MoE weights between Hugging Face and Megatron formats (see --help)."""

import sys

from uniapl_megatron.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
