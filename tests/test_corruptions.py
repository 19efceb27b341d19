"""ImageNet-C: flag parsing, the on-the-fly corruptions against direct formulas and properties, mCE by
hand, and the prepared TFDS sets read from a small set the test writes itself."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from acm_jax import data
from acm_jax.data import corruptions
from acm_jax.train import config as config_lib
from acm_jax.train import robustness


def smooth_images(n=3, size=32, seed=0, texture=15.0):
  """Blocks of random colours with some texture."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(40, 215, (n, 4, 4, 3))
  blocks = np.repeat(np.repeat(coarse, size // 4, 1), size // 4, 2)
  return np.clip(blocks + rng.normal(0, texture, blocks.shape), 0, 255).astype(np.uint8)


def test_parse_flags():
  assert corruptions.parse("all", "1,2,3,4,5") == (corruptions.NAMES, (1, 2, 3, 4, 5))
  assert corruptions.parse("contrast, fog", "3") == (("contrast", "fog"), (3,))
  with pytest.raises(ValueError, match=r"--corruptions: unknown \['glare'\]; expected 'all' or"):
    corruptions.parse("contrast,glare", "1")
  for bad in ("0,1", "6", "one", ""):
    with pytest.raises(ValueError, match=f"--severities must be comma-separated integers in 1..5, got '{bad}'"):
      corruptions.parse("all", bad)


@pytest.mark.parametrize("name", sorted(set(corruptions.ON_THE_FLY) - {"pixelate"}))  # pixelate: by hand below
def test_on_the_fly_corruptions_are_seeded_and_grow_with_severity(name):
  clean = smooth_images()
  out = {s: corruptions.corrupt(clean, name, s, seed=1) for s in (1, 5)}
  assert out[1].shape == clean.shape and out[1].dtype == np.uint8
  np.testing.assert_array_equal(out[1], corruptions.corrupt(clean, name, 1, seed=1))
  distance = {s: np.abs(o.astype(float) - clean).mean() for s, o in out.items()}
  assert 0 < distance[1] < distance[5], distance


def test_corruptions_against_direct_formulas():
  clean = smooth_images()
  x = clean / 255.0
  means = x.mean(axis=(1, 2), keepdims=True)
  np.testing.assert_array_equal(corruptions.corrupt(clean, "contrast", 2),
                                np.uint8(np.clip((x - means) * 0.3 + means, 0, 1) * 255))
  pixelated = corruptions.corrupt(clean, "pixelate", 5)  # 32 -> 8 -> 32 px: 4 x 4 blocks of one colour
  blocks = pixelated.reshape(3, 8, 4, 8, 4, 3)
  assert np.all(blocks == blocks[:, :, :1, :, :1])
  assert not np.array_equal(corruptions.corrupt(clean, "pixelate", 1), clean)
  buf = io.BytesIO()
  Image.fromarray(clean[0]).save(buf, "JPEG", quality=7)
  np.testing.assert_array_equal(corruptions.corrupt(clean[:1], "jpeg_compression", 5)[0],
                                np.asarray(Image.open(buf)))
  disk = corruptions._disk(6, 0.5)
  assert disk.sum() == pytest.approx(1.0, rel=1e-5) and np.allclose(disk, disk.T) and np.allclose(disk, disk[::-1])
  with pytest.raises(ValueError, match="'frost' has no on-the-fly implementation"):
    corruptions.corrupt(clean, "frost", 1)


def test_mce_by_hand():
  model = {"fog": {1: 0.2, 2: 0.4}, "snow": {1: 0.5, 2: 0.5}}
  dense = {"fog": {1: 0.3, 2: 0.3}, "snow": {1: 0.25, 2: 0.25}}
  result = corruptions.mce(model, dense)
  assert result["fog"] == pytest.approx(1.0) and result["snow"] == pytest.approx(2.0)
  assert result["mCE"] == pytest.approx(1.5)


@dataclasses.dataclass(frozen=True)
class FakeExperiment:  # what robustness.corrupted_experiment reads of a phases.Experiment
  config: config_lib.ExperimentConfig
  iterator: object = data.make_iterator
  group_masks: bool = True


def write_prepared(data_dir, corruption, severity, images, labels):
  tfds = pytest.importorskip("tensorflow_datasets")
  name = f"imagenet2012_corrupted/{corruption}_{severity}"
  builder = tfds.builder(name, data_dir=str(data_dir))
  examples = [(str(i), {"image": image, "label": int(label), "file_name": f"ILSVRC2012_val_{i + 1:08d}.JPEG"})
              for i, (image, label) in enumerate(zip(images, labels))]
  tfds.dataset_builders.store_as_tfds_dataset(
      name="imagenet2012_corrupted", version=str(builder.version), features=builder.info.features,
      split_datasets={"validation": examples}, config=f"{corruption}_{severity}", data_dir=str(data_dir),
      file_format="tfrecord", disable_shuffling=True)


def test_prepared_sets_are_read_as_they_are_and_missing_ones_are_named(tmp_path):
  # the TFDS feature: 224 x 224 JPEGs; flat blocks survive the JPEG coding nearly unchanged
  images, labels = smooth_images(5, 224, seed=2, texture=0.0), np.array([3, 1, 4, 1, 5])
  write_prepared(tmp_path, "frost", 2, images, labels)
  cfg = config_lib.ExperimentConfig(dataset="tfds:imagenet2012", data_dir=str(tmp_path), image_size=224)
  exp = robustness.corrupted_experiment(FakeExperiment(cfg), "frost", 2)
  assert exp.config.dataset == "tfds:imagenet2012_corrupted/frost_2" and not exp.group_masks
  batches = list(exp.iterator(exp.config.dataset, "test", 4, image_size=224, data_dir=str(tmp_path)))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels)
  got = np.concatenate([b["image"] for b in batches])
  error = np.abs(got - (images / 127.5 - 1.0))  # already centre crops: not rescaled and cropped again
  assert error.mean() < 0.01 and np.median(error) < 0.005, (error.mean(), np.median(error))
  with pytest.raises(ValueError, match=r"'frost' at severity 3: imagenet2012_corrupted/frost_3 is not in --data_dir"):
    robustness.corrupted_experiment(FakeExperiment(cfg), "frost", 3)
  on_the_fly = robustness.corrupted_experiment(FakeExperiment(cfg), "contrast", 3)
  assert on_the_fly.config.dataset == "tfds:imagenet2012"


def test_on_the_fly_eval_batches_are_the_clean_ones_corrupted():
  cfg = config_lib.ExperimentConfig(image_size=16)
  exp = robustness.corrupted_experiment(FakeExperiment(cfg), "contrast", 5)
  got = next(exp.iterator("synthetic", "test", 8, image_size=16))
  clean = next(data.make_iterator("synthetic", "test", 8, image_size=16))
  np.testing.assert_array_equal(got["label"], clean["label"])
  uint8 = np.round((clean["image"] + 1) * 127.5).astype(np.uint8)
  np.testing.assert_allclose(got["image"], corruptions.corrupt(uint8, "contrast", 5) / 127.5 - 1, atol=1e-6)


def test_cli_refuses_bad_corruption_flags(tmp_path, capsys):
  from experiments import vit_imagenet
  assert vit_imagenet.main([f"--workdir={tmp_path}", "--phase=eval", "--corruptions=glare"]) == 2
  assert "unknown ['glare']" in capsys.readouterr().err
  assert vit_imagenet.main([f"--workdir={tmp_path}", "--phase=eval", "--corruptions=fog", "--severities=7"]) == 2
  assert "--severities must be" in capsys.readouterr().err
  assert vit_imagenet.main([f"--workdir={tmp_path}", "--phase=finetune", "--corruptions=fog"]) == 2
  assert "--corruptions goes with --phase=eval" in capsys.readouterr().err
