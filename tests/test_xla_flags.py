"""The collective-overlap XLA flags helper (added where unset, user values kept and reported) and
the entry points' host-memory default."""

import os

import pytest

from acm_jax import xla_flags


def test_adds_every_flag_to_empty_flags():
  env = {}
  added = xla_flags.overlap_flags(env)
  assert added == [f"{k}={v}" for k, v in xla_flags.GPU_OVERLAP_FLAGS.items()]
  assert xla_flags.parse_flags(env["XLA_FLAGS"]) == xla_flags.GPU_OVERLAP_FLAGS


def test_keeps_user_flags_and_warns_on_a_conflict():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_gpu_enable_latency_hiding_scheduler=false "
                      "--xla_gpu_enable_pipelined_all_gather"}
  with pytest.warns(UserWarning, match="sets --xla_gpu_enable_latency_hiding_scheduler=false; .*=true. Keeping yours"):
    added = xla_flags.overlap_flags(env)
  flags = xla_flags.parse_flags(env["XLA_FLAGS"])
  assert flags["--xla_gpu_enable_latency_hiding_scheduler"] == "false"
  assert flags["--xla_gpu_enable_pipelined_all_gather"] is None  # bare flag: already true, untouched
  assert flags["--xla_force_host_platform_device_count"] == "8"
  assert len(added) == len(xla_flags.GPU_OVERLAP_FLAGS) - 2
  with pytest.warns(UserWarning):  # a second call changes nothing, and still reports the conflict
    assert xla_flags.overlap_flags(env) == []


def test_host_memory_default_turns_preallocation_off_unless_the_user_chose():
  env = {}
  assert xla_flags.host_memory_defaults(env) and env == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  for user in ({"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}, {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"}):
    env = dict(user)
    assert not xla_flags.host_memory_defaults(env) and env == user


def test_the_entry_point_sets_the_host_memory_default(monkeypatch, capsys):
  from acm_jax import cli
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert cli.main("vit", ["--help"]) == 0
  assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
