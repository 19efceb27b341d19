"""The embedded synthetic set and the TFDS path (on a fake ImageNet the test writes)."""

import io
import tarfile

import numpy as np
import pytest

from acm_jax import data
from acm_jax.data import synthetic


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_synthetic_is_deterministic_balanced_and_masked():
  a = synthetic.generate(synthetic.SyntheticConfig(num_train=600, num_test=100, seed=3))
  b = synthetic.generate(synthetic.SyntheticConfig(num_train=600, num_test=100, seed=3))
  c = synthetic.generate(synthetic.SyntheticConfig(num_train=600, num_test=100, seed=4))
  np.testing.assert_array_equal(a["train"]["image"], b["train"]["image"])
  assert not np.allclose(a["train"]["image"], c["train"]["image"])
  tr = a["train"]
  assert tr["image"].shape == (600, 32, 32, 3) and tr["image"].dtype == np.float32
  assert -1.0 <= tr["image"].min() and tr["image"].max() <= 1.0
  counts = np.bincount(tr["label"], minlength=10)
  assert counts.min() > 30  # every class present, roughly balanced
  # object pixels are saturated colours or grey distractors; background is textured but dull
  mask = tr["object_mask"]
  assert 0.03 < mask.mean() < 0.3
  per_image_contrast = [np.abs(img[m].mean(0) - img[~m].mean(0)).max() for img, m in zip(tr["image"][:50], mask[:50])]
  assert np.median(per_image_contrast) > 0.2
  # the class is not linearly readable from pixels: objects move and rotate
  x = tr["image"].reshape(600, -1)
  w = np.linalg.lstsq(np.c_[x, np.ones(600)], np.eye(10)[tr["label"]], rcond=1e-3)[0]
  te = a["test"]
  acc = np.mean(np.argmax(np.c_[te["image"].reshape(100, -1), np.ones(100)] @ w, 1) == te["label"])
  assert acc < 0.4


def test_train_iterator_is_a_function_of_seed_and_step():
  first = take(data.make_iterator("synthetic", "train", 7, seed=1), 5)
  resumed = take(data.make_iterator("synthetic", "train", 7, seed=1, start_step=3), 2)
  for a, b in zip(first[3:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  other = next(data.make_iterator("synthetic", "train", 7, seed=2))
  assert not np.array_equal(first[0]["label"], other["label"]) or not np.allclose(first[0]["image"], other["image"])
  # an epoch visits every example once
  idx = np.concatenate([data.train_indices(10, 3, 0, s) for s in range(10)])
  for epoch in range(3):
    assert sorted(idx[epoch * 10:(epoch + 1) * 10]) == list(range(10))


def test_test_split_is_one_ordered_pass():
  info = data.get_dataset_info("synthetic")
  batches = list(data.make_iterator("synthetic", "test", 300, with_masks=True))
  assert sum(len(b["label"]) for b in batches) == info.num_test
  assert len(batches[-1]["label"]) == info.num_test % 300
  assert batches[0]["object_mask"].shape == (300, 32, 32)
  full = synthetic.generate(synthetic.SyntheticConfig())["test"]
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), full["label"])
  dropped = list(data.make_iterator("synthetic", "test", 300, drop_remainder=True))
  assert all(len(b["label"]) == 300 for b in dropped)


def test_corruptions_change_images_and_reject_bad_kinds():
  images = synthetic.generate(synthetic.SyntheticConfig(num_train=10, num_test=10))["test"]["image"]
  for kind in ("noise", "blur", "contrast"):
    out = synthetic.corrupt(images, kind, 3)
    assert out.shape == images.shape and -1 <= out.min() and out.max() <= 1
    assert np.abs(out - images).mean() > 0.01
    assert np.abs(synthetic.corrupt(images, kind, 5) - images).mean() > np.abs(synthetic.corrupt(images, kind, 1) - images).mean()
  with pytest.raises(ValueError, match="unknown corruption"):
    synthetic.corrupt(images, "snow")
  with pytest.raises(ValueError, match="severity"):
    synthetic.corrupt(images, "blur", 9)


@pytest.mark.parametrize("call, message", [
    (lambda: data.make_iterator("mnist", "train", 4), "unknown dataset"),
    (lambda: data.make_iterator("synthetic", "valid", 4), "unknown split"),
    (lambda: data.make_iterator("synthetic", "train", 0), "batch_size"),
    (lambda: data.get_dataset_info("synthetic", image_size=8), "at least 16"),
    (lambda: data.get_dataset_info("tfds:imagenet2012"), "needs --data_dir"),
    (lambda: data.get_dataset_info("tfds:imagenet2012", data_dir="/no/such/dir"), "does not exist"),
])
def test_bad_input(call, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    call()


def _jpeg(rng, h, w):
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def write_fake_imagenet(manual_dir, synsets=("n01440764", "n01443537"), per_class=3, num_val=4):
  """ILSVRC2012-shaped tars: a train tar of per-synset tars, a val tar of JPEGs."""
  rng = np.random.default_rng(0)
  manual_dir.mkdir(parents=True)
  with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train:
    for synset in synsets:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as sub:
        for i in range(per_class):
          _add(sub, f"{synset}_{i}.JPEG", _jpeg(rng, 40 + 7 * i, 50))
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val:
    for i in range(1, num_val + 1):
      _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng, 60, 45))


def test_tfds_imagenet_built_offline_from_a_manual_dir(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  write_fake_imagenet(tmp_path / "downloads" / "manual")
  info = data.get_dataset_info("tfds:imagenet2012", image_size=32, data_dir=str(tmp_path))
  assert (info.num_classes, info.num_train, info.num_test, info.image_size) == (1000, 6, 4, 32)
  train = take(data.make_iterator("tfds:imagenet2012", "train", 4, image_size=32, data_dir=str(tmp_path), seed=5), 4)
  for batch in train:
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].std() > 0.1
    assert set(batch["label"].tolist()) <= {0, 1}  # the two synsets come first in ImageNet's label order
  resumed = take(data.make_iterator("tfds:imagenet2012", "train", 4, image_size=32, data_dir=str(tmp_path), seed=5,
                                    start_step=2), 2)
  for a, b in zip(train[2:], resumed):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_allclose(a["image"], b["image"], atol=1e-6)
  test = list(data.make_iterator("tfds:imagenet2012", "test", 3, image_size=32, data_dir=str(tmp_path)))
  assert [len(b["label"]) for b in test] == [3, 1]
  with pytest.raises(ValueError, match="object masks"):
    data.make_iterator("tfds:imagenet2012", "test", 3, data_dir=str(tmp_path), with_masks=True)


def test_tfds_without_source_files_says_what_is_missing(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(RuntimeError, match="ILSVRC2012_img_train.tar"):
    data.get_dataset_info("tfds:imagenet2012", data_dir=str(tmp_path))
