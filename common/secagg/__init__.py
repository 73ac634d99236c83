"""SecAgg+ secure aggregation of float vectors (Bonawitz et al. CCS'17, Bell et al. CCS'20): what both halves share.

`protocol` holds the primitives and parameter choices, `transport` the mapping of protocol messages onto
Flower records. The server's state machine is `fedpa.server.secagg`, the client's `fedpa.client.secagg`.
"""
