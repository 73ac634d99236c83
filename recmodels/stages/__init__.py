"""The multi-stage recommenders of the funnel (retrieval → pre-ranking → ranking → re-ranking).

Plain PyTorch (no Flower), each stage a small head over the *frozen foundation's* representations,
so that the same code runs on a device, in simulation and in benchmarks.

The representations every stage reads (built by `recmodels.stages.features` from a batch of the
foundation's contract, `foundation.batch`):

* ``user``      float32 [B, Du]: the request's user side: the foundation's [USER] token state
                (``FoundationModel.encode``'s user embedding, d) ++ profile embeddings ++ context
                embeddings (Du = d + field_dim * (P + 2)).
* ``history``   float32 [B, 1+L, d] and ``history_mask`` bool [B, 1+L]: the sequence encoder's token
                states ([USER] first, then the last L effective views; mask True where real).
* ``item``      float32 [N, d]: the foundation's item embeddings of candidate items.
* ``pair``      float32 [B, Dp]: the foundation's tower input for a (request, candidate) pair
                (user, target-attention interest, item, their product, profile, context): what the
                ranking stage scores.

Labels follow `foundation.batch.TASKS`; -1 marks an unobserved label. Stage codes and levels follow
`recdata.schema.STAGES` / ``STAGE_LEVEL`` (a larger level survived the funnel longer).
Every trainable layer of a stage head is an ``nn.Linear`` attribute with a stable name, listed in the
head's ``adapter_targets``, so that FedPA adapters can be injected into it like into the foundation.
"""

# The stages whose heads a federation personalizes (re-ranking reads whole lists and stays as trained).
FEDERATED_STAGES = ("retrieval", "prerank", "rank")
