"""FedPA adapters through peft: init, gradients, routing, exchange, save/load, merging, baselines."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedpa.foundation import adapters as A
from fedpa.foundation.config import ConfigError
from fedpa.foundation.model import CheckpointError, FoundationModel
from fedpa.foundation.quantize import quantize_for_inference
from fedpa.foundation.testing import SMALL_VOCAB as A_VOCAB
from fedpa.foundation.testing import random_batch, small_config


def foundation(seed=0, arch="transformer"):
    torch.manual_seed(seed)
    return FoundationModel(small_config(arch)).eval()


def adapted(preset="fedpa", slots=1, seed=0, arch="transformer", **kw):
    f = foundation(seed, arch)
    torch.manual_seed(seed + 1)
    m = A.attach_adapters(f, preset, user_slots=slots, **kw)
    if slots > 1:
        A.set_user_slots(m, list(range(slots)))
    return m


def train_steps(model, batches, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for b in batches:
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    return model.eval()


def batches(cfg, n=3, B=48, seed=10, users=3):
    return [random_batch(cfg, B, seed + i, n_users=users) for i in range(n)]


@pytest.mark.parametrize("preset", list(A.PRESETS))
def test_adapted_model_equals_foundation_at_init(preset):
    f = foundation()
    b = random_batch(f.config, 32, 0, n_users=3)
    ref = f(**b).logits.clone()
    m = A.attach_adapters(f, preset, user_slots=3)
    A.set_user_slots(m, [0, 1, 2])
    assert torch.equal(m(**b).logits, ref)  # B = 0: exact, whatever the (random) gate says


def test_every_adapter_factor_gets_gradient_and_the_foundation_none():
    m = adapted("fedpa", slots=2, use_global_adapter=True)
    cfg = m.get_base_model().config
    b = random_batch(cfg, 64, 1, n_users=2)
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    names = " ".join(trainable)
    for part in ("lora_user_A", "lora_user_B", "lora_group_A", "lora_group_B", "lora_gate_fc1", "lora_gate_fc2",
                 "lora_A", "lora_B", "head.modules_to_save"):
        assert part in names, part
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    m.train()
    m(**b).loss.backward()
    # step 0, standard LoRA: only B factors (and the head) move; A and the gate see zero gradient
    assert all(trainable[n].grad.abs().sum() > 0 for n in trainable if "_B" in n)
    assert all(trainable[n].grad.abs().sum() == 0 for n in trainable if "_A" in n or "gate" in n)
    opt.step()
    opt.zero_grad()
    m(**b).loss.backward()
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient after one step: {n}"
    frozen = [(n, p) for n, p in m.named_parameters() if not p.requires_grad]
    assert len(frozen) > 50
    assert all(p.grad is None for _, p in frozen)
    kinds = A.parameter_kinds(m)
    assert {k.param for k in kinds.values() if k.kind != "frozen"} == set(trainable)
    assert {k.param for k in kinds.values() if k.kind == "frozen"} == {n for n, _ in frozen}


def test_both_factors_zero_like_the_release_would_never_learn():
    """The release's defect, reproduced: with A = B = 0 no adapter factor ever gets a gradient."""
    m = adapted("fedpa")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_user_A" in n or "lora_group_A" in n:
                p.zero_()
    b = random_batch(m.get_base_model().config, 32, 2)
    m(**b).loss.backward()
    assert all(p.grad.abs().sum() == 0 for n, p in m.named_parameters() if "lora_user" in n or "lora_group" in n)


def test_adapters_learn_on_frozen_foundation():
    m = adapted("fedpa")
    data = batches(m.get_base_model().config, n=4, B=64)
    with torch.no_grad():
        before = sum(m(**b).loss.item() for b in data)
    train_steps(m, data * 5, lr=3e-2)
    with torch.no_grad():
        after = sum(m(**b).loss.item() for b in data)
    assert after < before - 0.05


def test_stacked_users_equal_one_user_models():
    stacked = adapted("fedpa", slots=3)
    cfg = stacked.get_base_model().config
    train_steps(stacked, batches(cfg, n=3, users=3))
    b = random_batch(cfg, 60, 99, n_users=3)
    out = stacked(**b).logits
    for slot in range(3):
        single = adapted("fedpa", slots=1)
        rows = b["user_id"] == slot
        A.load_private(single, A.extract_private(stacked, slot))
        A.load_shared(single, {k: v for k, v in A.extract_shared(stacked, b["user_profile"][rows][0]).items()})
        sub = {k: v[rows] for k, v in b.items()}
        torch.testing.assert_close(single(**sub).logits, out[rows], atol=1e-6, rtol=1e-6)


def test_group_rows_only_affect_their_group():
    m = adapted("fedpa", group_attributes=["age"])
    cfg = m.get_base_model().config
    b = random_batch(cfg, 64, 3, n_users=20)
    before = m(**b).logits.clone()
    age = b["user_profile"][:, cfg.user_fields.index("age")]
    value = int(age[0])
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_group_B" in n:
                p[value].normal_()
    after = m(**b).logits
    changed = (after - before).abs().sum(1) > 0
    assert changed[age == value].all() and not changed[age != value].any()


def test_exchange_names_kinds_and_round_trip():
    m = adapted("fedpa", slots=2)
    cfg = m.get_base_model().config
    train_steps(m, batches(cfg, users=2))
    kinds = A.parameter_kinds(m)
    assert all("default" not in n and not n.startswith("base_model") for n in kinds)
    assert kinds["tower.fc1.lora_user_A"].kind == "private"
    assert kinds["tower.fc1.lora_group_A.age=2"] == A.Kind("shared", group=("age", 2),
                                                           param=kinds["tower.fc1.lora_group_A.age=2"].param, row=2)
    assert (kinds["tower.fc1.lora_gate_fc1.weight"].kind == "shared"
            and kinds["tower.head.modules_to_save.weight"].group is None)
    assert kinds["tower.head.weight"].kind == "frozen"
    assert kinds["tower.fc1.weight"].kind == "frozen"  # foundation params under their own names
    profile = torch.tensor([3, 1, 5])  # age=3, gender=1, province=5
    shared = A.extract_shared(m, profile)
    groups = {k.group for n, k in kinds.items() if n in shared and k.group}
    assert groups == {("age", 3), ("gender", 1)}
    assert not any(kinds[n].kind == "private" for n in shared)
    assert shared["tower.fc1.lora_group_B.age=3"].shape == (4, 128)
    private = A.extract_private(m, slot=1)
    assert set(private) == {n for n, k in kinds.items() if k.kind == "private"}
    assert private["tower.fc1.lora_user_A"].shape == (m.get_base_model().tower.fc1.in_features, 4)

    other = adapted("fedpa", slots=2, seed=5)
    A.load_shared(other, shared)
    A.load_private(other, private, slot=1)
    again = A.extract_shared(other, {"age": 3, "gender": 1})
    assert all(torch.equal(again[n], shared[n]) for n in shared)
    assert all(torch.equal(A.extract_private(other, 1)[n], private[n]) for n in private)
    with pytest.raises(Exception, match="not shared"):
        A.load_shared(other, {"tower.fc1.lora_user_A": private["tower.fc1.lora_user_A"]})


@pytest.mark.parametrize("preset", ["fedpa", "fedper", "ditto"])
def test_save_load_adapters_bit_exact(tmp_path, preset):
    m = adapted(preset, slots=2)
    cfg = m.get_base_model().config
    train_steps(m, batches(cfg, users=2))
    A.save_adapters(m, tmp_path / "ad")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "ad").iterdir()}
    loaded = A.load_adapters(foundation(), tmp_path / "ad")
    A.set_user_slots(loaded, [0, 1])
    sd1 = {n: p for n, p in m.named_parameters()}
    sd2 = {n: p for n, p in loaded.named_parameters()}
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[n], sd2[n]) for n in sd1)
    b = random_batch(cfg, 32, 7, n_users=2)
    assert torch.equal(m(**b).logits, loaded(**b).logits)
    assert all(p.requires_grad == sd1[n].requires_grad for n, p in sd2.items())


def test_broken_adapter_files_raise_checkpoint_error(tmp_path):
    m = adapted("fedpa")
    A.save_adapters(m, tmp_path / "ad")
    w = tmp_path / "ad" / "adapter_model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-5] ^= 0x55
    w.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors.*corrupted"):
        A.load_adapters(foundation(), tmp_path / "ad")
    A.save_adapters(m, tmp_path / "ad")  # overwrite atomically with a good copy
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        A.load_adapters(foundation(), tmp_path / "ad")
    A.save_adapters(m, tmp_path / "ad")
    cfgf = tmp_path / "ad" / "adapter_config.json"
    raw = json.loads(cfgf.read_text())
    raw["r"] = 8
    cfgf.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="do not match"):
        A.load_adapters(foundation(), tmp_path / "ad")
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        A.load_adapters(foundation(), tmp_path / "missing")


@pytest.mark.parametrize("preset", list(A.PRESETS))
@pytest.mark.parametrize("arch", ["transformer", "mlp"])
def test_merged_equals_unmerged(preset, arch):
    m = adapted(preset, slots=2, arch=arch)
    cfg = m.get_base_model().config
    train_steps(m, batches(cfg, users=2))
    b = random_batch(cfg, 64, 11, n_users=2)
    rows = b["user_id"] == 1
    sub = {k: v[rows] for k, v in b.items()}
    merged = A.merge_for_user(m, user_slot=1, group_values=sub["user_profile"][0])
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**sub).logits, m(**sub).logits, atol=1e-5, rtol=1e-5)
    _, int8 = quantize_for_inference(merged)
    with torch.no_grad():
        assert (int8(**sub).logits - merged(**sub).logits).abs().max() < 0.1


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecation raised inside stock peft
def test_fedavg_lora_is_stock_peft_lora():
    ours = adapted("fedavg-lora")
    cfg = ours.get_base_model().config
    train_steps(ours, batches(cfg))
    stock = get_peft_model(foundation(), LoraConfig(r=4, lora_alpha=4, target_modules=["tower.fc1", "tower.fc2"],
                                                     modules_to_save=["tower.head"]))
    theirs = dict(stock.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                theirs[n].copy_(p)  # same peft names: lora_A/lora_B and the head copy
    b = random_batch(cfg, 32, 12)
    torch.testing.assert_close(ours(**b).logits, stock(**b).logits, atol=1e-6, rtol=1e-6)
    merged = ours.merge_and_unload()  # a lone global path without gate folds like LoRA
    torch.testing.assert_close(merged(**b).logits, stock(**b).logits, atol=1e-5, rtol=1e-5)


def test_fedpa_layer_refuses_peft_merge():
    m = adapted("fedpa")
    with pytest.raises(Exception, match="merge_for_user"):
        m.merge_and_unload()


def test_ditto_paths_and_penalty():
    m = adapted("ditto")
    cfg = m.get_base_model().config
    b = random_batch(cfg, 32, 13)
    assert A.ditto_penalty(m).item() > 0  # A_user and A_global start at different random values
    train_steps(m, batches(cfg))
    A.set_active_paths(m, ["global"])
    g_out = m(**b).logits.clone()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_user_B" in n:
                p.add_(1.0)
    assert torch.equal(m(**b).logits, g_out)  # the personal path is off
    A.set_active_paths(m, ["user"])
    assert not torch.equal(m(**b).logits, g_out)
    A.set_active_paths(m, None)
    pen = A.ditto_penalty(m)
    pen.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "lora_user" in n)
    with pytest.raises(ConfigError):
        A.set_active_paths(m, ["group"] if False else ["nope"])


def test_routing_errors_are_clear():
    m = adapted("fedpa")
    cfg = m.get_base_model().config
    b = random_batch(cfg, 8, 14)
    b["user_profile"][0, cfg.user_fields.index("age")] = 99
    with pytest.raises(A.RoutingError, match="'age' has value 99"):
        m(**b)
    stacked = adapted("fedpa", slots=2)
    b = random_batch(cfg, 8, 15, n_users=2)
    del b["user_id"]
    with pytest.raises(A.RoutingError, match="user_id"):
        stacked(**b)
    b = random_batch(cfg, 8, 15, n_users=5)
    with pytest.raises(A.RoutingError, match="no adapter slot"):
        stacked(**b)
    with A.use_routing(stacked, group_index=b["user_profile"][:, :2], user_slot=torch.zeros(8, dtype=torch.long)):
        assert stacked(**b).logits.shape == (8, len(cfg.tasks))


def test_config_validation():
    cfg = small_config()
    with pytest.raises(ConfigError, match="nope"):
        A.adapter_config(cfg, "fedpa", group_attributes=["nope"])
    with pytest.raises(ConfigError, match="preset"):
        A.adapter_config(cfg, "fedsomething")
    c = A.adapter_config(cfg, "fedpa")
    assert c.r == 4 and c.lora_alpha == 4 and c.group_attributes == ["age", "gender"]
    assert c.group_vocab == {"age": 6, "gender": 3} and c.target_modules == {"tower.fc1", "tower.fc2"}
    with_ids = small_config().__class__.from_dataset_vocab({**{"device_id": 11}, **A_VOCAB},
                                                           ["device_id", "age", "gender"])
    assert A.default_group_attributes(with_ids) == ["age", "gender"]  # id columns are not groups


def test_deepcopy_of_an_adapted_model_routes_on_its_own():
    import copy

    m = adapted("fedpa", slots=2)
    cfg = m.get_base_model().config
    b = random_batch(cfg, 16, 20, n_users=2)
    twin = copy.deepcopy(m)
    A.set_user_slots(twin, [1, 0])  # re-slotting the copy must not touch the original
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_user_B" in n:
                p[0].normal_()
    assert torch.equal(m(**b).logits, adapted("fedpa", slots=2)(**b).logits)
    assert not torch.equal(twin(**b).logits, m(**b).logits)


@pytest.mark.filterwarnings("ignore")
def test_merged_user_model_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    m = adapted("fedpa")
    cfg = m.get_base_model().config
    train_steps(m, batches(cfg, n=2))
    b = random_batch(cfg, 8, 3, n_users=1)
    merged = A.merge_for_user(m, 0, b["user_profile"][0])
    merged.dedupe_histories = False  # torch.unique does not trace
    keys = ["user_profile", "item", "hist_items", "hist_mask", "context"]

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, user_profile, item, hist_items, hist_mask, context):
            return self.inner(user_profile=user_profile, item=item, hist_items=hist_items,
                              hist_mask=hist_mask, context=context).logits

    wrapped = Logits(merged).eval()
    path = tmp_path / "user.onnx"
    torch.onnx.export(wrapped, tuple(b[k] for k in keys), str(path), input_names=keys, output_names=["logits"],
                      dynamic_axes={**{k: {0: "B"} for k in keys}, "logits": {0: "B"}}, dynamo=False)
    req = random_batch(cfg, 120, 5, n_users=1)
    got = ort.InferenceSession(str(path)).run(None, {k: req[k].numpy() for k in keys})[0]
    with torch.no_grad():
        want = wrapped(*[req[k] for k in keys]).numpy()
    assert abs(got - want).max() < 1e-4


@pytest.mark.parametrize("gate", [True, False])
def test_user_shift_is_private_per_slot_exact_at_init_and_merges(gate):
    f = foundation()
    b = random_batch(f.config, 60, 5, n_users=3)
    ref = f(**b).logits.clone()
    m = adapted("fedpa", slots=3, use_user_shift=True, use_gate=gate)
    assert torch.equal(m(**b).logits, ref)  # zero shift: the foundation exactly
    kinds = A.parameter_kinds(m)
    shift = [k for k in kinds if "lora_user_shift" in k]
    assert shift == ["tower.fc1.lora_user_shift"]  # only the layer that reads the tower input
    assert kinds[shift[0]].kind == "private" and kinds[shift[0]].per_slot
    train_steps(m, batches(m.get_base_model().config, users=3))
    assert A.extract_private(m, 1)[shift[0]].abs().sum() > 0
    out = m(**b).logits
    for slot in range(3):  # a stacked forward routes each row to its own user's shift
        rows = b["user_id"] == slot
        sub = {k: v[rows] for k, v in b.items()}
        merged = A.merge_for_user(m, user_slot=slot, group_values=sub["user_profile"][0])
        with torch.no_grad():
            torch.testing.assert_close(merged(**sub).logits, out[rows], atol=1e-5, rtol=1e-5)
    # Ditto's global objective does not read the user's offset
    A.set_active_paths(m, ["group"])
    try:
        with torch.no_grad():
            m.get_base_model().tower.fc1.lora_user_shift["default"].add_(5.0)
            moved = m(**b).logits
            m.get_base_model().tower.fc1.lora_user_shift["default"].sub_(5.0)
            torch.testing.assert_close(moved, m(**b).logits)
    finally:
        A.set_active_paths(m, None)


def test_user_bias_is_private_per_slot_beside_a_shared_head_and_merges():
    f = foundation()
    b = random_batch(f.config, 60, 5, n_users=3)
    ref = f(**b).logits.clone()
    m = adapted("fedpa", slots=3, use_user_bias=True)
    assert torch.equal(m(**b).logits, ref)  # zero deltas and offsets: the foundation exactly
    kinds = A.parameter_kinds(m)
    bias = kinds["tower.head.lora_user_bias"]
    assert bias.kind == "private" and bias.per_slot
    for k in ("tower.head.lora_head_shared_w", "tower.head.lora_head_shared_b"):  # the head itself stays shared
        assert kinds[k].kind == "shared" and not kinds[k].per_slot and kinds[k].group is None
    assert not any("modules_to_save" in k for k in kinds)
    train_steps(m, batches(m.get_base_model().config, users=3))
    offsets = m.get_base_model().tower.head.lora_user_bias["default"].detach()
    assert offsets.abs().sum() > 0 and not torch.equal(offsets[0], offsets[1])
    out = m(**b).logits
    for slot in range(3):  # each row gets its own user's offsets; the merged model folds them into the bias
        rows = b["user_id"] == slot
        sub = {k: v[rows] for k, v in b.items()}
        merged = A.merge_for_user(m, user_slot=slot, group_values=sub["user_profile"][0])
        with torch.no_grad():
            torch.testing.assert_close(merged(**sub).logits, out[rows], atol=1e-5, rtol=1e-5)


def test_user_bias_needs_a_shared_head():
    with pytest.raises(ConfigError, match="use_user_bias goes with a shared head"):
        adapted("fedpa", head="private", use_user_bias=True)
