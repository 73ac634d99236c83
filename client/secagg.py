"""The client half of SecAgg+ (primitives and message schema: `fedpa.common.secagg`).

One `SecAggClient` per client and round; each phase takes the server's request
(a dict) and returns the reply (a dict):

    client = SecAggClient(node_id)
    reply = client.advertise(req1)               # two X25519 public keys
    reply = client.share_keys(req2)              # encrypted Shamir shares for each neighbour
    reply = client.masked_input(req3, vector)    # the masked, quantized vector
    reply = client.consistency(req4)             # signs the survivor set the server shows it
    reply = client.unmask(req5)                  # shares of survivors' seeds / dropped clients' keys

`handle(req, vector)` dispatches on the request's phase. Between Flower
messages the client lives in `context.state`: `export_state()` gives a dict of
ints, floats, bytes and lists of them (it holds this round's private keys: keep
it in memory only), `SecAggClient.from_state(d)` restores it.

A request that breaks the protocol (wrong round, phase, sender or recipient,
malformed fields, a threshold below a majority, fewer than t neighbours at any
phase, a survivor set that leaves fewer than t of its neighbours in the sum or
that its neighbours did not sign as they were shown it, a value outside the
fixed-point range) raises `MessageRejected` (a SecAggError) and is recorded in
`rejections`; the client sends nothing for it, and leaves the round. Shares that
fail to open are reported to the server in the masked-input reply (their sender
is then treated as dropped). Which shares it reveals the client decides itself,
from the survivor set it signed: a seed share for a neighbour in the set, a key
share for one outside it, never both.

With an `Identity` (a key certified by the deployment's CA) the client signs
its keys and the survivor set, and refuses neighbours whose keys or survivor
sets do not carry a valid signature: the server can neither substitute keys nor
show one neighbourhood different survivor sets. Without one, the protocol
protects against an honest-but-curious server only (docs/design/secagg.md has
the threat model and its limits).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedpa.common.discrete_noise import DistributedNoise
from fedpa.common.secagg import (
    KEY_BYTES,
    MAX_DIM,
    MAX_NODE_ID,
    PHASE_ADVERTISE,
    PHASE_CONSISTENCY,
    PHASE_MASKED,
    PHASE_NAMES,
    PHASE_SHARE,
    PHASE_UNMASK,
    SERVER_ID,
    MessageRejected,
    QuantConfig,
    RandBytes,
    SecAggError,
    agree,
    check_header,
    count_clipped,
    encode_share,
    generate_keypair,
    get_bytes,
    get_bytes_list,
    get_float,
    get_ids,
    get_int,
    header,
    mask_sign,
    open_shares,
    pack_bits,
    pair_mask_key,
    prg_u64,
    quantize,
    seal_shares,
    seed_commitment,
    self_mask_key,
    shamir_share,
    share_key,
    share_x,
)
from fedpa.common.secagg.identity import (
    Identity,
    advertise_message,
    certified_key,
    consistency_message,
    verify,
)

log = logging.getLogger("fedpa.secagg")


class SecAggClient:
    def __init__(self, node_id: int, *, randbytes: RandBytes = os.urandom, require_majority: bool = True,
                 identity: Identity | None = None):
        if not 0 <= int(node_id) <= MAX_NODE_ID:
            raise SecAggError(f"node id {node_id} out of range 0..2^64-1")
        self.node_id = int(node_id)
        self.require_majority = require_majority
        self._rand = randbytes
        self.rejections: list[str] = []
        self.revealed: dict[str, list[int]] = {"b": [], "s": []}   # whose secrets' shares this client revealed
        self.done = 0                      # last phase answered
        self.aborted: str | None = None
        self.round_id: int | None = None
        self.nonce = b""
        self.quant: QuantConfig | None = None
        self.dim = 0
        self.threshold = 0
        self._c_sk: X25519PrivateKey | None = None
        self._s_sk: X25519PrivateKey | None = None
        self._seed = b""
        self._nb: dict[int, tuple[bytes, bytes]] = {}      # neighbour -> (c_pk, s_pk)
        self._shared: dict[int, tuple[bytes, bytes]] = {}  # neighbour -> (X25519 of c keys, of s keys)
        self._senders: list[int] = []                       # neighbours whose masks are in my vector
        self._held: dict[int, tuple[int, int]] = {}         # neighbour -> (b share, s share)
        self._bad: list[int] = []                           # neighbours whose share failed to open
        self._bad_why: list[str] = []
        self.identity = identity
        self._certs: dict[int, bytes] = {}                  # neighbour -> its certificate (with an identity)
        self._u3: list[int] = []                            # the survivor set this client signed

    # ------------------------------------------------------------------ helpers

    def _refuse(self, why: str, *, abort: bool = False) -> MessageRejected:
        self.rejections.append(why)
        log.warning("secagg client %d refused a request: %s", self.node_id, why)
        if abort:
            self.aborted = why
        return MessageRejected(why)

    def _check(self, msg, phase: int) -> None:
        if self.aborted:
            raise self._refuse(f"already left the round: {self.aborted}")
        if self.done != phase - 1:
            raise self._refuse(f"request for phase {phase} ({PHASE_NAMES[phase]}) after phase {self.done}")
        try:
            if phase == PHASE_ADVERTISE:
                if not isinstance(msg, Mapping):
                    raise MessageRejected("request is not a dict")
                round_id, nonce = get_int(msg, "round"), get_bytes(msg, "nonce", 32)
                if not 0 <= round_id < 2**63:
                    raise MessageRejected(f"round id {round_id} out of range")
            else:
                round_id, nonce = self.round_id, self.nonce
            check_header(msg, round_id=round_id, nonce=nonce, phase=phase, sender=SERVER_ID, recipient=self.node_id)
        except MessageRejected as e:
            raise self._refuse(str(e)) from None

    def _reply(self, phase: int, **fields) -> dict:
        self.done = phase
        return {**header(self.round_id, self.nonce, phase, self.node_id, SERVER_ID), **fields}

    def handle(self, msg: Mapping, vector: np.ndarray | None = None, noise: DistributedNoise | None = None) -> dict:
        phase = msg.get("phase") if isinstance(msg, Mapping) else None
        if phase == PHASE_ADVERTISE:
            return self.advertise(msg)
        if phase == PHASE_SHARE:
            return self.share_keys(msg)
        if phase == PHASE_MASKED:
            if vector is None:
                raise SecAggError("the masked-input phase needs the vector to aggregate")
            return self.masked_input(msg, vector, noise)
        if phase == PHASE_CONSISTENCY:
            return self.consistency(msg)
        if phase == PHASE_UNMASK:
            return self.unmask(msg)
        raise self._refuse(f"request for unknown phase {phase!r}")

    # ------------------------------------------------------------------ phase 1

    def advertise(self, msg: Mapping) -> dict:
        self._check(msg, PHASE_ADVERTISE)
        try:
            dim = get_int(msg, "dim")
            if not 1 <= dim <= MAX_DIM:
                raise MessageRejected(f"vector size {dim} out of range")
            quant = QuantConfig(clip=get_float(msg, "clip"), frac_bits=get_int(msg, "frac_bits"),
                                mod_bits=get_int(msg, "mod_bits"))
        except SecAggError as e:
            raise self._refuse(f"bad round config: {e}") from None
        self.round_id, self.nonce = int(msg["round"]), msg["nonce"]
        self.dim, self.quant = dim, quant
        self._c_sk, c_pk = generate_keypair(self._rand)
        self._s_sk, s_pk = generate_keypair(self._rand)
        signature, certificate = b"", b""
        if self.identity is not None:
            signature = self.identity.sign(advertise_message(self.round_id, self.nonce, self.node_id, c_pk, s_pk))
            certificate = self.identity.certificate
        return self._reply(PHASE_ADVERTISE, c_pk=c_pk, s_pk=s_pk, signature=signature, certificate=certificate)

    # ------------------------------------------------------------------ phase 2

    def share_keys(self, msg: Mapping) -> dict:
        self._check(msg, PHASE_SHARE)
        try:
            t = get_int(msg, "threshold")
            nbs = get_ids(msg, "neighbours")
            c_pks = get_bytes_list(msg, "c_pks", len(nbs), KEY_BYTES)
            s_pks = get_bytes_list(msg, "s_pks", len(nbs), KEY_BYTES)
            if self.node_id in nbs:
                raise MessageRejected("lists this client as its own neighbour")
            if not 2 <= t <= len(nbs):
                raise MessageRejected(f"threshold {t} must be within 2..{len(nbs)} neighbours")
            if self.require_majority and 2 * t <= len(nbs):
                raise MessageRejected(f"threshold {t} is not a majority of {len(nbs)} neighbours")
            if self.identity is not None:  # every neighbour's keys signed by a key the CA certified
                sigs = get_bytes_list(msg, "signatures", len(nbs))
                certs = get_bytes_list(msg, "certificates", len(nbs))
                for v, c, sk, sig, cert in zip(nbs, c_pks, s_pks, sigs, certs):
                    verify(self.identity.peer_key(cert, v), advertise_message(self.round_id, self.nonce, v, c, sk), sig,
                           f"keys of neighbour {v}")
                self._certs = dict(zip(nbs, certs))
            # X25519(c_me, c_v) keys both directions of share encryption; X25519(s_me, s_v) the pairwise mask
            shared = [agree(self._c_sk, pk) for pk in c_pks]
            mask_shared = [agree(self._s_sk, pk) for pk in s_pks]
        except MessageRejected as e:
            raise self._refuse(str(e), abort=True) from None
        self.threshold = t
        self._nb = {v: (c, s) for v, c, s in zip(nbs, c_pks, s_pks)}
        self._shared = {v: (c, s) for v, c, s in zip(nbs, shared, mask_shared)}
        self._seed = self._rand(KEY_BYTES)
        xs = [share_x(v) for v in nbs]
        b_sh = shamir_share(int.from_bytes(self._seed, "big"), t, xs, self._rand)
        s_sh = shamir_share(int.from_bytes(self._s_sk.private_bytes_raw(), "big"), t, xs, self._rand)
        envs = [seal_shares(share_key(sh, self.nonce, self.round_id, self.node_id, v), self.round_id, self.nonce,
                            self.node_id, v, bs, ss, self._rand)
                for v, sh, bs, ss in zip(nbs, shared, b_sh, s_sh)]
        return self._reply(PHASE_SHARE, recipients=nbs, ciphertexts=envs,
                           b_commit=seed_commitment(self._seed, self.nonce, self.round_id, self.node_id))

    # ------------------------------------------------------------------ phase 3

    def masked_input(self, msg: Mapping, vector: np.ndarray, noise: DistributedNoise | None = None) -> dict:
        """The vector in fixed point, plus ``noise``'s discrete Gaussian share (distributed DP), masked."""
        self._check(msg, PHASE_MASKED)
        try:
            senders = get_ids(msg, "senders")
            envs = get_bytes_list(msg, "ciphertexts", len(senders))
            stray = [w for w in senders if w not in self._nb]
            if stray:
                raise MessageRejected(f"forwards shares from non-neighbours {stray[:5]}")
            if len(set(senders)) < self.threshold:
                # with fewer, the server could leave this client's input masked by little but its self-mask,
                # whose seed its neighbours reveal for any survivor (Bonawitz et al.; Flower's client refuses too)
                raise MessageRejected(f"shares from only {len(set(senders))} neighbour(s), fewer than "
                                      f"t={self.threshold}")
        except MessageRejected as e:
            raise self._refuse(str(e), abort=True) from None
        x = np.asarray(vector).reshape(-1)
        if x.size != self.dim:
            raise SecAggError(f"vector has {x.size} values, the round aggregates {self.dim}")
        outside = count_clipped(x, self.quant)
        if outside or not np.all(np.isfinite(x)):
            raise self._refuse(f"{outside} value(s) of the update lie outside the round's fixed-point range "
                               f"[-{self.quant.clip:g}, {self.quant.clip:g}] (or are not finite): the client sends "
                               "nothing rather than a clipped update", abort=True)
        try:
            y = quantize(x, self.quant, None if noise is None else noise.draw(self.quant.frac_bits, self.dim))
        except SecAggError as e:
            raise self._refuse(f"{e}: the client sends nothing", abort=True) from None
        for w, env in zip(senders, envs):
            key = share_key(self._shared[w][0], self.nonce, self.round_id, w, self.node_id)
            try:
                self._held[w] = open_shares(key, self.round_id, self.nonce, env, w, self.node_id)
            except MessageRejected as e:
                self._bad.append(w)
                self._bad_why.append(str(e)[:200])
                self.rejections.append(str(e))
                log.warning("secagg client %d: %s", self.node_id, e)
        self._senders = senders
        y += prg_u64(self_mask_key(self._seed, self.nonce, self.round_id, self.node_id), self.dim)
        for w in senders:
            mask = prg_u64(pair_mask_key(self._shared[w][1], self.nonce, self.round_id, self.node_id, w), self.dim)
            if mask_sign(self.node_id, w) > 0:
                y += mask
            else:
                y -= mask
        y &= np.uint64(2**self.quant.mod_bits - 1)
        return self._reply(PHASE_MASKED, masked=pack_bits(y, self.quant.mod_bits), rejected=list(self._bad),
                           rejected_reasons=list(self._bad_why))

    # ------------------------------------------------------------------ phase 4

    def consistency(self, msg: Mapping) -> dict:
        """Phase 4: the server shows the survivor set U3 (whose masked inputs it has); the client checks that
        enough of its neighbours are in it and signs it as shown."""
        self._check(msg, PHASE_CONSISTENCY)
        try:
            survivors = get_ids(msg, "survivors")
        except MessageRejected as e:
            raise self._refuse(str(e), abort=True) from None
        if self.node_id not in survivors:
            raise self._refuse("the survivor set leaves out this client, whose masked input was sent", abort=True)
        mine = [w for w in self._held if w in set(survivors)]
        if len(mine) < self.threshold:
            raise self._refuse(f"only {len(mine)} of its neighbours are in the survivor set, fewer than "
                               f"t={self.threshold}", abort=True)
        self._u3 = sorted(set(survivors))
        signature = b""
        if self.identity is not None:
            signature = self.identity.sign(consistency_message(self.round_id, self.nonce, self._u3))
        return self._reply(PHASE_CONSISTENCY, signature=signature)

    def unmask(self, msg: Mapping) -> dict:
        """Phase 5: the neighbours' signatures on the survivor set; the client reveals, for each neighbour whose
        shares it holds, the seed share if that neighbour is in the set it signed, the key share if not."""
        self._check(msg, PHASE_UNMASK)
        try:
            signers = get_ids(msg, "signers")
            signatures = get_bytes_list(msg, "signatures", len(signers))
            if self.identity is not None:
                message = consistency_message(self.round_id, self.nonce, self._u3)
                valid = set()
                for v, sig in zip(signers, signatures):
                    if v not in self._certs:
                        raise MessageRejected(f"a survivor-set signature from client {v}, not a neighbour")
                    verify(certified_key(self._certs[v]), message, sig,   # checked against the CA in phase 2
                           f"neighbour {v}'s survivor set (not the one this client was shown)")
                    valid.add(v)
                if len(valid & set(self._u3)) < self.threshold:
                    raise MessageRejected(f"only {len(valid & set(self._u3))} neighbours signed the survivor set, "
                                          f"fewer than t={self.threshold}")
        except MessageRejected as e:
            raise self._refuse(str(e), abort=True) from None
        u3 = set(self._u3)
        survivors = sorted(w for w in self._held if w in u3)
        dropped = sorted(w for w in self._held if w not in u3)
        self.revealed = {"b": list(survivors), "s": list(dropped)}
        return self._reply(PHASE_UNMASK,
                           b_owners=survivors, b_shares=[encode_share(self._held[u][0]) for u in survivors],
                           s_owners=dropped, s_shares=[encode_share(self._held[w][1]) for w in dropped])

    # ------------------------------------------------------------------ state for context.state

    def export_state(self) -> dict:
        """This round's state as ints / floats / bytes / lists of them (contains private keys)."""
        q = self.quant
        nbs = list(self._nb)
        held = list(self._held)
        return {
            "node_id": self.node_id, "done": self.done, "aborted": self.aborted or "",
            "round": -1 if self.round_id is None else self.round_id, "nonce": self.nonce,
            "dim": self.dim, "threshold": self.threshold, "require_majority": int(self.require_majority),
            "clip": float(q.clip) if q else 0.0, "frac_bits": q.frac_bits if q else 0,
            "mod_bits": (q.mod_bits or 0) if q else 0,
            "c_sk": self._c_sk.private_bytes_raw() if self._c_sk else b"",
            "s_sk": self._s_sk.private_bytes_raw() if self._s_sk else b"",
            "seed": self._seed,
            "nb": nbs, "nb_c_pks": [self._nb[v][0] for v in nbs], "nb_s_pks": [self._nb[v][1] for v in nbs],
            "nb_c_shared": [self._shared[v][0] for v in nbs], "nb_s_shared": [self._shared[v][1] for v in nbs],
            "senders": list(self._senders), "bad": list(self._bad), "bad_why": list(self._bad_why),
            "held": held, "held_b": [encode_share(self._held[w][0]) for w in held],
            "held_s": [encode_share(self._held[w][1]) for w in held],
            "revealed_b": list(self.revealed["b"]), "revealed_s": list(self.revealed["s"]),
            "certs_of": list(self._certs), "certs": [self._certs[v] for v in self._certs], "u3": list(self._u3),
        }

    @classmethod
    def from_state(cls, st: Mapping, *, randbytes: RandBytes = os.urandom,
                   identity: Identity | None = None) -> SecAggClient:
        c = cls(int(st["node_id"]), randbytes=randbytes, require_majority=bool(st["require_majority"]),
                identity=identity)
        c.done, c.aborted = int(st["done"]), (st["aborted"] or None)
        c.round_id = None if int(st["round"]) < 0 else int(st["round"])
        c.nonce, c.dim, c.threshold = st["nonce"], int(st["dim"]), int(st["threshold"])
        if int(st["mod_bits"]):
            c.quant = QuantConfig(float(st["clip"]), int(st["frac_bits"]), int(st["mod_bits"]))
        c._c_sk = X25519PrivateKey.from_private_bytes(st["c_sk"]) if st["c_sk"] else None
        c._s_sk = X25519PrivateKey.from_private_bytes(st["s_sk"]) if st["s_sk"] else None
        c._seed = st["seed"]
        c._nb = {int(v): (cp, sp) for v, cp, sp in zip(st["nb"], st["nb_c_pks"], st["nb_s_pks"])}
        c._shared = {int(v): (cs, ss) for v, cs, ss in zip(st["nb"], st["nb_c_shared"], st["nb_s_shared"])}
        c._senders, c._bad = [int(v) for v in st["senders"]], [int(v) for v in st["bad"]]
        c._bad_why = [str(x) for x in st["bad_why"]]
        c._held = {int(w): (int.from_bytes(b, "big"), int.from_bytes(s, "big"))
                   for w, b, s in zip(st["held"], st["held_b"], st["held_s"])}
        c.revealed = {"b": [int(v) for v in st["revealed_b"]], "s": [int(v) for v in st["revealed_s"]]}
        c._certs = {int(v): cert for v, cert in zip(st.get("certs_of", []), st.get("certs", []))}
        c._u3 = [int(v) for v in st.get("u3", [])]
        return c
