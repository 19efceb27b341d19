"""Image folders: labels and files through the stream (solid colours identify the files), seeded
resume, unreadable files counted and named, and bad layouts."""

import numpy as np
import pytest
from PIL import Image

from acm_jax import data
from acm_jax.data import folder

pytest.importorskip("tensorflow")
CLASSES = ("cat", "dog", "eel")


def colour(label, index):
  return (40 + 60 * label, 30 + 25 * index, 200 - 25 * index)


def write_image(path, label, index, size):
  Image.new("RGB", size, colour(label, index)).save(path, quality=95)


def make_folder(root, per_class=4, val_per_class=2):
  for split, count in (("train", per_class), ("val", val_per_class)):
    for label, name in enumerate(CLASSES):
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        ext = "png" if i % 2 else "jpg"
        write_image(root / split / name / f"{i}.{ext}", label, i, (20 + 7 * i, 15 + 5 * label))
  return root


def identify(image):
  """(label, index) of a solid-colour example, from its mean colour in [-1, 1]."""
  rgb = (image.reshape(-1, 3).mean(0) + 1) * 127.5
  best = min(((l, i) for l in range(3) for i in range(6)), key=lambda li: np.abs(np.subtract(colour(*li), rgb)).sum())
  assert np.abs(np.subtract(colour(*best), rgb)).max() < 4
  return best


def test_info_labels_and_ordered_eval_stream(tmp_path):
  root = make_folder(tmp_path)
  info = data.get_dataset_info(f"folder:{root}", image_size=16)
  assert (info.num_classes, info.num_train, info.num_test, info.image_size) == (3, 12, 6, 16)
  batches = list(data.make_iterator(f"folder:{root}", "test", 4, image_size=16))
  assert [len(b["label"]) for b in batches] == [4, 2]
  seen = [identify(img) for b in batches for img in b["image"]]
  assert seen == [(label, i) for label in range(3) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), [0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("augment", ["none", "light", "inception"])
def test_train_stream_is_seeded_covers_each_epoch_and_resumes(tmp_path, augment):
  root = make_folder(tmp_path)
  name = f"folder:{root}"
  stream = data.make_iterator(name, "train", 4, image_size=16, seed=2, augment=augment)
  batches = [next(stream) for _ in range(6)]  # two epochs of 12
  ids = [identify(img) for b in batches for img in b["image"]]
  labels = np.concatenate([b["label"] for b in batches])
  assert [label for label, _ in ids] == labels.tolist()
  assert sorted(ids[:12]) == sorted(ids[12:]) == [(label, i) for label in range(3) for i in range(4)]
  assert ids[:12] != ids[12:]
  resumed = next(data.make_iterator(name, "train", 4, image_size=16, seed=2, augment=augment, start_step=4))
  for key in ("image", "label"):
    np.testing.assert_array_equal(resumed[key], batches[4][key])


def test_unreadable_files_are_counted_named_and_left_out(tmp_path, capsys):
  root = make_folder(tmp_path)
  good = (root / "train" / "cat" / "0.jpg").read_bytes()
  (root / "train" / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
  (root / "train" / "dog" / "garbage.png").write_bytes(b"not a png at all")
  (root / "train" / "eel" / "notes.txt").write_text("hello")
  scanned = folder.scan(str(root))
  err = capsys.readouterr().err
  assert "3 of 15 files" in err
  for bad in ("truncated.jpg", "garbage.png", "notes.txt"):
    assert bad in err
    assert any(path.endswith(bad) for path, _ in scanned.splits["train"].unreadable)
  assert len(scanned.splits["train"].files) == 12
  assert "runcated" in folder.check_image(str(root / "train" / "cat" / "truncated.jpg"))
  noisy = tmp_path / "noisy.jpg"  # cut just before its end: PIL's verify passes, the marker check does not
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(noisy, quality=90)
  noisy.write_bytes(noisy.read_bytes()[:-20])
  assert folder.check_image(str(noisy)) == "truncated JPEG (no end-of-image marker)"
  assert len(next(data.make_iterator(f"folder:{root}", "train", 12, image_size=8))["label"]) == 12


def test_bad_layouts_are_refused_by_name(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_dataset_info(f"folder:{tmp_path / 'nowhere'}")
  (tmp_path / "flat" / "train").mkdir(parents=True)
  write_image(tmp_path / "flat" / "train" / "a.jpg", 0, 0, (8, 8))
  (tmp_path / "flat" / "val").mkdir()
  with pytest.raises(ValueError, match="has no class subfolders"):
    data.get_dataset_info(f"folder:{tmp_path / 'flat'}")
  root = make_folder(tmp_path / "empty")
  (root / "train" / "fox").mkdir()
  with pytest.raises(ValueError, match="fox' holds no"):
    data.get_dataset_info(f"folder:{root}")
  root = make_folder(tmp_path / "noval")
  for path in (root / "val").rglob("*.*"):
    path.unlink()
  for sub in sorted((root / "val").rglob("*"), reverse=True):
    sub.rmdir()
  (root / "val").rmdir()
  with pytest.raises(ValueError, match="no val/ or test/ folder"):
    data.get_dataset_info(f"folder:{root}")
  root = make_folder(tmp_path / "extra")
  (root / "val" / "yak").mkdir()
  write_image(root / "val" / "yak" / "0.jpg", 0, 0, (8, 8))
  with pytest.raises(ValueError, match="classes that train/ lacks: \\['yak'\\]"):
    data.get_dataset_info(f"folder:{root}")
