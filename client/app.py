"""The Flower ClientApp: local training and evaluation for the users a node serves.

Messages (all on the Message API):

- ``query``: which clients does this node serve? -> ``{"clients": [...]}``.
- ``train``: content ``arrays`` (the global shared state), ``run`` (the
  federation config) and ``round`` (``{"round", "clients", "final"}``). Each
  listed user trains locally from the global state and its own private state;
  the reply holds the *sum* of the users' contributions (weighted deltas and
  counts, `common.aggregation`), never a private tensor.
- ``evaluate``: scores every user the node serves on validation and test and
  replies with `recmodels.evaluation.MetricSums` vectors.
- With SecAgg+ the vector stays on the node (``context.state``) and only its masked
  form leaves. The first SecAgg+ phase (setup: the node's public keys) rides on the
  train or evaluate request itself (``secagg-setup`` in, ``secagg-keys`` out);
  the other four come as messages of their own, one record per secure sum
  (``secagg``: the update's; ``secagg-eval``: an evaluation's, run beside the
  next round's).

Private state lives in ``context.state`` within a run and, when the run config
names a personal store, in the encrypted on-disk store across runs.

This module stays light (no torch, no models): it dispatches, checks the node's own privacy policy and runs
the SecAgg+ phases; what training and evaluation need lives in `client.training`, imported on first use.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpa.client.device_data import DeviceData
from fedpa.client.secagg import SecAggClient
from fedpa.common.config import NODE_KEYS, FederationConfig, parse_run_config
from fedpa.common.discrete_noise import DistributedNoise
from fedpa.common.records import record_to_arrays
from fedpa.common.secagg import PHASE_ADVERTISE, PHASE_MASKED, MessageRejected
from fedpa.common.secagg.identity import Identity
from fedpa.common.secagg.transport import SLOTS, TRAIN_SLOT, is_secagg, pack, unpack
from fedpa.foundation.errors import FedpaError

log = logging.getLogger("fedpa.client")
app = ClientApp()


def _config(msg: Message, context: Context) -> FederationConfig:
    """The run's configuration, with what this SuperNode sets for itself in its --node-config (`NODE_KEYS`:
    where its personal state lives and the key that opens it, its device data; never sent to the server)."""
    run = dict(msg.content["run"])
    run.update({k: context.node_config[k] for k in NODE_KEYS if k in context.node_config})
    cfg = parse_run_config(run)
    if cfg.device_data:   # a device: its own data and foundation, whatever paths the run names
        return DeviceData.open(cfg.device_data).apply(cfg)
    if cfg.nodes_hold_data:
        raise FedpaError("this run's nodes hold their own data, and this SuperNode names none: give it "
                         "device-data=DIR in its --node-config (a directory made by `fedpa device provision`)")
    return cfg


# What a node may require of every round it takes part in (its --node-config), whatever the server sends: the
# noise and clip bound its users are protected by, and how large a cohort it believes a round can have (a
# server announcing a huge cohort would shrink every client's share of distributed noise to nothing).
NODE_PRIVACY_KEYS = ("dp-min-noise-multiplier", "dp-max-clip", "dp-max-cohort")


class NodePolicyError(FedpaError):
    """A round asks for less privacy than this node requires (its --node-config)."""


def check_node_policy(node_config, cfg: FederationConfig, cohort: int) -> None:
    """Refuse a round whose privacy settings fall short of what the node pinned for itself."""
    def number(key: str) -> float | None:
        if key not in node_config:
            return None
        try:
            value = float(node_config[key])
        except (TypeError, ValueError):
            raise NodePolicyError(f"node config '{key}': {node_config[key]!r} is not a number") from None
        if not np.isfinite(value):
            raise NodePolicyError(f"node config '{key}' must be finite, got {value}")
        return value

    z, clip, most = number("dp-min-noise-multiplier"), number("dp-max-clip"), number("dp-max-cohort")
    if z is not None and not cfg.dp_noise_multiplier >= z:
        raise NodePolicyError(f"this node requires a DP noise multiplier of at least {z:g}; the round asks "
                              f"{cfg.dp_noise_multiplier:g}: refused")
    if clip is not None and (cfg.dp_noise_multiplier <= 0 or not cfg.dp_clip <= clip):
        raise NodePolicyError(f"this node requires updates clipped to at most {clip:g}; the round asks "
                              f"{cfg.dp_clip:g}{'' if cfg.dp_noise_multiplier > 0 else ' without DP'}: refused")
    if most is not None and cohort > most:
        raise NodePolicyError(f"the round announces a cohort of {cohort}, more than the {most:g} this node allows "
                              "(a larger claimed cohort shrinks each client's share of distributed noise): refused")


@app.query()
def query(msg: Message, context: Context) -> Message:
    from fedpa.client import training

    return training.query(msg, context, _config(msg, context))


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_secagg(msg.content):
        return _secagg_phase(msg, context)   # no torch, no model: a SecAgg+ phase is quick to start
    cfg = _config(msg, context)
    check_node_policy(context.node_config, cfg, int(msg.content["round"]["cohort"]))
    from fedpa.client import training

    return training.train(msg, context, cfg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fedpa.client import training

    return training.evaluate(msg, context, _config(msg, context))


SECAGG_IDENTITY_KEYS = ("secagg-identity-key", "secagg-certificate", "secagg-ca")
"""Node config: the node's signing key (its SuperNode authentication key), the certificate the deployment's CA
issued for it, and that CA. With them the node signs its SecAgg+ keys and survivor sets and checks its
neighbours'; without them it takes part against an honest-but-curious server only."""


def _secagg_identity(context: Context) -> Identity | None:
    given = [k for k in SECAGG_IDENTITY_KEYS if k in context.node_config]
    if not given:
        return None
    if len(given) < len(SECAGG_IDENTITY_KEYS):
        missing = sorted(set(SECAGG_IDENTITY_KEYS) - set(given))
        raise FedpaError(f"node config sets {', '.join(given)} but not {', '.join(missing)}: a SecAgg+ identity "
                         "needs the key, its certificate and the CA")
    try:
        return Identity.load(*(str(context.node_config[k]) for k in SECAGG_IDENTITY_KEYS), node_id=context.node_id)
    except MessageRejected as e:
        raise FedpaError(f"{context.node_config['secagg-certificate']}: {e}") from None


def _secagg_phase(msg: Message, context: Context) -> Message:
    """A SecAgg+ phase of each secure sum the message carries (the training update's, an evaluation's, or both),
    answered in one reply."""
    content = RecordDict()
    for slot in SLOTS:
        if slot in msg.content:
            pack(secagg_reply(unpack(msg.content, slot), context, slot), into=content, slot=slot)
    return Message(content=content, reply_to=msg)


def secagg_reply(request: dict, context: Context, slot: str = TRAIN_SLOT) -> dict:
    """This node's reply to one SecAgg+ request of the secure sum in ``slot`` (a phase message, or the setup a
    train or evaluate request carries); the protocol state lives in context.state between phases. The vector a
    request left is masked at most once: a second phase-1 request for a round is refused, and the vector is gone
    once its masked form left."""
    state_key, vector_key = f"{slot}-state", f"{slot}-vector"
    identity = _secagg_identity(context)
    if request.get("phase") == PHASE_ADVERTISE:
        round_id = request.get("round")
        seen = [int(r) for r in context.state["secagg-rounds"]["ids"]] if "secagg-rounds" in context.state else []
        if round_id in seen:
            raise FedpaError(f"a second SecAgg+ setup for round {round_id}: refused (its vector is masked once)")
        context.state["secagg-rounds"] = ConfigRecord({"ids": (seen + [int(round_id)])[-64:]})
        client = SecAggClient(int(context.node_id), identity=identity)
    else:
        if state_key not in context.state:
            raise FedpaError(f"a SecAgg+ phase-{request.get('phase')} request for '{slot}' without its setup")
        client = SecAggClient.from_state(dict(context.state[state_key]), identity=identity)
    vector = noise = None
    if request.get("phase") == PHASE_MASKED:
        if vector_key not in context.state:
            raise FedpaError("no vector to mask: it was masked already, or no request left one")
        held = record_to_arrays(context.state[vector_key])
        vector = held["v"]
        noise = DistributedNoise.from_array(held["dp-noise"]) if "dp-noise" in held else None
    try:
        return client.handle(request, vector, noise)
    finally:
        if vector is not None:
            del context.state[vector_key]
        context.state[state_key] = ConfigRecord(client.export_state())
