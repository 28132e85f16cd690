"""Small, version-pinned fixes to megatron-core 0.12.1 that the NPU backend needs off Transformer Engine.

Each fix is applied once, only when the condition it repairs holds, and says why. They change no
numerics.

- `DistributedOptimizer._copy_main_params_to_model_params` calls `fp8_utils.quantize_param_shard`
  unconditionally, and without Transformer Engine that function raises "Invalid Transformer Engine
  version for FP8 distributed optimizer" even when there is no FP8 parameter at all (fixed upstream
  later by returning early on an empty list). Neither our CPU/CUDA runs nor an Ascend cluster have TE
  (MindSpeed stubs it), so with no FP8 parameters the call is made a no-op.
- `dist_checkpointing` (validation of flattened shards, i.e. the distributed optimizer's state, and the
  shard exchange) calls `np.product`, which NumPy 2 removed (MindSpeed pins numpy <= 1.26). The alias
  is restored as `np.prod` when missing.
- The torch_dist checkpoint writer calls torch's private `filesystem._write_item` without the
  `serialization_format` argument newer torch added (2.13 here; Ascend's torch 2.1-2.7 predates it). When
  the signature has it, the writer gets a wrapper that passes torch's own default (TORCH_SAVE).
- Loading the distributed optimizer's `fully_sharded_model_space` state into torch AdamW (the fallback
  without TE/apex) breaks twice: `load_state_dict` first puts ONE shared `step` tensor into every
  parameter's state (torch AdamW then increments it once per parameter per step: wrong bias correction
  after resume), then `_set_main_param_and_optimizer_states` copies every state key from the checkpoint,
  which has no per-parameter `step` (it is stored once, in the param groups) -> KeyError. Fixed by
  keeping the already-restored step for the missing key and giving each parameter its own step tensor.

Not fixable here, only explained: torch 2.9-2.12 drop the `mcore_data` megatron-core adds to a checkpoint's
metadata (`checkpoint_keeps_mcore_data`, `MCORE_DATA_LOST`; the engine checks each save and names it on load).

"""
from __future__ import annotations

import torch

_APPLIED = False


def apply_megatron_compat() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _fix_quantize_param_shard()
    _fix_numpy_product()
    _fix_write_item()
    _fix_distopt_torch_adam_load()
    _APPLIED = True


def _fix_distopt_torch_adam_load() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    set_states = DistributedOptimizer._set_main_param_and_optimizer_states
    load_state_dict = DistributedOptimizer.load_state_dict

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        plain = not self.ddp_config.use_custom_fsdp and not self.config.use_precision_aware_optimizer
        if "step" not in tensors and plain:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:  # restored from the param groups by load_state_dict: keep it
                tensors = {**tensors, "step": step.clone()}
        return set_states(self, model_param, tensors)

    def _load_state_dict(self, state_dict):
        load_state_dict(self, state_dict)
        if getattr(self, "optimizer", None) is not None:
            for st in self.optimizer.state.values():
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].clone()  # one tensor per parameter (AdamW increments it in place)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    DistributedOptimizer.load_state_dict = _load_state_dict


def _fix_write_item() -> None:
    import inspect

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch.distributed.checkpoint import filesystem

    original = filesystem._write_item
    if "serialization_format" not in inspect.signature(original).parameters:
        return

    def _write_item(*args, **kwargs):
        if len(args) < 6 and "serialization_format" not in kwargs:
            kwargs["serialization_format"] = filesystem.SerializationFormat.TORCH_SAVE
        return original(*args, **kwargs)

    filesystem_async._write_item = _write_item  # the writer forks its workers: they inherit this


def _fix_numpy_product() -> None:
    import numpy as np

    if not hasattr(np, "product"):
        np.product = np.prod


def _fix_quantize_param_shard() -> None:
    from megatron.core import fp8_utils
    from megatron.core.optimizer import distrib_optimizer

    original = distrib_optimizer.quantize_param_shard

    def quantize_param_shard(model_params, main_params, start_offsets, data_parallel_group,
                             fsdp_shard_model_params=None):
        if len(model_params) == 0:  # no FP8 parameter: nothing to quantize (no TE needed)
            return None
        return original(model_params, main_params, start_offsets, data_parallel_group, fsdp_shard_model_params)

    distrib_optimizer.quantize_param_shard = quantize_param_shard
    fp8_utils.quantize_param_shard = quantize_param_shard


# torch 2.9-2.12's checkpoint writer rebuilds its Metadata with dataclasses.replace, which drops `mcore_data`, the
# attribute megatron-core 0.12.1 adds and reads back for the distributed optimizer's flattened shards
# (pytorch/pytorch#162948; torch 2.13, which CI pins, keeps it; newer megatron-core no longer needs it).
MCORE_DATA_LOST = (f"its Megatron metadata (mcore_data) is missing, which torch {torch.__version__} drops when "
                   "writing megatron-core 0.12.1's checkpoints (pytorch/pytorch#162948). Use torch <= 2.8 or >= 2.13 "
                   "with megatron-core 0.12.1, or a megatron-core release that no longer stores mcore_data.")


def checkpoint_keeps_mcore_data(path: str) -> bool:
    """Whether the dist checkpoint at `path` kept the metadata megatron-core 0.12.1 needs to load it."""
    from torch.distributed.checkpoint import FileSystemReader

    return getattr(FileSystemReader(path).read_metadata(), "mcore_data", None) is not None
