"""MEMO: activation memory for long-sequence training (Zhao et al., "MEMO: Fine-grained Tensor Management For
Ultra-long Context LLM Training", Proc. ACM Manag. Data 3(1), 2025, doi:10.1145/3709703; arXiv:2407.12117).

* :mod:`refimpl.memo.block` - the book's GPT block, whose saved activations are Korthikanti et al.'s (2022);
* :mod:`refimpl.memo.ledger` - the device/host byte ledger and the closed forms of activation memory;
* :mod:`refimpl.memo.strategies` - keep everything, full recomputation, full offload, MEMO token-wise;
* :mod:`refimpl.memo.swap` - the machinery under them: saved-tensor lifetimes, host copies, the swap space;
* :mod:`refimpl.memo.overlap` - when swapping hides behind compute, on the roofline of ``refimpl.roofline``;
* :mod:`refimpl.memo.planning` - lifetimes of a layer's tensors, a best-fit caching allocator, an exact MILP plan.

Submodules load on first use (``import refimpl.memo`` itself imports neither torch nor scipy).
"""

from __future__ import annotations

from refimpl._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {  # submodule -> the names it exports (its __all__), as one string each
        "block": (
            "ACTIVATION_NAMES MaskedScale Tape TapeEntry TransformerBlock dropout_keep_mask make_stack splitmix64 "
            "tile_seed"
        ),
        "ledger": (
            "KORTHIKANTI_TERMS Account Ledger OutOfMemoryError block_activation_bytes korthikanti_activation_bytes"
        ),
        "strategies": "FullOffload FullRecompute KeepAll MemoTokenwise StepResult Strategy forward_stack train_step",
        "swap": "",  # machinery of the strategies: reached as the submodule, nothing re-exported
        "overlap": (
            "LayerShape LayerTimes MemoPrediction choose_alpha gpt_layer_operators host_link_bandwidth layer_times "
            "predict_memo"
        ),
        "planning": (
            "Layout LifetimeTracer TensorLife best_fit_layout check_layout conflicts first_fit_in_order "
            "max_live_bytes milp_layout plot_layout round_up trace_lifetimes"
        ),
    },
)
