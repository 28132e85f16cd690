"""The source layout: from the repository root nothing of ours shadows a PyPI package (Hugging Face's `kernels`
broke `import transformers` when we had a top-level kernels/), and the `sail_dist` folder alone is the whole
package, so a plain source checkout runs with PYTHONPATH=. and no install."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import ROOT


def test_repo_root_holds_no_importable_package_but_ours():
    packages = sorted(d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py")))
    assert packages == ["sail_dist"], packages


def test_an_installed_kernels_package_wins_from_the_repo_root(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("FAKE = True\n")
    code = ("import kernels, sail_dist.kernels.opset, sail_dist.backends.base, sail_dist.parallel.recipe; "
            "assert kernels.FAKE; print(kernels.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, str(site)])})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == str(site / "kernels" / "__init__.py")


def test_the_source_folder_alone_runs_the_cli_and_a_bench(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "sail_dist"), src / "sail_dist", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(src)}
    where = subprocess.run([sys.executable, "-c", "import sail_dist.kernels.gpu, sail_dist.backends.npu.backend as b; "
                            "print(b.__file__)"], cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.strip().startswith(str(src))
    for module in ("sail_dist", "sail_dist.bench.packing"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=src, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and "usage:" in r.stdout, (module, r.stderr[-3000:])
