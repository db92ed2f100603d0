"""Tensor and expert parallelism for fp8kern models on torch.distributed (NCCL on GPUs, gloo on the CPU).

    torchrun --nproc-per-node 2 script.py   # in script.py, on every rank:
    torch.distributed.init_process_group()
    model = fp8kern.from_pretrained(path)            # or quantize_model(...) on any model with a TP plan
    fp8kern.parallel.shard_model(model, tp_size=2)   # this rank's shard; every rank returns the full logits
    # MoE experts: tensor parallel (each expert's intermediate rows split), or whole experts spread with ep_size=2

Exact for every scale layout and every shard size (see sharding.py), with fp32 partial sums and, by default,
the single-device activation scales (see layers.RowParallel).
"""

from .experts import ExpertParallel
from .layers import ColumnParallel, RowParallel
from .plan import STYLES, shard_model
from .sharding import column_shard, row_shard, split_bounds
from .tensor_parallel_experts import TensorParallelExperts

__all__ = ["shard_model", "ColumnParallel", "RowParallel", "ExpertParallel", "TensorParallelExperts", "column_shard",
           "row_shard", "split_bounds", "STYLES"]
