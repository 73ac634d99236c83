"""The server's round steps, each on its own: `collect` keeps valid replies and names what it drops,
`check_quorum` fails a thin round, `aggregate` / `add_noise` / `apply` turn sums into the next state.
Real Flower messages, no runtime: a step needs none."""

from __future__ import annotations

import numpy as np
import pytest
from fed_fixtures import fed_config
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedpa.common.aggregation import RoundFailed, client_contribution, count_keys
from fedpa.common.records import arrays_to_record
from fedpa.server.federation import Federation


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps every Message with the identity of the task that makes it; outside a runtime, this test is
    that task (and leaves the identity as it found it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="module")
def federation(tiny, tiny_foundation, tmp_path_factory):
    fed = Federation(None, fed_config(tiny, tiny_foundation, tmp_path_factory.mktemp("steps") / "run"))
    fed.nodes = {1: [0, 1], 2: [2]}
    fed.num_clients = 3                      # what discovery would have found
    return fed


def _reply(node: int, content: RecordDict) -> Message:
    sent = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node, group_id="1")
    return Message(content=content, reply_to=sent)


def _update(fed: Federation, n_users: int, value: float) -> dict[str, np.ndarray]:
    delta = {t.name: np.full(t.shape, value, np.float32) for t in fed.spec if t.group is None and not t.per_row}
    one = client_contribution(delta, fed.spec, set())
    return {k: v * n_users for k, v in one.items()}


def _content(update: dict[str, np.ndarray] | None, n_users: int) -> RecordDict:
    rd = RecordDict({"metrics": MetricRecord({"num-examples": 10 * n_users, "num-users": n_users,
                                              "loss-sum": 0.5 * 10 * n_users}),
                     "excluded": ConfigRecord({"reasons": [""]})})
    if update is not None:
        rd["arrays"] = arrays_to_record(update)
    return rd


def test_collect_keeps_valid_updates_and_names_what_it_drops(federation):
    fed = federation
    good = _update(fed, 2, 0.01)
    lying = _update(fed, 1, 0.01)
    lying["count/global"] = np.array([5.0], np.float32)        # claims five users, serves one
    got = fed.collect(1, [_reply(1, _content(good, 2)), _reply(2, _content(lying, 1))], {1: [0, 1], 2: [2], 3: [3]})
    assert got.users_ok == 2 and got.trained == {1: 2} and len(got.updates) == 1
    assert any("node 2: excluded (1 client(s)): count/global 5 does not match num-users 1" in p for p in got.problems)
    assert any("node 3: no reply" in p for p in got.problems)
    assert got.loss_sum == pytest.approx(10.0) and got.n_examples == 20
    with pytest.raises(RoundFailed, match="only 2 of 5 sampled clients"):
        fed.check_quorum(1, got, sampled=5)
    fed.check_quorum(1, got, sampled=4)                          # 0.5 * 4 = 2 needed


def test_aggregate_noise_and_apply_give_the_next_state(federation):
    fed = federation
    before = {k: v.copy() for k, v in fed.state.items()}
    sums = fed.aggregate(1, [_update(fed, 2, 0.01), _update(fed, 1, 0.04)], {1: [0, 1], 2: [2]})
    assert float(sums["count/global"][0]) == 3
    assert fed.add_noise(sums) is sums                           # no DP configured: unchanged
    after = fed.apply(sums)
    name = next(t.name for t in fed.spec if t.group is None and not t.per_row)
    np.testing.assert_allclose(after[name] - before[name], (2 * 0.01 + 0.04) / 3, rtol=1e-5)
    assert set(after) == set(before) and set(count_keys(fed.spec)) <= set(sums)


class _Nodes:
    """A grid of nodes that answer discovery with the given infos (the messages' own replies)."""

    def __init__(self, infos: dict[int, dict]):
        self.infos = infos

    def get_node_ids(self):
        return list(self.infos)

    def push_messages(self, msgs):
        self.sent = list(msgs)
        for m in self.sent:      # as a real grid does when it pushes a message: its id is its object id
            m.metadata.__dict__["_message_id"] = m.object_id
        return [m.metadata.message_id for m in self.sent]

    def pull_messages(self, ids):
        return [Message(content=RecordDict({"info": ConfigRecord(self.infos[m.metadata.dst_node_id])}), reply_to=m)
                for m in self.sent if m.metadata.message_id in ids]


@pytest.mark.parametrize("infos, message", [
    ({1: {"clients": [0], "num-clients": 3}, 2: {"clients": [1], "num-clients": 4}},
     "nodes disagree on the number of clients"),
    ({1: {"clients": [0, 1], "num-clients": 3}, 2: {"clients": [1, 2], "num-clients": 3}},
     r"client\(s\) \[1\] are served by more than one node"),
])
def test_discovery_refuses_devices_provisioned_inconsistently(tiny, tiny_foundation, tmp_path, infos, message):
    from dataclasses import replace

    cfg = replace(fed_config(tiny, tiny_foundation, tmp_path / "run"), min_nodes=2, round_timeout=5.0)
    fed = Federation(_Nodes(infos), cfg)
    with pytest.raises(RoundFailed, match=message):
        fed.discover()
    fine = Federation(_Nodes({1: {"clients": [0, 1], "num-clients": 3, "pid": 7, "ray-node": "a"},
                              2: {"clients": [2], "num-clients": 3, "pid": 8}}), cfg)
    assert fine.discover() == {1: [0, 1], 2: [2]}
    assert fine.node_processes == {1: {"pid": 7, "ray_node": "a"}, 2: {"pid": 8, "ray_node": ""}}
