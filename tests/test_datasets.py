"""Observed labels, split and subsampling against cases traced by hand with the official rules; formatted files;
the image path against torchvision's transforms."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import datasets
import loaders
from datasets import DataError, load_formatted
from label_rules import observe_labels, split_indices, subsample_indices
from loaders import EpochBatches

# A 4 x 5 full label matrix. Row 1 has no positive, row 3 no negative.
FULL = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=np.float64)
# Traced by hand with one RandomState(1200), row by row (shuffle positives, then negatives):
#   row 0: positives [0 2 3] -> [0 3 2], keep 0;  negatives [1 4] -> [4 1]
#   row 1: positives [] (no draw);               negatives [0 1 2 3 4] -> [4 0 3 1 2]
#   row 2: positives [1 4] -> [1 4], keep 1;      negatives [0 2 3] -> [2 0 3]
#   row 3: positives [0 1 2 3 4] -> [0 1 4 2 3], keep 0; negatives [] (no draw)
# Skipping the negative shuffles would give row 2 -> class 4 and row 3 -> class 4 instead.
OBSERVED_1POS = np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=np.float64)
OBSERVED_1POS_1NEG = np.array([[1, 0, 0, 0, -1], [0, 0, 0, 0, -1], [0, 1, -1, 0, 0], [1, 0, 0, 0, 0]], dtype=np.float64)


def test_observed_labels_match_the_hand_trace():
    got = observe_labels(FULL)
    assert got.dtype == FULL.dtype
    np.testing.assert_array_equal(got, OBSERVED_1POS)
    np.testing.assert_array_equal(observe_labels(FULL, num_pos=1, num_neg=1), OBSERVED_1POS_1NEG)


def test_observed_labels_keep_one_positive_per_row_with_positives():
    rng = np.random.default_rng(0)
    full = (rng.random((200, 12)) < 0.25).astype(np.float32)
    obs = observe_labels(full)
    assert set(np.unique(obs)) <= {0.0, 1.0}
    assert ((obs == 1) <= (full == 1)).all()  # only true positives are observed
    np.testing.assert_array_equal((obs == 1).sum(1), np.minimum(full.sum(1), 1))


def test_split_matches_the_hand_trace():
    # RandomState(1200).permutation(10) = [9 4 6 1 8 5 2 0 7 3]; n_val = round(0.2 * 10) = 2
    train, val = split_indices(10, 0.2, 1200)
    assert train.tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
    assert val.tolist() == [3, 7]


def test_subsampling_matches_the_hand_trace():
    # One RandomState(999): permutation(8) = [3 2 6 7 1 5 4 0] keeps 4 -> sorted [2 3 6 7] -> train[[2,3,6,7]];
    # then permutation(2) = [0 1] keeps round(0.5 * 2) = 1 -> val[[0]].
    train, val = np.array([0, 1, 2, 4, 5, 6, 8, 9]), np.array([3, 7])
    sub_train, sub_val = subsample_indices(train, val, 0.5, 0.5, 999)
    assert sub_train.tolist() == [2, 4, 8, 9]
    assert sub_val.tolist() == [3]
    full_train, full_val = subsample_indices(train, val, 1.0, 1.0, 999)
    assert full_train.tolist() == train.tolist() and full_val.tolist() == val.tolist()


def write_formatted(root, n_train=6, n_val=3, num_classes=16, seed=0):
    rng = np.random.default_rng(seed)
    for phase, n in (("train", n_train), ("val", n_val)):
        labels = (rng.random((n, num_classes)) < 0.3).astype(np.float64)
        labels[:, 0] = 1.0
        np.save(root / f"formatted_{phase}_labels.npy", labels)
        np.save(root / f"formatted_{phase}_images.npy", np.array([f"{phase}/{i}.png" for i in range(n)]))


def test_observed_labels_are_generated_once_and_cached(tmp_path):
    write_formatted(tmp_path)
    data = load_formatted("synthetic", tmp_path)
    cached = np.load(tmp_path / "formatted_train_labels_obs.npy")
    np.testing.assert_array_equal(cached, observe_labels(np.load(tmp_path / "formatted_train_labels.npy")))
    np.testing.assert_array_equal(data["train"]["labels_obs"], cached)


def test_an_existing_observed_file_is_used_unchanged(tmp_path):
    write_formatted(tmp_path)
    official = np.zeros((6, 16))
    official[:, 0] = 1  # true positives, but not what our generator would produce: it must still be used as is
    assert not np.array_equal(official, observe_labels(np.load(tmp_path / "formatted_train_labels.npy")))
    np.save(tmp_path / "formatted_train_labels_obs.npy", official)
    before = (tmp_path / "formatted_train_labels_obs.npy").read_bytes()
    data = load_formatted("synthetic", tmp_path)
    np.testing.assert_array_equal(data["train"]["labels_obs"], official)
    assert (tmp_path / "formatted_train_labels_obs.npy").read_bytes() == before


def test_missing_formatted_files_point_to_the_data_readme(tmp_path):
    with pytest.raises(DataError, match="data/README.md"):
        load_formatted("coco", tmp_path)


def test_disagreeing_lengths_and_bad_values_are_refused(tmp_path):
    write_formatted(tmp_path)
    np.save(tmp_path / "formatted_val_images.npy", np.array(["a.png"]))  # 1 image, 3 label rows
    with pytest.raises(DataError, match="disagree"):
        load_formatted("synthetic", tmp_path)
    write_formatted(tmp_path)
    labels = np.load(tmp_path / "formatted_train_labels.npy")
    labels[0, 0] = 2
    np.save(tmp_path / "formatted_train_labels.npy", labels)
    with pytest.raises(DataError, match="values other than"):
        load_formatted("synthetic", tmp_path)


# ------------------------------------------------------------------------------------------------------------ images


@pytest.fixture()
def odd_images(tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for i, (mode, size) in enumerate([("RGB", (37, 23)), ("L", (50, 64)), ("RGBA", (20, 20)), ("CMYK", (31, 45))]):
        array = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        image = Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode)
        path = tmp_path / f"img{i}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
        image.save(path)
        paths.append(str(path))
    return paths


def test_image_path_is_bit_identical_to_the_paper_transforms(odd_images):
    size = 28
    paper_train = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize(loaders.IMAGENET_MEAN, loaders.IMAGENET_STD),
        ]
    )
    split = datasets.Split("", np.array(odd_images), np.zeros((4, 1)), np.zeros((4, 1)))
    dataset = loaders.ImageDataset(split, size)
    for i, path in enumerate(odd_images):
        with Image.open(path) as raw:
            reference = paper_train(raw.convert("RGB"))
        image, index = dataset[i]
        assert index == i and image.dtype == torch.uint8
        ours = loaders.to_model_input(image[None])[0]
        assert torch.equal(ours, reference)
        flipped = loaders.to_model_input(image[None], torch.tensor([True]))[0]
        assert torch.equal(flipped, transforms.functional.hflip(reference))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_the_paper_pixels_in_channels_last_layout(odd_images, workers):
    """The workers hand over each image's pixels as decoded (H x W x C), never transposed: the batch is N x C x H x W
    with channels-last strides, the model's layout, and its values are the paper's."""
    size = 20
    split = datasets.Split("", np.array(odd_images), np.zeros((4, 1)), np.zeros((4, 1)))
    cfg = SimpleNamespace(bsize=3, seed=0, num_workers=workers, image_size=size)
    loader = loaders.make_loader(split, cfg, train=False, pin_memory=False)
    batches = list(loader)
    assert [b[1].tolist() for b in batches] == [[0, 1, 2], [3]]
    for images, rows in batches:
        assert images.shape == (len(rows), 3, size, size) and images.dtype == torch.uint8
        assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        for image, row in zip(images, rows.tolist(), strict=True):
            with Image.open(odd_images[row]) as raw:
                reference = transforms.functional.pil_to_tensor(transforms.Resize((size, size))(raw.convert("RGB")))
            assert torch.equal(image, reference)
        assert torch.equal(
            loaders.to_model_input(images),
            loaders.to_model_input(images.contiguous()),  # the layout changes nothing but the layout
        )


def test_undecodable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        loaders.load_image(str(bad), 8)


def test_epoch_batches_are_a_seeded_permutation_with_a_smaller_last_batch():
    sampler = EpochBatches(10, 4, shuffle=True, seed=5)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(sum(batches, [])) == list(range(10))
    again = EpochBatches(10, 4, shuffle=True, seed=5)
    again.set_epoch(2)
    assert list(again) == batches and torch.equal(again.flips, sampler.flips)
    sampler.set_epoch(3)
    assert list(sampler) != batches
    assert list(EpochBatches(5, 2, shuffle=False)) == [[0, 1], [2, 3], [4]]
