"""NPU backend (Ascend): Megatron-core pipeline + expert parallelism, MindSpeed, torch_npu fused ops (backend.py)."""
