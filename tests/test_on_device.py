"""Between rounds on a device: the event log (client/event_log.py) and the recommender (client/on_device.py).

The claims: a label that arrives after a round read the log counts in the next round, once; kill -9 during
appends loses at most the event being written; logged events change the user's next update; the device's
recommendations are the run's scores for the same rows, and the ONNX model it exports ranks them alike.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import numpy as np
import pytest
from fed_fixtures import fed_config
from test_device_data import _digest, _train_message, _train_reply

from fedpa.client.device_data import provision
from fedpa.client.event_log import LOG_FILE, EventLog, EventLogError


def test_a_late_label_counts_in_the_next_round_and_a_row_counts_once(tmp_path):
    with EventLog(tmp_path / LOG_FILE, user_id=5, num_items=100) as log:
        shown = log.impression(3, timestamp_ms=1_000)                     # shown, no feedback yet
        log.impression(4, timestamp_ms=2_000, effective_view=1)           # shown and watched at once
        first = log.snapshot()                                            # a round starts and reads the log
        log.label(shown, effective_view=0)                                # ...feedback arrives during the round
        log.label(shown, like=1)                                          # and more for the same impression
        second = log.snapshot()                                           # the next round
    assert first.labelled == 1 and first.exposures.column("video_id").to_pylist() == [4]
    assert second.labelled == 2 and second.seq > first.seq
    rows = second.exposures.to_pylist()
    assert [r["video_id"] for r in rows] == [3, 4] and {r["user_id"] for r in rows} == {5}
    assert (rows[0]["effective_view"], rows[0]["like"], rows[0]["follow"]) == (0, 1, -1)


def test_the_event_log_names_what_it_refuses(tmp_path):
    log = EventLog(tmp_path / LOG_FILE, user_id=1, num_items=10)
    with pytest.raises(EventLogError, match="no event 99"):
        log.label(99, effective_view=1)
    with pytest.raises(EventLogError, match="a label is 0 or 1"):
        log.impression(2, effective_view=2)
    with pytest.raises(EventLogError, match="unknown label 'clicked'"):
        log.impression(2, clicked=1)
    for vid in (-1, 10):
        with pytest.raises(EventLogError, match="outside the catalogue"):
            log.impression(vid)
    assert len(log) == 0                       # nothing half-written by the refusals
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(EventLogError, match="junk.sqlite: not a usable event log"):
        EventLog(tmp_path / "junk.sqlite", user_id=1)


def test_kill_9_while_appending_loses_at_most_the_event_being_written(tmp_path):
    path = tmp_path / LOG_FILE
    script = textwrap.dedent(f"""
        import sys
        from fedpa.client.event_log import EventLog
        log = EventLog({str(path)!r}, user_id=1)
        i = 0
        while True:
            eid = log.impression(i % 50, timestamp_ms=i)
            log.label(eid, effective_view=i % 2)
            print(eid, flush=True)   # acknowledged: committed before this line
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    deadline = time.time() + 60
    while len(acknowledged) < 40 and time.time() < deadline:
        acknowledged.append(int(proc.stdout.readline()))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids = {r[0] for r in db.execute("SELECT event_id FROM events WHERE labelled_seq IS NOT NULL")}
    assert len(acknowledged) == 40 and set(acknowledged) <= ids
    total = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    assert total - len(ids) <= 1               # at most the one impression whose label was being written


@pytest.fixture
def phone(tiny, tiny_foundation, tmp_path):
    from fedpa.client.personal_store import generate_key_file

    key = generate_key_file(tmp_path / "store.key")
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", max_clients=8, feature_cache="none", split="loo",
                     negatives=49)
    dev = provision(cfg, [3], tmp_path / "phone")
    node = {"device-data": str(dev.path), "personal-store": str(tmp_path / "store"),
            "personal-store-key-file": str(key)}
    return cfg, dev, node


def test_logged_events_change_the_users_next_update(phone):
    from fedpa.client.runtime import get_runtime
    from fedpa.common.models import build_personal_model

    cfg, dev, node = phone
    state = build_personal_model(cfg).get_shared()
    msg = _train_message(replace(cfg, nodes_hold_data=True), state, [3])
    before, _ = _train_reply(msg, node)
    rt = get_runtime(dev.apply(replace(cfg, device_data=str(dev.path), foundation_digest=_digest(cfg.foundation))))
    base = len(rt.user(3).train)
    rng = np.random.default_rng(0)
    with EventLog(dev.path / LOG_FILE, user_id=dev.clients[3]) as log:
        last = _after_the_provisioned_days(dev)
        for i in range(30):
            eid = log.impression(int(rng.integers(0, 500)), timestamp_ms=last + 60_000 * i)
            if i < 20:
                log.label(eid, effective_view=int(i % 3 == 0))          # 10 are still waiting for feedback
    assert len(rt.user(3).train) == base + 20
    after, _ = _train_reply(msg, node)
    assert max(float(np.abs(after[k] - before[k]).max()) for k in before) > 1e-6


def test_a_negative_pool_samples_the_provisioned_negatives_and_keeps_every_logged_row(tiny, tiny_foundation,
                                                                                     tmp_path):
    from fedpa.client.runtime import get_runtime

    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", max_clients=8, feature_cache="none", split="loo",
                     negatives=49, negative_pool=3)
    dev = provision(cfg, [3], tmp_path / "phone")
    rt = get_runtime(dev.apply(replace(cfg, device_data=str(dev.path), foundation_digest=_digest(cfg.foundation))))
    positives = int((rt.user(3).train.labels[:, 0] == 1).sum())
    with EventLog(dev.path / LOG_FILE, user_id=dev.clients[3]) as log:
        last = _after_the_provisioned_days(dev)
        for i in range(20):
            log.label(log.impression(100 + i, timestamp_ms=last + 60_000 * i), effective_view=0)
    data = rt.user(3)
    train = rt.round_train(data, 2)
    assert len(train) == 5 * positives + 20          # a round's share of the split's pool, and the whole log
    assert np.array_equal(train.features[-20:].numpy(), data.train.features[-20:].numpy())


def test_recommendations_are_the_runs_scores_and_the_exported_model_ranks_alike(phone, tmp_path):
    from fedpa.client.on_device import DeviceRecommender
    from fedpa.client.personal_store import PersonalStore
    from fedpa.client.runtime import get_runtime, user_seed
    from fedpa.common.models import build_personal_model

    cfg, dev, node = phone
    state = build_personal_model(cfg).get_shared()
    _train_reply(_train_message(replace(cfg, nodes_hold_data=True), state, [3]), node)   # one round on the phone
    store = PersonalStore.from_key_file(node["personal-store"], node["personal-store-key-file"])
    rec = DeviceRecommender(dev.path, store)
    assert rec.private is not None and rec.round == 0
    # the run's scorer on the user's test case (1 positive + 49 negatives, all shown at one time)
    rt = get_runtime(dev.apply(replace(cfg, device_data=str(dev.path), foundation_digest=_digest(cfg.foundation))))
    data = rt.user(3)
    pm = rt.model
    pm.set_shared(state)
    pm.set_private(rec.private)
    want = pm.personalized_scores(data.train, [data.test], data.profile, rt.local_for(1),
                                  seed=user_seed(cfg.seed, 1, data.user_id))[0]
    candidates = data.test.items[:, 0].numpy()
    now = _test_time(rt, data.user_id)
    got = rec.scores(candidates, now)
    assert np.abs(got - want).max() <= 1e-6
    top = rec.recommend(candidates, k=10, now_ms=now)
    assert [v for v, _ in top] == [int(candidates[i]) for i in np.argsort(-want, kind="stable")[:10]]
    onnx = rec.export_onnx(tmp_path / "phone.onnx", candidates, now)
    assert np.abs(onnx - got).max() <= 1e-4
    assert set(int(candidates[i]) for i in np.argsort(-onnx)[:10]) == {v for v, _ in top}


def _test_time(rt, uid) -> int:
    from fedpa.client.runtime import user_splits

    s = user_splits(rt.cfg, rt.dataset, np.array([uid]), rt.lookups)
    return int(s.test.request_timestamp[0])


def _after_the_provisioned_days(dev) -> int:
    from datetime import date

    from fedpa.recdata.store import Dataset

    day = date.fromisoformat(Dataset(dev.data_dir).days[-1])
    return (day.toordinal() - date(1970, 1, 1).toordinal() + 1) * 86_400_000


def test_the_device_commands_log_events_and_recommend(phone):
    from typer.testing import CliRunner

    from fedpa.common.models import build_personal_model
    from fedpa.simulations.cli import app

    cfg, dev, node = phone
    runner = CliRunner()
    shown = runner.invoke(app, ["device", "log", "--device", str(dev.path), "--item", "17"])
    assert shown.exit_code == 0 and "event 1: impression of video 17" in shown.output, shown.output
    labelled = runner.invoke(app, ["device", "log", "--device", str(dev.path), "--event", "1",
                                   "--label", "effective_view=1"])
    assert labelled.exit_code == 0 and "1 events" in labelled.output
    bad = runner.invoke(app, ["device", "log", "--device", str(dev.path), "--event", "1", "--label", "like=yes"])
    assert bad.exit_code == 2 and "expected NAME=0 or NAME=1" in bad.output
    early = runner.invoke(app, ["device", "recommend", "--device", str(dev.path), "--candidates", "1,2,3"])
    assert early.exit_code == 2 and "no model yet" in early.output
    _train_reply(_train_message(replace(cfg, nodes_hold_data=True), build_personal_model(cfg).get_shared(), [3]),
                 node)
    ranked = runner.invoke(app, ["device", "recommend", "--device", str(dev.path), "--candidates", "5,6,7,8",
                                 "--k", "2", "--store", node["personal-store"],
                                 "--key-file", node["personal-store-key-file"]])
    assert ranked.exit_code == 0, ranked.output
    ranks = [line for line in ranked.output.splitlines() if line.strip().startswith("│ 1") or
             line.strip().startswith("│ 2")]
    assert len(ranks) == 2 and "no private state" not in ranked.output
