"""The latent world kept under ``oracle/`` (apart from the features), for oracle evaluation only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ..store import Dataset, DatasetError


def oracle_utility(dataset: Dataset, user_ids: np.ndarray, video_ids: np.ndarray, day: str) -> np.ndarray:
    """The true utility of ``video_ids`` for ``user_ids`` (broadcast together) on ``day``.

    For oracle evaluation only: it reads the latent world under ``oracle/``, which no
    model may see. Raises DatasetError if the dataset has no oracle or an id is unknown.
    """
    oracle = dataset.path / "oracle"
    if not (oracle / "world.json").exists():
        raise DatasetError(f"{dataset.path}: no oracle (only synthetic datasets have one)")
    dataset.check_day(day)
    users, videos = np.broadcast_arrays(np.asarray(user_ids), np.asarray(video_ids))
    if not (np.issubdtype(users.dtype, np.integer) and np.issubdtype(videos.dtype, np.integer)):
        raise DatasetError("oracle_utility: user_ids and video_ids must be integer arrays")
    user_latent = _read_latents(oracle / "user_latent" / f"{day}.arrow", "user_id")
    items = _read_oracle_table(oracle / "items.arrow")
    second = (_read_latents(oracle / "user_latent" / f"{day}.arrow", "user_id", "latent_second")
              if "domain" in items.column_names else None)
    item_latent = _fixed_size_list_matrix(items.column("latent"))
    item_bias = items.column("bias").to_numpy()
    for name, ids, n in (("user_ids", users, len(user_latent)), ("video_ids", videos, len(item_latent))):
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise DatasetError(f"oracle_utility: {name} must be in [0, {n}) (got {ids.min()} .. {ids.max()})")
    flat_users, flat_videos = users.ravel(), videos.ravel()
    latents = user_latent[flat_users]
    if second is not None:  # a two-domain world: a user's taste on the second surface is its own
        on_second = items.column("domain").to_numpy()[flat_videos] == 2
        latents[on_second] = second[flat_users[on_second]]
    utility = np.einsum("nd,nd->n", latents, item_latent[flat_videos]) + item_bias[flat_videos]
    return utility.reshape(users.shape)


def _read_oracle_table(path: Path) -> pa.Table:
    if not path.exists():
        raise DatasetError(f"{path}: oracle file is missing")
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def _read_latents(path: Path, id_column: str, column: str = "latent") -> np.ndarray:
    table = _read_oracle_table(path)
    ids = table.column(id_column).to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise DatasetError(f"{path}: '{id_column}' must be 0 .. n-1 in order")
    return _fixed_size_list_matrix(table.column(column))


def _fixed_size_list_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A (rows, dim) zero-copy view of a fixed-size-list column of floats."""
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return array.flatten().to_numpy().reshape(len(array), array.type.list_size)


def _latent_column(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
