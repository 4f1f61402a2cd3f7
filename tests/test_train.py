import json

import numpy as np
import pytest
import torch

from tests.conftest import SEG, TRAIN, prepare_tiny_pipeline, tiny_params
from tilepipe.ml.checkpoint import load_model
from tilepipe.ml.dataset import TileBatches, make_loader, open_stores, select_tiles, split_members
from tilepipe.ml.training import train


def test_an_epoch_is_every_training_tile_once_and_nothing_else(prepared):
    tmp_path, params = prepared
    members = split_members(tmp_path / "split.json", "train")
    stores = open_stores(tmp_path / "tiles", sorted(members))
    ref = select_tiles(stores, members, "classification", 0.5)
    loader = make_loader(TileBatches(stores, ref, "classification", augment=True), 16, 0, True, 0)
    orders = []
    for epoch in (1, 2):
        loader.sampler.set_epoch(epoch)
        seen = [p for _, _, batch in loader.sampler for p in batch]
        assert sorted(seen) == list(range(len(ref.tile)))
        orders.append(seen)
        scenes = {ref.scene_ids[ref.scene[p]] for p in seen}
        assert scenes <= {"s0", "s1"}
        assert len({ref.scene[p] for p in seen[:16]}) == 2, "a batch should mix scenes"
    assert orders[0] != orders[1], "shuffled afresh every epoch"
    result = train(params, tmp_path / "tiles", tmp_path / "split.json", tmp_path / "models")
    assert result["tiles_seen_per_epoch"] == [len(ref.tile)] * 3
    assert result["train_scenes"] == 2 and result["val_scenes"] == 1


def test_no_val_or_test_tile_reaches_training(prepared):
    tmp_path, _ = prepared
    split_doc = json.loads((tmp_path / "split.json").read_text())["members"]
    train_scenes = set(split_doc["train"])
    held_out = set(split_doc["val"]) | set(split_doc["test"])
    assert train_scenes and held_out and not train_scenes & held_out
    members = split_members(tmp_path / "split.json", "train")
    ref = select_tiles(open_stores(tmp_path / "tiles", sorted(members)), members, "classification", 0.5)
    assert set(ref.scene_ids) == train_scenes


class Stop(Exception):
    pass


@pytest.mark.parametrize("task", [TRAIN, SEG], ids=["classification", "segmentation"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, task):
    tmp_path, params = prepare_tiny_pipeline(tmp_path, *task)
    train(params, tmp_path / "tiles", tmp_path / "split.json", tmp_path / "full")

    def die_after_first(epoch, _metrics):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(params, tmp_path / "tiles", tmp_path / "split.json", tmp_path / "cut", on_epoch=die_after_first)
    resumed = tiny_params(tmp_path, *task, "train.resume=true")
    result = train(resumed, tmp_path / "tiles", tmp_path / "split.json", tmp_path / "cut")
    assert result["epochs_run"] == 3
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, tensor in full.items():
        assert torch.allclose(tensor.float(), cut[name].float(), atol=1e-6), name
    a, _ = load_model(tmp_path / "full" / "model.pt")
    b, _ = load_model(tmp_path / "cut" / "model.pt")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), name


def test_model_carries_its_normalisation(prepared):
    tmp_path, params = prepared
    train(params, tmp_path / "tiles", tmp_path / "split.json", tmp_path / "models")
    model, meta = load_model(tmp_path / "models" / "model.pt")
    assert meta.bands == ["red", "green", "blue"] and meta.tile_size == 16
    np.testing.assert_allclose(model.mean.view(-1).numpy(), meta.mean, rtol=1e-6)
    assert all(s > 0 for s in meta.std)
    for name in ("learning_curves.png", "val_confusion.png", "history.csv"):
        assert (tmp_path / "models" / name).stat().st_size > 0


STEP_FAULTS = """
import resource, sys, torch
from torch import nn
from tilepipe.ml.loops import keep_freed_memory
from tilepipe.ml.models import SmallCNN
if sys.argv[1] == "keep":
    keep_freed_memory()
torch.manual_seed(0)
model = SmallCNN(3, 5, 24).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(model.parameters())
x = torch.rand(64, 3, 64, 64).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 5, (64,))
def step():
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # a one-off growth of the heap late in warm-up averages out over these
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def test_training_steps_reuse_freed_memory_instead_of_faulting_it_back_in():
    """With keep_freed_memory, a step of the default model no longer re-faults its activations."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    faults = {}
    for mode in ("default", "keep"):
        run = subprocess.run(
            [sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, check=True, timeout=300
        )
        faults[mode] = int(run.stdout.strip())
    # typically 0-200 vs 14-35 thousand faults per step; seen up to 1843 with the setting
    assert faults["keep"] * 5 < faults["default"], faults


def test_augmentation_turns_each_tile_and_its_labels_together_as_torch_would():
    """The 8 flips/turns match torch.rot90 then torch.flip on the last two axes, for every op."""
    from tilepipe.ml.dataset import dihedral, dihedral_ops

    rng = np.random.default_rng(3)
    images = rng.random((24, 3, 8, 8), dtype=np.float32)
    labels = rng.integers(0, 5, (24, 8, 8), dtype=np.uint8)
    ops = np.arange(24) % 8
    turned, turned_labels = dihedral(images, labels, ops)
    for i, op in enumerate(ops):
        for array, got in ((images[i], turned[i]), (labels[i], turned_labels[i])):
            want = torch.rot90(torch.from_numpy(array.copy()), int(op % 4), dims=(-2, -1))
            want = torch.flip(want, dims=(-1,)) if op >= 4 else want
            np.testing.assert_array_equal(got, want.numpy())
    assert dihedral(images, None, ops)[1] is None
    a, b = dihedral_ops(7, 2, np.array([5, 1, 9])), dihedral_ops(7, 2, np.array([5, 4, 4]))
    assert (a == b).all() and a.shape == (3,), "seeded by (seed, epoch, first position)"


def test_loader_batches_hold_the_gathered_tiles_turned_by_their_ops(prepared):
    tmp_path, _ = prepared
    from tilepipe.ml.dataset import dihedral, dihedral_ops

    members = split_members(tmp_path / "split.json", "train")
    stores = open_stores(tmp_path / "tiles", sorted(members))
    for task in ("classification", "segmentation"):
        ref = select_tiles(stores, members, task, 0.5)
        data = TileBatches(stores, ref, task, augment=True)
        positions = np.random.default_rng(0).permutation(len(ref.tile))[:16]
        x, y = data[(4, 3, positions.tolist())]
        plain, labels = TileBatches(stores, ref, task).gather(positions)
        ops = dihedral_ops(4, 3, positions)
        assert len(set(ops.tolist())) > 1
        want, want_labels = dihedral(plain, labels, ops)
        np.testing.assert_array_equal(x.numpy(), want)
        one_scene = np.flatnonzero(ref.scene == ref.scene[positions[0]])[::-3]  # a batch of one scene
        for chosen in (positions, one_scene):  # the gather itself is each tile's own pixels
            plain, labels = TileBatches(stores, ref, task).gather(chosen)
            for i, p in enumerate(chosen):
                store = stores[ref.scene_ids[ref.scene[p]]]
                np.testing.assert_array_equal(plain[i], store.image(int(ref.tile[p])))
                np.testing.assert_array_equal(labels[i], store.label(int(ref.tile[p])))
        if task == "classification":
            np.testing.assert_array_equal(y.numpy(), ref.target[positions])
        else:
            expect = want_labels.astype(np.int64)
            expect[expect == 255] = -100
            np.testing.assert_array_equal(y.numpy(), expect)
