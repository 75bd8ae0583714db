"""Generation lengths on a pruned model: `generate` runs on the compacted prompt, the caller counts the full one.

`max_length` and `min_length` count the prompt plus the new tokens, so on a prompt that lost ``removed`` placeholders
they would allow ``removed`` more new tokens than on the unpruned model (a 600-token image prompt pruned to 12.5 %
with ``max_length=prompt + 5`` generated hundreds). Every value that is set (a `generate` argument, a passed
`generation_config`, or the model's own) is lowered by ``removed``. The settings that count only new tokens
(`max_new_tokens`, `min_new_tokens`) and those measured from the end of the prompt (`exponential_decay_length_penalty`,
`begin_suppress_tokens`) already mean the same on both prompts; an unset `max_length` is transformers' default of 20
new tokens either way.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

TOTAL_LENGTH_SETTINGS = ("max_length", "min_length")


def _shorter(value: int, removed: int) -> int:
    return max(value - removed, 0)


def lengths_for_compacted_prompt(model: nn.Module, kwargs: dict[str, Any], removed: int) -> dict[str, Any]:
    """`generate` keyword arguments whose prompt-inclusive lengths count a prompt ``removed`` tokens shorter.

    The precedence is transformers': a `generate` argument, else the passed `generation_config`, else the model's.
    """
    if removed == 0:
        return kwargs
    kwargs = dict(kwargs)
    passed = kwargs.get("generation_config")
    if passed is not None:
        passed = kwargs["generation_config"] = copy.deepcopy(passed)  # the caller's config stays as it was
    for name in TOTAL_LENGTH_SETTINGS:
        if kwargs.get(name) is not None:
            kwargs[name] = _shorter(kwargs[name], removed)
        elif passed is not None and getattr(passed, name, None) is not None:
            setattr(passed, name, _shorter(getattr(passed, name), removed))
        elif getattr(model.generation_config, name, None) is not None:
            kwargs[name] = _shorter(getattr(model.generation_config, name), removed)
    return kwargs
