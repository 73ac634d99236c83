"""SecAgg+ (server/secagg, client/secagg.py): exact sums, dropouts, failures, rejections, masks, Shamir,
fixed point. Deterministic: every party draws its randomness from a seeded AES-CTR stream."""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedpa.client.secagg import SecAggClient
from fedpa.common.secagg import (
    ENVELOPE_BYTES,
    PRIME,
    SERVER_ID,
    MessageRejected,
    QuantConfig,
    SecAggError,
    SecAggParams,
    choose_degree,
    dequantize_sum,
    generate_keypair,
    graph_seed,
    lagrange_at_zero,
    pack_bits,
    prg_u64,
    quantize,
    shamir_reconstruct,
    shamir_share,
    share_x,
    unpack_bits,
)
from fedpa.server.secagg import SecAggServer

D = 1000


def drbg(*label):
    """Deterministic randomness for tests only (production uses os.urandom)."""
    enc = Cipher(algorithms.AES(hashlib.sha256(repr(label).encode()).digest()), modes.CTR(bytes(16))).encryptor()
    return lambda n: enc.update(bytes(n))


def _flower_friendly(msg: dict) -> None:
    for k, v in msg.items():
        ok = (isinstance(v, (int, float, bytes, str)) or (isinstance(v, np.ndarray) and v.ndim == 1)
              or (isinstance(v, list) and all(isinstance(x, (int, bytes, str)) for x in v)))
        assert ok, f"{k}: {type(v)}"


class Round:
    """Drives one round in process: the server's five requests, each client's replies. drop(phase, server) ->
    clients that send nothing at that phase; tamper_requests / tamper_replies(phase, ...) rewrite what goes to
    clients / to the server (a scripted malicious server); identities: node id -> Identity (signed keys and
    survivor sets)."""

    def __init__(self, vectors: dict[int, np.ndarray], *, params=SecAggParams(), quant=QuantConfig(), seed=0,
                 round_id=7, drop=None, tamper_requests=None, tamper_replies=None, via_state=False,
                 client_kwargs=None, identities=None, noise=None):
        self.vectors = vectors
        self.noise = noise or {}        # node id -> its DistributedNoise share (distributed DP)
        self.identities = identities or {}
        self.server = SecAggServer(sorted(vectors), len(next(iter(vectors.values()))), round_id=round_id,
                                   quant=quant, params=params, randbytes=drbg(seed, "server"))
        self.clients = {u: SecAggClient(u, randbytes=drbg(seed, u), identity=self.identities.get(u),
                                        **(client_kwargs or {})) for u in vectors}
        self.drop = drop or (lambda phase, server: set())
        self.tamper_requests = tamper_requests or (lambda phase, reqs: reqs)
        self.tamper_replies = tamper_replies or (lambda phase, pairs: pairs)
        self.via_state = via_state
        self.replies: dict[int, list] = {}
        self.refused: dict[int, list[int]] = {}

    def run(self):
        srv = self.server
        reqs = srv.advertise_requests()
        steps = [(1, lambda c, m, u: c.advertise(m), srv.receive_keys),
                 (2, lambda c, m, u: c.share_keys(m), srv.receive_shares),
                 (3, lambda c, m, u: c.masked_input(m, self.vectors[u], self.noise.get(u)), srv.receive_masked),
                 (4, lambda c, m, u: c.consistency(m), srv.receive_consistency),
                 (5, lambda c, m, u: c.unmask(m), srv.receive_unmask)]
        out = None
        for phase, act, receive in steps:
            reqs = self.tamper_requests(phase, reqs)
            gone = set(self.drop(phase, srv))
            pairs = []
            for u, m in reqs.items():
                _flower_friendly(m)
                if u in gone:
                    continue
                if self.via_state:
                    self.clients[u] = SecAggClient.from_state(self.clients[u].export_state(), randbytes=drbg(u, phase),
                                                              identity=self.identities.get(u))
                try:
                    reply = act(self.clients[u], m, u)
                except MessageRejected:
                    self.refused.setdefault(phase, []).append(u)
                    continue
                _flower_friendly(reply)
                pairs.append((u, reply))
            pairs = self.tamper_replies(phase, pairs)
            self.replies[phase] = pairs
            out = receive(pairs)
            reqs = out
        return out

    def revealed_both(self) -> set[int]:
        """Clients of which the server received a self-mask seed share from one holder and a mask-key share
        from another: with t of each it learns that client's input."""
        seeds = {w for c in self.clients.values() for w in c.revealed["b"]}
        keys = {w for c in self.clients.values() for w in c.revealed["s"]}
        return seeds & keys


IDENTITY_IDS = [10 * i + 3 for i in range(16)]


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    """Node id -> Identity, from real key files: the deployment's CA (server.pki) certifying each node's
    authentication key; plus one identity certified by another CA (a server minting its own participants)."""
    from fedpa.common.secagg.identity import Identity
    from fedpa.server.pki import issue_node_certificate, make_node_key, make_server_files

    d = tmp_path_factory.mktemp("pki")
    ca = make_server_files(d / "certs")
    out = {}
    for u in IDENTITY_IDS:
        key = make_node_key(d / "keys", f"node-{u}")
        out[u] = Identity.load(key.private, issue_node_certificate(ca, key, f"node-{u}", u), ca.ca_cert)
    rogue_ca = make_server_files(d / "rogue")
    key = make_node_key(d / "rogue-keys", "mallory")
    out["rogue"] = Identity.load(key.private, issue_node_certificate(rogue_ca, key, "mallory", 13), rogue_ca.ca_cert)
    return out


def vectors(n, d=D, seed=0, ids=None):
    rng = np.random.default_rng(seed)
    ids = ids or [10 * i + 3 for i in range(n)]
    out = {}
    for u in ids:
        v = rng.uniform(-4, 4, d).astype(np.float32)
        v[-1] = 1.0  # a count rides along
        out[u] = v
    return out


def check_sum(res, vecs, included):
    assert res.included == sorted(included)
    q = res.quant
    plain = np.zeros(len(next(iter(vecs.values()))), np.uint64)
    for u in included:
        plain += quantize(vecs[u], q)
    plain &= np.uint64(2**q.mod_bits - 1)
    np.testing.assert_array_equal(res.sum, plain)          # exact modular sum
    true = np.sum([np.clip(vecs[u].astype(np.float64), -q.clip, q.clip) for u in included], axis=0)
    got = res.dequantize()
    bound = len(included) * 2.0 ** -(q.frac_bits + 1)
    assert np.max(np.abs(got - true)) <= bound
    assert got[-1] == len(included)                        # the count is exact
    mean = got[:-1] / got[-1]
    assert np.max(np.abs(mean - true[:-1] / len(included))) <= 2.0 ** -(q.frac_bits + 1)


# --------------------------------------------------------------------------- correctness


def test_sum_is_exact_and_float_sum_within_bound():
    vecs = vectors(10)
    r = Round(vecs)
    res = r.run()
    assert (res.degree, res.threshold) == (9, 5)            # n = 10: complete graph, majority threshold
    check_sum(res, vecs, list(vecs))
    assert r.server.rejections == [] and all(not c.rejections for c in r.clients.values())


def test_sparse_graph_sum_and_per_client_cost_is_k():
    vecs = vectors(20, seed=1)
    r = Round(vecs, params=SecAggParams(degree=6))
    res = r.run()
    assert (res.degree, res.threshold) == (6, 4)
    graph = r.server._graph
    assert all(len(nb) == 6 for nb in graph.values())
    assert all(u in graph[v] for u in graph for v in graph[u])          # symmetric
    for _u, m in r.replies[2]:
        assert len(m["ciphertexts"]) == 6                                 # O(k) shares, not O(n)
    check_sum(res, vecs, list(vecs))


def test_client_state_survives_export_between_every_stage():
    vecs = vectors(6, seed=2)
    res = Round(vecs, via_state=True).run()
    check_sum(res, vecs, list(vecs))


@pytest.mark.parametrize("signed", [False, True], ids=["plain", "identities"])
@pytest.mark.parametrize("phase,included_after", [
    (1, False),   # drop before advertising keys
    (2, False),   # after advertising, before sharing keys
    (3, False),   # after sharing keys, before the masked input: its pairwise masks are removed
    (4, True),    # after the masked input, before signing the survivor set: its vector counts
    (5, True),    # after signing: its self-mask is rebuilt from its neighbours' shares
])
def test_dropout_at_each_stage(phase, included_after, signed, identities):
    vecs = vectors(12, seed=phase)
    victims = {13, 73}
    r = Round(vecs, params=SecAggParams(degree=6), drop=lambda s, srv: victims if s == phase else set(),
              identities=identities if signed else None)
    res = r.run()
    assert res.dropped[phase] == sorted(victims)
    assert all(not v for s, v in res.dropped.items() if s != phase)
    included = list(vecs) if included_after else [u for u in vecs if u not in victims]
    check_sum(res, vecs, included)
    assert not r.revealed_both() and not r.refused


def test_dropouts_at_several_stages_at_once(identities):
    vecs = vectors(16, seed=9)
    plan = {1: {3}, 2: {23}, 3: {53, 63}, 4: {93}, 5: {113}}
    r = Round(vecs, params=SecAggParams(degree=10), drop=lambda s, srv: plan.get(s, set()), identities=identities)
    res = r.run()
    check_sum(res, vecs, [u for u in vecs if u not in {3, 23, 53, 63}])


# --------------------------------------------------------------------------- failure before revealing


def test_too_many_neighbours_drop_fails_before_any_share_is_requested():
    vecs = vectors(10, seed=4)

    def drop(phase, srv):
        if phase != 3:
            return set()
        victim_nb = srv._graph[3]       # client 3 has 4 neighbours, t = 3: two of them leave
        return set(victim_nb[:2])

    r = Round(vecs, params=SecAggParams(degree=4), drop=drop)
    with pytest.raises(SecAggError,
                       match="client 3's self-mask seed has 2 surviving share holder.*no share was requested"):
        r.run()
    assert r.server.failed
    assert 4 not in r.replies                                 # no unmask request was ever made
    assert all(c.done <= 3 and c.revealed == {"b": [], "s": []} for c in r.clients.values())
    with pytest.raises(SecAggError, match="already failed"):
        r.server.receive_unmask([])


def test_survivors_split_into_groups_fails_before_any_share_is_requested():
    # a ring (Harary, k = 4) with t = 2: dropping two runs of two neighbours on the cycle leaves every
    # secret with enough holders, but the survivors form two groups whose sums would each be learnable
    vecs = vectors(10, seed=6)

    def drop(phase, srv):
        if phase != 3:
            return set()
        ids = sorted(srv._graph)
        order = [ids[i] for i in np.argsort(prg_u64(graph_seed(srv.nonce, srv.round_id), len(ids)), kind="stable")]
        return {order[0], order[1], order[5], order[6]}

    r = Round(vecs, params=SecAggParams(degree=4, threshold=2), drop=drop,
              client_kwargs={"require_majority": False})
    with pytest.raises(SecAggError,
                       match=r"split into 2 unconnected groups \(sizes \[3, 3\]\).*no share was requested"):
        r.run()
    assert all(c.revealed == {"b": [], "s": []} for c in r.clients.values())


def test_too_few_clients_left_fails_cleanly():
    vecs = vectors(5, seed=5)
    r = Round(vecs, drop=lambda s, srv: {3, 13, 23} if s == 2 else set())
    with pytest.raises(SecAggError, match="only 2 clients shared keys"):
        r.run()
    assert all(c.revealed == {"b": [], "s": []} for c in r.clients.values())


# --------------------------------------------------------------------------- masks look uniform


def test_masked_vector_is_indistinguishable_from_uniform():
    d = 20000
    plain = np.full(d, 7.5, np.float32)              # as far from uniform as a vector gets
    plain[::2] = -3.25
    vecs = {u: plain.copy() for u in (1, 2, 3, 4, 5)}
    r = Round(vecs, seed=11)
    res = r.run()
    m = res.quant.mod_bits
    packed = dict(r.replies[3])[1]["masked"]
    y = unpack_bits(packed, m, d)

    def chi2(counts):
        e = counts.sum() / len(counts)
        return float(((counts - e) ** 2 / e).sum())

    # df = 255: the 0.1% critical value is 330.5; df = 15: 37.7
    assert chi2(np.bincount(packed[:-1], minlength=256)) < 330.5
    assert chi2(np.bincount((y >> np.uint64(m - 4)).astype(np.int64), minlength=16)) < 37.7
    corr = np.corrcoef(y.astype(np.float64), plain.astype(np.float64))[0, 1]
    assert abs(corr) < 4 / math.sqrt(d)
    # the same tests do see the unmasked quantized vector
    q_packed = pack_bits(quantize(plain, res.quant), m)
    assert chi2(np.bincount(q_packed[:-1], minlength=256)) > 10_000


# --------------------------------------------------------------------------- rejections


def _mutate(phase, victim, fn):
    def tamper(s, pairs):
        if s != phase:
            return pairs
        out = []
        for u, m in pairs:
            if u == victim:
                res = fn(dict(m))
                out.extend(res if isinstance(res, list) else [(u, res)])
            else:
                out.append((u, m))
        return out
    return tamper


def _flip(env: bytes) -> bytes:
    b = bytearray(env)
    b[-5] ^= 1
    return bytes(b)


REJECTIONS = {
    "wrong round": (1, lambda m: {**m, "round": m["round"] + 1}, "wrong round", 1),
    "other nonce": (2, lambda m: {**m, "nonce": bytes(32)}, "another nonce", 2),
    "wrong phase": (2, lambda m: {**m, "phase": 3}, "wrong phase", 2),
    "wrong sender": (3, lambda m: {**m, "sender": 3}, "wrong sender", 3),
    "replay": (2, lambda m: [(13, m), (13, m)], "replay", 2),
    "share to a non-neighbour": (2, lambda m: {**m, "recipients": [m["recipients"][0]] + [99999] + m["recipients"][2:]},
                                 "not a neighbour", 2),
    "tampered ciphertext": (2, lambda m: {**m, "ciphertexts": [_flip(m["ciphertexts"][0])] + m["ciphertexts"][1:]},
                            "failed authentication", 3),
    "wrong-length vector": (3, lambda m: {**m, "masked": m["masked"][:-1]}, "wrong length", 3),
    "not an array": (3, lambda m: {**m, "masked": m["masked"].tobytes()}, "1-D uint8 array", 3),
    "missing key": (1, lambda m: {k: v for k, v in m.items() if k != "s_pk"}, "field 's_pk' must be bytes", 1),
    "low-order key": (1, lambda m: {**m, "c_pk": bytes(32)}, "invalid X25519 public key", 1),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_bad_message_is_rejected_and_round_completes_for_the_others(case):
    phase, fn, reason, dropped_at = REJECTIONS[case]
    vecs = vectors(10, seed=20)
    victim = 13
    r = Round(vecs, params=SecAggParams(degree=6), tamper_replies=_mutate(phase, victim, fn))
    res = r.run()
    assert any(reason in x.reason and x.client == victim for x in r.server.rejections), r.server.reasons
    assert any(reason in s for s in r.server.reasons)
    assert victim in res.dropped[dropped_at]
    check_sum(res, vecs, [u for u in vecs if u != victim])


def test_share_forwarded_to_the_wrong_client_is_detected_by_the_client():
    vecs = vectors(8, seed=21)
    w, victims = 13, {}

    def tamper(phase, reqs):
        if phase != 3:
            return reqs
        # swap w's envelopes between two of its neighbours: each now holds a share addressed to the other
        a, b = [v for v, m in reqs.items() if w in m["senders"]][:2]
        ia, ib = reqs[a]["senders"].index(w), reqs[b]["senders"].index(w)
        ca, cb = list(reqs[a]["ciphertexts"]), list(reqs[b]["ciphertexts"])
        ca[ia], cb[ib] = cb[ib], ca[ia]
        victims.update(a=a, b=b)
        return {**reqs, a: {**reqs[a], "ciphertexts": ca}, b: {**reqs[b], "ciphertexts": cb}}

    r = Round(vecs, tamper_requests=tamper)
    res = r.run()
    assert any("addressed to client" in s for s in r.clients[victims["a"]].rejections)
    assert any(x.client == w and "could not open" in x.reason for x in r.server.rejections)
    check_sum(res, vecs, [u for u in vecs if u != w])


def test_message_from_a_stranger_is_ignored():
    vecs = vectors(6, seed=22)
    r = Round(vecs, tamper_replies=lambda s, p: p + [(424242, dict(p[0][1]))] if s == 2 else p)
    res = r.run()
    assert any(x.client is None and "unknown sender 424242" in x.reason for x in r.server.rejections)
    check_sum(res, vecs, list(vecs))


# --------------------------------------------------------------------------- client refusals


def _client_at(phase_wanted):
    """A client that has answered every phase before ``phase_wanted``, and the request it gets there."""
    vecs = vectors(6, seed=23)
    captured = {}

    def tamper(phase, reqs):
        if phase == phase_wanted:
            captured.update(reqs)
            return {}
        return reqs

    r = Round(vecs, tamper_requests=tamper)
    with pytest.raises(SecAggError):
        r.run()
    u = next(iter(captured))
    return r.clients[u], captured[u], r


def test_client_decides_what_to_reveal_from_the_set_it_signed():
    # an unmask request cannot name which secrets to reveal: the client reveals the seed share of each
    # neighbour in the survivor set it signed and the key share of each one outside it, never both
    client, req, r = _client_at(4)
    survivors = [u for u in req["survivors"] if u != 43]
    reply4 = client.consistency({**req, "survivors": survivors})
    assert reply4["signature"] == b""
    reply = client.unmask(r.server._request(5, client.node_id, signers=[], signatures=[]) | {
        "survivors": req["survivors"], "dropped": [43], "b_owners": [43]})
    held = sorted(client._held)
    assert reply["b_owners"] == [w for w in held if w in survivors]
    assert reply["s_owners"] == [w for w in held if w not in survivors]
    assert not set(reply["b_owners"]) & set(reply["s_owners"])
    with pytest.raises(MessageRejected, match="after phase 5"):     # and it answers once
        client.unmask(req)


def test_client_refuses_a_survivor_set_with_too_few_neighbours_or_without_itself():
    client, req, _ = _client_at(4)
    with pytest.raises(MessageRejected, match="fewer than t"):
        client.consistency({**req, "survivors": [client.node_id]})
    assert client.aborted and client.revealed == {"b": [], "s": []}
    client, req, _ = _client_at(4)
    with pytest.raises(MessageRejected, match="leaves out this client"):
        client.consistency({**req, "survivors": [u for u in req["survivors"] if u != client.node_id]})


# --------------------------------------------------------------------------- a malicious server


@pytest.mark.parametrize("keep", [0, 1, 2], ids=["no senders", "one sender", "t-1 senders"])
def test_masked_input_refused_when_the_server_forwards_fewer_than_t_shares(keep):
    # with few pairwise masks the target's input would be hidden by its self-mask alone, whose seed its
    # neighbours reveal for any survivor: the target refuses to send it
    vecs = vectors(10, seed=30)
    target = 23

    def tamper(phase, reqs):
        if phase != 3:
            return reqs
        m = reqs[target]
        return {**reqs, target: {**m, "senders": m["senders"][:keep], "ciphertexts": m["ciphertexts"][:keep]}}

    r = Round(vecs, params=SecAggParams(degree=6), tamper_requests=tamper)
    res = r.run()
    assert r.refused[3] == [target]
    assert any("fewer than t=4" in x for x in r.clients[target].rejections)
    assert target not in dict(r.replies[3])                     # its masked input never left
    assert target in res.dropped[3]
    check_sum(res, vecs, [u for u in vecs if u != target])      # the others' sum is still exact


def _inconsistent_survivors(target: int, victim: int):
    """Phase 4 as a malicious server plays it: ``victim`` is a survivor, but ``target`` (a neighbour holding
    its shares) is told it dropped, so that ``target`` reveals its mask-key share while the others reveal its
    self-mask seed share: with both, the server would unmask the victim's input."""
    def tamper(phase, reqs):
        if phase != 4:
            return reqs
        m = reqs[target]
        return {**reqs, target: {**m, "survivors": [u for u in m["survivors"] if u != victim]}}
    return tamper


def test_survivor_sets_that_differ_between_clients_are_refused(identities):
    vecs = vectors(10, seed=31)
    target, victim = 3, None
    probe = Round(vecs, params=SecAggParams(degree=6))
    probe.run()
    victim = probe.server._graph[target][0]
    r = Round(vecs, params=SecAggParams(degree=6), identities=identities,
              tamper_requests=_inconsistent_survivors(target, victim))
    with pytest.raises(SecAggError):
        r.run()
    assert any("not the one this client was shown" in x and "does not verify" in x
               for x in r.clients[target].rejections)
    assert r.clients[target].revealed == {"b": [], "s": []}
    assert victim not in r.revealed_both()
    assert not r.revealed_both()


def test_without_identities_the_same_attack_succeeds():
    # the threat model without identities is an honest-but-curious server (docs/design/secagg.md): this test
    # pins that limit, so that the docs and the code cannot drift apart
    vecs = vectors(10, seed=31)
    probe = Round(vecs, params=SecAggParams(degree=6))
    probe.run()
    victim = probe.server._graph[3][0]
    r = Round(vecs, params=SecAggParams(degree=6), tamper_requests=_inconsistent_survivors(3, victim))
    try:
        r.run()
    except SecAggError:
        pass
    assert victim in r.revealed_both()


def test_substituted_keys_are_refused(identities):
    # a server in the middle hands client 3 its own key for a neighbour: the neighbour's signature over its
    # keys no longer verifies
    vecs = vectors(10, seed=32)
    attacker, _ = generate_keypair(drbg("mitm"))

    def tamper(phase, reqs):
        if phase != 2:
            return reqs
        m = reqs[3]
        return {**reqs, 3: {**m, "c_pks": [generate_keypair(drbg("mitm"))[1]] + m["c_pks"][1:]}}

    r = Round(vecs, params=SecAggParams(degree=6), identities=identities, tamper_requests=tamper)
    res = r.run()
    assert r.refused[2] == [3]
    assert any("signature does not verify" in x for x in r.clients[3].rejections)
    check_sum(res, vecs, [u for u in vecs if u != 3])


def _keys_of_13_signed_by(signer):
    """A server's phase-1 tampering: client 13's advertised keys re-signed by ``signer``, its certificate
    attached. Returns the tamper hook and a one-slot list where the test puts its `Round` (the signature binds
    the round's nonce, known once the round exists)."""
    from fedpa.common.secagg.identity import advertise_message

    rounds: list = [None]

    def tamper(phase, pairs):
        if phase != 1:
            return pairs
        out = []
        for u, m in pairs:
            if u == 13:
                msg = advertise_message(m["round"], rounds[0].server.nonce, 13, m["c_pk"], m["s_pk"])
                m = {**m, "signature": signer.sign(msg), "certificate": signer.certificate}
            out.append((u, m))
        return out

    return tamper, rounds


def test_keys_signed_by_an_identity_from_another_ca_are_refused(identities):
    # a server minting its own participant: a valid signature under a certificate the deployment never issued
    vecs = vectors(10, seed=33)
    tamper, rounds = _keys_of_13_signed_by(identities["rogue"])
    r = rounds[0] = Round(vecs, params=SecAggParams(degree=6), identities=identities, tamper_replies=tamper)
    with pytest.raises(SecAggError, match="no share was requested"):   # a server can stop a round, no more
        r.run()
    neighbours = r.server._graph[13]
    assert sorted(r.refused[2]) == sorted(neighbours)
    assert all(any("not issued by the deployment's CA" in x for x in r.clients[v].rejections) for v in neighbours)
    assert all(c.revealed == {"b": [], "s": []} for c in r.clients.values())


def test_a_certified_key_cannot_sign_for_another_node(identities):
    # a client colluding with the server signs keys for node 13 with its own (valid) identity: one
    # certified key could otherwise fill a victim's neighbourhood with Sybils
    vecs = vectors(10, seed=36)
    tamper, rounds = _keys_of_13_signed_by(identities[153])
    r = rounds[0] = Round(vecs, params=SecAggParams(degree=6), identities=identities, tamper_replies=tamper)
    with pytest.raises(SecAggError):
        r.run()
    assert all(any("certificate is for node 153, not node 13" in x for x in r.clients[v].rejections)
               for v in r.server._graph[13])


def test_identity_files_are_checked_when_loaded(identities, tmp_path):
    from fedpa.common.secagg.identity import Identity, IdentityError
    from fedpa.server.pki import issue_node_certificate, make_node_key, make_server_files

    ca = make_server_files(tmp_path / "certs")
    a, b = make_node_key(tmp_path / "keys", "a"), make_node_key(tmp_path / "keys", "b")
    cert_a = issue_node_certificate(ca, a, "a", 5)
    assert Identity.load(a.private, cert_a, ca.ca_cert, node_id=5).node_id == 5
    with pytest.raises(MessageRejected, match="certificate is for node 5, not node 6"):
        Identity.load(a.private, cert_a, ca.ca_cert, node_id=6)
    with pytest.raises(IdentityError, match="not for the key"):
        Identity.load(b.private, cert_a, ca.ca_cert)
    with pytest.raises(IdentityError, match="no such file"):
        Identity.load(a.private, tmp_path / "missing.crt", ca.ca_cert)
    (tmp_path / "junk.crt").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(IdentityError, match="not an X.509 certificate"):
        Identity.load(a.private, tmp_path / "junk.crt", ca.ca_cert)


def test_unsigned_keys_are_refused_by_a_client_with_an_identity(identities):
    vecs = vectors(6, seed=34)
    ids = {u: identities[u] for u in vecs if u != 13}    # client 13 has no identity
    r = Round(vecs, identities=ids)
    with pytest.raises(SecAggError):
        r.run()
    assert all(any("missing or oversized" in x for x in r.clients[u].rejections) for u in ids)


def test_values_outside_the_fixed_point_range_are_refused_not_clipped():
    vecs = vectors(8, seed=35)
    vecs[13] = vecs[13].copy()
    vecs[13][5] = 9.0                                  # the range is [-8, 8]
    vecs[23] = vecs[23].copy()
    vecs[23][7] = np.nan
    r = Round(vecs)
    res = r.run()
    assert sorted(r.refused[3]) == [13, 23]
    assert any("outside the round's fixed-point range" in x for x in r.clients[13].rejections)
    check_sum(res, vecs, [u for u in vecs if u not in (13, 23)])


def test_a_client_masks_its_vector_once_per_round(tmp_path):
    # a second setup request would let the server collect two maskings of one vector: the node refuses it
    import time

    from flwr.app import ConfigRecord, Context, Metadata, RecordDict
    from flwr.app import Message as FlwrMessage

    from fedpa.client.app import _secagg_phase
    from fedpa.common.records import arrays_to_record
    from fedpa.common.secagg.transport import pack
    from fedpa.foundation.errors import FedpaError

    srv = SecAggServer([1, 2, 3, 4], 10, round_id=5, randbytes=drbg("once"))
    req = srv.advertise_requests()[1]
    state = RecordDict({"secagg-vector": arrays_to_record({"v": np.zeros(10, np.float32)})})
    ctx = Context(run_id=1, node_id=1, node_config={}, state=state, run_config={})

    def ask(r):
        meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="5-secagg", created_at=time.time(), ttl=60.0, message_type="train")
        return _secagg_phase(FlwrMessage(content=pack(r), metadata=meta), ctx)

    ask(req)
    with pytest.raises(FedpaError, match=r"second SecAgg\+ setup for round 5"):
        ask(req)
    assert isinstance(ctx.state["secagg-rounds"], ConfigRecord)


def test_client_checks_round_sender_recipient_and_threshold():
    srv = SecAggServer([1, 2, 3, 4, 5], 10, round_id=3, randbytes=drbg("s"))
    reqs = srv.advertise_requests()
    c = SecAggClient(1, randbytes=drbg(1))
    with pytest.raises(MessageRejected, match="addressed to 2"):
        c.advertise(reqs[2])
    with pytest.raises(MessageRejected, match="wrong sender"):
        c.advertise({**reqs[1], "sender": 5})
    with pytest.raises(MessageRejected, match="phase 3"):
        c.handle({**reqs[1], "phase": 3}, np.zeros(10))
    others = {u: SecAggClient(u, randbytes=drbg(u)) for u in (1, 2, 3, 4, 5)}
    reqs2 = srv.receive_keys({u: others[u].advertise(reqs[u]) for u in others})
    with pytest.raises(MessageRejected, match="wrong round"):
        others[1].share_keys({**reqs2[1], "round": 4})
    with pytest.raises(MessageRejected, match="not a majority"):
        others[1].share_keys({**reqs2[1], "threshold": 2})
    with pytest.raises(MessageRejected, match="already left the round"):    # a refusal ends its part
        others[1].share_keys(reqs2[1])
    assert others[2].share_keys(reqs2[2])["recipients"] == reqs2[2]["neighbours"]


def test_client_rejects_wrong_vector_length():
    vecs = vectors(4, seed=24)
    vecs[13] = vecs[13][:-1]
    r = Round(vecs)
    with pytest.raises(SecAggError, match="vector has 999 values"):
        r.run()


# --------------------------------------------------------------------------- Shamir


def test_shamir_any_t_of_k_shares_reconstruct_and_fewer_do_not():
    rand = drbg("shamir")
    t = 4  # of k = 7 holders
    holders = [5, 9, 17, 2**64 - 1, 0, 33, 1000]
    xs = [share_x(h) for h in holders]
    for _trial in range(5):
        secret = int.from_bytes(rand(32), "big")
        ys = shamir_share(secret, t, xs, rand)
        pts = list(zip(xs, ys))
        for subset in itertools.combinations(pts, t):
            assert shamir_reconstruct(list(subset), t) == secret
        assert shamir_reconstruct(pts, t) == secret
        for subset in itertools.combinations(pts, t - 1):
            assert lagrange_at_zero(list(subset)) != secret
            with pytest.raises(SecAggError, match="cannot reconstruct"):
                shamir_reconstruct(list(subset), t)


def test_shamir_fewer_than_t_shares_are_consistent_with_every_secret():
    # t - 1 shares plus any candidate value at 0 lie on a degree t - 1 polynomial: they say nothing
    rand = drbg("shamir2")
    t, xs = 3, [share_x(i) for i in range(5)]
    ys = shamir_share(12345, t, xs, rand)
    seen = set()
    for candidate in (0, 1, 12345, PRIME - 1):
        pts = [(0, candidate)] + list(zip(xs[:t - 1], ys[:t - 1]))
        # the unique interpolant through these t points, evaluated at a third holder, is a valid share
        third = xs[t - 1]
        val = lagrange_at_zero([(x - third, y) for x, y in pts])  # shift so that `third` sits at 0
        seen.add(val)
    assert len(seen) == 4        # each candidate secret gives a different, equally valid world


def test_shamir_round_trips_an_x25519_private_key():
    rand = drbg("shamir3")
    sk, pk = generate_keypair(rand)
    xs = [share_x(i) for i in range(1, 6)]
    ys = shamir_share(int.from_bytes(sk.private_bytes_raw(), "big"), 3, xs, rand)
    raw = shamir_reconstruct(list(zip(xs, ys))[2:], 3).to_bytes(32, "big")
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    assert X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw() == pk


# --------------------------------------------------------------------------- fixed point


def test_quantization_at_the_clipping_edge_never_wraps():
    cfg = QuantConfig(clip=1.0, frac_bits=4).for_clients(1000)
    assert cfg.mod_bits == 15 and cfg.max_clients == 1023
    n = cfg.max_clients
    edge = np.array([1.0, -1.0, 5.0, -5.0, 1.0 - 2**-5, 0.03125])   # two beyond the edge: clipped
    s = np.zeros(len(edge), np.uint64)
    for _ in range(n):
        s += quantize(edge, cfg)
    s &= np.uint64(2**cfg.mod_bits - 1)
    got = dequantize_sum(s, n, cfg)
    true = n * np.clip(edge, -1, 1)
    assert np.max(np.abs(got - true)) <= n * 2.0 ** -(cfg.frac_bits + 1)
    np.testing.assert_array_equal(got[:4], [n, -n, n, -n])
    with pytest.raises(SecAggError, match="may wrap"):
        dequantize_sum(s, n + 1, cfg)


def test_quantization_error_bound_with_random_values_at_default_config():
    rng = np.random.default_rng(30)
    n = 200
    cfg = QuantConfig().for_clients(n)
    assert cfg.mod_bits == 36 and cfg.max_clients >= n
    xs = rng.uniform(-8, 8, (n, 5000))
    xs[:, :10] = 8.0                                      # at the edge
    s = np.zeros(5000, np.uint64)
    for x in xs:
        s += quantize(x, cfg)
    got = dequantize_sum(s & np.uint64(2**cfg.mod_bits - 1), n, cfg)
    err = np.max(np.abs(got - xs.sum(axis=0)))
    assert err <= n * 2.0 ** -(cfg.frac_bits + 1)
    with pytest.raises(SecAggError, match="NaN"):
        quantize(np.array([np.nan]), cfg)


def test_bit_packing_round_trips():
    rng = np.random.default_rng(31)
    for m in (2, 31, 32, 35, 62):
        v = rng.integers(0, 2**m, 777, dtype=np.uint64)
        p = pack_bits(v, m)
        assert p.size == (777 * m + 7) // 8
        np.testing.assert_array_equal(unpack_bits(p, m, 777), v)


# --------------------------------------------------------------------------- parameters


def test_default_degree_grows_like_log_n_and_threshold_is_a_majority():
    assert [choose_degree(n) for n in (5, 10, 33)] == [4, 9, 32]           # small n: complete graph
    ks = [choose_degree(n) for n in (100, 1000, 10**4, 10**5, 10**6)]
    assert ks == sorted(ks) and ks[0] >= 30 and ks[-1] <= 60
    assert all(k % 2 == 0 for k in ks)
    srv = SecAggServer(range(100), 10, round_id=1, randbytes=drbg("p"))
    assert srv.nominal_degree == ks[0]


def test_server_rejects_bad_setup():
    with pytest.raises(SecAggError, match="fewer than the 3"):
        SecAggServer([1, 2], 10, round_id=1)
    with pytest.raises(SecAggError, match="twice"):
        SecAggServer([1, 2, 2], 10, round_id=1)
    with pytest.raises(SecAggError, match="too small"):
        SecAggServer(range(100), 10, round_id=1, quant=QuantConfig(mod_bits=16, frac_bits=8))
    assert SERVER_ID == -1 and ENVELOPE_BYTES == 176


def test_distributed_noise_is_a_discrete_gaussian_on_the_fixed_point_and_sums_to_the_central_scale():
    """Distributed DP under SecAgg+ (Kairouz, Liu, Steinke 2021): each client adds its share of the noise as
    integers to its fixed-point vector before masking; the unmasked sum is the exact sum of the quantized inputs
    plus the clients' integer noise, whose variance is the shares' total."""
    from fedpa.common.discrete_noise import DistributedNoise, integer_sensitivity

    d = 20_000
    vecs = {u: np.where(np.arange(d) % 2 == 0, 0.25, -0.25).astype(np.float32) for u in (3, 13, 23, 33)}
    z, sens = 0.3, 1.2
    noise = DistributedNoise(z, sens, share=1 / 4)                 # four clients carry a quarter each
    quant = QuantConfig(clip=8.0, frac_bits=16)
    plain = Round(vecs, quant=quant).run()
    noisy = Round(vecs, quant=quant, noise=dict.fromkeys(vecs, noise)).run()
    m = plain.quant.mod_bits
    diff = (noisy.sum.astype(np.int64) - plain.sum.astype(np.int64)) % 2 ** m   # the four clients' noise, mod 2^m
    diff = np.where(diff >= 2 ** (m - 1), diff - 2 ** m, diff)
    sigma = z * integer_sensitivity(sens, 16, d)                    # the central scale, in units of 2^-16
    assert abs(diff.std() / sigma - 1) < 0.03 and abs(diff.mean()) < 4 * sigma / math.sqrt(d)
    assert np.array_equal(plain.dequantize(), np.where(np.arange(d) % 2 == 0, 1.0, -1.0))  # plain sum exact
    # noise that would carry a value past the round's range is refused, never clipped
    loud = Round(vecs, quant=quant, noise=dict.fromkeys(vecs, DistributedNoise(100.0, 1.0, 1.0)))
    with pytest.raises(SecAggError):
        loud.run()
    assert all("outside the round's fixed-point range" in " ".join(c.rejections) for c in loud.clients.values())


def test_a_secagg_phase_starts_without_torch():
    """Each SecAgg+ message starts a fresh ClientApp process in a deployment: its imports decide how long a phase
    takes (torch and transformers are about 3.5 s), so the app module and the phase's code must not load them."""
    import subprocess
    import sys

    code = ("import sys, fedpa.client.app, fedpa.client.secagg, fedpa.common.discrete_noise; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_newton_range_sums_large_offset_sums_and_keeps_small_deltas_precise():
    """A round whose vectors carry Newton offset sums (a category row over a node's users: tens of thousands)
    runs at `newton_clip`: the widest range the 62-bit modulus holds for its participants. The large sums come
    back within the fixed-point bound, and so do adapter-sized deltas beside them."""
    from fedpa.common.secagg.fixed_point import count_clipped
    from fedpa.server.federation import newton_clip

    ids = [3, 13, 23]
    rng = np.random.default_rng(1)
    vecs = {u: np.concatenate([rng.uniform(-1e-4, 1e-4, 30), rng.uniform(-4e4, 4e4, 9), [1.0]]) for u in ids}
    assert count_clipped(vecs[3], QuantConfig(clip=2048.0)) > 0          # what the count-sized range refused
    quant = QuantConfig(clip=newton_clip(len(ids)))
    res = Round(vecs, quant=quant).run()
    assert res.quant.mod_bits <= 62
    check_sum(res, vecs, ids)
