"""Training across processes with ``torch.distributed`` (gloo on CPU): data, ZeRO, tensor and pipeline parallelism.

* :mod:`refimpl.parallel.launch` - spawn ``P`` processes in one gloo group on a free loopback port;
* :mod:`refimpl.parallel.model` - a small trainable GPT built from the blocks of :mod:`refimpl.llm.model`;
* :mod:`refimpl.parallel.data` - data parallelism with bucketed gradients all-reduced during backward;
* :mod:`refimpl.parallel.zero` - ZeRO stages 1 and 2 around any ``torch.optim.Optimizer``;
* :mod:`refimpl.parallel.zero3` - ZeRO stage 3: parameters sharded too, gathered on demand (FSDP-style);
* :mod:`refimpl.parallel.tensor` - Megatron-LM column/row-parallel attention heads and MLP;
* :mod:`refimpl.parallel.ladder` - the Ladder residual, all-reduces overlapped with the next branch;
* :mod:`refimpl.parallel.pipeline` - GPipe and 1F1B schedules as data, run with send/recv between stages;
* :mod:`refimpl.parallel.mfu` - FLOPs per token, MFU and a step-time model of 3D parallelism (arithmetic);
* :mod:`refimpl.parallel.train` - the reference single-process run and the data-parallel run;
* :mod:`refimpl.parallel.checkpoint` - asynchronous checkpoints: copy to host, write in the background;
* :mod:`refimpl.parallel.recovery` - CheckFree: a lost stage rebuilt from its neighbours, against checkpoints;
* :mod:`refimpl.parallel.experiments` - every technique in one spawn, checked against one process.

Submodules load on first use (``import refimpl.parallel`` imports no torch).
"""

from __future__ import annotations

from refimpl._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {  # submodule -> the names it exports (its __all__), as one string each
        "launch": "free_port run_processes run_tasks",
        "model": "GPTBlock TinyGPT check_stream tiny_config",
        "data": "DataParallel make_buckets",
        "zero": "ZeroOptimizer partition_parameters state_bytes",
        "tensor": (
            "TensorParallelBlock check_tensor_parallel copy_to_tp reduce_from_tp shard_block tensor_parallel_step "
        ),
        "ladder": "block_branches ladder_step residual_forward",
        "pipeline": (
            "Action Timeline bubble_fraction check_schedule gpipe_schedule make_schedule measured_bubble "
            "one_f_one_b_schedule pipeline_step simulate stage_layers"
        ),
        "mfu": "GPT3_175B ParallelLayout StepTime network_bandwidths step_time training_flops_per_token",
        "checkpoint": "Snapshot async_snapshot host_copy save_durably",
        "recovery": "RecoveryResult average_neighbours markov_batches recovery_experiment",
        "experiments": "run_all",
        "zero3": "FullyShardedUnit",
        "train": "check_tokens data_parallel_steps train_data_parallel train_single zero3_steps",
    },
)
