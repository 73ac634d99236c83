"""SecAgg+ secure aggregation of float vectors (Bonawitz et al. CCS'17 with Bell et al. CCS'20's sparse graph):
what both halves share, split the way Flower splits `flwr.common.secure_aggregation`.

- `messages`     constants, the phases, the message header and typed field readers, errors
- `identity`     signing keys certified by the deployment's CA: signed keys and the consistency check
- `crypto`       X25519 agreement, round-bound HKDF keys, AES-CTR masks, AES-GCM share envelopes
- `shamir`       Shamir sharing over GF(2^521 - 1)
- `graph`        degree and threshold (Bell et al.'s bounds), the neighbour graph
- `fixed_point`  float vectors <-> integers mod 2^m, bit packing, named updates <-> one vector
- `transport`    protocol messages <-> Flower records

The server's state machine is `fedpa.server.secagg`, the client's `fedpa.client.secagg`.
Design notes (phases, message schema, guarantees and their limits, parameter choices): docs/design/secagg.md
"""

from .crypto import (
                     agree,
                     associated_data,
                     envelope_parties,
                     generate_keypair,
                     graph_seed,
                     mask_sign,
                     open_shares,
                     pair_mask_key,
                     prg_u64,
                     seal_shares,
                     seed_commitment,
                     self_mask_key,
                     share_key,
)
from .fixed_point import (
                     QuantConfig,
                     concat_update,
                     count_clipped,
                     dequantize_sum,
                     pack_bits,
                     packed_length,
                     quantize,
                     required_mod_bits,
                     split_sum,
                     unpack_bits,
)
from .graph import SecAggParams, choose_degree, default_threshold, effective_graph_params, neighbour_graph
from .messages import (
                     ENVELOPE_BYTES,
                     ENVELOPE_HEADER,
                     GCM_NONCE_BYTES,
                     KEY_BYTES,
                     MAX_DIM,
                     MAX_NODE_ID,
                     MAX_ROUND_ID,
                     NONCE_BYTES,
                     PHASE_ADVERTISE,
                     PHASE_CONSISTENCY,
                     PHASE_MASKED,
                     PHASE_NAMES,
                     PHASE_SETUP,
                     PHASE_SHARE,
                     PHASE_UNMASK,
                     PRIME,
                     PROTOCOL,
                     SERVER_ID,
                     SHARE_BYTES,
                     MessageRejected,
                     RandBytes,
                     Rejection,
                     SecAggError,
                     as_pairs,
                     check_header,
                     get_bytes,
                     get_bytes_list,
                     get_float,
                     get_ids,
                     get_int,
                     header,
                     message_nbytes,
)
from .shamir import decode_share, encode_share, lagrange_at_zero, shamir_reconstruct, shamir_share, share_x

__all__ = [
    "ENVELOPE_BYTES", "ENVELOPE_HEADER", "GCM_NONCE_BYTES", "KEY_BYTES", "MAX_DIM", "MAX_NODE_ID", "MAX_ROUND_ID",
    "NONCE_BYTES", "PHASE_ADVERTISE", "PHASE_CONSISTENCY", "PHASE_MASKED", "PHASE_NAMES", "PHASE_SETUP",
    "PHASE_SHARE", "PHASE_UNMASK",
    "PRIME", "PROTOCOL", "SERVER_ID", "SHARE_BYTES", "MessageRejected", "QuantConfig", "RandBytes", "Rejection",
    "SecAggError", "SecAggParams", "agree", "as_pairs", "associated_data", "check_header", "choose_degree",
    "concat_update", "count_clipped", "decode_share", "default_threshold", "dequantize_sum", "effective_graph_params",
    "encode_share", "envelope_parties", "generate_keypair", "get_bytes", "get_bytes_list", "get_float", "get_ids",
    "get_int", "graph_seed", "header", "lagrange_at_zero", "mask_sign", "message_nbytes", "neighbour_graph",
    "open_shares", "pack_bits", "packed_length", "pair_mask_key", "prg_u64", "quantize", "required_mod_bits",
    "seal_shares", "seed_commitment", "self_mask_key", "shamir_reconstruct", "shamir_share", "share_key",
    "share_x", "split_sum", "unpack_bits",
]
