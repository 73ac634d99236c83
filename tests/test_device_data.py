"""A device holds its own user's data and the foundation, nothing else, and no path of the server's reaches it
(client/device_data.py, recdata/subset.py).

The claims: a provisioned device directory holds only its users' rows; a node reading it gives each user exactly
the rows, features and training reply a simulated node reading the whole dataset gives; a run whose nodes hold
their own data sends no data or foundation path; a device refuses a foundation other than its own copy.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest
from fed_fixtures import fed_config
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from fedpa.client.device_data import DeviceData, DeviceDataError, provision
from fedpa.recdata.schema import DAY_TABLES
from fedpa.recdata.store import Dataset


@pytest.fixture(scope="module")
def device(tiny, tiny_foundation, tmp_path_factory):
    cfg = fed_config(tiny, tiny_foundation, tmp_path_factory.mktemp("run"), max_clients=8, feature_cache="none")
    return cfg, provision(cfg, [3], tmp_path_factory.mktemp("devices") / "phone")


def test_a_device_holds_its_own_users_rows_and_nothing_of_anyone_else(device, tiny):
    cfg, dev = device
    assert list(dev.clients) == [3] and dev.num_clients == 8
    uid = dev.clients[3]
    mine, whole = Dataset(dev.data_dir), Dataset(tiny)
    assert mine.users().column("user_id").to_pylist() == [uid]
    assert mine.days == whole.days and mine.vocab == whole.vocab
    rows = 0
    for name in DAY_TABLES:
        for day in whole.days:
            got = mine.day(name, day)
            assert set(got.column("user_id").to_pylist()) <= {uid}
            assert got.equals(whole.user_rows(name, uid, days=[day]))   # all of the user's rows, as they were
            rows += got.num_rows
    assert rows > 0 and set(mine.history().column("user_id").to_pylist()) <= {uid}
    assert mine.items().num_rows == whole.items().num_rows       # the catalogue is whole (not personal)
    assert sorted(p.name for p in dev.foundation_dir.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("split", ["by-day", "loo"])
def test_a_device_gives_its_user_the_same_tensors_as_the_whole_dataset(device, split):
    from fedpa.client.runtime import ClientRuntime

    cfg, dev = device
    cfg = replace(cfg, split=split)
    simulated = ClientRuntime(cfg)
    on_device = ClientRuntime(dev.apply(replace(cfg, device_data=str(dev.path),
                                                foundation_digest=_digest(cfg.foundation))))
    assert on_device.node_clients(0, 1) == [3] and on_device.num_clients == simulated.num_clients
    a, b = simulated.user(3), on_device.user(3)
    assert a.user_id == b.user_id and a.group_size == b.group_size and np.array_equal(a.profile, b.profile)
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert len(x) > 0 and np.array_equal(x.features.numpy(), y.features.numpy())
        assert np.array_equal(x.labels.numpy(), y.labels.numpy())
    with pytest.raises(Exception, match="client 2 is not held by this device"):
        on_device.user(2)


def _digest(path) -> str:
    from fedpa.foundation.checkpoint import artifact_digest

    return artifact_digest(path)


def _train_message(cfg, state, clients) -> Message:
    from fedpa.common.records import arrays_to_record
    from fedpa.server.federation import run_message_config

    content = RecordDict({"run": ConfigRecord(run_message_config(cfg)),
                          "round": ConfigRecord({"round": 1, "clients": clients, "final": False, "cohort": 8,
                                                 "run-id": "t", "resumed": False}),
                          "arrays": arrays_to_record(state)})
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=meta)


def _train_reply(msg: Message, node_config: dict):
    from fedpa.client import training
    from fedpa.client.app import _config
    from fedpa.common.records import record_to_arrays

    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    reply = training.train(msg, ctx, _config(msg, ctx))
    return record_to_arrays(reply.content["arrays"]), dict(reply.content["metrics"])


def test_a_node_on_device_data_trains_as_the_simulated_node_and_no_server_path_reaches_it(device, tmp_path):
    from fedpa.common.models import build_personal_model

    cfg, dev = device
    state = build_personal_model(cfg).get_shared()
    # the simulated node (node 3 of 8: one client each) reads the whole dataset the run names
    want, want_metrics = _train_reply(_train_message(cfg, state, [3]), {"partition-id": 3, "num-partitions": 8})
    # the device's run sends no path: the server's data and foundation are moved away to prove nothing reads them
    msg = _train_message(replace(cfg, nodes_hold_data=True), state, [3])
    run = dict(msg.content["run"])
    assert run["data-dir"] == "" and run["foundation"] == "" and len(run["foundation-digest"]) == 64
    assert str(cfg.data_dir) not in json.dumps(run) and str(cfg.foundation) not in json.dumps(run)
    got, got_metrics = _train_reply(msg, {"device-data": str(dev.path)})
    assert got_metrics == want_metrics and sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)
    # a node that holds no data is told what to do, not handed a path
    with pytest.raises(Exception, match="device-data=DIR"):
        _train_reply(msg, {"partition-id": 0, "num-partitions": 1})


def test_a_device_refuses_a_foundation_other_than_its_own(device, tmp_path):
    cfg, dev = device
    copy = tmp_path / "phone"
    shutil.copytree(dev.path, copy)
    mine = DeviceData.open(copy)
    mine.check_foundation(_digest(cfg.foundation))            # the run's foundation: accepted
    config = copy / "foundation" / "config.json"
    config.write_text(config.read_text().replace("{", '{"note": "retrained", ', 1))   # another version
    with pytest.raises(DeviceDataError, match="is not the run's .*refused"):
        DeviceData.open(copy).check_foundation(_digest(cfg.foundation))
    with pytest.raises(DeviceDataError, match="names no foundation digest"):
        mine.check_foundation("")


def test_malformed_device_directories_are_named(device, tmp_path):
    cfg, dev = device
    with pytest.raises(DeviceDataError, match="not a device directory"):
        DeviceData.open(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(dev.path, bad)
    (bad / "device.json").write_text("{not json")
    with pytest.raises(DeviceDataError, match=r"device.json: malformed"):
        DeviceData.open(bad)
    (bad / "device.json").write_text(json.dumps({"format": "fedpa-device", "clients": {"9": 1}, "num-clients": 8}))
    with pytest.raises(DeviceDataError, match="do not lie in 0..7"):
        DeviceData.open(bad)
    with pytest.raises(DeviceDataError, match="already exists"):
        provision(cfg, [3], dev.path)
    with pytest.raises(DeviceDataError, match="not one of the federation's 8 clients"):
        provision(cfg, [8], tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_user_subset_refuses_an_unknown_user(tiny, tmp_path):
    from fedpa.recdata.store import DatasetError
    from fedpa.recdata.subset import write_user_subset

    with pytest.raises(DatasetError, match="no user 999999"):
        write_user_subset(Dataset(tiny), [999999], tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
