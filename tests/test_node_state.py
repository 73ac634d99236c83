"""A node's users' private states in its Flower context (client/node_state.py): packed records, the newest row of
a user wins, superseded records dropped, memory bounded, bad records refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedpa.client.node_state import PREFIX, USERS, NodePrivateStates
from fedpa.common.records import arrays_to_record
from fedpa.foundation.errors import FedpaError


def _state(uid: int, version: int, rank: int = 2) -> dict[str, np.ndarray]:
    return {"lora_user_A": np.full((3, rank), uid + version / 10, np.float32),
            "user_bias": np.array([uid * 100 + version], np.float64)}


def _records(context_state: RecordDict) -> list[str]:
    return sorted(k for k in context_state.keys() if k.startswith(PREFIX))


def test_states_are_written_once_per_message_and_read_back_by_the_next():
    context_state = RecordDict({"train-vector": ConfigRecord({"kept": 1})})
    states = NodePrivateStates(context_state)
    assert states.get(7) is None
    for uid in range(5):
        states.put(uid, _state(uid, 1))
    states.put(9, _state(9, 1, rank=4))           # another layout: a record of its own
    assert _records(context_state) == []         # nothing written before the message's training is done
    assert states.get(3)["user_bias"][0] == 301  # but the job itself reads what it kept
    states.flush()
    assert _records(context_state) == [f"{PREFIX}0", f"{PREFIX}1"]
    assert "train-vector" in context_state       # the context's other entries stay

    again = NodePrivateStates(context_state)      # the next message, from the same context
    assert len(again) == 6
    for uid in (*range(5), 9):
        got, want = again.get(uid), _state(uid, 1, rank=4 if uid == 9 else 2)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
    got = again.get(2)
    got["lora_user_A"][:] = -1                    # a copy: the kept state does not move
    assert again.get(2)["lora_user_A"][0, 0] == np.float32(2.1)


def test_the_newest_row_wins_and_records_stay_within_twice_the_users():
    rng = np.random.default_rng(0)
    context_state = RecordDict()
    truth: dict[int, int] = {}
    for version in range(1, 40):
        states = NodePrivateStates(context_state)
        for uid in rng.choice(200, size=20, replace=False).tolist():   # 10 % of the users each round
            assert (states.get(uid) is None) == (uid not in truth)
            if uid in truth:
                assert states.get(uid)["user_bias"][0] == uid * 100 + truth[uid]
            states.put(uid, _state(uid, version))
            truth[uid] = version
        states.flush()
        # rows held over all records (each record read alone): at most twice the users, plus this round's
        held = [NodePrivateStates(RecordDict({k: context_state[k]})) for k in _records(context_state)]
        assert sum(len(h) for h in held) <= 2 * len(truth)
    final = NodePrivateStates(context_state)
    assert len(final) == len(truth)
    for uid, version in truth.items():
        assert final.get(uid)["user_bias"][0] == uid * 100 + version


def test_a_record_whose_users_all_trained_again_is_dropped():
    context_state = RecordDict()
    states = NodePrivateStates(context_state)
    for uid in range(4):
        states.put(uid, _state(uid, 1))
    states.flush()
    states = NodePrivateStates(context_state)
    for uid in range(4):
        states.put(uid, _state(uid, 2))
    states.flush()
    assert _records(context_state) == [f"{PREFIX}1"]


def test_a_message_that_fails_leaves_the_states_it_started_from():
    context_state = RecordDict()
    states = NodePrivateStates(context_state)
    states.put(1, _state(1, 1))
    states.flush()
    failing = NodePrivateStates(context_state)
    failing.put(1, _state(1, 2))                  # training then raised: no flush
    assert NodePrivateStates(context_state).get(1)["user_bias"][0] == 101


def test_bad_records_are_refused_by_name():
    with pytest.raises(FedpaError, match=f"{PREFIX}x.*not a private-state record name"):
        NodePrivateStates(RecordDict({f"{PREFIX}x": arrays_to_record({USERS: np.arange(2)})}))
    with pytest.raises(FedpaError, match=f"{PREFIX}0 has no one-dimensional int64"):
        NodePrivateStates(RecordDict({f"{PREFIX}0": arrays_to_record({"w": np.zeros((2, 3))})}))
    with pytest.raises(FedpaError, match="names a user twice"):
        NodePrivateStates(RecordDict({f"{PREFIX}0": arrays_to_record({USERS: np.array([4, 4]),
                                                                        "w": np.zeros((2, 3))})}))
    with pytest.raises(FedpaError, match=r"\['w'\] do not hold one row per user \(3\)"):
        NodePrivateStates(RecordDict({f"{PREFIX}0": arrays_to_record({USERS: np.arange(3), "w": np.zeros((2, 3))})}))
    with pytest.raises(FedpaError, match="is not a packed record"):
        NodePrivateStates(RecordDict({f"{PREFIX}0": ConfigRecord({"w": 1})}))
    with pytest.raises(ValueError, match="reserved"):
        NodePrivateStates(RecordDict()).put(1, {"@users": np.zeros(1)})
