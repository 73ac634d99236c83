"""What a train, evaluate or query message runs on a node: local training of the users it serves, their
scoring, and their private state (context.state within a run, the encrypted personal store across runs).

`client.app` imports this module only for those messages: the SecAgg+ phases between them need neither
torch nor the models, which keeps each phase's ClientApp process small and quick to start on a device.
"""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedpa.client.node_state import NodePrivateStates
from fedpa.client.on_device import keep_global_state
from fedpa.client.personal_store import PersonalStore, open_store
from fedpa.client.runtime import ClientRuntime, get_runtime, user_seed
from fedpa.common.aggregation import count_keys, expected_shapes, spec_from
from fedpa.common.config import FederationConfig
from fedpa.common.discrete_noise import DistributedNoise
from fedpa.common.privacy import cohort_contribution, distributed_share, private_contribution, sensitivity
from fedpa.common.records import arrays_to_record, record_to_arrays
from fedpa.common.secagg import PHASE_ADVERTISE, concat_update
from fedpa.common.secagg.transport import EVAL_SLOT, KEYS, SETUP, TRAIN_SLOT, detach, pack
from fedpa.foundation.errors import FedpaError
from fedpa.recmodels.evaluation import MetricSums, membership_attack

log = logging.getLogger("fedpa.client")


def dp_settings(cfg: FederationConfig, pm, cohort: int) -> dict:
    """The keyword arguments of `common.privacy.private_contribution` for this run and round."""
    return dict(noise_multiplier=cfg.dp_noise_multiplier, clip=cfg.dp_clip, mode=cfg.dp_mode,
                n_count_terms=pm.count_terms, min_reply_fraction=cfg.min_reply_fraction,
                cohort=cohort)


def _node_clients(context: Context, rt: ClientRuntime) -> list[int]:
    return rt.node_clients(int(context.node_config.get("partition-id", 0)),
                           int(context.node_config.get("num-partitions", 1)))


def _private_state(states: NodePrivateStates, rt: ClientRuntime, uid: int, run_id: str = "",
                   before_round: int | None = None, cfg: FederationConfig | None = None,
                   store: PersonalStore | None = None) -> dict[str, np.ndarray] | None:
    """The user's private state: from this node's context within a run, else from the personal store.
    Training round r of run ``run_id`` wants the state from before r: a resumed run redoing r skips
    what the interrupted attempt saved at r (the store keeps the version before it)."""
    kept = states.get(uid)
    if kept is not None:
        return kept
    cfg = cfg or rt.cfg
    store = store if store is not None else _store(cfg)  # callers looping over users open it once
    if store is not None:
        def redone(meta: dict) -> bool:
            return (before_round is not None and bool(run_id) and meta.get("run-id") == run_id
                    and int(meta.get("round", 0)) >= before_round)
        loaded = store.load(uid, skip=redone)
        if loaded is not None:
            arrays, meta = loaded
            if meta.get("algorithm") == cfg.algorithm:
                return arrays
            log.warning("personal state of user %s was saved by '%s', not '%s': starting fresh",
                        uid, meta.get("algorithm"), cfg.algorithm)
    return None


def _store(cfg: FederationConfig) -> PersonalStore | None:
    return open_store(cfg.personal_store, cfg.personal_store_key_file)


def query(msg: Message, context: Context, cfg: FederationConfig) -> Message:
    rt = get_runtime(cfg)
    clients = list(_node_clients(context, rt))
    info = ConfigRecord({"clients": clients, "num-clients": rt.num_clients, "pid": os.getpid(),
                         "ray-node": _ray_node()})
    return Message(content=RecordDict({"info": info}), reply_to=msg)


def _ray_node() -> str:
    """The Ray node this process runs on, when it is a simulation's Ray actor ("" elsewhere: a device never
    imports Ray for this)."""
    ray = sys.modules.get("ray")
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""
    except Exception:   # noqa: BLE001 - a diagnostic only
        return ""


def train(msg: Message, context: Context, cfg: FederationConfig) -> Message:
    """A train instruction: the selected users train; the reply (or, with SecAgg, the vector kept for the
    phases that follow) holds the sum of their contributions."""
    rnd = msg.content["round"]
    rt = get_runtime(cfg)
    round_ = int(rnd["round"])
    served = _node_clients(context, rt)
    wanted = [int(c) for c in rnd["clients"]]
    foreign = sorted(set(wanted) - set(served))
    if foreign:
        raise ValueError(f"clients {foreign[:5]} are not served by this node "
                         + (f"(serves {served[0]}..{served[-1]})" if served else "(it serves none)"))
    pm = rt.model
    global_state = record_to_arrays(msg.content["arrays"]) if "arrays" in msg.content else {}
    if rt.device is not None:   # what the device recommends with until the next round
        keep_global_state(rt.device, cfg, global_state, round_ - 1)
    spec = spec_from(pm.shared_spec())
    store = _store(cfg)
    if bool(rnd.get("resumed", False)) and store is None and pm.initial_private:
        raise FedpaError("this run was resumed, and this node kept its users' private state in memory only: "
                         "training on would restart every user's private adapter (give the node a personal "
                         "store, personal-store in its node config or the run config)")
    job = _TrainJob(cfg, rt, context, store, round_, str(rnd.get("run-id", "")), global_state, spec,
                    dp_settings(cfg, pm, int(rnd["cohort"])))
    if _vectorized(cfg, rt, wanted):
        job.train_vectorized(wanted)
    else:
        job.train_one_by_one(wanted)
    job.states.flush()
    total, loss_sum, n_examples, excluded = job.total, job.loss_sum, job.n_examples, job.excluded
    contributed = len(wanted) - len(excluded)
    if cfg.dp_noise_multiplier > 0:
        # under DP only the noised sums are released: the loss and example counts (per user, with one user per
        # node) stay on the node, and excluded users are counted, not named (log them here instead)
        for why in excluded:
            log.warning("round %d: %s", round_, why)
        metrics = MetricRecord({"num-users": contributed})
        excluded = [f"{len(excluded)} user(s) left out (reasons kept on the node under DP)"] if excluded else []
    else:
        metrics = MetricRecord({"num-examples": int(n_examples), "num-users": contributed,
                                "loss-sum": float(loss_sum)})
    content = RecordDict({"metrics": metrics, "excluded": ConfigRecord({"reasons": excluded or [""]})})
    if rt.algorithm.communicates:
        if total is None:  # every user excluded: an empty contribution (zero counts)
            total = {k: np.zeros(s, np.float32) for k, s in count_keys(spec).items()}
        if cfg.secagg:
            # kept on the node; only its masked form leaves, in the SecAgg+ phases that follow
            vector = concat_update(total, expected_shapes(spec))
            held = {"v": vector}
            if cfg.dp_noise_multiplier > 0 and cfg.dp_mode == "distributed" and contributed:
                # this node's users' share of the noise, added in fixed point when the vector is masked
                held["dp-noise"] = DistributedNoise(
                    cfg.dp_noise_multiplier, sensitivity(cfg.dp_clip, pm.count_terms),
                    distributed_share(contributed, cfg.min_reply_fraction, int(rnd["cohort"]))).to_array()
            hold_for_secure_sum(msg, context, content, held)
        else:
            content["arrays"] = arrays_to_record(total)
    return Message(content=content, reply_to=msg)


def hold_for_secure_sum(msg: Message, context: Context, content: RecordDict, held: dict[str, np.ndarray],
                        slot: str = TRAIN_SLOT) -> None:
    """Keep ``held`` (the vector and its noise share) on the node for the SecAgg+ phases of the secure sum in
    ``slot``, and answer the setup the request carries (this node's public keys) in the reply ``content``."""
    context.state[f"{slot}-vector"] = arrays_to_record(held)
    setup = detach(msg.content, SETUP)
    if setup is None:   # a server that sends the setup as a message of its own
        return
    if setup.get("phase") != PHASE_ADVERTISE:
        raise FedpaError(f"the SecAgg+ request a {msg.metadata.message_type} message carries is phase "
                         f"{setup.get('phase')!r}; only the setup (phase {PHASE_ADVERTISE}) rides along")
    from fedpa.client.app import secagg_reply

    pack(secagg_reply(setup, context, slot), into=content, slot=KEYS)


class _TrainJob:
    """One train instruction for this node's selected users: their contributions summed, their private
    states kept (context.state and the personal store), the users left out and why."""

    def __init__(self, cfg: FederationConfig, rt: ClientRuntime, context: Context, store: PersonalStore | None,
                 round_: int, run_id: str, global_state: dict[str, np.ndarray], spec, dp: dict):
        self.cfg, self.rt, self.context, self.store = cfg, rt, context, store
        self.round, self.run_id, self.global_state, self.spec, self.dp = round_, run_id, global_state, spec, dp
        self.local = rt.local_for(round_)
        self.total: dict[str, np.ndarray] | None = None
        self.loss_sum = self.n_examples = 0.0
        self.excluded: list[str] = []
        self.states = NodePrivateStates(context.state)   # written once the job's training is done (`flush`)

    def _private_before(self, uid: int) -> dict[str, np.ndarray] | None:
        return _private_state(self.states, self.rt, uid, self.run_id, before_round=self.round, cfg=self.cfg,
                              store=self.store)

    def _keep_private(self, uid: int, private: dict[str, np.ndarray]) -> None:
        if private:
            self.states.put(uid, private)
            if self.store is not None:
                def redone(meta: dict) -> bool:     # what an interrupted attempt at this round saved
                    return bool(self.run_id) and meta.get("run-id") == self.run_id and \
                        int(meta.get("round", 0)) >= self.round
                self.store.save(uid, private, {"algorithm": self.cfg.algorithm, "round": self.round,
                                               "foundation": self.cfg.foundation, "run-id": self.run_id},
                                supersedes=redone)

    def _add(self, contribution: dict[str, np.ndarray]) -> None:
        self.total = contribution if self.total is None else {k: self.total[k] + contribution[k] for k in self.total}

    def _count(self, loss: float, n: float) -> None:
        if n:
            self.loss_sum += loss * n
            self.n_examples += n

    def train_one_by_one(self, clients: list[int]) -> None:
        rt, pm = self.rt, self.rt.model
        for c in clients:
            data = rt.user(c)
            train = rt.round_train(data, self.round)
            if self.global_state:
                pm.set_shared(self.global_state)
            pm.set_private(self._private_before(data.user_id))
            stats = pm.train_user(train, data.profile, self.local,
                                  seed=user_seed(self.cfg.seed, self.round, data.user_id), exclude=held_out(data))
            private = pm.get_private()
            if not all(np.all(np.isfinite(v)) for v in private.values()):
                self.excluded.append(f"user {data.user_id}: non-finite private state after training "
                                     "(kept the previous one)")
                continue
            if rt.algorithm.communicates:
                local = pm.get_shared()
                delta = {k: local[k] - self.global_state[k] for k in local}
                rows = pm.touched_rows(train)
                for name, (r, g, h) in (pm.item_statistics.items() if pm.item_bias_newton else ()):
                    delta[name] = np.zeros_like(local[name])      # item-bias-update newton: statistics, not steps
                    delta[name][r] = g
                    rows[name] = np.zeros(len(local[name]), np.float32)
                    rows[name][r] = h
                if not all(np.all(np.isfinite(v)) for v in delta.values()):
                    self.excluded.append(f"user {data.user_id}: non-finite update")
                    continue
                self._add(private_contribution(delta, self.spec, pm.groups_of(data.profile), rows=rows, **self.dp))
            self._keep_private(data.user_id, private)
            self._count(stats["loss"], stats["n"])

    def train_vectorized(self, clients: list[int]) -> None:
        """All users at once (recmodels.cohort): the same training, per-user clipping and noise."""
        from fedpa.recmodels.cohort import CohortUser  # several users a node: never on a one-user device

        rt = self.rt
        users = [rt.user(c) for c in clients]
        cohort = [CohortUser(rt.round_train(d, self.round), d.profile, self._private_before(d.user_id),
                             user_seed(self.cfg.seed, self.round, d.user_id), d.user_id) for d in users]
        for chunk in rt.cohort_engine.train(cohort, self.global_state, self.local):
            for k, i in enumerate(chunk.users):
                uid = users[i].user_id
                if not chunk.finite[k]:
                    self.excluded.append(f"user {uid}: non-finite private state or update after training "
                                         "(kept the previous one)")
                    continue
                self._keep_private(uid, chunk.private[k])
                self._count(float(chunk.loss[k]), float(chunk.n[k]))
            if rt.algorithm.communicates:
                self._add(cohort_contribution(chunk.deltas, len(chunk.users), self.spec, keep=chunk.finite,
                                              rows=chunk.rows, **self.dp))


def held_out(data) -> np.ndarray:
    """The items of the user's validation and test positives: what a model sampling its own negatives must not
    draw (on a device, the user's whole log is known; only these rows are kept out of training)."""
    return np.concatenate([d.items[d.labels[:, 0] == 1, 0].numpy() for d in (data.val, data.test)
                           if d.items is not None]) if data.val.items is not None else np.zeros(0, np.int64)


def _vectorized(cfg: FederationConfig, rt: ClientRuntime, users) -> bool:
    """Train / score this node's users with the cohort engine (several users, an adapted model)."""
    return cfg.cohort_engine == "vectorized" and len(users) > 1 and rt.model.model is not None


def evaluate(msg: Message, context: Context, cfg: FederationConfig) -> Message:
    """Every user this node serves, scored on validation and test (and, in the final round, the membership
    attack): metric sums, never a score."""
    rt = get_runtime(cfg)
    pm = rt.model
    round_ = int(msg.content["round"]["round"])
    local = rt.local_for(round_)  # PFedRec fine-tunes before scoring at this round's learning rate
    global_state = record_to_arrays(msg.content["arrays"]) if "arrays" in msg.content else {}
    if rt.device is not None:
        keep_global_state(rt.device, cfg, global_state, round_)
    attack = bool(msg.content["round"].get("final", False))
    store = _store(cfg)
    val, test, mia = MetricSums(), MetricSums(), MetricSums()
    users = 0
    clients = list(_node_clients(context, rt))
    states = NodePrivateStates(context.state)
    vectorized = _vectorized(cfg, rt, clients)
    if vectorized:
        from fedpa.recmodels.cohort import CohortUser

        data_of = [rt.user(c) for c in clients]
        cohort = [CohortUser(rt.round_train(d, round_), d.profile,
                             _private_state(states, rt, d.user_id, cfg=cfg, store=store),
                             user_seed(cfg.seed, round_, d.user_id), d.user_id) for d in data_of]
        all_scores = rt.cohort_engine.predict(
            cohort, [[d.val, d.test] + ([d.train] if attack else []) for d in data_of], global_state, local)
    for j, c in enumerate(clients):
        data = rt.user(c)
        if vectorized:
            scores = all_scores[j]
        else:
            if global_state:
                pm.set_shared(global_state)
            pm.set_private(_private_state(states, rt, data.user_id, cfg=cfg, store=store))
            splits = [data.val, data.test] + ([data.train] if attack else [])
            scores = pm.personalized_scores(rt.round_train(data, round_), splits, data.profile, local,
                                            seed=user_seed(cfg.seed, round_, data.user_id))
        ref = rt.reference(data) or [None, None]
        rows = len(data.train)
        val.add_user(data.val.labels[:, 0].numpy(), scores[0], data.group_size, reference=ref[0], training_rows=rows)
        test.add_user(data.test.labels[:, 0].numpy(), scores[1], data.group_size, reference=ref[1],
                      training_rows=rows)
        if attack:
            mia.add_user(*membership_attack(data.train.labels[:, 0].numpy(), scores[2],
                                            data.test.labels[:, 0].numpy(), scores[1]))
        users += 1
    if cfg.secagg:
        # kept on the node; the server learns only the sum over nodes, in the SecAgg+ phases that follow
        vector = np.concatenate([val.v, test.v] + ([mia.v] if attack else [])).astype(np.float64)
        content = RecordDict({"metrics": MetricRecord({"num-users": users})})
        hold_for_secure_sum(msg, context, content, {"v": vector}, slot=EVAL_SLOT)
        return Message(content=content, reply_to=msg)
    arrays = {"val": val.v, "test": test.v, **({"mia": mia.v} if attack else {})}
    content = RecordDict({"arrays": arrays_to_record(arrays),
                          "metrics": MetricRecord({"num-users": users, "num-examples": int(val.get("n"))})})
    return Message(content=content, reply_to=msg)
