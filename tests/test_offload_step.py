"""The chunked CPU-offload host step (backends/gpu/offload_step.py) against DeepSpeed's whole-partition sequence.

The engine-level check (ZeRO-2 + DeepSpeedCPUAdam with the chunked step == plain torch AdamW) is
test_gpu_backend.py::test_zero2_two_ranks_equal_reference[cpu_adam]."""
import pytest
import torch
from conftest import require

from sail_dist.backends.gpu.offload_step import CHUNK_ALIGN, host_adam_chunked
from sail_dist.bench import offload_step as bench


@pytest.mark.parametrize("n,chunk", [(3 * CHUNK_ALIGN + 77, CHUNK_ALIGN), (5 * CHUNK_ALIGN, 2 * CHUNK_ALIGN)])
def test_chunked_step_bitwise_equals_deepspeed(n, chunk):
    """Parameters, both moments, the bf16 copy and the step count: bitwise DeepSpeed's, over three steps, with an
    unaligned tail and a last chunk shorter than the others."""
    require("deepspeed")
    assert bench.check_bitwise(n, chunk, cuda=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_chunked_step_bitwise_equals_deepspeed_cuda():
    """The device path: each chunk's fp32 copy and cast on the GPU == DeepSpeed's host cast and bf16 copy."""
    require("deepspeed")
    assert bench.check_bitwise(5 * CHUNK_ALIGN + 77, 2 * CHUNK_ALIGN, cuda=True)


def test_chunked_step_moves_the_parameters():
    """The check above cannot pass by doing nothing on both sides: one chunked step changes every element."""
    require("deepspeed")
    p = bench._partition(2 * CHUNK_ALIGN, False, 0)
    before = p.detach().clone()
    adam = bench._adam(p)
    out = torch.empty(p.numel(), dtype=torch.bfloat16)
    host_adam_chunked(adam, adam.param_groups[0], p, p.grad, bench.SCALE.reshape(1), out, CHUNK_ALIGN)
    assert (p != before).all() and torch.equal(out, p.to(torch.bfloat16))


def test_chunk_must_be_aligned():
    require("deepspeed")
    p = bench._partition(CHUNK_ALIGN, False, 0)
    adam = bench._adam(p)
    with pytest.raises(ValueError, match="multiple of 4096"):
        host_adam_chunked(adam, adam.param_groups[0], p, p.grad, None, torch.empty(CHUNK_ALIGN), 1000)
