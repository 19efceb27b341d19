"""The command line: every flag documented with its allowed values, booleans and choices checked in one
line, derived defaults shown resolved, start-up description, the eval.json summary, configs reloaded as
their own class, and both entry points served by the one driver."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from acm_jax import cli, registry
from acm_jax.train import config as config_lib
from acm_jax.wav2vec2 import task as speech
from experiments import vit_imagenet, wav2vec2_commonvoice


@pytest.mark.parametrize("family", ["vit", "wav2vec2"])
def test_every_flag_has_help_with_allowed_values(family, capsys):
  assert cli.main(family, ["--help"]) == 0
  text = capsys.readouterr().out
  flags = re.findall(r"^  (--\w+) (\S+)\s*(.*?)(?=^  --|\Z)", text, re.M | re.S)
  documented = {name: (metavar, " ".join(help_text.split())) for name, metavar, help_text in flags}
  fields = {f"--{f.name}" for f in dataclasses.fields(registry.get(family).config_class)}
  assert fields <= set(documented)
  for name in fields:
    metavar, help_text = documented[name]
    assert help_text and "default:" in help_text, name
    assert metavar.startswith("{") or metavar in ("INT", "FLOAT", "TEXT"), (name, metavar)
  assert documented["--acm_attention"][0] == "{true,false,yes,no,1,0}"
  assert documented["--impl"][0] == "{auto,xla,pallas,triton}"
  assert documented["--sharding"][0] == "{dp,fsdp,tp}"
  assert documented["--label_rule"][0] == "{ours,official}"
  assert "default: 2 (num_learners // 2)" in documented["--static_k"][1]
  presets = {"vit": "vit_b16", "wav2vec2": "xls_r_300m"}[family]
  assert presets in documented["--model"][0] and "from_init" in documented["--model"][0]


@pytest.mark.parametrize("value, expected", [("true", True), ("YES", True), ("1", True), ("false", False),
                                             ("no", False), ("0", False)])
def test_booleans_take_the_usual_spellings(value, expected):
  _, cfg = cli.parse(registry.get("vit"), [f"--acm_attention={value}", f"--remat={value}"])
  assert cfg.acm_attention is expected and cfg.remat == ("full" if expected else "none")


@pytest.mark.parametrize("flag, value, allowed", [("acm_attention", "maybe", "true, yes, 1, false, no, 0"),
                                                  ("remat", "some", "none, full, dots, dots_no_batch (or true / false)"),
                                                  ("impl", "cuda", "auto, xla, pallas, triton"),
                                                  ("sharding", "zero3", "dp, fsdp, tp"),
                                                  ("model", "vit_h14", "tiny, vit_s16")])
def test_bad_values_stop_with_one_line(flag, value, allowed, capsys):
  assert vit_imagenet.main([f"--{flag}={value}"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and f"--{flag}" in err and repr(value) in err and allowed in err, err


def test_bad_number_and_unknown_flag(capsys):
  assert wav2vec2_commonvoice.main(["--budget=half"]) == 2
  assert capsys.readouterr().err.strip() == "error: argument --budget: 'half' is not a number"
  assert vit_imagenet.main(["--budgett=0.5"]) == 2
  assert capsys.readouterr().err.strip() == "error: unrecognized arguments: --budgett=0.5"


def test_startup_description_names_work_dir_and_changed_fields(tmp_path):
  cfg = config_lib.ExperimentConfig(workdir=str(tmp_path), budget=0.25, acm_attention=True)
  text = cli.describe(cfg)
  assert text.splitlines() == [f"work dir: {tmp_path}", "config: ExperimentConfig --acm_attention=True --budget=0.25"]
  assert cli.describe(config_lib.ExperimentConfig(workdir=str(tmp_path))).endswith("(all defaults)")


def test_eval_summary_is_keyed_by_model(tmp_path):
  (tmp_path / "eval.json").write_text(json.dumps({"model": "dense", "top1": 0.5}))  # an older single record
  cli.write_summary(tmp_path, [{"model": "dense", "top1": 0.9}, {"model": "acm_b0.50", "top1": 0.8}])
  cli.write_summary(tmp_path, [{"model": "static_k2", "top1": 0.7}, {"model": "dense", "top1": 0.95}])
  summary = json.loads((tmp_path / "eval.json").read_text())
  assert summary == {"dense": {"model": "dense", "top1": 0.95}, "acm_b0.50": {"model": "acm_b0.50", "top1": 0.8},
                     "static_k2": {"model": "static_k2", "top1": 0.7}}


def test_saved_config_reloads_as_its_own_class(tmp_path):
  for cfg in (speech.SpeechConfig(language="en", synth_words=40), config_lib.ExperimentConfig(budget=0.25)):
    (tmp_path / "config.json").write_text(cfg.to_json())
    loaded = config_lib.load(tmp_path / "config.json")
    assert type(loaded) is type(cfg) and loaded == cfg
  (tmp_path / "config.json").write_text(json.dumps({"budget": 0.75}))  # written before config_class existed
  assert config_lib.load(tmp_path / "config.json") == config_lib.ExperimentConfig(budget=0.75)
  for name, why in (("not_imported_anywhere.Config", "outside acm_jax"), ("os.system", "not an ExperimentConfig")):
    (tmp_path / "config.json").write_text(json.dumps({"config_class": name}))
    with pytest.raises(ValueError, match=why):
      config_lib.load(tmp_path / "config.json")


def test_entry_points_are_the_one_driver():
  for module in ("experiments.vit_imagenet", "experiments.wav2vec2_commonvoice"):
    ran = subprocess.run([sys.executable, "-m", module, "--acm_attention=maybe"], capture_output=True, text=True)
    assert ran.returncode == 2 and ran.stderr.count("\n") == 1 and "--acm_attention" in ran.stderr
