"""Expert parallelism on torch.distributed: the all-to-all dispatcher (`ep`), the (dp, ep) mesh,
expert sharding and gathered checkpoints (`parallel`), EPLB placement (`eplb`) and the EP-scale
routing-trace simulator (`simulate`)."""

from moekit.distributed.ep import EPDispatcher, all_to_all_autograd
from moekit.distributed.parallel import (DistributedError, Layout, apply_expert_parallel, full_state_dict,
                                         init_from_env, make_layout, save_full, shard_state_dict)

__all__ = ["EPDispatcher", "all_to_all_autograd", "DistributedError", "Layout", "apply_expert_parallel",
           "full_state_dict", "init_from_env", "make_layout", "save_full", "shard_state_dict"]
