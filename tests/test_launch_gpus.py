"""The launchers' GPU count (launch/common.sh `sail_detect_gpus`): one rank per GPU the job may use. nvidia-smi
lists every GPU of the node, so CUDA_VISIBLE_DEVICES narrows the count; an empty one (or -1) is the CPU path."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import ROOT


def _detect(tmp_path, visible: str | None, gpus_on_node: int | None = 8) -> tuple[int, str, str]:
    """(return status, NGPU, DS_ACCELERATOR) of sail_detect_gpus with a fake nvidia-smi listing the node's GPUs
    (`gpus_on_node=None`: one that fails)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if gpus_on_node is not None:
        lines = "".join(f"GPU {i}: NVIDIA H200 (UUID: GPU-{i})\\n" for i in range(gpus_on_node))
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '{lines}'\n")
    else:  # a node without a working driver: nvidia-smi fails (it shadows a real one on a GPU machine's PATH)
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR")}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    script = f'source "{ROOT}/launch/common.sh"; sail_detect_gpus; echo "$? $NGPU ${{DS_ACCELERATOR:-}}"'
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    status, ngpu, *acc = r.stdout.split()
    return int(status), ngpu, (acc[0] if acc else "")


@pytest.mark.parametrize("visible,expect", [(None, (0, "8", "")), ("0,1", (0, "2", "")), ("3", (0, "1", "")),
                                            ("", (1, "0", "cpu")), ("-1", (1, "0", "cpu"))])
def test_ranks_follow_cuda_visible_devices(tmp_path, visible, expect):
    assert _detect(tmp_path, visible) == expect


def test_failing_nvidia_smi_is_the_cpu_path(tmp_path):
    assert _detect(tmp_path, None, gpus_on_node=None) == (1, "0", "cpu")
