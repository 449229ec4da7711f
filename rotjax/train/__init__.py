"""Training: AdamW with masked weight decay, pure jitted steps, data parallelism over a device
mesh, exact-resume orbax checkpoints and a loop logging JSON lines.

A run, end to end::

    tx = rotjax.train.optimizer(learning_rate=schedule, weight_decay=0.05)
    state = rotjax.train.create_train_state(params, tx, key=jax.random.key(0))
    steps = rotjax.train.classification_steps(model, tx, learning_rate=schedule)
    result = rotjax.train.fit(state, steps, train.arrays(), batch_size=128, num_steps=5000,
                              eval_data=test.arrays(), workdir="/tmp/run", checkpoint_every=500)
"""

from rotjax.train._augment import augment_images
from rotjax.train._checkpoint import checkpoint_manager, restore_checkpoint, save_checkpoint
from rotjax.train._loop import (
    BATCHES_FILE,
    CHECKPOINT_DIR,
    METRICS_FILE,
    FitResult,
    MetricsWriter,
    evaluate,
    evaluator,
    fit,
    predictor,
)
from rotjax.train._mesh import (
    DATA_AXIS,
    batch_sharding,
    check_batch_size,
    data_mesh,
    process_rows,
    replicate,
    replicated,
    shard_batch,
)
from rotjax.train._metrics import (
    IGNORE_LABEL,
    batch_metrics,
    cross_entropy,
    entity_f1,
    macro_f1,
    majority_baseline,
    summarize,
)
from rotjax.train._optim import (
    DECAYS,
    NO_DECAY_PATTERNS,
    learning_rate_schedule,
    optimizer,
    weight_decay_mask,
)
from rotjax.train._runtime import (
    COMPILATION_CACHE_ENV,
    DISTRIBUTED_ENV,
    enable_compilation_cache,
    initialize_distributed,
)
from rotjax.train._steps import (
    Steps,
    TrainState,
    classification_steps,
    create_train_state,
    default_inputs,
    eval_step,
)

__all__ = [
    "BATCHES_FILE",
    "CHECKPOINT_DIR",
    "COMPILATION_CACHE_ENV",
    "DATA_AXIS",
    "DECAYS",
    "DISTRIBUTED_ENV",
    "IGNORE_LABEL",
    "METRICS_FILE",
    "NO_DECAY_PATTERNS",
    "FitResult",
    "MetricsWriter",
    "Steps",
    "TrainState",
    "augment_images",
    "batch_metrics",
    "batch_sharding",
    "check_batch_size",
    "checkpoint_manager",
    "classification_steps",
    "create_train_state",
    "cross_entropy",
    "data_mesh",
    "default_inputs",
    "enable_compilation_cache",
    "entity_f1",
    "eval_step",
    "evaluate",
    "evaluator",
    "fit",
    "initialize_distributed",
    "learning_rate_schedule",
    "macro_f1",
    "majority_baseline",
    "optimizer",
    "predictor",
    "process_rows",
    "replicate",
    "replicated",
    "restore_checkpoint",
    "save_checkpoint",
    "shard_batch",
    "summarize",
    "weight_decay_mask",
]
