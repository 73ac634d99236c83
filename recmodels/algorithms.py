"""The algorithms' registry: what each one personalizes and shares. No torch here, so that the
configuration and the command line can list the algorithms without importing the model stack; the
models themselves are built by `recmodels.personalization.PersonalModel` from these entries."""

from __future__ import annotations

from dataclasses import dataclass

from fedpa.foundation.errors import FedpaError


@dataclass(frozen=True)
class Algorithm:
    name: str
    preset: str | None            # adapter preset in foundation.adapters.PRESETS; None = no adapters
    communicates: bool = True     # exchanges shared parameters with the server
    ditto: bool = False           # personal path trained with a proximal term to the global path
    finetune_before_eval: bool = False  # PFedRec-style: fine-tune the received shared part locally, then score
    centralized: bool = False     # pooled training outside the federation (upper bound)
    description: str = ""
    collaborative: bool = False   # a published id-based recommender (recmodels.collaborative): no foundation
    # the algorithm's own settings (dashed configuration keys), as its paper's official code sets them: they
    # replace the configuration's defaults, never a value the user gave (`common.config.with_recipe`)
    recipe: tuple[tuple[str, object], ...] = ()


FEDPA_RECIPE: tuple[tuple[str, object], ...] = (
    ("use-user-bias", True), ("item-popularity", True),
    ("item-bias-fields", "video_id,category_level_one,category_level_two,upload_type"),
    ("item-bias-update", "newton"), ("item-bias-prior", 10.0), ("item-bias-lr", 0.3), ("lr-decay", 0.8),
    ("foundation-logit-scale", 0.1), ("negative-pool", 16), ("item-embedding-dim", 32), ("item-embedding-lr", 0.03))
# where the Newton tables cannot run (under DP: a user's curvature sums have no bounded sensitivity yet, or
# without offset tables) the recipe's tables learn as before 2026-12-05: the video-id table alone (Adam steps
# on the category tables lost on `small`), local Adam steps averaged over the readers, shrunk by 100 phantom
# readers (`common.config.with_recipe`, the privacy sweep's noisy points)
ADAM_TABLES: tuple[tuple[str, object], ...] = (("item-bias-fields", "video_id"), ("item-bias-update", "adam"),
                                               ("item-bias-prior", 100.0))
# under DP the recipe leaves out the item embeddings: their noise would fall on 32 values per catalogue row, most
# of them read by few users, and they were never measured there (the recipe under DP stays what was measured)
EMBEDDING_KEYS = frozenset({"item-embedding-dim", "item-embedding-lr"})
# ... and where the video-id table has more rows than this: the embeddings travel whole every round (32 values and a
# count per row: 2.6 MB a client here), and the server holds every reply of a round at once (1,000 clients of
# `small`'s 100,000 rows, 16 MB each, filled a 24 GB machine). Set by that cost, not by quality: on the five
# selection sets it leaves them on where they gained (KuaiSAR-R's 5-core, MovieLens-100K: 1,178 and 1,682 rows)
# and off where they did not (`small`, KuaiSAR-R: 100,000 and 37,020 rows). `item-rows` bounds the table.
EMBEDDING_MAX_ROWS = 20_000
# recipe keys a configuration drops when it cannot carry the item-side parts, and those a funnel stage's head
# (scored by its own head, not the foundation's) drops (`common.config.with_recipe`)
ITEM_SIDE_KEYS = frozenset({"item-popularity", "item-bias-fields", "item-bias-update", "item-bias-prior",
                            "item-bias-lr", "item-embedding-dim", "item-embedding-lr"})
FOUNDATION_HEAD_KEYS = frozenset({"foundation-logit-scale"})
# split loo: the recipe's pool of sampled training negatives (4 x negative-pool per positive, encoded once into the
# feature cache) shrinks so that the pool holds at most this many rows (about 6 GB of cache at MovieLens' width):
# 16 on KuaiSAR-R and MovieLens-100K (a 5 GB cache), 2 on MovieLens-1M's million ratings. Set by that cost, not by
# quality: a larger pool gained wherever it was measured (docs/results.md, "A larger negative pool").
POOL_MAX_NEGATIVES = 8_000_000

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in [
    # FedPA's recipe is fedpa's own best configuration, chosen on validation across data sets (synthetic RecFlow,
    # KuaiSAR-R leave-one-out, its 5-core and last-pair, MovieLens-100K; docs/results.md "Choosing FedPA's
    # default"): FedPA as released plus a private per-user logit offset, shared offset tables keyed by the video
    # id, its two category levels and its upload type, stepped together by the server's MAP Newton step from the
    # readers' sums (prior precision 10), the federation's click tally, shared item embeddings of width 32 with a
    # private user vector where the video-id table has at most EMBEDDING_MAX_ROWS rows, learning at a step that
    # does not decay (2026-12-07: they learn what many users' rows say about an item, over many rounds), a
    # decaying learning rate for the rest, and the frozen foundation's logit scaled by 0.1 (beside per-user and
    # per-item offsets, at full weight it counts their evidence twice);
    # under leave-one-out, training negatives drawn from a pool of 64 per positive, 4 fresh ones each round (since
    # 2026-12-07; the pool shrinks on large datasets, POOL_MAX_NEGATIVES).
    # `fedpa-release` in `fedpa compare` is FedPA as released; the fedpa-no-* ablations remove one part each.
    Algorithm("fedpa", "fedpa", recipe=FEDPA_RECIPE,
              description="private user adapter + shared group adapters + shared gate and head; private user "
                          "offset and vector, shared item offsets, embeddings and click tally (the recipe)"),
    Algorithm("local", "local", communicates=False, description="private LoRA + private head, no communication"),
    Algorithm("fedavg-lora", "fedavg-lora", description="one shared LoRA and head, averaged (FedAvg)"),
    Algorithm("fedper", "fedper", description="shared LoRA body, private head (FedPer)"),
    Algorithm("fedper-ft", "fedper", finetune_before_eval=True,
              description="FedPer whose shared LoRA body is fine-tuned locally before scoring (PFedRec's dual "
                          "personalization on adapters; fedpa called it pfedrec before 2026-12)"),
    Algorithm("ditto", "ditto", ditto=True, description="global LoRA (FedAvg) + personal LoRA with a proximal term"),
    Algorithm("foundation", None, communicates=False, description="the frozen foundation, no adaptation"),
    Algorithm("centralized", "fedpa", communicates=False, centralized=True,
              description="FedPA's model trained on pooled private data (upper bound)"),
    # the published federated recommenders, without a foundation (recmodels/collaborative.py)
    Algorithm("fedmf", None, collaborative=True, recipe=(("lr", 0.01), ("batch-size", 256)),
              description="FedMF / FedNCF's GMF: private user embedding, shared item embeddings and biases averaged "
                          "per row over their readers"),
    Algorithm("pfedrec", None, collaborative=True, finetune_before_eval=True,
              recipe=(("lr", 0.1), ("batch-size", 256), ("local-epochs", 1)),
              description="PFedRec (IJCAI'23): shared item embeddings averaged over the round's clients, private "
                          "score function, item table fine-tuned locally before scoring"),
    Algorithm("fedrap", None, collaborative=True,
              recipe=(("lr", 0.5), ("batch-size", 2048), ("local-epochs", 10), ("lr-decay", 0.97)),
              description="FedRAP (ICLR'24): shared item commonality, private additive item personality and score "
                          "function"),
]}

# what `make demo` and `fedpa compare` run by default: FedPA, the adapter baselines, the published recommenders,
# the frozen foundation and the pooled upper bound (here, so that the CLI lists them without the model stack)
COMPARED_BY_DEFAULT = ("fedpa", "local", "fedavg-lora", "fedper", "ditto", "fedmf", "pfedrec", "fedrap", "foundation",
                       "centralized")


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise FedpaError(f"unknown algorithm '{name}' (one of {', '.join(ALGORITHMS)})")
    return ALGORITHMS[name]
