"""Augmentation against plain numpy / scipy references on random inputs, determinism and bad flags."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from acm_jax import data, losses
from acm_jax.data import augment

tf = pytest.importorskip("tensorflow")


def test_mixup_and_cutmix_match_a_loop_reference():
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (6, 10, 12, 3)).astype(np.float32), "label": np.arange(6, dtype=np.int32)}
  clean = batch["image"].copy()
  kinds = set()
  for position in range(0, 40, 4):
    params = augment.mix_params(3, position, 10, 12, mixup=0.8, cutmix=1.0)
    assert params == augment.mix_params(3, position, 10, 12, mixup=0.8, cutmix=1.0)  # from (seed, position)
    kind, lam, box = params
    kinds.add(kind)
    out = augment.apply_mix(batch, params)
    for i in range(6):
      j = 5 - i
      assert out["mix_label"][i] == j and out["mix_weight"][i] == np.float32(lam)
      if kind == "mixup":
        np.testing.assert_allclose(out["image"][i], lam * batch["image"][i] + (1 - lam) * batch["image"][j],
                                   rtol=1e-6)
        continue
      top, bottom, left, right = box
      expect = batch["image"][i].copy()
      for y, x in itertools.product(range(top, bottom), range(left, right)):
        expect[y, x] = batch["image"][j][y, x]
      np.testing.assert_array_equal(out["image"][i], expect)
      assert lam == pytest.approx(1 - (bottom - top) * (right - left) / 120)
  assert kinds == {"mixup", "cutmix"}
  np.testing.assert_array_equal(batch["image"], clean)  # mixed into new arrays, the batch left as it was
  assert augment.mix_params(3, 0, 10, 12, 0.0, 0.0) is None
  assert augment.mix_params(3, 0, 10, 12, 0.0, 1.0)[0] == "cutmix"
  assert augment.mix_params(3, 0, 10, 12, 0.5, 0.0)[0] == "mixup"


def test_mixed_classification_loss_is_cross_entropy_of_mixed_smoothed_targets():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 7))
  a, b = rng.integers(0, 7, 5), rng.integers(0, 7, 5)
  lam = rng.uniform(size=5)
  eye = np.eye(7)
  targets = lam[:, None] * (0.9 * eye[a] + 0.1 / 7) + (1 - lam[:, None]) * (0.9 * eye[b] + 0.1 / 7)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expect = -(targets * log_p).sum(-1).mean()
  got = losses.classification_loss(jnp.asarray(logits), jnp.asarray(a), 0.1, jnp.asarray(b), jnp.asarray(lam))
  assert float(got) == pytest.approx(expect, rel=1e-5)


def test_light_crop_numpy_and_tensorflow_match_a_reference():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
  offsets, flips = augment.light_params(0, 8, 4, 16)
  assert offsets.min() >= 0 and offsets.max() <= 4
  flips = np.array([True, False, True, False])  # both branches, whatever the draw
  got = augment.light_numpy(images, offsets, flips)
  for i in range(4):
    padded = np.pad(images[i], ((2, 2), (2, 2), (0, 0)), mode="reflect")
    expect = padded[offsets[i, 0]:offsets[i, 0] + 16, offsets[i, 1]:offsets[i, 1] + 16]
    expect = expect[:, ::-1] if flips[i] else expect
    np.testing.assert_array_equal(got[i], expect)
    tf_out = augment.light_crop(tf, tf.constant(images[i], tf.float32), tf.constant(offsets[i], tf.int32),
                                tf.constant(flips[i]), 16)
    np.testing.assert_array_equal(tf_out.numpy(), expect)


def test_three_augment_ops_match_numpy_and_scipy():
  rng = np.random.default_rng(3)
  image = rng.uniform(0, 255, (20, 24, 3)).astype(np.float32)
  grey = image @ np.array([0.299, 0.587, 0.114], np.float32)
  factors = np.array([1.2, 0.8, 1.25], np.float32)

  def jitter(x):  # torchvision's adjust_brightness, adjust_contrast, adjust_saturation
    luma = np.array([0.299, 0.587, 0.114])
    x = np.clip(x * factors[0], 0, 255)
    mean = (x @ luma).mean()
    x = np.clip(mean + factors[1] * (x - mean), 0, 255)
    g = (x @ luma)[..., None]
    return np.clip(g + factors[2] * (x - g), 0, 255)

  blurred = ndimage.gaussian_filter(image, sigma=(1.5, 1.5, 0), mode="mirror", truncate=4.0)  # radius 6
  expects = [np.repeat(grey[..., None], 3, -1), np.where(image >= 128, 255 - image, image), blurred]
  for op, expect in enumerate(expects):
    got = augment.three_augment_ops(tf, tf.constant(image), tf.constant(op), tf.constant(1.5), tf.constant(factors))
    np.testing.assert_allclose(got.numpy(), jitter(expect), atol=2e-3)


@pytest.mark.parametrize("preset", augment.PRESETS)
def test_train_image_presets_are_seeded_by_position(preset):
  image = tf.constant(np.random.default_rng(4).integers(0, 256, (30, 40, 3)), tf.uint8)
  run = lambda position: augment.train_image(tf, image, tf.constant([5, position], tf.int64), 16, preset).numpy()
  first = run(7)
  assert first.shape == (16, 16, 3) and first.min() >= 0 and first.max() <= 255
  np.testing.assert_array_equal(first, run(7))
  if preset != "none":
    assert any(not np.array_equal(first, run(p)) for p in range(8, 12))


def test_synthetic_stream_with_light_and_mixing_resumes_exactly():
  kwargs = dict(image_size=16, seed=1, augment="light", mixup=0.8, cutmix=1.0)
  stream = data.make_iterator("synthetic", "train", 8, **kwargs)
  first = [next(stream) for _ in range(3)]
  resumed = next(data.make_iterator("synthetic", "train", 8, start_step=2, **kwargs))
  assert set(resumed) == {"image", "label", "mix_label", "mix_weight"}
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], first[2][key])
  plain = next(data.make_iterator("synthetic", "train", 8, image_size=16, seed=1))
  np.testing.assert_array_equal(plain["label"], first[0]["label"])
  assert not np.array_equal(plain["image"], first[0]["image"])
  test = next(data.make_iterator("synthetic", "test", 8, **kwargs))  # eval data is never augmented
  np.testing.assert_array_equal(test["image"], next(data.make_iterator("synthetic", "test", 8, image_size=16))["image"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(augment="randaugment"), "unknown --augment preset 'randaugment'"),
    (dict(mixup=-0.1), "--mixup must be an alpha >= 0"),
    (dict(cutmix=float("nan")), "--cutmix must be an alpha >= 0"),
    (dict(augment="inception"), "generated set 'synthetic' takes one of"),
])
def test_bad_augmentation_flags(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.make_iterator("synthetic", "train", 8, image_size=16, **kwargs)


def test_cli_refuses_bad_augmentation_before_training(tmp_path, capsys):
  from experiments import vit_imagenet
  assert vit_imagenet.main([f"--workdir={tmp_path}", "--augment=autoaugment"]) == 2
  assert "--augment: 'autoaugment' is not allowed; expected one of inception" in capsys.readouterr().err
  assert vit_imagenet.main([f"--workdir={tmp_path}", "--cutmix=-1"]) == 2
  assert "--cutmix must be an alpha >= 0" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())
