"""The federation's configuration, declared once: one dataclass whose fields carry their help text, section,
choices and scope.

Everything else derives from the fields: Flower's run config keys (the field names with dashes, as
``[tool.flwr.app.config]`` and ``flwr run . --run-config`` spell them), the `fedpa` command-line options
(`fedpa.simulations.cli.settings`), the pyproject table and docs/configuration.md (``python -m
fedpa.common.config``, kept in sync by a test), validation, and the key under which a client process keeps
its runtime. Adding a key is one field here plus its use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedpa.foundation.batch import CATEGORICAL_ITEM_FIELDS
from fedpa.foundation.errors import FedpaError
from fedpa.recdata.schema import EVAL_USERS, SPLITS, TRAIN_NEGATIVES
from fedpa.recmodels.algorithms import (
    ADAM_TABLES,
    ALGORITHMS,
    EMBEDDING_KEYS,
    EMBEDDING_MAX_ROWS,
    FOUNDATION_HEAD_KEYS,
    ITEM_SIDE_KEYS,
    POOL_MAX_NEGATIVES,
)
from fedpa.recmodels.stages import FEDERATED_STAGES


class ConfigValueError(FedpaError):
    pass


DP_MODES = ("central", "distributed", "local")
COHORT_ENGINES = ("vectorized", "loop")
HEADS = ("", "shared", "private", "frozen")
ROBUST_METHODS = ("none", "trimmed-mean", "median")

# Sections, in the order the help and the docs list them.
SECTIONS = {
    "data": "Data: the dataset, which users are clients, the split",
    "model": "Model: the algorithm and its adapters",
    "training": "Training: rounds and local steps",
    "privacy": "Privacy and robustness",
    "runtime": "Runtime: run directory, timeouts, state",
}


def setting(default: Any, help: str, section: str, *, option: str | None = None, choices: tuple | None = None,
            at_least: float | None = None, above: float | None = None, runtime: bool = True, cli: bool = True,
            node: bool = False) -> Any:
    """A configuration field.

    option:   the `fedpa` command-line option when it is not ``--`` + the key (``--rounds`` for num-rounds)
    choices:  the allowed values (validated, listed in the help)
    at_least, above: the value must be >= at_least, or > above (validated)
    runtime:  the value changes what a client process builds (its model, data, caches): part of the key under
              which the process keeps its runtime. Only values read afresh from every message may say False.
    cli:      offered as an option by the commands (False: set by fedpa itself, e.g. the funnel stage)
    node:     a SuperNode may set it for itself in its --node-config, over the server's run config
    """
    assert section in SECTIONS, section
    return field(default=default, metadata=dict(help=help, section=section, option=option, choices=choices,
                                                at_least=at_least, above=above, runtime=runtime, cli=cli, node=node))


@dataclass
class FederationConfig:
    # -- data
    data_dir: str = setting("data/small", "dataset directory (canonical format)", "data", option="--data")
    split: str = setting("by-day", "train / validation / test split: by-day (RecFlow), chrono (60/20/20 per user), "
                         "loo (leave one out, sampled negatives), last (MRFF: last pair per user)", "data",
                         choices=SPLITS)
    negatives: int = setting(99, "sampled negatives per validation / test case (split loo)", "data", at_least=1)
    negative_pool: int = setting(1, "split loo: sampled training negatives per positive are 4 x this, drawn once; "
                                 "each round trains on every positive and a fresh 4 of them per positive, as the "
                                 "field's implicit-feedback recommenders redraw theirs (1 = the same 4 every round)",
                                 "data", at_least=1)
    domains: str = setting("", "in a dataset of several domains (items.domain): the domains the run sees at all, "
                           "rows and behaviour sequences (comma-separated names, '' = all; one = a single-domain "
                           "platform)", "data")
    train_domains: str = setting("", "train on the rows of these domains only (comma-separated names, '' = all; "
                                 "the evaluated domain alone = single-domain training, sequences unchanged)", "data")
    eval_domains: str = setting("", "evaluate on the rows of these domains only (comma-separated names, '' = all)",
                                "data")
    eval_users: str = setting("all", "with eval-domains: evaluate every user, those with training rows in another "
                                     "domain (cross-domain) or those without (single-domain)", "data",
                              choices=EVAL_USERS)
    max_clients: int = setting(0, "use at most this many private users (0 = all)", "data", at_least=0)
    federate_open_users: bool = setting(False, "open users (the foundation's pre-training users) join the "
                                        "federation as clients too, as MRFF's protocol has it", "data")
    partition_seed: int = setting(0, "which users are open / private; fixed across seeds so that the foundation "
                                  "(pre-trained on the open users of this seed) never saw a client", "data", at_least=0)
    active_top_fraction: float = setting(0.2, "share of users (by exposures) counted as highly active", "data")
    open_active_fraction: float = setting(0.8, "share of the highly active users that are open", "data")
    open_rest_fraction: float = setting(0.2, "share of the other users that are open", "data")
    activity_attribute: str = setting("", "profile field that marks highly active users (\"\" = by exposures)",
                                      "data")
    active_values: str = setting("", "comma-separated values of activity-attribute that count as highly active",
                                 "data")
    # -- model
    foundation: str = setting("runs/foundation", "foundation checkpoint directory", "model")
    algorithm: str = setting("fedpa", "the federated algorithm", "model", choices=tuple(ALGORITHMS))
    rank: int = setting(4, "adapter rank", "model", at_least=1)
    group_attributes: str = setting("", "comma-separated profile fields with group adapters (\"\" = the "
                                    "foundation's default)", "model")
    use_user_adapter: bool = setting(True, "FedPA: the private user adapter (ablation when off)", "model")
    use_group_adapters: bool = setting(True, "FedPA: the shared group adapters (ablation when off)", "model")
    use_gate: bool = setting(True, "FedPA: the adaptive gate over paths (off: their mean)", "model")
    domain_adapters: bool = setting(False, "FedPA, in a dataset of several domains: a domain-specific shared LoRA path "
                                           "per domain, each row routed by its item's domain (UniCDR+'s specific "
                                           "part beside the domain-invariant user and group paths)", "model")
    use_user_shift: bool = setting(False, "FedPA: a private per-user offset of the tower input (the release's "
                                   "client-side user embeddings)", "model")
    use_user_bias: bool = setting(False, "FedPA: private per-user logit offsets beside the shared head, "
                                  "calibrated on the device", "model")
    item_bias_fields: str = setting("", "FedPA: shared item-side logit offsets keyed by these item fields "
                                    "(comma-separated), averaged per row over their readers", "model")
    item_embedding_dim: int = setting(0, "FedPA: shared item embeddings (per-row averaged like the item-side "
                                      "tables) and a private user vector of this width; 0 = off", "model",
                                      at_least=0)
    item_popularity: bool = setting(False, "FedPA: how many clients clicked each item, tallied over the federation "
                                    "(under secagg only the sum), scores as w*log(1 + clicks) with a shared "
                                    "learned w", "model")
    item_popularity_steps: bool = setting(False, "FedPA, with item-popularity: the tally scores through a learned "
                                          "step at 1, 2, 4, ..., 128 clicks beside w*log(1 + clicks), so its "
                                          "effect can rise, fall and rise again with the count", "model")
    item_rows: int = setting(0, "FedPA: rows of the video-id keyed item tables and embeddings (ids hashed into "
                             "them; 0 = the foundation's): bounds the upload, masked under secagg", "model",
                             at_least=0)
    item_bias_lr: float = setting(0.0, "local learning rate of the item-side tables (decays with lr-decay; "
                                  "0 = lr)", "model", at_least=0)
    item_embedding_lr: float = setting(0.0, "FedPA, with item-embedding-dim: the local step of the item embeddings "
                                       "and the private user vectors, the same every round (0 = item-bias-lr, "
                                       "decaying with lr-decay): they learn from many users over many rounds",
                                       "model", at_least=0)
    item_bias_update: str = setting("adam", "how the item-side offset tables learn: adam (local steps, averaged per "
                                    "row over its readers) or newton (each client sends per-row sums of p - y "
                                    "and p(1 - p) at the round's start; the server takes a MAP Newton step, "
                                    "item-bias-prior its prior precision)", "model", choices=("adam", "newton"))
    item_bias_prior: float = setting(0.0, "phantom readers per item-side table row in its server-side mean: "
                                     "shrinks rarely read rows", "model", runtime=False, at_least=0)
    foundation_logit_scale: float = setting(1.0, "multiplies the frozen foundation's logits before "
                                            "personalization adds to them (temperature)", "model", above=0)
    head: str = setting("", "prediction head: \"\" = the algorithm's, shared, private or frozen", "model",
                        choices=HEADS)
    ditto_lambda: float = setting(0.1, "Ditto: weight of the proximal term", "model")
    embedding_dim: int = setting(32, "width of the item and user embeddings of the id-based algorithms (fedmf, "
                                 "pfedrec, fedrap)", "model", at_least=1)
    pfedrec_eta: float = setting(80.0, "PFedRec: the item embeddings' SGD step is lr x catalogue items x this (the "
                                 "official lr_eta)", "model", above=0)
    fedrap_lambda: float = setting(0.1, "FedRAP: weight of -MSE(personality, commonality), ramped by tanh over the "
                                   "rounds", "model", at_least=0)
    fedrap_mu: float = setting(0.1, "FedRAP: weight of the commonality's L1 norm, ramped like fedrap-lambda", "model",
                               at_least=0)
    fedrap_item_lr: float = setting(200.0, "FedRAP: SGD step of the item personality and commonality in round 1 "
                                    "(decays with lr-decay; the official lr_args)", "model", above=0)
    fedrap_weight_decay: float = setting(1e-4, "FedRAP: SGD weight decay of every parameter, every item row "
                                         "included (the official l2_regularization)", "model", at_least=0)
    stage: str = setting("", "personalize this funnel stage's head instead of the foundation's tower", "model",
                         choices=("",) + tuple(FEDERATED_STAGES), cli=False)
    stage_models: str = setting("", "the `fedpa funnel` run directory whose trained stage heads are personalized",
                                "model", cli=False)
    stage_negatives: int = setting(4, "per request: the stage's own negatives added to a user's rows", "model",
                                   at_least=0)
    # -- training
    num_rounds: int = setting(10, "federated rounds", "training", option="--rounds", runtime=False, at_least=0)
    clients_per_round: float = setting(1.0, "clients per round: a fraction (<= 1) or a count (> 1)", "training",
                                       runtime=False, above=0)
    local_epochs: int = setting(1, "local epochs per round", "training", at_least=0)
    lr: float = setting(0.01, "local learning rate (Adam)", "training", above=0)
    lr_decay: float = setting(1.0, "round r trains at lr * lr-decay^(r-1) (1 = constant)", "training")
    batch_size: int = setting(64, "local batch size", "training", at_least=1)
    listwise_weight: float = setting(0.0, "adapter-based algorithms: weight of a sampled-softmax term beside binary "
                                     "cross-entropy in local training, each positive of a mini-batch (one user's "
                                     "rows) against the batch's negatives (0 = cross-entropy alone)", "training",
                                     at_least=0)
    seed: int = setting(0, "random seed (sampling, initialisation, every client's seed)", "training", at_least=0)
    eval_every: int = setting(1, "evaluate every N rounds (and after the last)", "training", runtime=False, at_least=1)
    # -- privacy and robustness
    secagg: bool = setting(False, "SecAgg+ over the nodes' updates: the server sees only the sum (needs >= 3 "
                           "nodes)", "privacy", runtime=False)
    dp_noise_multiplier: float = setting(0.0, "client-level DP noise multiplier z (0 = off)", "privacy",
                                         runtime=False, at_least=0)
    dp_mode: str = setting("central", "where DP noise is added: central (server), distributed (clients, needs "
                           "secagg) or local", "privacy", choices=DP_MODES, runtime=False)
    dp_clip: float = setting(1.0, "L2 bound C of one user's shared update", "privacy", runtime=False, above=0)
    dp_delta: float = setting(0.0, "δ of the reported (ε, δ) (0 = min(N^-1.1, 1e-5) for N clients: well below 1/N, "
                              "which would allow publishing one random user's data)", "privacy",
                              runtime=False)
    dp_max_epsilon: float = setting(0.0, "privacy budget: stop before a round would exceed it (0 = none)",
                                    "privacy", runtime=False, at_least=0)
    robust_aggregation: str = setting("none", "per-user robust aggregation (not with secagg)", "privacy",
                                      choices=tuple(ROBUST_METHODS), runtime=False)
    trim_fraction: float = setting(0.1, "trimmed mean: share of the largest and of the smallest values dropped",
                                   "privacy", runtime=False)
    norm_bound: float = setting(0.0, "server-side L2 bound of each user's update (0 = none; not with secagg)",
                                "privacy", runtime=False, at_least=0)
    # -- runtime
    run_dir: str = setting("runs/simulate", "run directory to write", "runtime", runtime=False)
    min_nodes: int = setting(1, "nodes to wait for before round 1", "runtime", runtime=False, at_least=1)
    min_reply_fraction: float = setting(0.5, "a round fails below this share of valid replies (and sets the "
                                        "quorum of distributed DP)", "runtime", runtime=False)
    round_timeout: float = setting(600.0, "seconds to wait for a round's training replies, and again for its SecAgg+ "
                                  "phases together", "runtime", runtime=False, above=0)
    personal_store: str = setting("", "directory of the encrypted personal store (\"\" = keep private state in "
                                  "memory)", "runtime", runtime=False, node=True)
    personal_store_key_file: str = setting("", "key file of the personal store (else $FEDPA_STORE_KEY)",
                                           "runtime", runtime=False, node=True)
    device_data: str = setting("", "a device directory (`fedpa device provision`): the node reads its users' rows "
                               "and the foundation from it alone, never a path of the server's", "runtime",
                               node=True, cli=False)
    nodes_hold_data: bool = setting(False, "every node holds its own data (device-data in its node config): the "
                                    "server sends no data or foundation path, only the foundation's digest",
                                    "runtime", runtime=False, cli=False)
    foundation_digest: str = setting("", "SHA-256 of the run's foundation artifact (set by the server; a device "
                                     "refuses a run whose foundation differs from its copy)", "runtime",
                                     runtime=False, cli=False)
    track: str = setting("", "also log the configuration, per-round metrics and the summary to an experiment tracker: "
                         "tensorboard (RUN/tensorboard; view with `tensorboard --logdir RUN`)", "runtime",
                         runtime=False, choices=("", "tensorboard"))
    keep_checkpoints: int = setting(2, "round checkpoints kept in the run directory (the newest ones; resuming "
                                    "needs the last)", "runtime", runtime=False, at_least=1)
    resume: bool = setting(False, "continue run-dir from its last checkpoint (same configuration)", "runtime",
                           runtime=False, cli=False)
    feature_cache: str = setting("", "root of the simulation's cached tower inputs (\"\" = "
                                 "~/.cache/fedpa/features, none = off)", "runtime")
    feature_cache_limit_gb: float = setting(32.0, "simulation: after building a feature-cache entry, remove the "
                                            "least recently used others until the root holds at most this many "
                                            "GiB (0 = no limit; entries in use are kept)", "runtime",
                                            runtime=False, at_least=0)
    ray_address: str = setting("", "simulation: join this Ray cluster (\"auto\", or the head's HOST:PORT) instead of "
                               "starting a local Ray instance; data, foundation and feature cache must be at the "
                               "same paths on every machine", "runtime", runtime=False)
    cohort_engine: str = setting("vectorized", "how a node serving several users trains them: vectorized (all "
                                 "at once) or loop (one after another)", "runtime", choices=COHORT_ENGINES,
                                 runtime=False)
    engine_device: str = setting("cpu", "where the vectorized cohort engine trains and scores: cpu, cuda, cuda:N or "
                                 "auto (CUDA where the node's process sees a GPU; under Ray simulation that depends "
                                 "on the actor's resources, docs/simulation.md); a GPU asked for and absent is "
                                 "refused before anything trains", "runtime")

    # ------------------------------------------------------------------ run config <-> dataclass

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> FederationConfig:
        """Parse and validate Flower's run config (dashed keys); keys it does not name keep their defaults."""
        unknown = sorted(k for k in rc if k not in FIELDS)
        if unknown:
            raise ConfigValueError(f"unknown configuration key(s): {', '.join(unknown)}")
        cfg = cls(**{FIELDS[k].name: coerce_value(k, v) for k, v in rc.items()})
        cfg.validate()
        return cfg

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> FederationConfig:
        """The configuration a run directory was written with (its config.json)."""
        path = Path(run_dir) / "config.json"
        try:
            written = json.loads(path.read_text())
        except OSError:
            raise ConfigValueError(f"{run_dir}: not a run directory (no config.json)") from None
        except ValueError as e:
            raise ConfigValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_run_config({k: v for k, v in written.items() if k in FIELDS})

    def differences(self, written: dict[str, Any], ignore: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Keys (dashed) whose value in ``written`` (a run's config.json) differs from this configuration;
        a key the run predates counts with its default value."""
        defaults = FederationConfig().to_run_config()
        return sorted(k for k, v in self.to_run_config().items()
                      if k not in ignore and written.get(k, defaults[k]) != v)

    def runtime_key(self) -> tuple:
        """The values that decide what a client process builds for this run (every field not marked
        ``runtime=False``): a process reuses its runtime only while all of them are unchanged."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.metadata["runtime"])

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        def bad(msg):
            raise ConfigValueError(msg)

        for f in fields(self):
            key, value, meta = f.name.replace("_", "-"), getattr(self, f.name), f.metadata
            if isinstance(value, float) and not math.isfinite(value):
                bad(f"{key} must be a finite number, got {value}")
            if meta["choices"] is not None and value not in meta["choices"]:
                shown = ", ".join(repr(c) if c == "" else str(c) for c in meta["choices"])
                bad(f"unknown {key} '{value}' ({shown})")
            if meta["at_least"] is not None and not value >= meta["at_least"]:
                bad(f"{key} must be >= {meta['at_least']:g}, got {value}")
            if meta["above"] is not None and not value > meta["above"]:
                bad(f"{key} must be > {meta['above']:g}, got {value}")
        for name in ("active_top_fraction", "open_active_fraction", "open_rest_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                bad(f"{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.fedrap_item_lr * self.fedrap_weight_decay >= 1:   # SGD's decay step: w * (1 - lr * wd)
            bad(f"fedrap-item-lr x fedrap-weight-decay must be < 1, got {self.fedrap_item_lr:g} x "
                f"{self.fedrap_weight_decay:g}: each step would flip the sign of every item row")
        if self.clients_per_round > 1 and self.clients_per_round != int(self.clients_per_round):
            bad(f"clients-per-round above 1 is a count and must be whole, got {self.clients_per_round}")
        if not 0 < self.lr_decay <= 1:
            bad(f"lr-decay must be in (0, 1], got {self.lr_decay}")
        if not 0 < self.min_reply_fraction <= 1:
            bad(f"min-reply-fraction must be in (0, 1], got {self.min_reply_fraction}")
        if not 0 <= self.dp_delta < 1:
            bad(f"dp-delta must be in [0, 1), got {self.dp_delta}")
        if not 0 <= self.trim_fraction < 0.5:
            bad(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.dp_mode == "distributed" and self.dp_noise_multiplier > 0 and not self.secagg:
            bad("dp-mode 'distributed' needs secagg: without it the server sees each node's update with only "
                "a fraction of the noise (use dp-mode 'central' or 'local', or turn secagg on)")
        if self.dp_noise_multiplier > 0 and self.robust_aggregation != "none":
            bad("robust aggregation cannot run under DP: the noise is calibrated for a sum, and a median or "
                "trimmed mean scaled by the count moves by about count * clip / 2 when one user leaves (use "
                "norm-bound with DP, or robust aggregation without it)")
        if self.secagg and (self.robust_aggregation != "none" or self.norm_bound > 0):
            bad("robust aggregation and norm bounds need each user's update, and under secure aggregation the "
                "server sees only the sum: turn secagg off, or bound norms on the clients (dp-clip)")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.engine_device):
            bad(f"unknown engine-device '{self.engine_device}' (auto, cpu, cuda or cuda:N)")
        if self.stage and not self.stage_models:
            bad("stage needs stage-models: the `fedpa funnel` run directory holding the trained stage heads")
        if self.stage and self.foundation_logit_scale != 1.0:
            bad("foundation-logit-scale scales the foundation's own head; a funnel stage is scored by its own head")
        if self.item_bias_fields:
            unknown = [f for f in self.item_bias_list if f not in CATEGORICAL_ITEM_FIELDS]
            if unknown or not self.item_bias_list:
                bad(f"item-bias-fields: {', '.join(unknown) or 'none given'} (categorical item fields: "
                    f"{', '.join(CATEGORICAL_ITEM_FIELDS)})")
        if self.item_bias_update == "newton" and not self.item_bias_fields:
            bad("item-bias-update 'newton' steps the item-side offset tables: set item-bias-fields")
        if self.item_bias_update == "newton" and self.dp_noise_multiplier > 0:
            bad("item-bias-update 'newton' under DP: a user's curvature sums have no bounded sensitivity yet "
                "(use item-bias-update 'adam')")
        if self.item_popularity_steps and not self.item_popularity:
            bad("item-popularity-steps shapes the click tally's score: it needs item-popularity")
        if self.item_tables and self.algorithm == "fedpa":  # FedPA options: the others ignore them
            what = ("item-bias-fields" if self.item_bias_fields else "item-embedding-dim" if self.item_embedding_dim
                    else "item-popularity")
            if self.stage:
                bad(f"{what} applies to the foundation's scorer, not to a funnel stage's head")
            if self.dp_noise_multiplier > 0 and self.dp_mode == "local":
                bad(f"{what} cannot run under local DP: local mode sends counts in the clear, and the "
                    "tables' per-row counts are the items a user read (use dp-mode central or distributed)")
            if self.robust_aggregation != "none" or self.norm_bound > 0:
                bad(f"{what} cannot run with robust aggregation (its tables are averaged per row)")

    # ------------------------------------------------------------------ derived values

    @property
    def item_tables(self) -> bool:
        """Any of FedPA's item-side options (tables, embeddings, the click tally)."""
        return bool(self.item_bias_fields or self.item_embedding_dim or self.item_popularity)

    @property
    def carries_item_side(self) -> bool:
        """Whether FedPA's item-side options can run with the rest of this configuration (`validate` names
        why not): not on a funnel stage's head, not under local DP, not with robust aggregation."""
        local_dp = self.dp_mode == "local"   # also before a sweep sets the noise
        return not (self.stage or local_dp or self.robust_aggregation != "none" or self.norm_bound > 0)

    @property
    def item_bias_list(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.item_bias_fields.split(",") if f.strip())

    def round_lr(self, round_: int) -> float:
        """The local learning rate of training round ``round_`` (1-based)."""
        return self.lr * self.lr_decay ** max(int(round_) - 1, 0)

    def round_embedding_lr(self, round_: int) -> float | None:
        """The item embeddings' and user vectors' learning rate in round ``round_`` (None: the tables')."""
        return self.item_embedding_lr or None

    def round_item_bias_lr(self, round_: int) -> float | None:
        """The item-side tables' learning rate in round ``round_`` (None: the round's lr)."""
        return self.round_lr(round_) * self.item_bias_lr / self.lr if self.item_bias_lr else None

    def sample_size(self, num_clients: int) -> int:
        if self.clients_per_round <= 1:
            return max(1, math.ceil(self.clients_per_round * num_clients))
        return min(num_clients, int(self.clients_per_round))


assert all(f.default is not MISSING for f in fields(FederationConfig))
# dashed key -> field
FIELDS = {f.name.replace("_", "-"): f for f in fields(FederationConfig)}
# what a SuperNode may set for itself in its --node-config (never sent to the server)
NODE_KEYS = tuple(k for k, f in FIELDS.items() if f.metadata["node"])


def with_recipe(cfg: FederationConfig, given: set[str] | frozenset[str] = frozenset(),
                item_side: bool = True) -> FederationConfig:
    """``cfg`` with its algorithm's own settings (`Algorithm.recipe`: what the paper's official code uses) for
    every key the user did not give (``given``: dashed keys set on the command line, in a file or a run
    config). ``item_side`` False: FedPA's item-side parts are left out too (a caller that cannot run them)."""
    recipe = {k: v for k, v in ALGORITHMS[cfg.algorithm].recipe if k not in given}
    if not (item_side and cfg.carries_item_side):   # FedPA's item-side parts cannot run here: left out
        recipe = {k: v for k, v in recipe.items() if k not in ITEM_SIDE_KEYS}
    if cfg.stage:
        recipe = {k: v for k, v in recipe.items() if k not in FOUNDATION_HEAD_KEYS}
    fields_set = recipe.get("item-bias-fields", cfg.item_bias_fields)
    if recipe.get("item-bias-update") == "newton" and (cfg.dp_noise_multiplier > 0 or not fields_set):
        recipe.update({k: v for k, v in ADAM_TABLES if k in recipe})   # what the Newton tables cannot run with
    rows = video_rows(cfg) if EMBEDDING_KEYS & recipe.keys() else None
    if cfg.dp_noise_multiplier > 0 or rows is None or rows > EMBEDDING_MAX_ROWS:
        recipe = {k: v for k, v in recipe.items() if k not in EMBEDDING_KEYS}
    if "negative-pool" in recipe and cfg.split == "loo":   # elsewhere there is no pool to bound
        recipe["negative-pool"] = bounded_pool(cfg, int(recipe["negative-pool"]))
    if not recipe:
        return cfg
    out = FederationConfig(**{**dataclasses.asdict(cfg), **{FIELDS[k].name: v for k, v in recipe.items()}})
    out.validate()
    return out


def bounded_pool(cfg: FederationConfig, pool: int) -> int:
    """The largest negative pool up to ``pool`` whose sampled training negatives (4 x pool per positive) stay within
    `POOL_MAX_NEGATIVES` for the dataset of ``cfg``, counting every exposure as a positive (a bound: under leave-one-out
    the last two positives of each user do not train); ``pool`` when the dataset's manifest cannot be read."""
    try:
        exposures = int(json.loads((Path(cfg.data_dir) / "manifest.json").read_text())["rows"]["exposures"])
    except (OSError, ValueError, KeyError, TypeError):
        return pool
    return max(1, min(pool, POOL_MAX_NEGATIVES // max(1, TRAIN_NEGATIVES * exposures)))


def video_rows(cfg: FederationConfig) -> int | None:
    """Rows of the video-id keyed item tables a FedPA model of ``cfg`` holds (the foundation's video-id table, or
    ``item-rows`` when smaller); None when the foundation's configuration cannot be read."""
    from fedpa.foundation.config import ConfigError, FoundationConfig  # transformers: only where a recipe is applied

    try:
        rows = FoundationConfig.from_json_file(str(Path(cfg.foundation) / "config.json")).table_size("video_id")
    except (OSError, ValueError, ConfigError):
        return None
    return max(1, min(rows, cfg.item_rows) if cfg.item_rows else rows)


@lru_cache(maxsize=8)
def _parsed(items: tuple) -> FederationConfig:
    return FederationConfig.from_run_config(dict(items))


def parse_run_config(rc: dict[str, Any]) -> FederationConfig:
    """`FederationConfig.from_run_config`, parsed once per distinct run config in a process (every message of
    a run carries the same one); returns a copy, so callers may change it."""
    cfg = _parsed(tuple(sorted(rc.items())))
    return FederationConfig(**asdict(cfg))


def field_type(f) -> type:
    return f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]


def coerce_value(key: str, value: Any) -> Any:
    """``value`` (a run config's, or text from the command line) as configuration ``key``'s declared type; a
    value that is not one is refused naming the key."""
    typ = field_type(FIELDS[key])
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return bool(value)
        if typ in (int, float) and isinstance(value, bool):
            raise ValueError
        if typ is int:
            if isinstance(value, float) and value != int(value):
                raise ValueError
            return int(value)
        return typ(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigValueError(f"configuration '{key}': {value!r} is not a valid {typ.__name__}") from None


# ---------------------------------------------------------------------- generated files


def pyproject_table() -> str:
    """The ``[tool.flwr.app.config]`` table: every key with its default (Flower accepts only declared keys)."""
    lines = ["[tool.flwr.app.config]"]
    for key, f in FIELDS.items():
        lines.append(f"{key} = {_toml(f.default)}")
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """docs/configuration.md: every key by section, with its default, choices and meaning."""
    out = ["# Configuration reference", "",
           "Generated from `common/config.py` by `python -m fedpa.common.config --write` (`make config`; a test",
           "keeps it in sync). Every key is spelled the same in a TOML file (`fedpa simulate --config run.toml`),",
           "after `--set KEY=VALUE`, in Flower's run config (`flwr run . --run-config \"KEY=VALUE\"`) and, as",
           "`--KEY VALUE`, as a command-line option of `fedpa simulate` (the few exceptions are listed). Keys",
           "marked *node* may also be set by a SuperNode for itself in its `--node-config`.", ""]
    for section, title in SECTIONS.items():
        out += [f"## {title}", "", "| key | default | meaning |", "| --- | --- | --- |"]
        for key, f in FIELDS.items():
            m = f.metadata
            if m["section"] != section:
                continue
            text = m["help"].replace("|", "\\|")
            if m["choices"] is not None:
                text += " (one of: " + ", ".join(f"`{c}`" if c else '`""`' for c in m["choices"]) + ")"
            if m["at_least"] is not None:
                text += f" (>= {m['at_least']:g})"
            if m["above"] is not None:
                text += f" (> {m['above']:g})"
            if m["option"]:
                text += f"; option `{m['option']}`"
            if not m["cli"]:
                text += "; set by fedpa, not an option"
            if m["node"]:
                text += "; *node*"
            out.append(f"| `{key}` | `{_toml(f.default)}` | {text} |")
        out.append("")
    return "\n".join(out)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import re

    ap = argparse.ArgumentParser(description="Print or rewrite the files generated from FederationConfig.")
    ap.add_argument("--write", action="store_true", help="rewrite pyproject.toml's table and docs/configuration.md")
    ap.add_argument("--root", default=".", help="the repository root")
    args = ap.parse_args(argv)
    root = Path(args.root)
    if not args.write:
        print(pyproject_table())
        return 0
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    new = re.sub(r"\[tool\.flwr\.app\.config\]\n(?:[^\[\n][^\n]*\n|\n)*", lambda _: pyproject_table() + "\n", text)
    pyproject.write_text(new.rstrip() + "\n")
    (root / "docs" / "configuration.md").write_text(reference_markdown())
    print(f"wrote {pyproject} and {root / 'docs' / 'configuration.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
