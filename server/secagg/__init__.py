"""SecAgg+ secure aggregation of float vectors (Bonawitz et al. CCS'17, Bell et al. CCS'20).

`protocol` holds the primitives and parameter choices both halves share,
`server_half` the server's state machine; the client's is `client.secagg`.
No Flower imports: each stage is a method from inbound message dicts to
outbound message dicts.
"""

from server.secagg.protocol import (
    SERVER_ID, STAGE_ADVERTISE, STAGE_MASKED, STAGE_NAMES, STAGE_SETUP, STAGE_SHARE, STAGE_UNMASK,
    MessageRejected, QuantConfig, Rejection, SecAggError, SecAggParams,
    choose_degree, concat_update, default_threshold, dequantize_sum, message_nbytes, quantize,
    required_mod_bits, split_sum,
)
from server.secagg.server_half import SecAggResult, SecAggServer

__all__ = [
    "SERVER_ID", "STAGE_ADVERTISE", "STAGE_MASKED", "STAGE_NAMES", "STAGE_SETUP", "STAGE_SHARE", "STAGE_UNMASK",
    "MessageRejected", "QuantConfig", "Rejection", "SecAggError", "SecAggParams", "SecAggResult", "SecAggServer",
    "choose_degree", "concat_update", "default_threshold", "dequantize_sum", "message_nbytes", "quantize",
    "required_mod_bits", "split_sum",
]
