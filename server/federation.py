"""The server's round loop on Flower's Message API.

One round: sample clients, send each node the global shared state and the list
of its sampled clients, receive one summed contribution per node, validate it
(keys, shapes, dtypes, finite values, counts), drop what is invalid with the
reason logged, aggregate the rest as sums, evaluate, checkpoint, log a line of
metrics. A round with too few valid clients fails with a clear error and leaves
the last checkpoint as it was.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid

from fedpa.foundation.errors import FedpaError
from fedpa.foundation.model import count_parameters, load_foundation
from fedpa.recmodels.evaluation import MetricSums
from fedpa.recmodels.personalization import get_algorithm

from fedpa.common.aggregation import (InvalidUpdate, RoundFailed, apply_sums, expected_shapes, robust_sums, spec_from,
                          sum_updates, validate_update)
from fedpa.common.secagg.protocol import QuantConfig, SecAggError, split_sum
from .secagg import SecAggServer
from fedpa.common.secagg.transport import pack, unpack
from fedpa.common.config import FederationConfig
from fedpa.common.privacy import (add_noise, clamp_counts, distributed_share_std, event_multiplier, make_accountant, round_event,
                      sensitivity)
from .rundir import RunDir, plot_curves

log = logging.getLogger("fedpa.server")


def message_bytes(msg: Message) -> int:
    """Bytes of the serialized message (protobuf), i.e. what travels on the wire."""
    return message_to_proto(msg).ByteSize()


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict=OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def primary_metric(split: str) -> str:
    return "hr@10" if split == "loo" else "auc"


class Federation:
    def __init__(self, grid: Grid, cfg: FederationConfig, progress=None):
        self.grid = grid
        self.cfg = cfg
        self.algorithm = get_algorithm(cfg.algorithm)
        if self.algorithm.centralized:
            raise FedpaError("'centralized' is not a federation: run it with `fedpa simulate` (pooled training)")
        self.run = RunDir(cfg.run_dir)
        self.progress = progress or (lambda *a, **k: None)
        foundation = load_foundation(cfg.foundation)
        foundation_params = count_parameters(foundation)  # before peft injects the adapters into it
        self.model = cfg.personal_model(foundation=foundation)
        self.spec = spec_from(self.model.shared_spec())
        self.state = self.model.get_shared()
        self.model_sizes = {
            "foundation_params": foundation_params,
            "shared_params": int(sum(np.prod(t.shape) for t in self.spec)),
            "private_params_per_user": int(sum(v.size for v in self.model.initial_private.values())),
        }
        self.run_config = {**cfg.to_run_config()}
        self.run_id = ""            # set when the run starts (or is resumed): personal-store versions carry it
        self.privacy_events: list[tuple[float, int]] = []

    # ------------------------------------------------------------------ messaging

    def _send(self, msgs: list[Message]) -> list[Message]:
        return list(self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout))

    def _content(self, round_: int, clients: list[int] | None = None, final: bool = False,
                 with_state: bool = True, cohort: int = 0) -> RecordDict:
        rd = RecordDict({"run": ConfigRecord(self.run_config),
                         "round": ConfigRecord({"round": round_, "clients": clients or [], "final": final,
                                                "cohort": cohort, "run-id": self.run_id})})
        if with_state and self.state:
            rd["arrays"] = to_record(self.state)
        return rd

    def discover(self) -> dict[int, list[int]]:
        """Wait for the nodes, then ask each which clients it serves."""
        deadline = time.time() + self.cfg.round_timeout
        ids, last, stable_since = [], None, time.time()
        while time.time() < deadline:
            ids = sorted(self.grid.get_node_ids())
            if ids != last:
                last, stable_since = ids, time.time()
            if len(ids) >= self.cfg.min_nodes and time.time() - stable_since >= 0.5:
                break
            time.sleep(0.1)
        if len(ids) < self.cfg.min_nodes:
            raise RoundFailed(f"only {len(ids)} node(s) connected, {self.cfg.min_nodes} needed")
        msgs = [Message(content=RecordDict({"run": ConfigRecord(self.run_config)}), message_type=MessageType.QUERY,
                        dst_node_id=n, group_id="discover") for n in ids]
        nodes: dict[int, list[int]] = {}
        num_clients = None
        failures = []
        for rep in self._send(msgs):
            src = rep.metadata.src_node_id
            if rep.has_error():
                failures.append(_reason(rep))
                log.warning("node %s failed to start: %s", src, failures[-1])
                continue
            info = rep.content["info"]
            nodes[src] = [int(c) for c in info["clients"]]
            num_clients = int(info["num-clients"])
        if not nodes:
            raise RoundFailed("no node answered the discovery query"
                              + (f" (e.g. {failures[0]})" if failures else ""))
        self.num_clients = num_clients
        served = sorted(c for cs in nodes.values() for c in cs)
        if served != list(range(num_clients)):
            missing = sorted(set(range(num_clients)) - set(served))
            log.warning("%d of %d clients have no node (e.g. %s): they will not take part",
                        len(missing), num_clients, missing[:5])
        self.client_node = {c: n for n, cs in nodes.items() for c in cs}
        self.accountant = None
        if self.cfg.dp_noise_multiplier > 0 and self.algorithm.communicates:
            self.dp_delta = self.cfg.dp_delta or 1.0 / num_clients
            self.accountant = make_accountant(num_clients, self.dp_delta)
        self.nodes = nodes
        return nodes

    def _ordered(self, replies: list[Message]) -> list[Message]:
        """Replies in the order of the clients their nodes serve: float sums then do not depend on
        which node answered first, so a rerun with the same seed gives identical numbers."""
        return sorted(replies, key=lambda r: min(self.nodes.get(r.metadata.src_node_id) or [math.inf]))

    # ------------------------------------------------------------------ rounds

    def _dp_event(self, sample_size: int):
        return round_event(event_multiplier(self.cfg.dp_mode, self.cfg.dp_noise_multiplier), max(1, sample_size),
                           self.num_clients)

    def sample(self, round_: int) -> list[int]:
        clients = sorted(self.client_node)
        k = min(self.cfg.sample_size(self.num_clients), len(clients))
        rng = np.random.default_rng([self.cfg.seed, round_])
        return sorted(rng.choice(clients, size=k, replace=False).tolist())

    def train_round(self, round_: int, final: bool) -> dict[str, Any]:
        selected = self.sample(round_)
        by_node: dict[int, list[int]] = {}
        for c in selected:
            by_node.setdefault(self.client_node[c], []).append(c)
        msgs = [Message(content=self._content(round_, cs, final, cohort=len(selected)), message_type=MessageType.TRAIN,
                        dst_node_id=n, group_id=str(round_)) for n, cs in by_node.items()]
        down = [message_bytes(m) for m in msgs]
        replies = self._send(msgs)
        answered = {r.metadata.src_node_id for r in replies}
        problems = [f"node {n}: no reply within {self.cfg.round_timeout:g}s ({len(by_node[n])} client(s))"
                    for n in by_node if n not in answered]
        valid, up, users_ok, loss_sum, n_ex = [], [], 0, 0.0, 0
        trained: dict[int, int] = {}
        for rep in self._ordered(replies):
            src = rep.metadata.src_node_id
            up.append(message_bytes(rep))
            if rep.has_error():
                problems.append(f"node {src}: client error: {_reason(rep)}")
                continue
            try:
                m = rep.content["metrics"]
                reasons = [r for r in rep.content["excluded"]["reasons"] if r] if "excluded" in rep.content else []
                problems += [f"node {src}: {r}" for r in reasons]
                plain = self.algorithm.communicates and not self.cfg.secagg
                if plain:
                    if "arrays" not in rep.content:
                        raise InvalidUpdate("reply has no 'arrays' record")
                    update = from_record(rep.content["arrays"])
                    validate_update(update, self.spec)
                n_users = min(int(m["num-users"]), len(by_node.get(src, [])))
                if plain and float(update["count/global"][0]) != n_users:
                    raise InvalidUpdate(f"count/global {float(update['count/global'][0]):g} does not match "
                                        f"num-users {n_users}")
                users_ok += n_users
                trained[src] = n_users
                if plain:
                    valid.append(update)
                loss_sum += float(m["loss-sum"])
                n_ex += int(m["num-examples"])
            except (InvalidUpdate, KeyError, TypeError, ValueError) as e:
                problems.append(f"node {src}: excluded ({len(by_node.get(src, []))} client(s)): {e}")
        for p in problems:
            log.warning("round %d: %s", round_, p)
        secagg_bytes = 0.0
        if self.cfg.secagg and self.algorithm.communicates:
            sums, included, secagg_bytes = self._secure_sum(round_, [n for n, k in trained.items() if k > 0], problems,
                                                            cohort=len(selected))
            users_ok = sum(trained[n] for n in included)
        need = math.ceil(self.cfg.min_reply_fraction * len(selected))
        if users_ok < need:
            raise RoundFailed(f"round {round_}: only {users_ok} of {len(selected)} sampled clients returned a valid "
                              f"update ({need} needed); last checkpoint kept. Problems: " + "; ".join(problems[:5]))
        if self.algorithm.communicates and (self.cfg.secagg or valid):
            if not self.cfg.secagg:
                if self.cfg.robust_aggregation != "none" or self.cfg.norm_bound > 0:
                    crowded = [n for n, cs in by_node.items() if len(cs) > 1]
                    if crowded:
                        raise RoundFailed(f"round {round_}: robust aggregation needs one user per node, node "
                                          f"{crowded[0]} served {len(by_node[crowded[0]])} (simulate with "
                                          "--cohort-size 1); last checkpoint kept")
                    sums = robust_sums(valid, self.spec, method=self.cfg.robust_aggregation,
                                       trim_fraction=self.cfg.trim_fraction, norm_bound=self.cfg.norm_bound)
                else:
                    sums = sum_updates(valid, self.spec)
            if self.cfg.dp_noise_multiplier > 0:
                if self.cfg.dp_mode == "central":
                    std = self.cfg.dp_noise_multiplier * sensitivity(self.cfg.dp_clip, self.model.count_terms)
                    sums = add_noise(sums, self.spec, std)
                elif self.cfg.dp_mode == "distributed":  # the clients' noise is already in the sum
                    sums = clamp_counts(sums, self.spec)
                event = self._dp_event(len(selected))
                self.accountant.compose(event)
                self.privacy_events.append((event.noise_multiplier, event.sample_size))
            self.state = apply_sums(self.state, sums, self.spec, row_prior=self.cfg.item_bias_prior)
        per_client_down = float(np.mean(down)) if down else 0.0
        per_client_up = (float(np.mean(up)) if up else 0.0) + secagg_bytes
        return {"selected": len(selected), "clients_ok": users_ok, "train_loss": loss_sum / max(n_ex, 1),
                "problems": problems,
                "bytes_down_per_client": per_client_down if self.algorithm.communicates else 0.0,
                "bytes_up_per_client": per_client_up if self.algorithm.communicates else 0.0}

    def _secure_sum(self, round_: int, participants: list[int], problems: list[str], cohort: int):
        """SecAgg+ over the nodes that trained: four message exchanges, then only the sum is known.
        Returns (named sums, nodes included, SecAgg bytes sent per participant)."""
        shapes = expected_shapes(self.spec)
        dim = int(sum(np.prod(s) for s in shapes.values()))
        # a node's vector is a sum over its users: counts reach the cohort size, so the fixed-point
        # range must cover it (one more bit per doubling)
        biggest = max([len(self.nodes[n]) for n in participants] or [1])
        reach = 2.0 * biggest
        if self.cfg.dp_noise_multiplier > 0 and self.cfg.dp_mode == "distributed":
            # ... and the clients' noise: 8 std of a node's share stays inside the range (clipping it
            # would remove noise)
            share = distributed_share_std(self.cfg.dp_noise_multiplier, self.cfg.dp_clip,
                                          self.model.count_terms, self.cfg.min_reply_fraction, cohort)
            reach += 8.0 * share * math.sqrt(biggest)
        clip = float(2 ** math.ceil(math.log2(max(8.0, reach))))
        try:
            sa = SecAggServer(participants, dim, round_id=round_, quant=QuantConfig(clip=clip))
            requests = sa.advertise_requests()
            sent = {n: 0 for n in participants}
            for receive in (sa.receive_keys, sa.receive_shares, sa.receive_masked, sa.receive_unmask):
                msgs = [Message(content=pack(req), message_type=MessageType.TRAIN, dst_node_id=n,
                                group_id=f"{round_}-secagg") for n, req in requests.items()]
                pairs = []
                for rep in self._ordered(self._send(msgs)):
                    src = rep.metadata.src_node_id
                    if rep.has_error():
                        problems.append(f"node {src}: secure aggregation: {_reason(rep)}")
                        continue
                    sent[src] = sent.get(src, 0) + message_bytes(rep)
                    pairs.append((src, unpack(rep.content)))
                requests = receive(pairs)
            result = requests
        except SecAggError as e:
            raise RoundFailed(f"round {round_}: secure aggregation failed: {e}; last checkpoint kept") from None
        problems += [f"secure aggregation: {r}" for r in sa.reasons]
        sums = split_sum(result.dequantize(), shapes)
        return sums, result.included, float(np.mean([sent[n] for n in result.included])) if result.included else 0.0

    def evaluate(self, round_: int, final: bool = False) -> dict[str, dict[str, float]]:
        """Validation and test metrics; in the final evaluation also a membership-inference attack
        against every user's personalized model (`recmodels.evaluation.membership_attack`)."""
        msgs = [Message(content=self._content(round_, final=final), message_type=MessageType.EVALUATE,
                        dst_node_id=n, group_id=f"eval-{round_}") for n in self.nodes]
        val, test, mia = MetricSums(), MetricSums(), MetricSums()
        users = 0
        for rep in self._ordered(self._send(msgs)):
            src = rep.metadata.src_node_id
            if rep.has_error():
                log.warning("round %d evaluation: node %s: %s", round_, src, _reason(rep))
                continue
            try:
                arrays = from_record(rep.content["arrays"])
                v, t = MetricSums(arrays["val"]), MetricSums(arrays["test"])
                m = MetricSums(arrays["mia"]) if final else MetricSums()
                if not (np.isfinite(v.v).all() and np.isfinite(t.v).all() and np.isfinite(m.v).all()):
                    raise ValueError("non-finite metric sums")
                n = min(int(rep.content["metrics"]["num-users"]), len(self.nodes.get(src, [])))
            except (KeyError, TypeError, ValueError) as e:
                log.warning("round %d evaluation: node %s: reply dropped: %s", round_, src, e)
                continue
            val += v
            test += t
            mia += m
            users += n
        out = {"val": val.finalize(), "test": test.finalize(), "users": users}
        if final:
            attack = mia.finalize()
            out["membership_inference"] = {"auc": attack["auc"], "per_user_auc": attack["gauc"]}
        return out

    # settings that may differ between an interrupted run and its resumption
    RESUMABLE_CHANGES = frozenset({"resume", "run-dir", "min-nodes", "round-timeout", "feature-cache",
                                   "cohort-engine"})

    def _start(self) -> tuple[int, list[dict], float]:
        """(first round to train, history so far, wall seconds so far): a fresh run evaluates round 0;
        a resumed one restores the last checkpoint and drops metrics of rounds after it."""
        cfg = self.cfg
        if not cfg.resume:
            self.run_id = uuid.uuid4().hex
            self.run.write_config({**cfg.to_run_config(), "model": self.model_sizes})
            self.discover()
            ev = self.evaluate(0, final=(cfg.num_rounds == 0))
            rec = {"round": 0, "eval": ev, "wall_s": 0.0}
            self.run.append_metrics(rec)
            self.progress(0, cfg.num_rounds, ev)
            return 1, [rec], 0.0
        written = self.run.read_config()
        changed = cfg.differences(written, self.RESUMABLE_CHANGES)
        if changed:
            now = cfg.to_run_config()
            raise FedpaError(f"{cfg.run_dir}: cannot resume with a different configuration "
                             f"({', '.join(f'{k}: {written.get(k)!r} -> {now[k]!r}' for k in changed[:5])})")
        last, state, meta = self.run.load_checkpoint()
        missing = sorted(set(self.state) - set(state))
        if missing or meta.get("algorithm") != cfg.algorithm:
            raise FedpaError(f"{cfg.run_dir}: the checkpoint of round {last} does not match this configuration "
                             f"({'missing ' + missing[0] if missing else 'algorithm ' + str(meta.get('algorithm'))})")
        self.state = {k: state[k] for k in self.state}
        self.run_id = meta.get("run-id") or uuid.uuid4().hex
        (self.run.path / "summary.json").unlink(missing_ok=True)  # rewritten when the resumed run ends
        self.discover()
        if self.accountant is not None:
            for multiplier, sample_size in meta.get("privacy_events", []):
                self.accountant.compose(round_event(multiplier, sample_size, self.num_clients))
        self.privacy_events = [tuple(e) for e in meta.get("privacy_events", [])]
        self.run.truncate_metrics(last)
        history = self.run.read_metrics()
        log.info("resuming %s after round %d", cfg.run_dir, last)
        self.progress(last, cfg.num_rounds, None)
        return last + 1, history, float(history[-1].get("wall_s", 0.0)) if history else 0.0

    def run_rounds(self) -> dict[str, Any]:
        cfg = self.cfg
        self.privacy_events: list[tuple[float, int]] = []
        first, history, wall_before = self._start()
        t0 = time.time() - wall_before
        self.stopped_by_budget = None
        for r in range(first, cfg.num_rounds + 1):
            if self.accountant is not None and cfg.dp_max_epsilon > 0 and self.accountant.would_exceed(
                    self._dp_event(len(self.sample(r))), cfg.dp_max_epsilon):
                log.warning("round %d would exceed the privacy budget ε = %g: training stops", r, cfg.dp_max_epsilon)
                self.stopped_by_budget = r
                break
            tr = time.time()
            stats = self.train_round(r, final=(r == cfg.num_rounds))
            rec = {"round": r, **stats, "train_s": time.time() - tr}
            if self.accountant is not None:
                rec["epsilon"] = self.accountant.get_epsilon(self.dp_delta)
                rec["delta"] = self.dp_delta
            if r % cfg.eval_every == 0 or r == cfg.num_rounds:
                rec["eval"] = self.evaluate(r, final=(r == cfg.num_rounds))
            rec["wall_s"] = time.time() - t0
            # metrics first, then the checkpoint: a kill in between leaves a line that resuming drops
            self.run.append_metrics(rec)
            self.run.save_checkpoint(r, self.state, {
                "algorithm": cfg.algorithm, "run-id": self.run_id,
                # the accountant's whole state: the Gaussian events composed so far
                "privacy_events": [list(e) for e in self.privacy_events],
                # sampling and every client's seed derive from (seed, round): no RNG stream to save
                "sampling": "numpy default_rng([seed, round])"})
            self.run.keep_last_checkpoints(2)
            history.append(rec)
            self.progress(r, cfg.num_rounds, rec.get("eval"))
        return self.summarize(history, time.time() - t0)

    def summarize(self, history: list[dict], wall: float) -> dict[str, Any]:
        privacy = None
        if self.accountant is not None:
            privacy = {"epsilon": self.accountant.get_epsilon(self.dp_delta), "delta": self.dp_delta,
                       "mode": self.cfg.dp_mode,
                       "epsilon_is": "per user, local reports" if self.cfg.dp_mode == "local" else "client-level, released sums",
                       "noise_multiplier": self.cfg.dp_noise_multiplier, "clip": self.cfg.dp_clip,
                       "rounds_accounted": self.accountant.num_releases,
                       "stopped_by_budget_at_round": self.stopped_by_budget}
        sizes = [len(c) for c in getattr(self, "nodes", {}).values()] or [0]
        most = max(sizes)
        cohorts = {"nodes": len(sizes), "users_per_node_max": most,
                   "engine": (self.cfg.cohort_engine if most > 1 else "one user per node"),
                   # what secure aggregation hides behind its sum: one user's update, or a node's sum
                   "secagg_participant": "user" if most <= 1 else f"node (sum of up to {most} users)"}
        return write_summary(self.run, self.cfg, history, wall, self.model_sizes, privacy, cohorts)


def write_summary(run: RunDir, cfg: FederationConfig, history: list[dict], wall: float,
                  model_sizes: dict, privacy: dict | None = None, cohorts: dict | None = None) -> dict[str, Any]:
    key = primary_metric(cfg.split)
    evals = [h for h in history if "eval" in h]
    best = max(evals, key=lambda h: _num(h["eval"]["val"].get(key)))
    trained = [h for h in history if h.get("round", 0) > 0 and "bytes_up_per_client" in h]
    summary = {
        "algorithm": cfg.algorithm, "seed": cfg.seed, "split": cfg.split, "rounds": cfg.num_rounds,
        "selection_metric": f"val {key}", "best_round": best["round"],
        "val": best["eval"]["val"], "test": best["eval"]["test"],
        "final": evals[-1]["eval"], "wall_s": wall,
        "seconds_per_round": wall / max(cfg.num_rounds, 1),
        "bytes_down_per_client_round": float(np.mean([h["bytes_down_per_client"] for h in trained])) if trained else 0.0,
        "bytes_up_per_client_round": float(np.mean([h["bytes_up_per_client"] for h in trained])) if trained else 0.0,
        "model": model_sizes,
        "clients": evals[-1]["eval"].get("users"),
        "secure_aggregation": cfg.secagg,
        "cohorts": cohorts,
        "differential_privacy": privacy,
        "membership_inference": evals[-1]["eval"].get("membership_inference"),
    }
    run.write_summary(summary)
    plot_curves(run)
    return summary


def _num(x) -> float:
    return -math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _reason(rep: Message) -> str:
    r = str(rep.error.reason).strip()
    return r.splitlines()[-1].rstrip("'>")[:300] if r else f"error code {rep.error.code}"
