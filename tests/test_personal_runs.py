"""Personal state outlives a run through the encrypted personal store, and only through it."""

from dataclasses import replace

import numpy as np
from fed_fixtures import fed_config

from fedpa.client.personal_store import PersonalStore, generate_key_file
from fedpa.simulations.simulate import simulate


def test_personal_adapters_persist_across_runs(tiny, tiny_foundation, tmp_path):
    key = tmp_path / "keys" / "store.key"
    key.parent.mkdir()
    generate_key_file(key)
    store_dir = tmp_path / "personal"
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run1", num_rounds=1, max_clients=6,
                     personal_store=str(store_dir), personal_store_key_file=str(key))
    simulate(cfg, cohort_size=3)
    store = PersonalStore.from_key_file(store_dir, key)
    users = store.users()
    assert len(users) == 6  # every client saved its private adapter after the final round
    arrays, meta = store.load(users[0])
    assert meta["algorithm"] == "fedpa" and meta["round"] == 1
    assert any(k.endswith("lora_user_B") for k in arrays)
    assert any(np.abs(v).sum() > 0 for k, v in arrays.items() if k.endswith("lora_user_B"))  # it trained
    # nothing readable in the clear on disk
    raw = b"".join(p.read_bytes() for p in store_dir.iterdir() if p.is_file())
    assert b"lora_user" not in raw and b"fedpa" not in raw

    # a second run with the same seed would reproduce the first run exactly if it started fresh; its
    # state differs, so it continued from the stored one
    simulate(replace(cfg, run_dir=str(tmp_path / "run2")), cohort_size=3)
    arrays2, meta2 = store.load(users[0])
    assert meta2["round"] == 1
    b1 = [v for k, v in sorted(arrays.items()) if k.endswith("lora_user_B")]
    b2 = [v for k, v in sorted(arrays2.items()) if k.endswith("lora_user_B")]
    assert any(not np.array_equal(x, y) for x, y in zip(b1, b2))
