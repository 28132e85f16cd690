"""Shared test helpers: tiny configs and hand-built packed batches (independent of the data pipeline), and
`require` for optional packages: a skip on a dev box, a failure in CI (CI=true), so a broken install cannot pass."""
from __future__ import annotations

import importlib
import json
import os
import socket
import sys

import pytest
import torch
import torch.nn.functional as F

from sail_dist.config import ModelConfig, load_config
from sail_dist.data.batch import PackedBatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def in_ci() -> bool:
    """CI=true (set by .ci/run, and by GitHub Actions and most CI services)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(*modules: str):
    """Import each module for the test that needs it and return the last one. When one is missing: under CI a
    failure (every package the suite asks for is installed by .ci/run: a missing one is a broken install),
    elsewhere a skip naming it. Call it from the test (or the helper that launches the package's processes),
    never at module level, so the file's other tests neither import nor need it."""
    mod = None
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            msg = f"{name} is not importable ({type(e).__name__}: {e})"
            if in_ci():
                pytest.fail(f"{msg}; CI=true: .ci/run installs it, so this is a broken install", pytrace=False)
            pytest.skip(msg)
    return mod


def require_mcore_checkpoints() -> None:
    """megatron-core (via `require`), and a torch whose distributed checkpoints keep its metadata: torch 2.9-2.12
    drop the `mcore_data` megatron-core 0.12.1 adds (pytorch/pytorch#162948; seen with 2.11, docs/npu.md), so the
    NPU backend's save stops with that explanation there."""
    require("megatron.core")
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (2, 9) <= (major, minor) < (2, 13):
        pytest.skip(f"torch {torch.__version__} drops megatron-core 0.12.1's checkpoint metadata "
                    "(pytorch/pytorch#162948): the NPU backend cannot checkpoint with it")


class LazyModule:
    """`transformers = LazyModule("transformers")` at module level: imported through `require` on first attribute
    use, so only the tests that use it skip without it (or fail under CI)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("_"):  # pytest's collection probes (`__test__`, fixture markers): not the module's API
            raise AttributeError(attr)
        return getattr(require(self._name), attr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MAX_TEST_RANKS = 4  # the most processes one test starts (launch/npu_pretrain.sh's PP 2 x EP 2)


def gpu_children() -> bool:
    """SAIL_TEST_GPU=1 (launch/gpu_tests.sh): child processes may use the GPUs, so the backends run there on CUDA
    (NCCL, device bf16, pinned batches) wherever a launch fits the GPUs (see child_env and torchrun_cmd)."""
    return os.environ.get("SAIL_TEST_GPU", "").strip().lower() in ("1", "true", "yes")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a test's child processes (multi-rank runs): one thread per rank, tests/ importable with the
    parent's PYTHONPATH kept (a machine that runs the suite from a source tree, not a pip install, needs it), and
    no GPU, so they run on CPU over gloo everywhere as in CI (ranks cannot share one GPU under NCCL). With
    SAIL_TEST_GPU=1 on a machine with at least MAX_TEST_RANKS GPUs they stay visible; with fewer, torchrun_cmd
    gives them back to each launch that fits (a launcher script's ranks are not known here: they stay on CPU)."""
    path = [os.path.join(ROOT, "tests"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    keep = gpu_children() and torch.cuda.device_count() >= MAX_TEST_RANKS
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path),
            **({} if keep else {"CUDA_VISIBLE_DEVICES": ""}), **extra}


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    """`torchrun --nproc_per_node N` on a free port, followed by `args` (a script or `-m module`, then its args).
    With SAIL_TEST_GPU=1 the launch sees the GPUs when its N ranks fit them, else none (CPU over gloo, as in CI)."""
    prefix: list[str] = []
    if gpu_children():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # the parent's choice of GPUs, if any
        if nproc > torch.cuda.device_count():
            prefix = ["env", "CUDA_VISIBLE_DEVICES="]
        elif visible is None:
            prefix = ["env", "-u", "CUDA_VISIBLE_DEVICES"]
        else:
            prefix = ["env", f"CUDA_VISIBLE_DEVICES={visible}"]
    return [*prefix, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *args]


def run_in_triton_interpreter(test_file: str) -> None:
    """Re-run `test_file` in a child pytest process with TRITON_INTERPRET=1 set from the start (the interpreter
    must be on before triton is first imported), so nothing else in this process runs in the interpreter."""
    require("triton", "numpy")  # the interpreter needs numpy
    import subprocess

    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(test_file)],
                         cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-6000:] + out.stderr[-2000:]


def model_config(name: str, *overrides: str) -> ModelConfig:
    return load_config(os.path.join(ROOT, "configs", "model", f"{name}.yaml"), ["data.demo=true", *overrides]).model


def make_sample(cfg: ModelConfig, n_text: int, grids: list[tuple[int, int]] = (), gen: torch.Generator | None = None):
    """One sample: random text ids (avoiding special ids), <img> <IMG_CONTEXT>*n </img> per image, random patches."""
    t = cfg.tokens
    low = 16 if cfg.llm.vocab_size > 64 else max(t.__dict__.values()) + 1
    ids = [torch.randint(low, cfg.llm.vocab_size, (n_text,), generator=gen)]
    patches = []
    s = cfg.adapter.downsample
    for h, w in grids:
        n_vis = (h // s) * (w // s)
        ids.append(torch.tensor([t.img_start] + [t.img_context] * n_vis + [t.img_end]))
        ids.append(torch.randint(low, cfg.llm.vocab_size, (3,), generator=gen))
        patches.append(torch.randn(h * w, 3 * cfg.vit.patch_size ** 2, generator=gen))
    ids = torch.cat(ids)
    labels = torch.cat([ids[1:], torch.tensor([-100])])
    labels[ids == t.img_context] = -100
    return ids, labels, patches, list(grids)


def pack(samples, sample_ids=None) -> PackedBatch:
    ids = torch.cat([s[0] for s in samples])
    labels = torch.cat([s[1] for s in samples])
    lens = [len(s[0]) for s in samples]
    patches = [p for s in samples for p in s[2]]
    grids = [g for s in samples for g in s[3]]
    return PackedBatch(
        input_ids=ids, labels=labels, position_ids=torch.cat([torch.arange(n) for n in lens]),
        cu_seqlens=F.pad(torch.cumsum(torch.tensor(lens), 0), (1, 0)).to(torch.int32), max_seqlen=max(lens),
        loss_weight=(labels != -100).float(),
        pixel_values=torch.cat(patches) if patches else None,
        image_grid_hw=torch.tensor(grids, dtype=torch.long) if grids else None,
        sample_ids=list(sample_ids if sample_ids is not None else range(len(samples))))


def step_losses(out_dir) -> dict[int, float]:
    """{step: loss} from a run's <out_dir>/metrics.jsonl (the records that carry a loss)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def kill_tree(proc) -> None:
    """SIGKILL a launched run (a subprocess.Popen) and all its children: torchrun's workers each sit in a session of
    their own, so killing the launcher alone would leave them training."""
    import signal

    import psutil

    procs = [psutil.Process(proc.pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    proc.wait()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the largest deviation relative to the reference's scale."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture
def shared_dir():
    """../shared beside the checkout (the project's shared reference files, e.g. the SAIL-VL2-2B release index
    under reference/sailvl2_2b_hf). Absent: a skip that says so, a failure under CI."""
    if not os.path.isdir(SHARED):
        msg = (f"this test needs ../shared (the project's shared reference files, e.g. "
               f"reference/sailvl2_2b_hf) beside the checkout; {SHARED} is absent")
        if in_ci():
            pytest.fail(f"{msg}; CI=true: CI must provide it", pytrace=False)
        pytest.skip(msg)
    return SHARED
