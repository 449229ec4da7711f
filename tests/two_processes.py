"""One process of a data-parallel `rotjax.train.fit` run on the CPU, for
``test_train.py::test_fit_on_two_processes_is_fit_on_one``: the same tiny BERT, data and steps
as one process with two devices, or as process ``ID`` of ``N`` with one device each
(`rotjax.train.initialize_distributed`, coordinator on localhost).

    python tests/two_processes.py ID N PORT WORKDIR OUT.npz STEPS...

Trains to each of ``STEPS`` in turn in ``WORKDIR`` (each call resumes from the last one's
final checkpoint) and process 0 writes the final params and eval metrics to ``OUT.npz``.
"""

import json
import sys

pid, n, port, workdir, out, *steps = sys.argv[1:]
pid, n = int(pid), int(n)

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 2 // n)  # the same two-device mesh either way
jax.config.update("jax_default_matmul_precision", "highest")

from rotjax import train  # noqa: E402

if n > 1:
    assert train.initialize_distributed(
        enabled=True, coordinator_address=f"localhost:{port}", num_processes=n, process_id=pid
    )

import numpy as np  # noqa: E402

from rotjax.models import bert, family  # noqa: E402
from rotjax.tree import to_dict  # noqa: E402

assert (jax.process_count(), jax.device_count()) == (n, 2)
config = bert.Config(
    vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=16, max_position_embeddings=16, num_labels=3,
)  # fmt: skip
rng = np.random.default_rng(0)  # every process holds all rows (fit takes its own)
ids = rng.integers(1, 50, (40, 7)).astype(np.int32)
mask = (np.arange(7) < rng.integers(2, 8, 40)[:, None]).astype(np.int32)
data = {"input_ids": ids * mask, "attention_mask": mask, "labels": rng.integers(0, 3, 40)}
eval_data = {k: v[:12] for k, v in data.items()}
tx = train.optimizer(learning_rate=1e-2, weight_decay=0.1, frozen=family(config).inert)
model = family(config).Model(config)
params = family(config).init(config, jax.random.key(1))
state = train.create_train_state(params, tx, key=jax.random.key(2))
steps_fn = train.classification_steps(model, tx)
for total in map(int, steps):
    result = train.fit(
        state, steps_fn, data, batch_size=8, num_steps=total, eval_data=eval_data,
        eval_batch_size=4, workdir=workdir, checkpoint_every=2, log_every=2,
    )  # fmt: skip
if pid == 0:
    final = {k: np.asarray(v) for k, v in to_dict(result.state.params).items()}
    metrics = json.dumps({"eval": result.eval_metrics, "resumed_from": result.resumed_from})
    np.savez(out, metrics=np.asarray(metrics), **final)
