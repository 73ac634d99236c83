"""The server's round loop on Flower's Message API.

A training round is a sequence of named steps, each a method that can be read and tested alone:
`sample` the clients, `configure` one train message per node, `collect` the replies (validating each:
keys, shapes, dtypes, finite values, counts; what is invalid is dropped with its reason), `secure_sum`
under SecAgg+, `check_quorum`, `aggregate` the plain updates (sums, or robust per-user statistics),
`add_noise` (central DP), `account` the round's privacy event, `apply` the sums to the shared state. Then
the round is evaluated, checkpointed and logged. A round with too few valid clients fails with a clear
error and leaves the last checkpoint as it was.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpa.common.aggregation import (
    InvalidUpdate,
    RoundFailed,
    apply_sums,
    expected_shapes,
    spec_from,
    sum_updates,
    validate_update,
)
from fedpa.common.config import FederationConfig
from fedpa.common.flower_pace import reply_poll_s
from fedpa.common.models import build_personal_model
from fedpa.common.privacy import add_discrete_noise, clamp_counts, distributed_share_std, sensitivity
from fedpa.common.records import arrays_to_record, message_bytes, record_bytes, record_to_arrays
from fedpa.common.secagg import QuantConfig, SecAggError, split_sum
from fedpa.common.secagg.transport import EVAL_SLOT, KEYS, SETUP, TRAIN_SLOT, detach, pack, unpack
from fedpa.foundation.checkpoint import artifact_digest
from fedpa.foundation.errors import FedpaError
from fedpa.foundation.model import count_parameters, load_foundation
from fedpa.recmodels.evaluation import SIZE as METRIC_SIZE
from fedpa.recmodels.evaluation import MetricSums
from fedpa.recmodels.personalization import get_algorithm

from .accounting import event_multiplier, make_accountant, round_event
from .health import training_warnings
from .robust import robust_sums
from .rundir import RunDir, plot_curves
from .secagg import SecAggResult, SecAggServer

log = logging.getLogger("fedpa.server")


def default_delta(num_clients: int) -> float:
    """δ when the configuration leaves it at 0: min(N^-1.1, 1e-5), well below 1/N (a mechanism that publishes
    one random user's data outright is (0, 1/N)-DP, so δ ~ 1/N makes ε meaningless)."""
    return min(max(num_clients, 1) ** -1.1, 1e-5)


def primary_metric(split: str) -> str:
    return "hr@10" if split == "loo" else "auc"


@dataclass
class RoundReplies:
    """What one round's train replies brought (`Federation.collect`), and what the round then sent and spent."""

    updates: list[dict[str, np.ndarray]] = field(default_factory=list)  # valid plain updates (no SecAgg)
    trained: dict[int, int] = field(default_factory=dict)               # node -> users in its valid reply
    users_ok: int = 0
    loss_sum: float = 0.0
    n_examples: int = 0
    problems: list[str] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    secagg_bytes: float = 0.0
    secagg_signed: int | None = None   # nodes in the secure sum that signed their keys (None: no SecAgg)
    seconds: dict[str, float] = field(default_factory=dict)   # wall time of the round's stages

    def stats(self, selected: int, communicates: bool) -> dict[str, Any]:
        down = float(np.mean(self.bytes_down)) if self.bytes_down else 0.0
        up = (float(np.mean(self.bytes_up)) if self.bytes_up else 0.0) + self.secagg_bytes
        return {"selected": selected, "clients_ok": self.users_ok,
                "train_loss": self.loss_sum / self.n_examples if self.n_examples else None,
                "problems": self.problems,
                "bytes_down_per_client": down if communicates else 0.0,
                "bytes_up_per_client": up if communicates else 0.0,
                **({} if self.secagg_signed is None else {"secagg_signed_nodes": self.secagg_signed}),
                "stage_s": {k: round(v, 3) for k, v in self.seconds.items()}}


@dataclass
class OpenSum:
    """A secure sum whose setup went out with a train or evaluate request: its SecAgg+ server, the record name of
    its phases (``slot``), the replies that carried the nodes' keys and the nodes whose keys count (``eligible``).
    `Federation._secagg_exchange` runs its remaining phases and fills ``result`` or ``error``."""

    sa: SecAggServer
    slot: str
    setup_replies: list[Message]
    eligible: list[int]
    problems: list[str] = field(default_factory=list)
    sent: dict[int, int] = field(default_factory=dict)    # node -> bytes of its replies to this sum's phases
    requests: dict[int, dict] = field(default_factory=dict)
    result: SecAggResult | None = None
    error: SecAggError | None = None

    @property
    def open(self) -> bool:
        return self.result is None and self.error is None


@dataclass
class Evaluation:
    """An evaluation whose requests went out (`Federation.start_evaluation`): the plain metric sums, or the
    secure sum still to run (``secure``), and the record of its round when the next round finishes it."""

    round: int
    final: bool
    val: MetricSums = field(default_factory=MetricSums)
    test: MetricSums = field(default_factory=MetricSums)
    mia: MetricSums = field(default_factory=MetricSums)
    users: int = 0
    secure: OpenSum | None = None
    record: dict | None = None


EVAL_SECAGG_ROUND = 2**62
"""SecAgg+ round ids of evaluations: this plus the round (training's secure sums use the round itself; a node
masks one vector per round id)."""
EVAL_QUANT = QuantConfig(clip=2.0**32, frac_bits=12)
MAX_MOD_BITS = 62
REPLY_POLL_S = (0.02, 0.1)
"""How often the server pulls replies from a SuperLink (s): every 0.02 s while they arrive, slowing to ten times a
second (a pull is one request to the SuperLink on the server's own machine). A simulation of few nodes polls its
in-process grid faster (`common.flower_pace.reply_poll_s`)."""


def newton_clip(participants: int) -> float:
    """The fixed-point range of a SecAgg round whose vectors carry Newton offset sums (item-bias-update newton):
    a row's −Σ(p − y) and Σ p(1 − p) grow with the rows its users have of that item or category, a number the
    server does not know, so the range is the widest the 62-bit modulus holds for this many participants (a
    category row summed over a node of 583 KuaiSAR-R users passes 2,048 at once)."""
    return float(2 ** (MAX_MOD_BITS - QuantConfig.frac_bits - 1 - int(participants).bit_length()))
"""Metric sums are counts and sums of per-row values: up to 2^32 per node, 2^-13 resolution."""


def run_message_config(cfg: FederationConfig) -> dict[str, Any]:
    """The run configuration every message carries: with the foundation's digest (a device checks its copy against
    it), and, when nodes hold their own data, without the server's data and foundation paths."""
    rc = {**cfg.to_run_config(), "foundation-digest": artifact_digest(cfg.foundation)}
    if cfg.nodes_hold_data:
        rc.update({"data-dir": "", "foundation": "", "feature-cache": "none"})
    return rc


class Federation:
    def __init__(self, grid: Grid, cfg: FederationConfig, progress=None):
        self.grid = grid
        self.cfg = cfg
        self.algorithm = get_algorithm(cfg.algorithm)
        if self.algorithm.centralized:
            raise FedpaError("'centralized' is not a federation: run it with `fedpa simulate` (pooled training)")
        self.run = RunDir(cfg.run_dir, track=cfg.track)
        self.progress = progress or (lambda *a, **k: None)
        foundation = load_foundation(cfg.foundation)
        foundation_params = count_parameters(foundation)  # before peft injects the adapters into it
        self.model = build_personal_model(cfg, foundation=foundation)
        self.spec = spec_from(self.model.shared_spec())
        self.state = self.model.get_shared()
        self.model_sizes = {
            "foundation_params": foundation_params,
            "shared_params": int(sum(np.prod(t.shape) for t in self.spec)),
            "private_params_per_user": int(sum(v.size for v in self.model.initial_private.values())),
        }
        self.run_config = run_message_config(cfg)
        self.run_id = ""            # set when the run starts (or is resumed): personal-store versions carry it
        self.privacy_events: list[tuple[float, int]] = []

    # ------------------------------------------------------------------ messaging

    def _send(self, msgs: list[Message], deadline: float | None = None) -> list[Message]:
        """Send and wait for the replies until ``deadline`` (time.time(); default: round-timeout from now): the
        SecAgg+ phases of a round share one timeout, however many there are."""
        timeout = self.cfg.round_timeout if deadline is None else max(deadline - time.time(), 1.0)
        end = time.time() + timeout
        pending = set(self.grid.push_messages(msgs))
        replies: list[Message] = []
        first, longest = reply_poll_s(self.grid, len(pending), REPLY_POLL_S)
        wait = first
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or time.time() >= end:
                break
            # Flower's own send_and_receive sleeps 3 s between pulls (1.42, deployment grid): with several message
            # exchanges per SecAgg+ round that alone was a third of a loopback round. Poll fast while replies are
            # due, backing off to ten pulls a second during long local training.
            time.sleep(min(wait, max(end - time.time(), 0.0)))
            wait = first if got else min(wait * 1.5, longest)
        return replies

    def _content(self, round_: int, clients: list[int] | None = None, final: bool = False,
                 with_state: bool = True, cohort: int = 0, setup: dict | None = None) -> RecordDict:
        rd = RecordDict({"run": ConfigRecord(self.run_config),
                         "round": ConfigRecord({"round": round_, "clients": clients or [], "final": final,
                                                "cohort": cohort, "run-id": self.run_id,
                                                "resumed": bool(self.cfg.resume)})})
        if with_state and self.state:
            rd["arrays"] = arrays_to_record(self.state)
        if setup is not None:   # the SecAgg+ setup for the vector this request leaves on the node
            pack(setup, into=rd, slot=SETUP)
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
        self.node_processes: dict[int, dict] = {}
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
            self.node_processes[src] = {"pid": int(info.get("pid", 0)), "ray_node": str(info.get("ray-node", ""))}
            if num_clients is not None and int(info["num-clients"]) != num_clients:
                raise RoundFailed(f"nodes disagree on the number of clients ({num_clients} and "
                                  f"{int(info['num-clients'])}): were they provisioned from different partitions?")
            num_clients = int(info["num-clients"])
        if not nodes:
            raise RoundFailed("no node answered the discovery query"
                              + (f" (e.g. {failures[0]})" if failures else ""))
        self.num_clients = num_clients
        served = sorted(c for cs in nodes.values() for c in cs)
        twice = sorted(c for c, n in Counter(served).items() if n > 1)
        if twice:
            raise RoundFailed(f"client(s) {twice[:5]} are served by more than one node: each user's data must live "
                              "on one node only")
        if served != list(range(num_clients)):
            missing = sorted(set(range(num_clients)) - set(served))
            log.warning("%d of %d clients have no node (e.g. %s): they will not take part",
                        len(missing), num_clients, missing[:5])
        self.client_node = {c: n for n, cs in nodes.items() for c in cs}
        self.accountant = None
        if self.cfg.dp_noise_multiplier > 0 and self.algorithm.communicates:
            self.dp_delta = self.cfg.dp_delta or default_delta(num_clients)
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

    def train_round(self, round_: int, final: bool, evaluation: Evaluation | None = None) -> dict[str, Any]:
        """One round of training and aggregation. With SecAgg+ the open secure sum of the previous round's
        ``evaluation`` runs its phases in the same messages as this round's (they are independent sums)."""
        deadline = time.time() + self.cfg.round_timeout
        selected = self.sample(round_)
        by_node = self.assign(selected)
        secure = self.cfg.secagg and self.algorithm.communicates
        setup = self.secure_sum_setup(round_, list(by_node), cohort=len(selected)) if secure else None
        msgs = self.configure(round_, by_node, final, cohort=len(selected), setup=setup)
        t = time.time()
        replies = self._send(msgs, deadline)
        got = self.collect(round_, replies, by_node)
        got.seconds["train"] = time.time() - t
        got.bytes_down = [message_bytes(m) for m in msgs]
        if secure:
            # a budget of its own: a node that died mid-round can hold the training replies up to the deadline
            # (until the SuperLink notices it), and the live nodes' four remaining phases must still fit. A
            # round waits at most twice the round timeout.
            t = time.time()
            secure_sums, included, got.secagg_bytes, got.secagg_signed = self.secure_sum(
                round_, OpenSum(setup, TRAIN_SLOT, replies, [n for n, k in got.trained.items() if k > 0]),
                got.problems, beside=evaluation.secure if evaluation is not None else None,
                deadline=time.time() + self.cfg.round_timeout)
            got.seconds["secagg"] = time.time() - t
            # the users that really reached the sum: its own count, never more than the nodes claimed
            counted = int(round(float(secure_sums["count/global"][0])))
            got.users_ok = min(sum(got.trained[n] for n in included), counted)
        for p in got.problems:
            log.warning("round %d: %s", round_, p)
        self.check_quorum(round_, got, len(selected))
        if self.algorithm.communicates and (secure or got.updates):
            sums = secure_sums if secure else self.aggregate(round_, got.updates, by_node)
            sums = self.add_noise(sums)
            self.account(round_, len(selected))
            new = self.apply(sums)
            bad = sorted(k for k, v in new.items() if not np.all(np.isfinite(v)))
            if bad:
                raise RoundFailed(f"round {round_}: the aggregate made '{bad[0]}' NaN or inf; last checkpoint kept")
            self.state = new
        return got.stats(len(selected), self.algorithm.communicates)

    def assign(self, selected: list[int]) -> dict[int, list[int]]:
        """The sampled clients grouped by the node that serves them."""
        by_node: dict[int, list[int]] = {}
        for c in selected:
            by_node.setdefault(self.client_node[c], []).append(c)
        return by_node

    def configure(self, round_: int, by_node: dict[int, list[int]], final: bool, cohort: int,
                  setup: SecAggServer | None = None) -> list[Message]:
        """One train message per node: the global shared state, the run config, the node's sampled clients (and
        with SecAgg+ the setup of the round's secure sum)."""
        requests = setup.advertise_requests() if setup is not None else {}
        return [Message(content=self._content(round_, cs, final, cohort=cohort, setup=requests.get(n)),
                        message_type=MessageType.TRAIN, dst_node_id=n, group_id=str(round_))
                for n, cs in by_node.items()]

    def collect(self, round_: int, replies: list[Message], by_node: dict[int, list[int]]) -> RoundReplies:
        """Validate every train reply; keep the valid plain updates, drop the rest with the reason."""
        got = RoundReplies()
        answered = {r.metadata.src_node_id for r in replies}
        got.problems += [f"node {n}: no reply within {self.cfg.round_timeout:g}s ({len(by_node[n])} client(s))"
                         for n in by_node if n not in answered]
        plain = self.algorithm.communicates and not self.cfg.secagg
        for rep in self._ordered(replies):
            src = rep.metadata.src_node_id
            got.bytes_up.append(message_bytes(rep))
            if rep.has_error():
                got.problems.append(f"node {src}: client error: {_reason(rep)}")
                continue
            try:
                m = rep.content["metrics"]
                reasons = [r for r in rep.content["excluded"]["reasons"] if r] if "excluded" in rep.content else []
                got.problems += [f"node {src}: {r}" for r in reasons]
                if plain:
                    if "arrays" not in rep.content:
                        raise InvalidUpdate("reply has no 'arrays' record")
                    update = record_to_arrays(rep.content["arrays"])
                    validate_update(update, self.spec)
                n_users = min(int(m["num-users"]), len(by_node.get(src, [])))
                if plain and float(update["count/global"][0]) != n_users:
                    raise InvalidUpdate(f"count/global {float(update['count/global'][0]):g} does not match "
                                        f"num-users {n_users}")
                got.users_ok += n_users
                got.trained[src] = n_users
                if plain:
                    got.updates.append(update)
                if "loss-sum" in m:   # absent under DP: the node keeps it (client/training.py)
                    got.loss_sum += float(m["loss-sum"])
                    got.n_examples += int(m["num-examples"])
            except (InvalidUpdate, KeyError, TypeError, ValueError) as e:
                got.problems.append(f"node {src}: excluded ({len(by_node.get(src, []))} client(s)): {e}")
        return got

    def check_quorum(self, round_: int, got: RoundReplies, sampled: int) -> None:
        """Fail the round (the last checkpoint stays) when fewer than min-reply-fraction of the sampled
        clients returned a valid update."""
        need = math.ceil(self.cfg.min_reply_fraction * sampled)
        if got.users_ok < need:
            raise RoundFailed(f"round {round_}: only {got.users_ok} of {sampled} sampled clients returned a valid "
                              f"update ({need} needed); last checkpoint kept. Problems: " + "; ".join(got.problems[:5]))

    def aggregate(self, round_: int, updates: list[dict[str, np.ndarray]],
                  by_node: dict[int, list[int]]) -> dict[str, np.ndarray]:
        """The plain updates' sums, or robust per-user statistics expressed as sums."""
        if self.cfg.robust_aggregation == "none" and self.cfg.norm_bound <= 0:
            return sum_updates(updates, self.spec)
        crowded = [n for n, cs in by_node.items() if len(cs) > 1]
        if crowded:
            raise RoundFailed(f"round {round_}: robust aggregation needs one user per node, node "
                              f"{crowded[0]} served {len(by_node[crowded[0]])} (simulate with "
                              "--cohort-size 1); last checkpoint kept")
        return robust_sums(updates, self.spec, method=self.cfg.robust_aggregation,
                           trim_fraction=self.cfg.trim_fraction, norm_bound=self.cfg.norm_bound)

    def add_noise(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Central DP: discrete Gaussian noise on the fixed point, calibrated to one user's contribution.
        Distributed DP: the nodes' noise is already in the sum, only the counts are clamped. Local DP and no DP:
        unchanged."""
        if self.cfg.dp_noise_multiplier <= 0:
            return sums
        if self.cfg.dp_mode == "central":
            return add_discrete_noise(sums, self.spec, self.cfg.dp_noise_multiplier,
                                      sensitivity(self.cfg.dp_clip, self.model.count_terms))
        if self.cfg.dp_mode == "distributed":
            return clamp_counts(sums, self.spec)
        return sums

    def account(self, round_: int, sampled: int) -> None:
        """Compose this round's Gaussian event into the accountant, and write it to the run's privacy ledger
        before the noisy state leaves the server (a crash after the release and before the checkpoint makes
        the round run again with fresh noise: both releases are charged)."""
        if self.cfg.dp_noise_multiplier <= 0:
            return
        event = self._dp_event(sampled)
        self.run.append_privacy_event({"round": round_, "run-id": self.run_id,
                                       "noise_multiplier": event.noise_multiplier, "sample_size": event.sample_size})
        self.accountant.compose(event)
        self.privacy_events.append((event.noise_multiplier, event.sample_size))

    def apply(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new shared state: old + Σ deltas / Σ counts per entry (per group, per row)."""
        return apply_sums(self.state, sums, self.spec, row_prior=self.cfg.item_bias_prior,
                          newton=self.cfg.item_bias_update == "newton",
                          population=self.num_clients)

    def secure_sum_setup(self, round_: int, participants: list[int], cohort: int) -> SecAggServer:
        """The SecAgg+ server of a round's secure sum over ``participants`` (the nodes asked to train): its setup
        rides on the train requests."""
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
        if self.cfg.item_bias_update == "newton" and self.cfg.item_bias_fields:
            clip = newton_clip(len(participants))
        try:
            return SecAggServer(participants, dim, round_id=round_, quant=QuantConfig(clip=clip))
        except SecAggError as e:
            raise RoundFailed(f"round {round_}: secure aggregation failed: {e}; last checkpoint kept") from None

    def secure_sum(self, round_: int, train: OpenSum, problems: list[str], beside: OpenSum | None = None,
                   deadline: float | None = None):
        """SecAgg+ over the nodes that trained (their train replies carried their keys): four more message
        exchanges, which also carry the phases of ``beside`` (an evaluation's open sum), then only the sum is
        known. Returns (named sums, nodes included, SecAgg bytes sent per participant, how many of them signed)."""
        self._secagg_exchange([train] + ([beside] if beside is not None and beside.open else []), deadline)
        problems += train.problems
        if train.error is not None:
            why = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
            raise RoundFailed(f"round {round_}: secure aggregation failed: {train.error}; last checkpoint kept"
                              + (f" (nodes: {why})" if why else ""))
        result = train.result
        sums = split_sum(result.dequantize(), expected_shapes(self.spec))
        per_node = float(np.mean([train.sent.get(n, 0) for n in result.included])) if result.included else 0.0
        return sums, result.included, per_node, len(result.signed)

    def _secagg_exchange(self, sums: list[OpenSum], deadline: float | None = None) -> None:
        """The SecAgg+ phases after the setup, for one or more open secure sums at once. The keys come in the
        replies to the requests that carried the setup (from each sum's ``eligible`` nodes: the others are
        dropped); then four message exchanges with the nodes holding their vectors in context.state, a node's
        requests of every sum in one message. Each sum ends with its ``result`` or its ``error`` (a failed sum
        does not stop the others)."""
        phases = ("receive_keys", "receive_shares", "receive_masked", "receive_consistency", "receive_unmask")
        for s in sums:
            s.sent = {n: 0 for n in s.sa.participants}
            keys = []
            for rep in self._ordered(s.setup_replies):
                src = rep.metadata.src_node_id
                if src not in s.eligible or rep.has_error():   # its reason is noted with the reply's own
                    continue
                advertised = detach(rep.content, KEYS)
                if advertised is None:
                    s.problems.append(f"node {src}: its reply carries no SecAgg+ keys ('{KEYS}')")
                    continue
                keys.append((src, advertised))
            self._advance(s, phases[0], keys)
        for phase, receive in enumerate(phases[1:], start=2):
            live = [s for s in sums if s.open]
            if not live:
                break
            content: dict[int, RecordDict] = {}
            for s in live:
                for n, req in s.requests.items():
                    pack(req, into=content.setdefault(n, RecordDict()), slot=s.slot)
            msgs = [Message(content=rd, message_type=MessageType.TRAIN, dst_node_id=n,
                            group_id=f"{live[0].sa.round_id}-secagg") for n, rd in content.items()]
            replies = self._ordered(self._send(msgs, deadline))
            answered = {rep.metadata.src_node_id for rep in replies}
            for s in live:
                pairs = []
                s.problems += [f"node {n}: no secure-aggregation reply (phase {phase}) before the round's deadline"
                               for n in s.requests if n not in answered]
                for rep in replies:
                    src = rep.metadata.src_node_id
                    if src not in s.requests:
                        continue
                    if rep.has_error():
                        s.problems.append(f"node {src}: secure aggregation: {_reason(rep)}")
                        continue
                    if s.slot not in rep.content:
                        s.problems.append(f"node {src}: its phase-{phase} reply has no '{s.slot}' record")
                        continue
                    # bytes on the wire: the whole reply, or this sum's records of a reply that carries two
                    part = RecordDict({k: rep.content[k] for k in (s.slot, f"{s.slot}-arrays") if k in rep.content})
                    s.sent[src] = s.sent.get(src, 0) + (message_bytes(rep) if len(live) == 1 else record_bytes(part))
                    pairs.append((src, unpack(rep.content, s.slot)))
                self._advance(s, receive, pairs)
        for s in sums:
            s.problems += [f"secure aggregation: {r}" for r in s.sa.reasons]

    @staticmethod
    def _advance(s: OpenSum, receive: str, pairs: list) -> None:
        try:
            out = getattr(s.sa, receive)(pairs)
        except SecAggError as e:
            s.error, s.requests = e, {}
            return
        if isinstance(out, SecAggResult):
            s.result, s.requests = out, {}
        else:
            s.requests = out

    def evaluate(self, round_: int, final: bool = False) -> dict[str, dict[str, float]]:
        """Validation and test metrics; in the final evaluation also a membership-inference attack
        against every user's personalized model (`recmodels.evaluation.membership_attack`). With SecAgg the
        nodes' metric sums are securely summed too: the server sees only their total."""
        return self.finish_evaluation(self.start_evaluation(round_, final))

    def start_evaluation(self, round_: int, final: bool = False) -> Evaluation:
        """Send the evaluate requests and read the replies: plain metric sums are summed here; with SecAgg the
        nodes keep theirs, and the secure sum (its setup rode on the requests) is left open, for
        `finish_evaluation` or the next round's phases."""
        ev = Evaluation(round_, final)
        setup: dict[int, dict] = {}
        if self.cfg.secagg:
            try:
                sa = SecAggServer(list(self.nodes), (3 if final else 2) * METRIC_SIZE,
                                  round_id=EVAL_SECAGG_ROUND + round_, quant=EVAL_QUANT)
                setup = sa.advertise_requests()
            except SecAggError as e:
                log.warning("round %d evaluation: secure aggregation failed (%s); no metrics this round", round_, e)
                return ev
        msgs = [Message(content=self._content(round_, final=final, setup=setup.get(n)),
                        message_type=MessageType.EVALUATE, dst_node_id=n, group_id=f"eval-{round_}")
                for n in self.nodes]
        replies = self._send(msgs)
        masked: list[int] = []          # nodes holding their metric sums for the secure sum
        for rep in self._ordered(replies):
            src = rep.metadata.src_node_id
            if rep.has_error():
                log.warning("round %d evaluation: node %s: %s", round_, src, _reason(rep))
                continue
            try:
                n = min(int(rep.content["metrics"]["num-users"]), len(self.nodes.get(src, [])))
                if self.cfg.secagg:
                    masked.append(src)
                else:
                    arrays = record_to_arrays(rep.content["arrays"])
                    v, t = MetricSums(arrays["val"]), MetricSums(arrays["test"])
                    m = MetricSums(arrays["mia"]) if final else MetricSums()
                    if not (np.isfinite(v.v).all() and np.isfinite(t.v).all() and np.isfinite(m.v).all()):
                        raise ValueError("non-finite metric sums")
                    ev.val += v
                    ev.test += t
                    ev.mia += m
            except (KeyError, TypeError, ValueError) as e:
                log.warning("round %d evaluation: node %s: reply dropped: %s", round_, src, e)
                continue
            ev.users += n
        if self.cfg.secagg:
            ev.secure = OpenSum(sa, EVAL_SLOT, replies, masked)
        return ev

    def finish_evaluation(self, ev: Evaluation) -> dict[str, Any]:
        """The metrics of an evaluation, running its secure sum's phases if no round ran them."""
        s = ev.secure
        if s is not None:
            if s.open:
                self._secagg_exchange([s], time.time() + self.cfg.round_timeout)
            if s.result is not None:
                total = s.result.dequantize()
                ev.val, ev.test = MetricSums(total[:METRIC_SIZE]), MetricSums(total[METRIC_SIZE:2 * METRIC_SIZE])
                ev.mia = MetricSums(total[2 * METRIC_SIZE:]) if ev.final else MetricSums()
                ev.users = min(ev.users, sum(len(self.nodes.get(n, [])) for n in s.result.included))
            else:
                log.warning("round %d evaluation: secure aggregation failed (%s); %s; no metrics this round",
                            ev.round, s.error, "; ".join(s.problems[:3]))
                ev.users = 0
            for p in s.problems:
                log.warning("round %d evaluation: %s", ev.round, p)
        elif self.cfg.secagg:     # its secure sum could not even start
            ev.users = 0
        return self._metrics(ev.val, ev.test, ev.mia, ev.users, ev.final)

    @staticmethod
    def _metrics(val: MetricSums, test: MetricSums, mia: MetricSums, users: int, final: bool) -> dict:
        out = {"val": val.finalize(), "test": test.finalize(), "users": users}
        if final:
            attack = mia.finalize()
            out["membership_inference"] = {"auc": attack["auc"], "per_user_auc": attack["gauc"]}
        return out

    # settings that may differ between an interrupted run and its resumption
    RESUMABLE_CHANGES = frozenset({"resume", "run-dir", "min-nodes", "round-timeout", "feature-cache",
                                   "feature-cache-limit-gb", "cohort-engine", "engine-device", "track"})

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
        # everything is checked before anything is changed: a resume that fails leaves the run as it was
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
        history = [r for r in self.run.read_metrics() if r.get("round", 0) <= last]
        unevaluated = meta.get("unevaluated-record")
        if unevaluated is not None and any(r.get("round") == last for r in history):
            unevaluated = None     # its line was written before the run stopped
        ledger = self.run.read_privacy_ledger()
        self.state = {k: state[k] for k in self.state}
        self.run_id = meta.get("run-id") or uuid.uuid4().hex
        self.discover()
        # every release is charged, the rounds a crash made run twice included (the ledger is written before
        # a noisy state leaves the server; the checkpoint's list predates the ledger)
        events = ([(e["noise_multiplier"], e["sample_size"]) for e in ledger] if ledger
                  else [tuple(e) for e in meta.get("privacy_events", [])])
        if self.accountant is not None:
            for multiplier, sample_size in events:
                self.accountant.compose(round_event(multiplier, sample_size, self.num_clients))
        self.privacy_events = list(events)
        self.run.truncate_metrics(last)
        if unevaluated is not None:
            # the run stopped while the evaluation of its last checkpoint was open (SecAgg+ runs it in the next
            # round's messages): evaluated again, from the checkpoint's state
            unevaluated["eval"] = self.evaluate(last, final=(last == cfg.num_rounds))
            self.run.append_metrics(unevaluated)
            history.append(unevaluated)
        (self.run.path / "summary.json").unlink(missing_ok=True)  # rewritten when the resumed run ends
        log.info("resuming %s after round %d", cfg.run_dir, last)
        self.progress(last, cfg.num_rounds, None)
        return last + 1, history, float(history[-1].get("wall_s", 0.0)) if history else 0.0

    def run_rounds(self) -> dict[str, Any]:
        cfg = self.cfg
        self.privacy_events: list[tuple[float, int]] = []
        first, history, wall_before = self._start()
        t0 = time.time() - wall_before
        self.stopped_by_budget = None
        # With SecAgg+ a round's evaluation sends its requests when the round ends, and its secure sum runs its
        # phases in the next round's messages (two independent sums, one exchange each phase): a round is five
        # message exchanges instead of ten. Its metrics line is written when that sum ends.
        pipelined = cfg.secagg and self.algorithm.communicates
        pending: Evaluation | None = None
        latest_eval = None
        for r in range(first, cfg.num_rounds + 1):
            if self.accountant is not None and cfg.dp_max_epsilon > 0 and self.accountant.would_exceed(
                    self._dp_event(len(self.sample(r))), cfg.dp_max_epsilon):
                log.warning("round %d would exceed the privacy budget ε = %g: training stops", r, cfg.dp_max_epsilon)
                self.stopped_by_budget = r
                break
            tr = time.time()
            stats = self.train_round(r, final=(r == cfg.num_rounds), evaluation=pending)
            rec = {"round": r, **stats, "train_s": time.time() - tr}
            if pending is not None:
                latest_eval = self._record_evaluation(pending, history)
                pending = None
            if self.accountant is not None:
                rec["epsilon"] = self.accountant.get_epsilon(self.dp_delta)
                rec["delta"] = self.dp_delta
            if r % cfg.eval_every == 0 or r == cfg.num_rounds:
                te = time.time()
                if pipelined and r < cfg.num_rounds:
                    pending = self.start_evaluation(r)
                else:
                    rec["eval"] = latest_eval = self.evaluate(r, final=(r == cfg.num_rounds))
                rec["stage_s"]["evaluate"] = round(time.time() - te, 3)
            rec["wall_s"] = time.time() - t0
            if pending is None:
                # metrics first, then the checkpoint: a kill in between leaves a line that resuming drops
                self.run.append_metrics(rec)
                history.append(rec)
            else:
                pending.record = rec    # written with its evaluation; until then the checkpoint holds it
            self.run.save_checkpoint(r, self.state, {
                "algorithm": cfg.algorithm, "run-id": self.run_id,
                # the accountant's whole state: the Gaussian events composed so far
                "privacy_events": [list(e) for e in self.privacy_events],
                # sampling and every client's seed derive from (seed, round): no RNG stream to save
                "sampling": "numpy default_rng([seed, round])",
                **({"unevaluated-record": rec} if pending is not None else {})})
            self.run.keep_last_checkpoints(cfg.keep_checkpoints)
            self.progress(r, cfg.num_rounds, latest_eval)
        if pending is not None:   # training stopped early (privacy budget): the evaluation's sum runs alone
            self._record_evaluation(pending, history)
        return self.summarize(history, time.time() - t0)

    def _record_evaluation(self, ev: Evaluation, history: list[dict]) -> dict[str, Any]:
        """Finish an evaluation left open at the end of its round and write its round's metrics line."""
        rec = ev.record
        rec["eval"] = self.finish_evaluation(ev)
        self.run.append_metrics(rec)
        history.append(rec)
        return rec["eval"]

    def summarize(self, history: list[dict], wall: float) -> dict[str, Any]:
        privacy = None
        if self.accountant is not None:
            privacy = {"epsilon": self.accountant.get_epsilon(self.dp_delta), "delta": self.dp_delta,
                       "mode": self.cfg.dp_mode,
                       "epsilon_is": ("per user, local reports" if self.cfg.dp_mode == "local"
                                      else "client-level, released sums"),
                       "noise_multiplier": self.cfg.dp_noise_multiplier, "clip": self.cfg.dp_clip,
                       "rounds_accounted": self.accountant.num_releases,
                       "stopped_by_budget_at_round": self.stopped_by_budget}
        sizes = [len(c) for c in getattr(self, "nodes", {}).values()] or [0]
        most = max(sizes)
        cohorts = {"nodes": len(sizes), "users_per_node_max": most,
                   "engine": (self.cfg.cohort_engine if most > 1 else "one user per node"),
                   # what secure aggregation hides behind its sum: one user's update, or a node's sum
                   "secagg_participant": "user" if most <= 1 else f"node (sum of up to {most} users)",
                   # where each node ran: its process, and in a simulation its Ray node (a cluster spreads them)
                   "processes": [{"node": int(n), "clients": len(cs), **self.node_processes.get(n, {})}
                                 for n, cs in sorted(getattr(self, "nodes", {}).items())]}
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
        "bytes_down_per_client_round": (float(np.mean([h["bytes_down_per_client"] for h in trained]))
                                        if trained else 0.0),
        "bytes_up_per_client_round": float(np.mean([h["bytes_up_per_client"] for h in trained])) if trained else 0.0,
        "model": model_sizes,
        "clients": evals[-1]["eval"].get("users"),
        "secure_aggregation": cfg.secagg,
        "cohorts": cohorts,
        "differential_privacy": privacy,
        "membership_inference": evals[-1]["eval"].get("membership_inference"),
        "warnings": training_warnings(history, best["round"]),
    }
    run.write_summary(summary)
    plot_curves(run)
    return summary


def _num(x) -> float:
    return -math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _reason(rep: Message) -> str:
    r = str(rep.error.reason).strip()
    return r.splitlines()[-1].rstrip("'>")[:300] if r else f"error code {rep.error.code}"
