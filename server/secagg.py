"""The server half of SecAgg+: a message-passing state machine, one object per round.

    server = SecAggServer(participants, dim, round_id=r)
    reqs = server.advertise_requests()            # phase 0 (setup) -> phase-1 requests
    reqs = server.receive_keys(replies)           # phase 1 replies -> phase-2 requests
    reqs = server.receive_shares(replies)         # phase 2 replies -> phase-3 requests
    reqs = server.receive_masked(replies)         # phase 3 replies -> phase-4 requests (the survivor set)
    reqs = server.receive_consistency(replies)    # phase 4 replies -> phase-5 requests (its signatures)
    result = server.receive_unmask(replies)       # phase 5 replies -> SecAggResult

`replies` are (channel node id, message) pairs, the channel being who the
transport says sent it (Flower: `msg.metadata.src_node_id`); a dict
{node id: message} also works. Requests are {node id: message}. A participant
that does not reply is dropped; a reply that breaks the protocol is rejected
(`server.rejections`, logged) and its sender is dropped. Too few clients or
share holders raise SecAggError; at phase 3 this happens before any unmask
request exists, so no share is revealed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedpa.common.secagg import (
    ENVELOPE_BYTES,
    KEY_BYTES,
    MAX_NODE_ID,
    MAX_ROUND_ID,
    NONCE_BYTES,
    PHASE_ADVERTISE,
    PHASE_CONSISTENCY,
    PHASE_MASKED,
    PHASE_NAMES,
    PHASE_SHARE,
    PHASE_UNMASK,
    SERVER_ID,
    SHARE_BYTES,
    MessageRejected,
    QuantConfig,
    RandBytes,
    Rejection,
    SecAggError,
    SecAggParams,
    agree,
    as_pairs,
    check_header,
    decode_share,
    dequantize_sum,
    effective_graph_params,
    envelope_parties,
    get_bytes,
    get_bytes_list,
    get_ids,
    graph_seed,
    header,
    mask_sign,
    neighbour_graph,
    packed_length,
    pair_mask_key,
    prg_u64,
    seed_commitment,
    self_mask_key,
    shamir_reconstruct,
    share_x,
    unpack_bits,
)
from fedpa.common.secagg.identity import MAX_CERTIFICATE_BYTES, MAX_SIGNATURE_BYTES

log = logging.getLogger("fedpa.secagg")


def _optional_bytes(msg: Mapping, key: str, limit: int) -> bytes:
    """A bytes field that may be empty (a client without an identity) but not longer than ``limit``."""
    v = msg.get(key, b"")
    if not isinstance(v, bytes) or len(v) > limit:
        raise MessageRejected(f"field '{key}' must be at most {limit} bytes")
    return v


@dataclass
class SecAggResult:
    """The unmasked sum of the included clients' quantized vectors, modulo 2^quant.mod_bits."""

    round_id: int
    sum: np.ndarray                       # uint64, < 2^mod_bits
    included: list[int]                   # whose vectors are in the sum
    dropped: dict[int, list[int]]         # phase -> clients lost at that phase (not replying or rejected)
    quant: QuantConfig
    degree: int
    threshold: int
    rejections: list[Rejection] = field(default_factory=list)
    signed: list[int] = field(default_factory=list)   # included clients that signed their keys (an identity)

    def dequantize(self) -> np.ndarray:
        """Float64 sum; |error| <= len(included) * 2^-(f+1) per coordinate (plus clipping)."""
        return dequantize_sum(self.sum, len(self.included), self.quant)


class SecAggServer:
    def __init__(self, participants: Iterable[int], dim: int, *, round_id: int,
                 quant: QuantConfig = QuantConfig(), params: SecAggParams = SecAggParams(),
                 randbytes: RandBytes = os.urandom):
        ids = [int(i) for i in participants]
        if len(set(ids)) != len(ids):
            raise SecAggError("participants list a client twice")
        if any(not 0 <= i <= MAX_NODE_ID for i in ids):
            raise SecAggError("participant ids must be within 0..2^64-1")
        if not 0 <= round_id <= MAX_ROUND_ID:
            raise SecAggError(f"round id {round_id} out of range")
        if not 1 <= dim <= 2**31 - 1:
            raise SecAggError(f"vector size {dim} out of range")
        self.round_id = int(round_id)
        self.participants = sorted(ids)
        self.dim = int(dim)
        self.params = params
        self.rejections: list[Rejection] = []
        self.dropped: dict[int, list[int]] = {s: [] for s in (PHASE_ADVERTISE, PHASE_SHARE, PHASE_MASKED,
                                                              PHASE_CONSISTENCY, PHASE_UNMASK)}
        self._need(len(ids), "participants")
        self.quant = quant.for_clients(len(ids))
        self.nonce = randbytes(NONCE_BYTES)
        self.nominal_degree = params.degree_for(len(ids))
        self.degree = self.threshold = 0
        self._phase = PHASE_ADVERTISE
        self._failed: str | None = None
        self._keys: dict[int, tuple[bytes, bytes]] = {}           # u -> (c_pk, s_pk)
        self._graph: dict[int, tuple[int, ...]] = {}
        self._envelopes: dict[int, dict[int, bytes]] = {}         # sender -> recipient -> envelope
        self._commit: dict[int, bytes] = {}
        self._forwarded: dict[int, list[int]] = {}                # v -> senders whose shares v got
        self._forwarded_set: dict[int, set[int]] = {}
        self._masked: dict[int, np.ndarray] = {}
        self._u2: set[int] = set()
        self._u3: set[int] = set()
        self._lost: set[int] = set()                              # in U2, not in the sum
        self._rejected_by: dict[int, set[int]] = {}               # v -> senders whose shares v could not open
        self._asked: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
        self._signed: dict[int, tuple[bytes, bytes]] = {}         # u -> (signature, certificate) of its keys
        self._u4: set[int] = set()                                # signed the survivor set

    # ------------------------------------------------------------------ helpers

    @property
    def reasons(self) -> list[str]:
        return [str(r) for r in self.rejections]

    @property
    def failed(self) -> str | None:
        """Why the round failed, or None."""
        return self._failed

    def _need(self, count: int, what: str) -> None:
        if count < self.params.min_clients:
            self._fail(f"only {count} {what}, fewer than the {self.params.min_clients} a sum may cover")

    def _fail(self, why: str) -> None:
        self._failed = why
        log.error("secagg round %d failed: %s", getattr(self, "round_id", -1), why)
        raise SecAggError(f"secure aggregation round {getattr(self, 'round_id', -1)} failed: {why}")

    def _enter(self, phase: int) -> None:
        if self._failed:
            raise SecAggError(f"secure aggregation round {self.round_id} already failed: {self._failed}")
        if self._phase != phase:
            raise SecAggError(f"server expects phase {self._phase} ({PHASE_NAMES.get(self._phase, 'done')}) replies, "
                              f"got a call for phase {phase}")

    def _reject(self, phase: int, client: int | None, reason: str) -> None:
        r = Rejection(phase, client, reason)
        self.rejections.append(r)
        log.warning("secagg round %d: rejected %s", self.round_id, r)

    def _collect(self, phase: int, replies, expected: set[int], parse: Callable[[int, Mapping], object]) -> dict:
        """Validated replies {client: parse(client, msg)}; rejected senders, replays and silent clients drop."""
        accepted: dict[int, object] = {}
        seen: set[int] = set()
        bad: set[int] = set()
        for channel, msg in as_pairs(replies):
            if not isinstance(channel, (int, np.integer)) or isinstance(channel, bool):
                self._reject(phase, None, f"message from a channel with a non-integer id {channel!r}")
                continue
            channel = int(channel)
            if channel not in expected:
                known = channel in self.participants
                self._reject(phase, channel if known else None,
                             f"message from {'client' if known else 'unknown sender'} {channel!r}, "
                             f"which is not expected at phase {phase}")
                continue
            if channel in seen:
                bad.add(channel)
                self._reject(phase, channel, f"replay: second message from client {channel} in phase {phase}")
                continue
            seen.add(channel)
            try:
                check_header(msg, round_id=self.round_id, nonce=self.nonce, phase=phase, sender=channel,
                             recipient=SERVER_ID)
                accepted[channel] = parse(channel, msg)
            except MessageRejected as e:
                bad.add(channel)
                self._reject(phase, channel, str(e))
        for c in bad:
            accepted.pop(c, None)
        lost = sorted(expected - set(accepted))
        self.dropped[phase].extend(lost)
        if lost:
            log.info("secagg round %d phase %d: %d of %d clients dropped", self.round_id, phase, len(lost),
                     len(expected))
        return accepted

    def _request(self, phase: int, to: int, **fields) -> dict:
        return {**header(self.round_id, self.nonce, phase, SERVER_ID, to), **fields}

    # ------------------------------------------------------------------ phase 0 -> 1

    def advertise_requests(self) -> dict[int, dict]:
        """Setup: the round's config for every participant, asking for its two public keys."""
        self._enter(PHASE_ADVERTISE)
        q = self.quant
        return {u: self._request(PHASE_ADVERTISE, u, dim=self.dim, mod_bits=q.mod_bits, frac_bits=q.frac_bits,
                                 clip=float(q.clip), degree=self.nominal_degree)
                for u in self.participants}

    # ------------------------------------------------------------------ phase 1 -> 2

    def receive_keys(self, replies) -> dict[int, dict]:
        self._enter(PHASE_ADVERTISE)
        probe = X25519PrivateKey.generate()

        signed: dict[int, tuple[bytes, bytes]] = {}

        def parse(u: int, msg: Mapping) -> tuple[bytes, bytes]:
            c_pk, s_pk = get_bytes(msg, "c_pk", KEY_BYTES), get_bytes(msg, "s_pk", KEY_BYTES)
            if c_pk == s_pk:
                raise MessageRejected("c and s public keys are equal (revealing s would expose its shares)")
            agree(probe, c_pk)  # rejects low-order points
            agree(probe, s_pk)
            # relayed as they came: the neighbours check them against the deployment's CA
            signed[u] = (_optional_bytes(msg, "signature", MAX_SIGNATURE_BYTES),
                         _optional_bytes(msg, "certificate", MAX_CERTIFICATE_BYTES))
            return c_pk, s_pk

        keys = self._collect(PHASE_ADVERTISE, replies, set(self.participants), parse)
        self._signed = {u: signed[u] for u in keys}
        owner: dict[bytes, int] = {}
        clash: set[int] = set()
        for u in sorted(keys):
            for pk in keys[u]:
                if pk in owner and owner[pk] != u:
                    clash |= {u, owner[pk]}
                owner.setdefault(pk, u)
        for u in sorted(clash):
            self._reject(PHASE_ADVERTISE, u, "public key duplicates another client's")
            del keys[u]
            self.dropped[PHASE_ADVERTISE].append(u)
        self._keys = keys
        self._need(len(keys), "clients advertised keys")
        self.degree, self.threshold = effective_graph_params(self.params, self.nominal_degree, len(keys))
        self._graph = neighbour_graph(sorted(keys), self.degree, graph_seed(self.nonce, self.round_id))
        self._phase = PHASE_SHARE
        return {u: self._request(PHASE_SHARE, u, threshold=self.threshold, neighbours=list(nb),
                                 c_pks=[keys[v][0] for v in nb], s_pks=[keys[v][1] for v in nb],
                                 signatures=[self._signed[v][0] for v in nb],
                                 certificates=[self._signed[v][1] for v in nb])
                for u, nb in self._graph.items()}

    # ------------------------------------------------------------------ phase 2 -> 3

    def receive_shares(self, replies) -> dict[int, dict]:
        self._enter(PHASE_SHARE)

        def parse(u: int, msg: Mapping) -> tuple[dict[int, bytes], bytes]:
            nb = set(self._graph[u])
            recipients = get_ids(msg, "recipients")
            envs = get_bytes_list(msg, "ciphertexts", len(recipients))
            for v in recipients:
                if v not in nb:
                    raise MessageRejected(f"share addressed to client {v}, which is not a neighbour of {u}")
            missing = sorted(nb - set(recipients))
            if missing:
                raise MessageRejected(f"no share for neighbour(s) {missing[:5]}")
            for v, env in zip(recipients, envs):
                if len(env) != ENVELOPE_BYTES:
                    raise MessageRejected(f"share for client {v} has length {len(env)}, expected {ENVELOPE_BYTES}")
                if envelope_parties(env) != (u, v):
                    raise MessageRejected(f"share listed for client {v} is labelled {envelope_parties(env)}")
            return dict(zip(recipients, envs)), get_bytes(msg, "b_commit", 32)

        got = self._collect(PHASE_SHARE, replies, set(self._graph), parse)
        self._need(len(got), "clients shared keys")
        self._u2 = set(got)
        self._envelopes = {u: e for u, (e, _) in got.items()}
        self._commit = {u: c for u, (_, c) in got.items()}
        self._phase = PHASE_MASKED
        reqs = {}
        for v in sorted(self._u2):
            senders = [w for w in self._graph[v] if w in self._u2]
            self._forwarded[v] = senders
            self._forwarded_set[v] = set(senders)
            reqs[v] = self._request(PHASE_MASKED, v, senders=senders,
                                    ciphertexts=[self._envelopes[w][v] for w in senders])
        return reqs

    # ------------------------------------------------------------------ phase 3 -> 4

    def receive_masked(self, replies) -> dict[int, dict]:
        """Masked inputs in; feasibility checked *before* any unmask request is made."""
        self._enter(PHASE_MASKED)
        nbytes = packed_length(self.dim, self.quant.mod_bits)

        def parse(v: int, msg: Mapping) -> tuple[np.ndarray, list[int], list[str]]:
            y = msg.get("masked")
            if not isinstance(y, np.ndarray) or y.dtype != np.uint8 or y.ndim != 1:
                raise MessageRejected("field 'masked' must be a 1-D uint8 array")
            if y.size != nbytes:
                raise MessageRejected(f"masked vector has {y.size} bytes, expected {nbytes} "
                                      f"({self.dim} values at {self.quant.mod_bits} bits): wrong length")
            rejected = get_ids(msg, "rejected")
            stray = sorted(set(rejected) - self._forwarded_set[v])
            if stray:
                raise MessageRejected(f"reports shares from {stray[:5]}, which it was not sent")
            why = msg.get("rejected_reasons", [])
            if not isinstance(why, list) or len(why) != len(rejected) or not all(isinstance(x, str) for x in why):
                raise MessageRejected("field 'rejected_reasons' must be one string per rejected share")
            return np.array(y, copy=True), rejected, [x[:200] for x in why]

        got = self._collect(PHASE_MASKED, replies, set(self._u2), parse)
        blamed: dict[int, tuple[int, str]] = {}
        for v in sorted(got):
            for w, why in zip(got[v][1], got[v][2]):
                blamed.setdefault(w, (v, why))
        for w, (v, why) in sorted(blamed.items()):
            self._reject(PHASE_MASKED, w, f"client {v} could not open the share from client {w} ({why}): "
                                          "treated as dropped")
            if w in got:
                self.dropped[PHASE_MASKED].append(w)
        self._rejected_by = {v: set(r) for v, (_, r, _) in got.items()}
        u3 = set(got) - set(blamed)
        self._u3 = u3
        self._lost = self._u2 - u3
        self._masked = {v: got[v][0] for v in u3}

        problems = []
        if len(u3) < self.params.min_clients:
            problems.append(f"only {len(u3)} masked inputs, fewer than the {self.params.min_clients} a sum may cover")
        for u in sorted(self._u2):
            if u not in u3 and not any(v in u3 for v in self._graph[u]):
                continue  # nobody in the sum holds a mask with u
            holders = self._holders(u)
            if len(holders) < self.threshold:
                what = "self-mask seed" if u in u3 else "mask key"
                problems.append(f"client {u}'s {what} has {len(holders)} surviving share holder(s), "
                                f"needs t={self.threshold}")
        if len(u3) >= self.params.min_clients:
            sizes = self._components(u3)
            if len(sizes) > 1:
                # each component's pairwise masks cancel on their own: its sum would be learnable
                problems.insert(0, f"the clients in the sum split into {len(sizes)} unconnected groups "
                                   f"(sizes {sizes[:5]}): unmasking would reveal each group's sum")
        if problems:
            self._fail("; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
                       + "; no share was requested")
        self._phase = PHASE_CONSISTENCY
        for v in sorted(u3):
            held = [w for w in self._forwarded[v] if w not in self._rejected_by[v]]
            self._asked[v] = (frozenset(w for w in held if w in u3), frozenset(w for w in held if w in self._lost))
        return {v: self._request(PHASE_CONSISTENCY, v, survivors=sorted(u3)) for v in sorted(u3)}

    # ------------------------------------------------------------------ phase 4 -> 5

    def receive_consistency(self, replies) -> dict[int, dict]:
        """Each survivor's signature on the survivor set it was shown, relayed to its neighbours, which refuse to
        reveal any share unless t of theirs signed the same set (the consistency check)."""
        self._enter(PHASE_CONSISTENCY)

        def parse(v: int, msg: Mapping) -> bytes:
            return _optional_bytes(msg, "signature", MAX_SIGNATURE_BYTES)

        got = self._collect(PHASE_CONSISTENCY, replies, set(self._u3), parse)
        self._u4 = set(got)
        short = [u for u in sorted(self._u2) if (u in self._u3 or any(v in self._u3 for v in self._graph[u]))
                 and len([v for v in self._holders(u) if v in self._u4]) < self.threshold]
        if short:
            self._fail(f"too few share holders signed the survivor set for client(s) {short[:5]} "
                       f"(need t={self.threshold}); no share was requested")
        self._phase = PHASE_UNMASK
        reqs = {}
        for v in sorted(self._u4):
            signers = [w for w in self._graph[v] if w in self._u4]
            reqs[v] = self._request(PHASE_UNMASK, v, signers=signers, signatures=[got[w] for w in signers])
        return reqs

    def _holders(self, u: int) -> list[int]:
        """Clients in the sum that hold a valid share of u's secrets."""
        return [v for v in self._graph[u] if v in self._u3 and u in self._forwarded_set[v]
                and u not in self._rejected_by[v]]

    def _components(self, nodes: set[int]) -> list[int]:
        """Sizes of the connected components of the graph induced on `nodes` (largest first)."""
        seen: set[int] = set()
        sizes = []
        for start in sorted(nodes):
            if start in seen:
                continue
            seen.add(start)
            stack, size = [start], 0
            while stack:
                u = stack.pop()
                size += 1
                for v in self._graph[u]:
                    if v in nodes and v not in seen:
                        seen.add(v)
                        stack.append(v)
            sizes.append(size)
        return sorted(sizes, reverse=True)

    # ------------------------------------------------------------------ phase 4 -> result

    def receive_unmask(self, replies) -> SecAggResult:
        self._enter(PHASE_UNMASK)

        def parse(v: int, msg: Mapping) -> tuple[dict[int, int], dict[int, int]]:
            want_b, want_s = self._asked[v]
            out = []
            for kind, want in (("b", want_b), ("s", want_s)):
                owners = get_ids(msg, f"{kind}_owners")
                shares = get_bytes_list(msg, f"{kind}_shares", len(owners), SHARE_BYTES)
                if set(owners) != want:
                    raise MessageRejected(f"{kind}-shares for {sorted(owners)[:5]}, asked for {sorted(want)[:5]}")
                out.append({w: decode_share(s) for w, s in zip(owners, shares)})
            return out[0], out[1]

        got = self._collect(PHASE_UNMASK, replies, set(self._u4), parse)
        t = self.threshold
        b_points: dict[int, list[tuple[int, int]]] = {u: [] for u in self._u3}
        s_points: dict[int, list[tuple[int, int]]] = {w: [] for w in self._lost}
        for v in sorted(got):
            for u, y in got[v][0].items():
                b_points[u].append((share_x(v), y))
            for w, y in got[v][1].items():
                s_points[w].append((share_x(v), y))
        short = [u for u, p in b_points.items() if len(p) < t]
        short += [w for w, p in s_points.items() if len(p) < t and any(v in self._u3 for v in self._graph[w])]
        if short:
            self._fail(f"too few share holders answered the unmask request for client(s) {sorted(short)[:5]} "
                       f"(need t={t})")

        m = self.quant.mod_bits
        total = np.zeros(self.dim, dtype=np.uint64)
        for v in sorted(self._u3):
            total += unpack_bits(self._masked[v], m, self.dim)
        for u in sorted(self._u3):
            seed = self._reconstruct(b_points[u], u, "self-mask seed")
            total -= prg_u64(self_mask_key(seed, self.nonce, self.round_id, u), self.dim)
        for w in sorted(self._lost):
            if not s_points[w]:
                continue
            sk_raw = self._reconstruct(s_points[w], w, "mask key")
            sk = X25519PrivateKey.from_private_bytes(sk_raw)
            for u in self._graph[w]:
                if u not in self._u3:
                    continue
                mask = prg_u64(pair_mask_key(agree(sk, self._keys[u][1]), self.nonce, self.round_id, u, w), self.dim)
                if mask_sign(u, w) > 0:
                    total -= mask
                else:
                    total += mask
        total &= np.uint64(2**m - 1)
        self._phase = PHASE_UNMASK + 1
        log.info("secagg round %d: summed %d clients (dropped %s)", self.round_id, len(self._u3),
                 {s: len(v) for s, v in self.dropped.items() if v})
        return SecAggResult(self.round_id, total, sorted(self._u3), {s: sorted(v) for s, v in self.dropped.items()},
                            self.quant, self.degree, self.threshold, list(self.rejections),
                            sorted(u for u in self._u3 if all(self._signed.get(u, (b"", b"")))))

    def _reconstruct(self, points: list[tuple[int, int]], owner: int, what: str) -> bytes:
        value = shamir_reconstruct(sorted(points), self.threshold)
        ok = value < 2 ** (8 * KEY_BYTES)
        raw = value.to_bytes(KEY_BYTES, "big") if ok else b""
        if ok and what == "self-mask seed":
            ok = seed_commitment(raw, self.nonce, self.round_id, owner) == self._commit[owner]
        elif ok:
            ok = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw() == self._keys[owner][1]
        if not ok:
            self._fail(f"client {owner}'s reconstructed {what} does not match its commitment: "
                       "a share holder sent a wrong share")
        return raw
