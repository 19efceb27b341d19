"""The package: the wheel holds acm_jax and pallas_kernels and imports outside the repository;
requirements.txt and pyproject.toml name the same dependencies; no module imports one that
imports it back."""

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
  return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_lines(path: Path) -> list[str]:
  return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_requirements_files_match_pyproject():
  project = _pyproject()["project"]
  extras = project["optional-dependencies"]
  expected = {*project["dependencies"], *extras["tfds"], *extras["speech"], *extras["plots"], *extras["test"]}
  listed = _requirement_lines(ROOT / "requirements.txt")
  assert len(listed) == len(set(listed)) and set(listed) == expected
  assert _requirement_lines(ROOT / "requirements-gpu.txt") == extras["gpu"]
  assert not any(re.match(r"(jax-)?triton\b", r) for r in expected)  # the 1 GB wheel stays out of CPU installs


def test_wheel_holds_both_packages_and_imports_outside_the_repository(tmp_path):
  pytest.importorskip("setuptools")
  source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  for package in ("acm_jax", "pallas_kernels"):
    shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
  built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
  assert built.returncode == 0, built.stderr[-2000:]
  (wheel,) = (tmp_path / "dist").glob("acm_jax-*.whl")
  names = set(zipfile.ZipFile(wheel).namelist())
  sources = {str(p.relative_to(ROOT)) for package in ("acm_jax", "pallas_kernels")
             for p in (ROOT / package).rglob("*.py")}
  assert sources <= names, sorted(sources - names)[:5]
  assert not any(n.startswith(("tests/", "experiments/", "benchmarks/")) for n in names)
  installed = tmp_path / "site"
  zipfile.ZipFile(wheel).extractall(installed)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  code = ("import acm_jax, pallas_kernels, acm_jax.acm, acm_jax.cli, acm_jax.vit.task, acm_jax.wav2vec2.model; "
          "print(acm_jax.__file__); print(pallas_kernels.__file__)")
  # -P: the working directory is not put on sys.path; PYTHONPATH holds only the unpacked wheel
  ran = subprocess.run([sys.executable, "-P", "-c", code], cwd=elsewhere, capture_output=True, text=True,
                       env={"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
  assert ran.returncode == 0, ran.stderr[-2000:]
  assert all(Path(line).is_relative_to(installed) for line in ran.stdout.split())


def _module_imports() -> dict[str, set[str]]:
  """{module: the package modules it imports anywhere in its body (deferred imports too)}.
  `from a.b import c` counts a.b.c where that is a module, else a.b."""
  modules = {}
  for package in ("acm_jax", "pallas_kernels"):
    for path in (ROOT / package).rglob("*.py"):
      name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
      modules[name.removesuffix(".__init__")] = path
  graph = {}
  for name, path in modules.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        found |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        assert not node.level, f"{name}: relative import (the package uses absolute ones)"
        subs = [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {s for s in subs if s in modules}
        if any(s not in modules for s in subs):
          found.add(node.module)
    graph[name] = {m for m in found if m in modules and m != name}
  return graph


def test_no_module_imports_one_that_imports_it_back():
  graph = _module_imports()
  assert {"acm_jax.acm", "acm_jax.inference", "acm_jax.data", "pallas_kernels.acm_fused"} <= set(graph)
  assert "acm_jax.inference" in graph["acm_jax.acm"]  # the scan sees deferred and module-level imports

  def reachable(start):
    seen, todo = set(), [start]
    while todo:
      for nxt in graph[todo.pop()] - seen:
        seen.add(nxt)
        todo.append(nxt)
    return seen

  cycles = sorted((a, b) for a in graph for b in graph[a] if a in reachable(b))
  assert not cycles, f"import cycles (module, an import that leads back to it): {cycles}"
