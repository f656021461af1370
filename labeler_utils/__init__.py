"""Distil a teacher LLM's graded relevance judgments into a small student labeler.

Importing the package drops one log line: bitsandbytes, which peft imports whether or not a 4-bit
model is used, warns on CPUs with AVX512-BF16 that the optional ``kernels`` package is missing. Its
4-bit layers work without it (on bitsandbytes' own CPU code); nothing else from it is silenced.
"""

import logging

_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_kernels_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_KERNELS_NOTICE)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_notice)
