"""The embedded synthetic set, the batch iterators, and the TFDS path on a fake ImageNet
that the test writes (tiny ILSVRC2012 tars built offline by TFDS)."""

import collections
import io
import itertools
import tarfile

import numpy as np
import pytest

from acm_jax import data
from acm_jax.data import synthetic

SMALL = synthetic.SyntheticConfig(num_train=2000, num_test=300, seed=3)  # the glyph task, the default
SHAPES_SMALL = synthetic.SyntheticConfig(num_train=2000, num_test=300, seed=3, task="shapes")


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def test_generation_is_deterministic_seeded_and_cached(tmp_path, monkeypatch):
  monkeypatch.setattr(synthetic, "CACHE_DIR", str(tmp_path))
  synthetic.generate.cache_clear()
  first = synthetic.generate(SMALL)
  assert len(list(tmp_path.glob("synthetic-*.npz"))) == 1
  synthetic.generate.cache_clear()
  cached = synthetic.generate(SMALL)  # read back from the .npz
  fresh = synthetic._generate(SMALL)
  for split in ("train", "test"):
    assert sorted(cached[split]) == sorted(fresh[split]) == ["distractor_mask", "image", "label", "object_mask"]
    for key in fresh[split]:
      np.testing.assert_array_equal(first[split][key], fresh[split][key])
      np.testing.assert_array_equal(cached[split][key], fresh[split][key])
  other = synthetic._generate(synthetic.SyntheticConfig(num_train=2000, num_test=300, seed=4))
  assert np.mean(other["train"]["image"] != fresh["train"]["image"]) > 0.5
  # the test set does not depend on the size of the train set
  bigger = synthetic._generate(synthetic.SyntheticConfig(num_train=2500, num_test=300, seed=3))
  np.testing.assert_array_equal(bigger["test"]["image"], fresh["test"]["image"])
  np.testing.assert_array_equal(bigger["train"]["label"][:2000], fresh["train"]["label"])
  synthetic.generate.cache_clear()


def check_layout_and_balance(arrays):
  """2000 uint8 32x32 images, int32 labels spread over 10 classes."""
  assert arrays["image"].shape == (2000, 32, 32, 3) and arrays["image"].dtype == np.uint8
  assert arrays["label"].dtype == np.int32
  counts = np.bincount(arrays["label"], minlength=10)
  assert counts.shape == (10,) and counts.min() > 150 and counts.max() < 250


def _aligned_object_patches(arrays, g):
  """(image index, top, left) of every g x g patch on the g-pixel grid that lies inside the class object."""
  n, size = arrays["object_mask"].shape[:2]
  inside = arrays["object_mask"].reshape(n, size // g, g, size // g, g).all(axis=(2, 4))
  return [(i, r * g, c * g) for i, r, c in zip(*np.nonzero(inside))]


def test_glyph_labels_are_balanced_and_read_from_the_glyph_in_the_image():
  arrays = synthetic._generate(SMALL)["train"]
  check_layout_and_balance(arrays)
  # every grid-aligned patch inside the object is the object's colour plus contrast x one glyph of the
  # bank (the same in all channels; patches clipped at 0 or 1 are left out); the nearest glyph's class
  # is the label
  bank = synthetic.glyph_bank(SMALL).reshape(SMALL.num_glyphs, -1)
  image = arrays["image"].astype(np.float64) / 255.0
  patches = _aligned_object_patches(arrays, SMALL.glyph_size)
  assert len(patches) > 2000
  checked = {}
  for i, top, left in patches[::7]:
    patch = image[i, top:top + 4, left:left + 4]
    if patch.min() == 0.0 or patch.max() == 1.0:
      continue
    grey = patch.mean(-1) - patch.mean()
    assert np.abs(patch - patch.mean((0, 1)) - grey[..., None]).max() < 0.02  # a grey-level texture
    distance = np.abs(bank * SMALL.glyph_contrast - grey.reshape(1, -1)).max(axis=1)
    assert distance.min() < 0.03 and np.sort(distance)[1] > 0.1  # one glyph fits, no other does
    assert distance.argmin() % 10 == arrays["label"][i]
    checked.setdefault(i, set()).add(distance.argmin())
  assert len(checked) > 150 and all(len(glyphs) == 1 for glyphs in checked.values())  # one glyph per object
  for num_classes in (2, 7):
    labels = synthetic._generate(synthetic.SyntheticConfig(num_train=300, num_test=10, num_classes=num_classes))
    assert set(np.unique(labels["train"]["label"])) == set(range(num_classes))


def test_glyph_objects_are_textured_and_the_background_is_not():
  arrays = synthetic._generate(SMALL)["train"]
  image = arrays["image"].astype(np.float32) / 255.0
  grey = image.mean(-1)
  patches = grey.reshape(-1, 8, 4, 8, 4).transpose(0, 1, 3, 2, 4).reshape(len(grey), 64, 16)
  spread = patches.std(-1)  # (n, 64) per-patch standard deviation
  obj = arrays["object_mask"].reshape(-1, 8, 4, 8, 4).all(axis=(2, 4)).reshape(-1, 64)
  bg = ~(arrays["object_mask"] | arrays["distractor_mask"]).reshape(-1, 8, 4, 8, 4).any(axis=(2, 4)).reshape(-1, 64)
  assert spread[obj].mean() > 3 * spread[bg].mean()
  assert 0.08 < arrays["object_mask"].mean() < 0.35


def test_labels_are_balanced_and_follow_shape_and_colour():
  arrays = synthetic._generate(SHAPES_SMALL)["train"]
  check_layout_and_balance(arrays)
  # the colour family (label % 2) is readable from the object's mean hue: warm objects are red-dominant
  rgb = np.array([img[m].mean(0) for img, m in zip(arrays["image"][:200].astype(float), arrays["object_mask"][:200])])
  warm = arrays["label"][:200] % 2 == 0
  assert np.all(rgb[warm, 0] > rgb[warm, 2]) and np.all(rgb[~warm, 2] > rgb[~warm, 0])
  for num_classes in (5, 15, 20):
    labels = synthetic._generate(synthetic.SyntheticConfig(num_train=500, num_test=10, num_classes=num_classes,
                                                           task="shapes"))
    assert set(np.unique(labels["train"]["label"])) == set(range(num_classes))


def test_masks_mark_the_class_object():
  arrays = synthetic._generate(SHAPES_SMALL)["train"]
  image = arrays["image"].astype(np.float32) / 255.0
  mask, distractor = arrays["object_mask"], arrays["distractor_mask"]
  assert not np.any(mask & distractor)
  assert mask.any(axis=(1, 2)).all()  # every image has its object
  assert 0.3 < distractor.any(axis=(1, 2)).mean() < 0.7  # about half have a distractor
  assert 0.08 < mask.mean() < 0.35  # objects cover a minority of pixels: most tokens are background
  # object pixels are saturated colours; the background and the grey distractor are dull
  saturation = image.max(-1) - image.min(-1)
  background = ~mask & ~distractor
  per_image = [(s[m].mean(), s[b].mean()) for s, m, b in zip(saturation, mask, background)]
  gaps = np.array([o - b for o, b in per_image])
  assert np.mean(gaps > 0.15) > 0.95
  assert saturation[distractor].mean() < 0.15


def test_dataset_names_pick_the_task():
  glyphs = data.make_iterator("synthetic", "test", 50)
  shapes = data.make_iterator("synthetic_shapes", "test", 50)
  for name, iterator, task in (("synthetic", glyphs, "glyphs"), ("synthetic_shapes", shapes, "shapes")):
    expected = synthetic.generate(synthetic.SyntheticConfig(task=task))["test"]
    batch = next(iterator)
    np.testing.assert_array_equal(batch["label"], expected["label"][:50])
    np.testing.assert_array_equal(batch["image"], synthetic.normalize(expected["image"][:50]))
    info = data.get_dataset_info(name)
    assert (info.num_classes, info.image_size, info.num_test) == (10, 32, 5000)


def test_train_iterator_is_a_function_of_seed_and_step():
  # batches of 7: a non-divisor of the set size, so epochs end inside batches
  first = take(data.make_iterator("synthetic", "train", 7, seed=1, with_masks=True), 6)
  resumed = take(data.make_iterator("synthetic", "train", 7, seed=1, start_step=4, with_masks=True), 2)
  for a, b in zip(first[4:], resumed):
    assert sorted(a) == sorted(b) == ["image", "label", "object_mask"]
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  batch = first[0]
  assert batch["image"].shape == (7, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (7,) and batch["label"].dtype == np.int32
  assert batch["object_mask"].shape == (7, 32, 32) and batch["object_mask"].dtype == bool
  assert -1.0 <= batch["image"].min() < -0.5 and 0.5 < batch["image"].max() <= 1.0
  other = next(data.make_iterator("synthetic", "train", 7, seed=2))
  assert not np.array_equal(first[0]["image"], other["image"])
  assert "object_mask" not in other


@pytest.mark.parametrize("image_size", [None, 80])  # held in memory / streamed by worker processes
def test_uint8_images_normalise_to_the_float_batches(image_size):
  """`uint8_images=True` gives the same batches before normalisation, on the host and on a device
  (`normalize_jax`, as the training step does), to the bit; labels and masks unchanged."""
  import jax
  kwargs = dict(image_size=image_size, seed=3, start_step=2, with_masks=True, augment="light")
  floats = take(data.make_iterator("synthetic", "train", 5, **kwargs), 2)
  raw = take(data.make_iterator("synthetic", "train", 5, uint8_images=True, **kwargs), 2)
  on_device = jax.jit(synthetic.normalize_jax)
  for f, r in zip(floats, raw):
    assert r["image"].dtype == np.uint8 and 0 < r["image"].std()
    np.testing.assert_array_equal(synthetic.normalize(r["image"]), f["image"])
    np.testing.assert_array_equal(np.asarray(on_device(r["image"])), f["image"])
    for key in ("label", "object_mask"):
      np.testing.assert_array_equal(r[key], f[key])


def test_normalize_matches_the_plain_formula_for_every_value():
  import jax
  values = np.arange(256, dtype=np.uint8).reshape(16, 16)
  expected = values.astype(np.float64) / 127.5 - 1.0  # float64 reference, one rounding to float32
  np.testing.assert_allclose(synthetic.normalize(values), expected, rtol=0, atol=2.4e-7)  # two float32 roundings
  np.testing.assert_array_equal(np.asarray(jax.jit(synthetic.normalize_jax)(values)), synthetic.normalize(values))


def test_stream_indices_cover_each_epoch_and_resume_exactly():
  n, batch = 10, 3
  full = np.concatenate([data.stream_indices(n, step * batch, batch, 0, True) for step in range(10)])
  for epoch in range(3):
    assert sorted(full[epoch * n:(epoch + 1) * n]) == list(range(n))
  assert not np.array_equal(full[:n], full[n:2 * n])  # each epoch has its own order
  np.testing.assert_array_equal(data.stream_indices(n, 14, 9, 0, True), full[14:23])
  np.testing.assert_array_equal(data.stream_indices(n, 8, 5, 0, False), [8, 9, 0, 1, 2])
  bounds = list(data.batch_bounds(n, 4, 1, repeat=False, drop_remainder=False))
  assert bounds == [(4, 4), (8, 2)]
  assert list(data.batch_bounds(n, 4, 0, repeat=False, drop_remainder=True)) == [(0, 4), (4, 4)]
  assert list(data.batch_bounds(n, 4, 3, repeat=False, drop_remainder=False)) == []


def test_test_split_is_one_ordered_pass():
  info = data.get_dataset_info("synthetic")
  full = synthetic.generate(synthetic.SyntheticConfig())["test"]
  batches = list(data.make_iterator("synthetic", "test", 333, with_masks=True))
  assert [len(b["label"]) for b in batches] == [333] * (info.num_test // 333) + [info.num_test % 333]
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), full["label"])
  np.testing.assert_array_equal(np.concatenate([b["object_mask"] for b in batches]), full["object_mask"])
  np.testing.assert_array_equal(batches[1]["image"], synthetic.normalize(full["image"][333:666]))
  dropped = list(data.make_iterator("synthetic", "test", 333, drop_remainder=True))
  assert [len(b["label"]) for b in dropped] == [333] * (info.num_test // 333)
  # a shuffled single pass still visits every test example exactly once
  shuffled = list(data.make_iterator("synthetic", "test", 1000, shuffle=True, seed=5))
  labels = np.concatenate([b["label"] for b in shuffled])
  assert not np.array_equal(labels, full["label"])
  np.testing.assert_array_equal(np.sort(labels), np.sort(full["label"]))
  # a train split read once, in order, is the generated train set
  once = list(data.make_iterator("synthetic", "train", 4096, shuffle=False, repeat=False, drop_remainder=False))
  assert sum(len(b["label"]) for b in once) == info.num_train


def test_dataset_info():
  info = data.get_dataset_info("synthetic")
  assert info == data.DatasetInfo("synthetic", 10, 32, 30000, 5000)
  assert data.get_dataset_info("synthetic", image_size=48).image_size == 48
  batch = next(data.make_iterator("synthetic", "test", 2, image_size=16, with_masks=True))
  assert batch["image"].shape == (2, 16, 16, 3) and batch["object_mask"].shape == (2, 16, 16)


def test_corruptions_grow_with_severity_and_keep_the_range():
  images = synthetic.normalize(synthetic._generate(synthetic.SyntheticConfig(num_train=1, num_test=16))["test"]["image"])
  for kind in synthetic.CORRUPTIONS:
    out = synthetic.corrupt(images, kind, 3)
    assert out.shape == images.shape and out.dtype == np.float32 and -1 <= out.min() and out.max() <= 1
    np.testing.assert_array_equal(out, synthetic.corrupt(images, kind, 3))  # deterministic
    change = [np.abs(synthetic.corrupt(images, kind, s) - images).mean() for s in range(1, 6)]
    assert change[0] > 0.001 and np.all(np.diff(change) > 0)


@pytest.mark.parametrize("call, message", [
    (lambda: data.make_iterator("mnist", "train", 4), r"unknown dataset 'mnist'.*'synthetic', 'synthetic_shapes'.*'tfds:<name>'"),
    (lambda: data.make_iterator("tfds:", "train", 4), "unknown dataset 'tfds:'"),
    (lambda: data.make_iterator("synthetic", "valid", 4), r"unknown split 'valid'.*\('train', 'test'\)"),
    (lambda: data.make_iterator("synthetic", "train", 0), "batch_size must be a positive int, got 0"),
    (lambda: data.make_iterator("synthetic", "train", 4, start_step=-1), "start_step must be an int >= 0, got -1"),
    (lambda: data.make_iterator("synthetic", "train", 4, image_size=8), "at least 16 pixels, got 8"),
    (lambda: data.get_dataset_info("synthetic", image_size=0), "image_size must be a positive int"),
    (lambda: data.make_iterator("synthetic", "test", 4, with_masks=True, image_size=-3), "got -3"),
    (lambda: synthetic.SyntheticConfig(num_classes=12, task="shapes"), r"one of \(5, 10, 15, 20\).*got 12"),
    (lambda: synthetic.SyntheticConfig(num_classes=1), r"num_classes must be in 2..num_glyphs \(1000\).*got 1"),
    (lambda: synthetic.SyntheticConfig(task="faces"), r"task must be one of \('glyphs', 'shapes'\), got 'faces'"),
    (lambda: synthetic.SyntheticConfig(glyph_contrast=0.9), r"glyph_contrast must be in \(0, 0.5\], got 0.9"),
    (lambda: synthetic.SyntheticConfig(num_train=0), "num_train and num_test must be >= 1"),
    (lambda: synthetic.corrupt(np.zeros((1, 8, 8, 3)), "snow"), r"unknown corruption 'snow'.*\('noise', 'blur'"),
    (lambda: synthetic.corrupt(np.zeros((1, 8, 8, 3)), "blur", 9), "severity must be an integer in 1..5, got 9"),
    (lambda: data.get_dataset_info("tfds:imagenet2012"), "needs --data_dir"),
    (lambda: data.make_iterator("synthetic", "train", 4, mixup=0.8, uint8_images=True),
     r"uint8_images=True is for the synthetic sets without mixup or cutmix; got 'synthetic', mixup 0.8"),
    (lambda: data.make_iterator("tfds:imagenet2012", "train", 4, uint8_images=True, data_dir="/x"),
     "uint8_images=True is for the synthetic sets"),
])
def test_bad_input_raises_value_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_missing_data_dir_and_masks_for_tfds():
  with pytest.raises(FileNotFoundError, match="/no/such/dir"):
    data.get_dataset_info("tfds:imagenet2012", data_dir="/no/such/dir")
  with pytest.raises(ValueError, match="no object masks"):
    data.make_iterator("tfds:imagenet2012", "test", 3, data_dir="/tmp", with_masks=True)


# --- the TFDS read schedule (plain Python) -----------------------------------------------------

FileInstruction = collections.namedtuple("FileInstruction", "filename skip take")


def test_tfds_schedule_covers_each_epoch_and_resumes_exactly():
  from acm_jax.data import tfds_data
  shards = [FileInstruction(f"shard{i}", 0, take) for i, take in enumerate((5, 12, 3, 7))]
  parts = tfds_data.pieces(shards, window=6)
  assert [(p.file, p.skip, p.take) for p in parts[1:3]] == [("shard1", 0, 6), ("shard1", 6, 6)]
  total = sum(s.take for s in shards)

  def records(start, count, shuffle=True, repeat=True):
    """(file, record index) at stream positions start.. as the TF pipeline reads them."""
    out = []
    for files, skips, takes, order, skip in tfds_data.group_stream(parts, 7, shuffle, repeat, 6, start):
      interleaved = [(f, s + i) for i in range(max(takes)) for f, s, t in zip(files, skips, takes) if i < t]
      out += [interleaved[j] for j in order][skip:]
      if len(out) >= count:
        return out[:count]
    return out

  full = records(0, 3 * total)
  everything = sorted((s.filename, i) for s in shards for i in range(s.take))
  for epoch in range(3):
    assert sorted(full[epoch * total:(epoch + 1) * total]) == everything
  assert full[:total] != full[total:2 * total]
  for start in (1, 5, 6, total - 1, total, total + 11):
    assert records(start, 9) == full[start:start + 9]
  ordered = records(0, 2 * total, shuffle=False, repeat=False)
  assert ordered == [(s.filename, i) for s in shards for i in range(s.take)]
  assert records(total, 5, repeat=False) == []


# --- the TFDS pipeline on a fake ImageNet ------------------------------------------------------

SYNSETS = ("n01440764", "n01443537", "n01484850")  # the first three ImageNet classes: labels 0, 1, 2


def _jpeg(rng, h, w):
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def write_fake_imagenet(manual_dir, per_class=3, num_val=5):
  """ILSVRC2012-shaped tars: a train tar of per-synset tars of JPEGs, a val tar of JPEGs."""
  rng = np.random.default_rng(0)
  manual_dir.mkdir(parents=True)
  with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train:
    for synset in SYNSETS:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as sub:
        for i in range(per_class):
          _add(sub, f"{synset}_{i}.JPEG", _jpeg(rng, 40 + 7 * i, 50))
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val:
    for i in range(1, num_val + 1):
      _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng, 60, 45))


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
  pytest.importorskip("tensorflow_datasets")
  root = tmp_path_factory.mktemp("tfds")
  write_fake_imagenet(root / "downloads" / "manual")
  return str(root)


def test_tfds_imagenet_built_offline_and_read(fake_imagenet):
  from acm_jax.data import tfds_data
  info = data.get_dataset_info("tfds:imagenet2012", image_size=32, data_dir=fake_imagenet)
  assert info == data.DatasetInfo("tfds:imagenet2012", 1000, 32, 9, 5)
  kwargs = dict(image_size=32, data_dir=fake_imagenet, seed=5)
  train = take(data.make_iterator("tfds:imagenet2012", "train", 4, **kwargs), 5)  # 20 examples: 3 epochs
  for batch in train:
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].std() > 0.1
  labels = np.concatenate([b["label"] for b in train])
  for epoch in range(2):
    assert sorted(labels[epoch * 9:(epoch + 1) * 9]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  resumed = take(data.make_iterator("tfds:imagenet2012", "train", 4, start_step=3, **kwargs), 2)
  for a, b in zip(train[3:], resumed):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_allclose(a["image"], b["image"], atol=1e-6)
  # small shuffle groups: several groups per epoch, resumed across group and epoch boundaries
  grouped = dict(kwargs, shuffle=True, repeat=True, drop_remainder=True, window=2)
  full = take(tfds_data.make_iterator("imagenet2012", "train", 2, start_step=0, **grouped), 8)
  later = take(tfds_data.make_iterator("imagenet2012", "train", 2, start_step=5, **grouped), 3)
  for a, b in zip(full[5:], later):
    np.testing.assert_allclose(a["image"], b["image"], atol=1e-6)
  assert sorted(np.concatenate([b["label"] for b in full])[:9]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  # the test split: one ordered pass with the centre crop, the last batch smaller
  test = list(data.make_iterator("tfds:imagenet2012", "test", 3, image_size=32, data_dir=fake_imagenet))
  assert [len(b["label"]) for b in test] == [3, 2]
  again = list(data.make_iterator("tfds:imagenet2012", "test", 5, image_size=32, data_dir=fake_imagenet, seed=9))
  np.testing.assert_allclose(np.concatenate([b["image"] for b in test]), again[0]["image"], atol=1e-6)
  import tensorflow_datasets as tfds
  expected = [ex["label"] for ex in tfds.as_numpy(tfds.builder("imagenet2012", data_dir=fake_imagenet)
                                                  .as_dataset(split="validation", shuffle_files=False))]
  np.testing.assert_array_equal(again[0]["label"], expected)


def test_tfds_without_source_files_says_what_is_missing(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(RuntimeError, match="ILSVRC2012_img_train.tar"):
    data.get_dataset_info("tfds:imagenet2012", data_dir=str(tmp_path))
  with pytest.raises(RuntimeError, match="would need a download"):
    data.get_dataset_info("tfds:mnist", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_set'"):
    data.get_dataset_info("tfds:no_such_set", data_dir=str(tmp_path))
