"""trainer_state.json is assembled from the parts that own the state: the student's keys and each state's."""

from __future__ import annotations

from typing import Any

import pytest

from uniapl_megatron.trainer.checkpoint import _merged


class _Part:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {k: state[k] for k in self.state}


def test_parts_fill_the_state_and_may_not_collide():
    student, run = _Part({"scheduler": {"num_steps": 3}}), _Part({"sampler": [1, 2], "nonfinite_total": 0})
    assert _merged(student, [run]) == {"scheduler": {"num_steps": 3}, "sampler": [1, 2], "nonfinite_total": 0}
    with pytest.raises(ValueError, match=r"_Part repeats the keys \['scheduler'\]"):
        _merged(student, [_Part({"scheduler": None})])
    with pytest.raises(ValueError, match=r"repeats the keys \['step'\]"):  # the checkpoint's own key
        _merged(student, [_Part({"step": 1})])
