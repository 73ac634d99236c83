"""Cost of SecAgg+ against plain float32 aggregation, measured in one run.

Per client: compute (CPU) time over the five phases and bytes sent (replies) and
received (requests); the server: time over its phases. "Plain" is what the
same sum costs without secure aggregation: each client serializes its float32
vector, the server sums them in float64. All parties run in this process, one
after another, single-threaded; each figure is the median over --repeats rounds
(per-client figures: the mean over a round's clients; "(max)": the slowest).

    .venv/bin/python benchmarks/bench_secagg.py [--dim 20000] [--clients 10 50 100 200] [--drop-frac 0.05]
    .venv/bin/python benchmarks/bench_secagg.py --identities --clients 10 100 1000 --repeats 1

--identities prints what the malicious-server protocol costs against the honest-but-curious one, side
by side in one run: "before" is a round without identities and without its consistency phase (the four
phases the protocol had), "after" the same round with CA-certified identities: every client signs its
keys and the survivor set and verifies its neighbours' certificates and signatures (two ECDSA P-384
signatures, 2k certificate checks and 2k signature checks per client and round).

    .venv/bin/python benchmarks/bench_secagg.py --noise --dims 20000 167000 1000000

--noise prints what exact DP noise costs a node (distributed mode) or the server (central mode) per round
against the float Gaussian it replaced, side by side: OpenDP's discrete Gaussian for d coordinates vs numpy's
ziggurat over a ChaCha20 stream (common.privacy.noise_rng), and the masking step (phase 3) with and without it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

clock = time.process_time   # CPU time of this process: other jobs on the machine barely move it


from fedpa.client.secagg import SecAggClient  # noqa: E402
from fedpa.common.secagg import QuantConfig, message_nbytes  # noqa: E402
from fedpa.server.secagg import SecAggServer  # noqa: E402

PHASES = (1, 2, 3, 4, 5)


def make_identities(ids: list[int]) -> dict:
    """One CA and a certified P-384 key per client, in memory (what server.pki writes to files)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from fedpa.common.secagg.identity import Identity, node_name

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bench CA")).issuer_name(name("bench CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    out = {}
    for u in ids:
        key = ec.generate_private_key(ec.SECP384R1())
        cert = (x509.CertificateBuilder().subject_name(node_name(f"node-{u}", u)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
                .sign(ca_key, hashes.SHA256()))
        out[u] = Identity(key, cert.public_bytes(serialization.Encoding.DER), ca)
    return out


def secagg_round(n: int, dim: int, drop_frac: float, seed: int, signed: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.choice(2**40, n, replace=False)]
    vecs = {u: rng.uniform(-1, 1, dim).astype(np.float32) for u in ids}
    gone = set(int(i) for i in rng.choice(ids, int(round(drop_frac * n)), replace=False)) if drop_frac else set()
    ctime = {u: 0.0 for u in ids}
    cstage = {st: 0.0 for st in PHASES}
    sstage = {st: 0.0 for st in (0, *PHASES)}
    csent = {st: 0.0 for st in PHASES}
    sent = {u: 0 for u in ids}
    recv = {u: 0 for u in ids}
    stime = 0.0

    t0 = clock()
    server = SecAggServer(ids, dim, round_id=1, quant=QuantConfig())
    reqs = server.advertise_requests()
    stime += clock() - t0
    sstage[0] = stime
    identities = make_identities(ids) if signed else {}
    clients = {u: SecAggClient(u, identity=identities.get(u)) for u in ids}
    phases = [(1, lambda c, m, u: c.advertise(m), server.receive_keys),
              (2, lambda c, m, u: c.share_keys(m), server.receive_shares),
              (3, lambda c, m, u: c.masked_input(m, vecs[u]), server.receive_masked),
              (4, lambda c, m, u: c.consistency(m), server.receive_consistency),
              (5, lambda c, m, u: c.unmask(m), server.receive_unmask)]
    result = None
    for phase, act, receive in phases:
        replies = []
        for u, m in reqs.items():
            recv[u] += message_nbytes(m)
            if phase == 3 and u in gone:       # drop after sharing keys: the server must rebuild their mask keys
                continue
            t = clock()
            reply = act(clients[u], m, u)
            ctime[u] += clock() - t
            cstage[phase] += clock() - t
            sent[u] += message_nbytes(reply)
            csent[phase] += message_nbytes(reply) + message_nbytes(m)
            replies.append((u, reply))
        t = clock()
        result = receive(replies)
        stime += clock() - t
        sstage[phase] = clock() - t
        reqs = result
    true = np.sum([vecs[u].astype(np.float64) for u in result.included], axis=0)
    err = float(np.max(np.abs(result.dequantize() - true)))
    bound = len(result.included) * 2.0 ** -(result.quant.frac_bits + 1)
    assert err <= bound, (err, bound)
    full = [u for u in ids if u not in gone]
    return {
        "k": result.degree, "t": result.threshold, "m": result.quant.mod_bits,
        "client_ms": 1e3 * np.mean([ctime[u] for u in full]), "client_max_ms": 1e3 * max(ctime[u] for u in full),
        "server_ms": 1e3 * stime,
        "sent": float(np.mean([sent[u] for u in full])), "recv": float(np.mean([recv[u] for u in full])),
        "err": err, "bound": bound, "included": len(result.included),
        "client_stage_ms": {st: 1e3 * v / len(full) for st, v in cstage.items()},
        "client_stage_bytes": {st: v / len(full) for st, v in csent.items()},
        "server_stage_ms": {st: 1e3 * v for st, v in sstage.items()},
    }


def plain_round(n: int, dim: int, seed: int, repeats: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    vecs = [rng.uniform(-1, 1, dim).astype(np.float32) for _ in range(n)]
    best_c, best_s = float("inf"), float("inf")
    for _ in range(repeats):
        t = clock()
        payloads = [v.astype(np.float32).tobytes() for v in vecs]
        c = (clock() - t) / n
        t = clock()
        total = np.zeros(dim, np.float64)
        for p in payloads:
            total += np.frombuffer(p, dtype=np.float32)
        s = clock() - t
        best_c, best_s = min(best_c, c), min(best_s, s)
    return {"client_ms": 1e3 * best_c, "server_ms": 1e3 * best_s, "sent": 4 * dim}


def compare_noise(dims: list[int]) -> None:
    from fedpa.common.discrete_noise import discrete_gaussian
    from fedpa.common.privacy import noise_rng

    print(f"{'d':>9} | {'float Gaussian ms':>17} {'discrete ms':>11} {'ratio':>6} {'µs / coord':>10}")
    rng = noise_rng()
    for d in dims:
        t = time.perf_counter()
        rng.normal(0.0, 1e5, size=d)
        f = time.perf_counter() - t
        t = time.perf_counter()
        discrete_gaussian(1e5, d)
        g = time.perf_counter() - t
        print(f"{d:>9} | {1e3 * f:>17.1f} {1e3 * g:>11.0f} {g / f:>5.0f}x {1e6 * g / d:>10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=20_000, help="vector size d (FedPA shared state + counts)")
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100, 200])
    ap.add_argument("--drop-frac", type=float, default=0.05,
                    help="fraction dropping after share keys, for the second table (0 to skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="rounds per setting; the median of each figure is shown")
    ap.add_argument("--identities", action="store_true",
                    help="compare the malicious-server protocol (identities, consistency check) with the "
                         "honest-but-curious one instead")
    ap.add_argument("--noise", action="store_true",
                    help="the cost of the discrete Gaussian (distributed / central DP) against a float Gaussian")
    ap.add_argument("--dims", type=int, nargs="+", default=[20_000, 167_000, 1_000_000],
                    help="vector sizes for --noise")
    args = ap.parse_args()
    if args.noise:
        compare_noise(args.dims)
        return
    secagg_round(10, args.dim, 0.0, args.seed, signed=args.identities)   # warm-up (imports, OpenSSL, allocator)
    if args.identities:
        compare_identities(args)
        return

    def measure(n: int, drop: float) -> dict:
        runs = [secagg_round(n, args.dim, drop, args.seed + n + 1000 * r) for r in range(args.repeats)]
        return {k: (float(np.median([r[k] for r in runs])) if k in ("client_ms", "client_max_ms", "server_ms", "sent",
                                                                     "recv", "err") else runs[0][k])
                for k in runs[0]} | {
            "client_stage_ms": {st: float(np.median([r["client_stage_ms"][st] for r in runs])) for st in PHASES},
            "server_stage_ms": {st: float(np.median([r["server_stage_ms"][st] for r in runs])) for st in range(6)}}

    print(f"d = {args.dim}; defaults: clip 8, f = 24 fractional bits, degree/threshold from choose_degree\n")
    hdr = (f"{'n':>5} {'k':>3} {'t':>3} {'m':>3} | {'client ms':>9} {'(max)':>7} {'plain':>7} {'ratio':>7} | "
           f"{'server ms':>9} {'plain':>7} | {'sent B':>9} {'plain B':>9} {'expand':>6} {'recv B':>8} | {'max err':>8}")
    rows = {}
    for drop in ([0.0, args.drop_frac] if args.drop_frac else [0.0]):
        print(f"-- {'no dropouts' if not drop else f'{drop:.0%} of clients drop after sharing keys'}")
        print(hdr)
        for n in args.clients:
            s = measure(n, drop)
            p = plain_round(n, args.dim, args.seed + n)
            rows[(drop, n)] = (s, p)
            print(f"{n:>5} {s['k']:>3} {s['t']:>3} {s['m']:>3} | {s['client_ms']:>9.2f} {s['client_max_ms']:>7.2f} "
                  f"{p['client_ms']:>7.3f} {s['client_ms'] / p['client_ms']:>6.0f}x | {s['server_ms']:>9.1f} "
                  f"{p['server_ms']:>7.2f} | {s['sent']:>9.0f} {p['sent']:>9} {s['sent'] / p['sent']:>5.2f}x "
                  f"{s['recv']:>8.0f} | {s['err']:>8.1e}")
        print()
    ns = args.clients
    if (0.0, 100) in rows:
        s, p = rows[(0.0, 100)]
        print(f"n = 100: SecAgg/plain per-client compute {s['client_ms'] / p['client_ms']:.0f}x "
              f"({s['client_ms']:.2f} ms vs {p['client_ms']:.3f} ms), server {s['server_ms'] / p['server_ms']:.0f}x "
              f"({s['server_ms']:.0f} ms vs {p['server_ms']:.1f} ms), bytes sent {s['sent'] / p['sent']:.3f}x")
        cs, ss = s["client_stage_ms"], s["server_stage_ms"]
        print("  per phase, client ms: " + ", ".join(f"{st} {cs[st]:.2f}" for st in PHASES)
              + "; server ms: " + ", ".join(f"{st} {ss[st]:.1f}" for st in range(6)))
    if len(ns) > 1:
        a, b = rows[(0.0, ns[0])][0], rows[(0.0, ns[-1])][0]
        print(f"n {ns[0]} -> {ns[-1]} ({ns[-1] / ns[0]:.0f}x clients): "
              f"per-client time {b['client_ms'] / a['client_ms']:.2f}x, "
              f"per-client bytes sent {b['sent'] / a['sent']:.2f}x, degree k {a['k']} -> {b['k']}")


def compare_identities(args) -> None:
    print(f"d = {args.dim}; per client and round, CPU ms and bytes (sent + received); median of {args.repeats}\n")
    print(f"{'n':>5} {'k':>3} | {'before ms':>9} {'after ms':>9} {'ratio':>6} | {'consistency ms':>14} "
          f"{'signing+checks ms':>17} | {'before B':>9} {'after B':>9} {'ratio':>6} | {'server before':>13} "
          f"{'after ms':>9}")
    for n in args.clients:
        plain = [secagg_round(n, args.dim, 0.0, args.seed + n + 1000 * r) for r in range(args.repeats)]
        signed = [secagg_round(n, args.dim, 0.0, args.seed + n + 1000 * r, signed=True) for r in range(args.repeats)]

        def med(runs, f):
            return float(np.median([f(r) for r in runs]))

        before = med(plain, lambda r: r["client_ms"] - r["client_stage_ms"][4])
        after = med(signed, lambda r: r["client_ms"])
        consistency = med(signed, lambda r: r["client_stage_ms"][4])
        b_bytes = med(plain, lambda r: r["sent"] + r["recv"] - r["client_stage_bytes"][4])
        a_bytes = med(signed, lambda r: r["sent"] + r["recv"])
        s_before = med(plain, lambda r: r["server_ms"] - r["server_stage_ms"][4])
        s_after = med(signed, lambda r: r["server_ms"])
        print(f"{n:>5} {plain[0]['k']:>3} | {before:>9.2f} {after:>9.2f} {after / before:>5.2f}x | "
              f"{consistency:>14.2f} {after - before - consistency:>17.2f} | {b_bytes:>9.0f} {a_bytes:>9.0f} "
              f"{a_bytes / b_bytes:>5.2f}x | {s_before:>13.0f} {s_after:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
