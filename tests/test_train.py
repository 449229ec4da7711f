"""Training: one-step smoke runs, exact resume, data parallelism, weight-decay mask, macro-F1.

XLA's CPU compiler dominates the time here (a train step with dropout and AdamW takes seconds
to compile), so every test that trains the tiny BERT uses the same config, optimizer, batch
size and step functions: one compiled program, shared through the persistent compilation cache.
"""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_err
from helpers import CONFIGS, VIT_CONFIGS, compiled, init, inputs
from sklearn.metrics import accuracy_score, f1_score

from rotjax import data, train
from rotjax.models import bert, family
from rotjax.tree import to_dict

# One layer keeps the compile time down; hidden dropout exercises the dropout rng.
BERT = bert.Config(
    vocab_size=50,
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=16,
    num_labels=3,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.0,
)
VIT = VIT_CONFIGS["vit-h1d8-l1-nobias"]
BATCH, SEQ, NUM_STEPS = 8, 7, 6


def text_data(config, seed, n, *, token_labels=False):
    """Random token arrays with padded tails; token labels are -100 on padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, (n, SEQ)).astype(np.int32)
    lengths = rng.integers(2, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int32)
    if token_labels:
        labels = rng.integers(0, config.num_labels, (n, SEQ)).astype(np.int32)
        labels = np.where(mask > 0, labels, train.IGNORE_LABEL).astype(np.int32)
    else:
        labels = rng.integers(0, config.num_labels, n).astype(np.int32)
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def setup(config, seed, *, total_steps=NUM_STEPS):
    """A fresh state and steps: AdamW, warmup + cosine decay, clipping."""
    schedule = train.learning_rate_schedule(
        peak_value=1e-2, total_steps=total_steps, warmup_steps=2
    )
    tx = train.optimizer(
        learning_rate=schedule, weight_decay=0.1, max_grad_norm=1.0, frozen=family(config).inert
    )
    key_init, key_run = jax.random.split(jax.random.key(seed))
    model, params = init(config, key_init, scale=0.1)  # one compiled program, unlike model.init
    state = train.create_train_state(params, tx, key=key_run)
    return state, train.classification_steps(model, tx, learning_rate=schedule)


def run_bert(seed, num_steps, *, mesh=None, params_dtype=None, **kwargs):
    """``num_steps`` steps of the shared tiny BERT run, on one device unless ``mesh``, its
    params in ``params_dtype`` if given."""
    state, steps = setup(BERT, seed)
    if params_dtype is not None:
        cast = lambda x: x.astype(params_dtype)
        state = state.replace(params=jax.tree.map(cast, state.params))
    arrays = text_data(BERT, seed, 20)  # 2 steps per epoch: the run crosses epochs
    mesh = train.data_mesh(jax.devices()[:1]) if mesh is None else mesh
    return train.fit(
        state, steps, arrays, batch_size=BATCH, num_steps=num_steps, seed=seed, mesh=mesh, **kwargs
    )


def assert_finite_record(record):
    assert np.isfinite(record["loss"]) and 0 <= record["accuracy"] <= 1, record


@pytest.mark.parametrize("config", [BERT, VIT], ids=["bert", "vit"])
def test_one_step_smoke(config, seed, tmp_path):
    if config is VIT:
        rng = np.random.default_rng(seed)
        shape = (10, config.image_size, config.image_size, config.num_channels)
        arrays = {
            "images": rng.integers(0, 256, shape).astype(np.uint8),
            "labels": rng.integers(0, config.num_labels, 10).astype(np.int32),
        }
    else:
        arrays = text_data(config, seed, 10)
    state, steps = setup(config, seed)
    before = jax.tree.map(np.array, state)
    # Two steps: the warmup starts at learning rate 0, so the first step leaves params alone.
    # The default mesh: all 8 devices of the split CPU.
    result = train.fit(
        state, steps, arrays, batch_size=BATCH, num_steps=2, eval_data=arrays, workdir=tmp_path
    )
    assert int(result.state.step) == 2
    assert jax.tree.all(jax.tree.map(np.array_equal, before, state))  # input left alone
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), before.params, result.state.params
    )
    assert any(jax.tree.leaves(changed))
    # 10 eval examples in batches of 8: the padded tail counts nowhere.
    assert result.eval_metrics["count"] == 10
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in records] == [("train", 2), ("eval", 2)]
    for r in records:
        assert_finite_record(r)
    # The final checkpoint holds exactly the final state: params, optimizer state, step, rng.
    manager = train.checkpoint_manager(tmp_path / "checkpoints")
    restored = train.restore_checkpoint(manager, state)
    manager.close()
    assert int(restored.step) == 2
    same = jax.tree.map(np.array_equal, jax.device_get(restored), jax.device_get(result.state))
    assert jax.tree.all(same), same
    if config is VIT:  # float images in [0, 255] trained 255x too bright, silently
        bright = {**arrays, "images": arrays["images"].astype(np.float32)}
        with pytest.raises(
            ValueError,
            match=r"train_data images are floats in \[\d+, \d+\]: give floats in \[0, 1\]",
        ):
            train.fit(state, steps, bright, batch_size=BATCH, num_steps=1)
        with pytest.raises(ValueError, match=r"eval images are floats in"):
            train.evaluate(steps.eval_step, state.params, bright, batch_size=BATCH)


@pytest.mark.parametrize("flip", [True, False])
def test_augment_images_shifts_and_flips_only_when_asked(seed, flip):
    """Each image comes back shifted by up to 2 pixels (zero filled), mirrored or not; with
    ``flip=False`` (digits) never mirrored."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.1, 1.0, (64, 6, 5, 1)).astype(np.float32)
    batch = {"images": jnp.asarray(images), "labels": jnp.arange(64)}
    out = train.augment_images(batch, jax.random.key(seed), flip=flip)
    assert out["images"].shape == images.shape and (out["labels"] == batch["labels"]).all()

    def crops(img):  # every shift the augmentation can draw
        p = np.pad(img, ((2, 2), (2, 2), (0, 0)))
        return [p[y : y + 6, x : x + 5] for y in range(5) for x in range(5)]

    mirrored = 0
    for img, got in zip(images, np.asarray(out["images"]), strict=True):
        plain = any(np.array_equal(got, c) for c in crops(img))
        mirror = any(np.array_equal(got, c) for c in crops(img[:, ::-1]))
        assert plain or mirror
        mirrored += mirror and not plain
    assert (mirrored > 0) if flip else (mirrored == 0)


def test_resume_is_bitwise_exact(seed, tmp_path):
    straight = run_bert(seed, NUM_STEPS).state
    first = run_bert(seed, NUM_STEPS // 2, workdir=tmp_path, checkpoint_every=2, log_every=1)
    assert first.resumed_from is None
    # What the resumed run starts from is what the first run ended with: params, optimizer
    # state (Adam's moments, the schedule's count), step and rng.
    manager = train.checkpoint_manager(tmp_path / "checkpoints")
    restored = train.restore_checkpoint(manager, first.state)
    manager.close()
    same = jax.tree.map(np.array_equal, jax.device_get(restored), jax.device_get(first.state))
    assert jax.tree.all(same) and int(restored.step) == NUM_STEPS // 2
    # A new process would rebuild everything from scratch: so does `run_bert`.
    batches_seen = []
    second = run_bert(
        seed,
        NUM_STEPS,
        workdir=tmp_path,
        checkpoint_every=2,
        log_every=1,
        callback=lambda r: batches_seen.append(r["step"]) if r["split"] == "train" else None,
    )
    assert second.resumed_from == NUM_STEPS // 2
    # The data position: the resumed run trained steps 4..6 only (on the batches of those
    # steps: the final state equals the straight run's, bitwise, checked below).
    assert batches_seen == list(range(NUM_STEPS // 2 + 1, NUM_STEPS + 1))
    same = jax.tree.map(np.array_equal, jax.device_get(straight), jax.device_get(second.state))
    assert jax.tree.all(same), same
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert steps == list(range(1, NUM_STEPS + 1))


@pytest.mark.parametrize("token_labels", [False, True], ids=["sequence", "token"])
def test_trimmed_batches_train_the_same_model(token_labels, seed):
    # Without dropout, cutting each batch's padding columns changes the work, not the run:
    # the same params and records up to float32 rounding (one step's gradients differ by
    # reduction order; Adam's updates are O(lr) each, 6 steps: 1e-5 absolute).
    task = "token_classification" if token_labels else BERT.task
    config = dataclasses.replace(BERT, hidden_dropout_prob=0.0, task=task)
    arrays = text_data(config, seed, 20, token_labels=token_labels)
    # Texts of 2-4 tokens but one of SEQ: every pass (2 batches of 8) has a short batch.
    short = np.arange(SEQ) < np.random.default_rng(seed).integers(2, 5, (20, 1))
    short[0] = True
    arrays = {
        k: np.where(short, v, 0 if k != "labels" else train.IGNORE_LABEL) if v.ndim == 2 else v
        for k, v in arrays.items()
    }
    mesh = train.data_mesh(jax.devices()[:1])
    runs, widths = {}, {}
    for trim in (None, 2):
        state, steps = setup(config, seed)
        seen = widths.setdefault(trim, set())

        def step(state, batch, inner=steps.train_step, seen=seen):
            seen.add(batch["input_ids"].shape[1])  # at trace time: one per compiled width
            return inner(state, batch)

        runs[trim] = train.fit(
            state,
            steps._replace(train_step=step),
            arrays,
            batch_size=BATCH,
            num_steps=NUM_STEPS,
            seed=seed,
            mesh=mesh,
            eval_data=arrays,
            log_every=2,
            trim=trim,
        )
    assert widths[None] == {SEQ}
    batches = [data.batch_indices(20, BATCH, seed=seed, step=t) for t in range(NUM_STEPS)]
    longest = {int(arrays["attention_mask"][b].sum(1).max()) for b in batches}
    assert widths[2] == {min(SEQ, -(-n // 2) * 2) for n in longest} and min(widths[2]) < SEQ
    close = jax.tree.map(
        lambda a, b: np.allclose(a, b, rtol=0, atol=1e-5),
        runs[None].state.params,
        runs[2].state.params,
    )
    assert jax.tree.all(close), close
    for a, b in zip(runs[None].history, runs[2].history, strict=True):
        assert a["step"] == b["step"] and a["count"] == b["count"]
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    never = lambda record: pytest.fail(f"trained before refusing: {record}")
    fit = lambda train_data, **k: train.fit(
        state, steps, train_data, batch_size=BATCH, num_steps=1, callback=never, trim=2, **k
    )
    with pytest.raises(ValueError, match="'attention_mask' array; got"):
        fit({"labels": arrays["labels"]})
    eval_only = {k: v for k, v in arrays.items() if k != "attention_mask"}
    # before any training (since 2026-12-06 as a mask the training data has: with trim or not)
    with pytest.raises(ValueError, match=r"eval_data lacks \['attention_mask'\]"):
        fit(arrays, eval_data=eval_only)
    labelled = {**arrays, "labels": np.where(arrays["labels"] == -100, 0, arrays["labels"])}
    if token_labels:  # padding labelled as a class: cutting would drop those labels
        with pytest.raises(ValueError, match="labels past the last real token"):
            fit(labelled)
        with pytest.raises(ValueError, match="labels past the last real token"):
            fit(arrays, eval_data=labelled)  # before training, not at the final evaluation
    m = [
        train.evaluate(steps, runs[None].state.params, arrays, batch_size=8, trim=t)
        for t in (None, 3)
    ]
    assert m[0]["count"] == m[1]["count"] and np.isclose(m[0]["loss"], m[1]["loss"], rtol=1e-5)


def test_batch_order_depends_only_on_seed_and_step(seed):
    n, b = 23, 5
    stream = data.train_batches({"labels": np.arange(n)}, batch_size=b, seed=seed)
    for step in range(3 * data.steps_per_epoch(n, b)):
        expected = data.batch_indices(n, b, seed=seed, step=step)
        np.testing.assert_array_equal(next(stream)["labels"], expected)
    late = data.train_batches({"labels": np.arange(n)}, batch_size=b, seed=seed, start_step=7)
    np.testing.assert_array_equal(next(late)["labels"], data.batch_indices(n, b, seed=seed, step=7))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_inert_params_are_those_without_a_gradient(name, key):
    """A family's ``inert`` params (which training freezes) get no gradient but rounding
    noise, and the attention key biases of families where they count (DeBERTa's relative
    positions read the key; RoPE rotates it) are not inert: they got frozen by a default
    before, and never trained."""
    config = CONFIGS[name]
    c = compiled(config)
    params = c.init(key, 0.3)
    x = inputs(config, key)
    loss = lambda p: jnp.sum(jnp.sin(jax.tree.leaves(c.model.apply({"params": p}, *x))[0]))
    grads = to_dict(jax.grad(loss)(params))
    scale = max(float(jnp.abs(g).max()) for g in grads.values())
    patterns = [re.compile(p) for p in family(config).inert]
    inert = [p for p in grads if any(r.search(p) for r in patterns)]
    for path in inert:
        assert float(jnp.abs(grads[path]).max()) <= 1e-5 * scale, path
    keys = {p for p in grads if p.endswith("attention/key/bias")}
    for path in keys - set(inert):
        assert float(jnp.abs(grads[path]).max()) > 1e-4 * scale, path
    if family(config).name in ("bert", "vit"):
        assert set(inert) == keys  # every one of BERT's and ViT's key biases is inert


def test_four_devices_match_one(seed):
    """Tolerance 1e-5 on every param, each on its own scale: the sharded program sums
    gradients in another order (float32 rounding, ~1e-7 relative per op), amplified a little by
    Adam's normalization over 6 steps. The attention key biases, whose gradient is only
    rounding noise, are frozen (``family(config).inert``): they stay where they started."""
    start = setup(BERT, seed)[0].params
    four = run_bert(seed, NUM_STEPS, mesh=train.data_mesh(jax.devices()[:4])).state.params
    assert len(four["classifier"]["kernel"].sharding.device_set) == 4
    one = run_bert(seed, NUM_STEPS, mesh=train.data_mesh(jax.devices()[:1])).state.params
    for path, x in to_dict(one).items():
        assert rel_err(to_dict(four)[path], x) < 1e-5, path
    key_bias = "encoder/layer_0/attention/key/bias"
    np.testing.assert_array_equal(to_dict(one)[key_bias], to_dict(start)[key_bias])


def test_evaluator_takes_params_on_any_devices(key):
    """The same metrics for params left to JAX, committed to a device outside the mesh, or
    replicated on another mesh, or on the same devices in another order (jit refuses those
    as they are: each is copied onto the evaluator's mesh)."""
    model, params = init(BERT, key, scale=0.3)
    arrays = text_data(BERT, 0, 16)
    evaluate = train.evaluator(model, arrays, batch_size=8, mesh=train.data_mesh(jax.devices()[:4]))
    want = evaluate(params)
    elsewhere = jax.device_put(params, jax.devices()[5])
    other_mesh = jax.device_put(params, train.replicated(train.data_mesh(jax.devices()[6:])))
    reversed_mesh = train.replicated(train.data_mesh(jax.devices()[:4][::-1]))
    for moved in (elsewhere, other_mesh, jax.device_put(params, reversed_mesh)):
        assert evaluate(moved) == want
    assert elsewhere["classifier"]["bias"].devices() == {jax.devices()[5]}  # not moved


def test_replicate_returns_new_buffers_on_the_mesh(key):
    """Donating `replicate`'s result (as `fit` does) never deletes or changes the caller's
    params, whether left to JAX, already replicated on the mesh, or numpy."""
    mesh = train.data_mesh(jax.devices()[:4])
    _, params = init(BERT, key)
    want = jax.tree.map(np.array, params)
    donate = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)
    for tree in (params, jax.device_put(params, train.replicated(mesh)), want):
        out = train.replicate(tree, mesh)
        for x in jax.tree.leaves(out):
            assert x.sharding.is_equivalent_to(train.replicated(mesh), x.ndim)
        donate(out)
        assert not any(x.is_deleted() for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))
        jax.tree.map(np.testing.assert_array_equal, tree, want)


def test_batch_sizes_must_split_over_devices():
    assert jax.device_count() == 8  # conftest splits the CPU
    mesh = train.data_mesh(jax.devices()[:4])
    train.check_batch_size(8, mesh)
    for bad in (0, 6, 3):
        with pytest.raises(ValueError, match="multiple of the 4 devices"):
            train.check_batch_size(bad, mesh)
    state, steps = setup(BERT, 0)
    with pytest.raises(ValueError, match="multiple of the 4 devices"):
        train.fit(state, steps, text_data(BERT, 0, 20), batch_size=6, num_steps=1, mesh=mesh)
    data = text_data(BERT, 0, 20)
    with pytest.raises(ValueError, match="eval_batch_size 6 must be a positive multiple"):
        train.fit(
            state, steps, data, batch_size=8, num_steps=1, mesh=mesh, eval_data=data,
            eval_batch_size=6,
        )  # fmt: skip


def test_fit_checks_train_data_as_the_run_cuts_and_augments_it(tmp_path):
    """fit's check that the model takes the training arrays traces the train step on the
    first batch as the run makes it: cut by ``trim`` (texts padded past the model's positions,
    every one short enough) and through ``augment`` (12x12 images cropped to the model's 8x8),
    both refused when it traced the eval step on a raw row (a review of the day's diff), as
    were eval-only arrays of a custom eval step (whose other scalar statistics are summed)."""
    narrow = dataclasses.replace(BERT, max_position_embeddings=16)
    state, steps = setup(narrow, 0)
    data = text_data(narrow, 0, 16)
    wide = {k: np.pad(v, ((0, 0), (0, 32 - SEQ))) if v.ndim == 2 else v for k, v in data.items()}
    train.fit(state, steps, wide, batch_size=8, num_steps=1, trim=8)
    with pytest.raises(ValueError, match=r"^train_data does not fit the model: .*at most 16"):
        train.fit(state, steps, wide, batch_size=8, num_steps=1)
    config = dataclasses.replace(VIT, image_size=8, patch_size=4)

    def crop(batch, key):
        i, j = jax.random.randint(key, (2,), 0, 5)
        images = batch["images"]
        return {
            **batch,
            "images": jax.lax.dynamic_slice(images, (0, i, j, 0), (len(images), 8, 8, 1)),
        }

    tx = optax.sgd(0.1)
    model, params = init(config, jax.random.key(0))
    state = train.create_train_state(params, tx, key=jax.random.key(1))
    steps = train.classification_steps(model, tx, augment=crop)
    rng = np.random.default_rng(0)
    images = {"images": rng.random((8, 12, 12, 1), np.float32), "labels": rng.integers(0, 3, 8)}
    train.fit(state, steps, images, batch_size=8, num_steps=1)
    # A custom eval step may read arrays that only the eval data has (per-example weights),
    # and its other statistics are summed: scalars and arrays (10 rows, the last batch padded
    # with zeros: the step's to mask, here by the weights' own zeros).
    state, base = setup(BERT, 0)
    data = {k: v[:10] for k, v in text_data(BERT, 0, 16).items()}
    eval_data = {**data, "w": np.linspace(0.5, 2.0, 10, dtype=np.float32)}

    def weighted(params, batch):
        metrics = base.eval_step(params, batch)
        labels = jnp.maximum(batch["labels"], 0)  # (the filler rows' -100: weight 0 below)
        per_class = jax.nn.one_hot(labels, BERT.num_labels) * batch["w"][:, None]
        return {**metrics, "w": batch["w"].sum(), "w_per_class": per_class.sum(0)}

    result = train.fit(
        state, base._replace(eval_step=weighted), data, batch_size=8, num_steps=1,
        eval_data=eval_data, eval_batch_size=8,
    )  # fmt: skip
    got = result.eval_metrics
    assert got["count"] == 10 and got["w"] == pytest.approx(eval_data["w"].sum(), rel=1e-6)
    want = np.bincount(data["labels"], eval_data["w"], minlength=BERT.num_labels)
    np.testing.assert_allclose(got["w_per_class"], want, rtol=1e-6)
    for name in ("accuracy", "step"):  # not silently replaced by it, nor replacing it: refused
        clash = lambda params, batch, name=name: {**weighted(params, batch), name: batch["w"][0]}
        with pytest.raises(ValueError, match=rf"statistics \['{name}'\] would replace"):
            train.fit(
                state, base._replace(eval_step=clash), data, batch_size=8, num_steps=1,
                eval_data=eval_data, eval_batch_size=8, workdir=tmp_path / name,
            )  # fmt: skip
        assert not (tmp_path / name / "metrics.jsonl").exists()  # before training
    one = jax.device_get(weighted(state.params, {k: v[:8] for k, v in eval_data.items()}))
    less = {k: v for k, v in one.items() if k != "w"}
    with pytest.raises(ValueError, match=r"eval batches of different statistics: .*'w'"):
        train.summarize([one, less])


def test_fit_refuses_bad_arguments_by_their_names(tmp_path):
    state, steps = setup(BERT, 0)
    data = text_data(BERT, 0, 20)
    fit = lambda **kw: train.fit(state, steps, **{"train_data": data, "batch_size": 8, **kw})
    short = {**data, "input_ids": data["input_ids"][:-1]}
    mask = data["attention_mask"].astype(np.float32)  # (a float mask, as models take)
    nan = {
        **data,
        "attention_mask": np.where(np.arange(mask.size) == 3, np.nan, mask.ravel()).reshape(
            mask.shape
        ),
    }
    for kw, message in (
        (dict(train_data=short), r"train_data arrays must share one length, got \{.*19"),
        (dict(eval_every=0, eval_data=data), "eval_every must be None or an int >= 1"),
        (dict(checkpoint_every=0, workdir=tmp_path), "checkpoint_every must be None or an int"),
        (dict(checkpoint_every=1.5, workdir=tmp_path), r"checkpoint_every .* got 1\.5"),
        (dict(keep_checkpoints=0, workdir=tmp_path), "keep_checkpoints must be None or an int"),
        # (refused at the first batch, after the workdir's files: they blocked the rerun)
        (dict(seed=-1, workdir=tmp_path), r"seed must be an int >= 0, got -1"),
        (dict(seed=0.5, workdir=tmp_path), r"seed must be an int >= 0, got 0.5"),
        # NaN inputs: every param NaN within steps, or an eval at chance accuracy, silently
        (dict(train_data=nan), r"train_data arrays with NaN or Inf .*: \{'attention_mask': 1\}"),
        (dict(eval_data=nan, eval_every=1), r"eval arrays with NaN or Inf"),
        # (a float num_steps failed in range(); an eval period without eval data was ignored;
        # a missing input was a KeyError at the first step, after the workdir's files)
        (dict(num_steps=2.5, workdir=tmp_path), r"num_steps must be an int >= 0, got 2\.5"),
        (dict(log_every=0.5), r"log_every must be an int >= 1, got 0\.5"),
        (dict(eval_every=2, workdir=tmp_path), r"eval_every needs eval_data"),
        (
            dict(train_data={k: v for k, v in data.items() if k != "input_ids"}, workdir=tmp_path),
            r"^train_data does not fit the model: it has no 'input_ids' array \(it has \[",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            fit(**{"num_steps": 1, **kw})
    assert not any(tmp_path.iterdir())  # refused before anything was written
    # The wrong kinds of argument are named (params for the state: AttributeError 'key'; a
    # tuple of arrays for the data: numpy's "truth value of an array is ambiguous").
    with pytest.raises(TypeError, match=r"state must be a TrainState .*got a dict"):
        train.fit(state.params, steps, data, batch_size=8, num_steps=1)
    for name in ("train_data", "eval_data"):
        kw = {"train_data": data, name: (data["input_ids"], data["labels"])}
        with pytest.raises(TypeError, match=rf"{name} must be a dict of named arrays"):
            train.fit(state, steps, batch_size=8, num_steps=1, **kw)
    # The state's key: one key, named (an int was an AttributeError; a batch of keys failed in
    # fit's jitted step); raw key data is one key too
    for bad in (0, None, jax.random.split(jax.random.key(0), 3)):
        with pytest.raises(ValueError, match=r"key must be a jax\.random\.key"):
            train.create_train_state(state.params, optax.sgd(0.1), key=bad)
    raw = train.create_train_state(state.params, optax.sgd(0.1), key=jax.random.PRNGKey(0))
    typed = train.create_train_state(state.params, optax.sgd(0.1), key=jax.random.key(0))
    np.testing.assert_array_equal(raw.rng, typed.rng)


@pytest.mark.parametrize("config", [BERT, VIT_CONFIGS["vit-h3d4-l2"]], ids=["bert", "vit"])
def test_weight_decay_mask_excludes_biases_and_norms(config):
    shapes = jax.eval_shape(lambda k: init(config, k)[1], jax.random.key(0))
    leaves = jax.tree_util.tree_flatten_with_path(train.weight_decay_mask(shapes))[0]
    flat = {"/".join(k.key for k in path): m for path, m in leaves}
    for path, m in flat.items():
        *modules, name = path.split("/")
        in_norm = any("norm" in module.lower() for module in modules)
        assert m == (name != "bias" and not in_norm), path
    assert any(flat.values()) and not all(flat.values())


def test_optimizer_decays_only_masked_params():
    """With zero gradients AdamW's update is ``-lr * wd * θ`` on decayed params, else 0."""
    params = {
        "dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
        "embeddings": {"LayerNorm": {"scale": jnp.ones(3), "bias": jnp.ones(3)}},
    }
    tx = train.optimizer(learning_rate=0.5, weight_decay=0.1)

    @jax.jit
    def update(params):
        grads = jax.tree.map(jnp.zeros_like, params)
        return tx.update(grads, tx.init(params), params)[0]

    got = update(params)
    np.testing.assert_allclose(got["dense"]["kernel"], -0.05 * np.ones((2, 3)), rtol=1e-6)
    for leaf in (got["dense"]["bias"], *jax.tree.leaves(got["embeddings"])):
        np.testing.assert_array_equal(leaf, 0.0)
    # A frozen param takes neither its gradient nor weight decay: it never moves.
    frozen = train.optimizer(learning_rate=0.5, weight_decay=0.1, frozen=[r"dense/kernel$"])
    grads = jax.tree.map(jnp.ones_like, params)
    got = frozen.update(grads, frozen.init(params), params)[0]
    np.testing.assert_array_equal(got["dense"]["kernel"], 0.0)
    assert float(jnp.abs(got["dense"]["bias"]).min()) > 0  # the others do


def test_token_level_metrics_skip_ignored_labels(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3, 5, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (3, 5)).astype(np.int32)
    labels[1, 2:] = train.IGNORE_LABEL
    keep = labels != train.IGNORE_LABEL
    loss, count = jax.jit(train.cross_entropy)(logits, labels)
    log_probs = jax.nn.log_softmax(logits[keep])
    expected = -np.mean(np.take_along_axis(np.asarray(log_probs), labels[keep][:, None], 1))
    assert count == keep.sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    got = train.summarize([jax.jit(train.batch_metrics)(logits, labels)])
    preds = logits.argmax(-1)[keep]
    np.testing.assert_allclose(got["accuracy"], accuracy_score(labels[keep], preds))
    np.testing.assert_allclose(got["macro_f1"], f1_score(labels[keep], preds, average="macro"))
    with pytest.raises(ValueError, match=r"needs >= 2 classes, got logits of shape \(3, 5, 1\)"):
        train.cross_entropy(logits[..., :1], labels)  # a zero loss whatever the model did


@pytest.mark.parametrize("n", [1, 13, 40])
def test_macro_f1_matches_sklearn(n, seed):
    rng = np.random.default_rng(seed)
    classes = 5
    # Skewed draws so that some classes are often absent from labels or predictions.
    p = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    labels = rng.choice(classes, n, p=p).astype(np.int32)
    preds = rng.choice(classes, n, p=p[::-1]).astype(np.int32)
    logits = np.eye(classes, dtype=np.float32)[preds] + 0.01 * rng.random((n, classes), np.float32)
    metrics = jax.jit(train.batch_metrics)
    stats = [
        metrics(b["logits"], b["labels"])
        for b in data.batches({"logits": logits, "labels": labels}, 8, pad=True)
    ]
    got = train.summarize(stats)
    assert got["count"] == n
    np.testing.assert_allclose(got["macro_f1"], f1_score(labels, preds, average="macro"))
    np.testing.assert_allclose(got["accuracy"], accuracy_score(labels, preds))


def test_schedule_warmup_then_cosine():
    lr = train.learning_rate_schedule(peak_value=1.0, total_steps=10, warmup_steps=2)
    got = [float(lr(t)) for t in (0, 1, 2, 6, 10, 20)]
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        train.learning_rate_schedule(peak_value=1.0, total_steps=10, decay="step")
    # end + (peak - end)(1 + cos πs)/2 with a peak of 0 too (it stayed at 0: optax's end is
    # relative to the peak)
    up = train.learning_rate_schedule(peak_value=0.0, total_steps=10, warmup_steps=0, end_value=2.0)
    np.testing.assert_allclose([float(up(t)) for t in (0, 5, 10, 20)], [0, 1, 2, 2], atol=1e-6)


def test_entity_f1_by_hand():
    """Entity-level F1 (seqeval): a span counts only if its type and whole extent are right;
    ignored positions (later word pieces, special tokens) are left out of both sequences."""
    tags = ("O", "B-x", "I-x", "B-y", "I-y")
    labels = np.array([[-100, 1, 2, 0, -100], [-100, 3, -100, 0, 0]])
    # Sentence 1: x over two words, right. Sentence 2: y right, one spurious x: P 2/3, R 1.
    pred = np.array([[0, 1, 2, 0, 3], [0, 3, 1, 0, 1]])
    assert train.entity_f1(pred, labels, tags) == pytest.approx(0.8)
    # A truncated span (B-x without its I-x) and a wrong type: no entity right.
    assert train.entity_f1(np.array([[0, 1, 0, 0, 0], [0, 1, 0, 0, 0]]), labels, tags) == 0.0
    # A tag id outside the names at a labelled position (IGNORE_LABEL from a predictor's cut
    # padding, say) is refused: tag_names[-100] named a tag silently; unlabelled ones are not read.
    for bad in (-100, 5):
        with pytest.raises(ValueError, match=f"predictions hold tag ids outside .* e.g. {bad}"):
            train.entity_f1(np.where(labels == 1, bad, 0), labels, tags)
    assert train.entity_f1(np.where(labels == -100, -100, pred), labels, tags) == pytest.approx(0.8)


def test_predictor_matches_the_model(key):
    config = BERT
    model, params = init(config, key, scale=0.3)
    arrays = text_data(config, 0, 11)
    predict = train.predictor(model, batch_size=4)
    got = predict(params, arrays)
    logits = model.apply({"params": params}, arrays["input_ids"], arrays["attention_mask"])
    np.testing.assert_array_equal(got, np.argmax(logits, -1))
    # Batches cut to their longest text (sorted by length, so that most are cut): the same
    # predictions of real tokens; cut padding positions IGNORE_LABEL.
    tagger = dataclasses.replace(config, task="token_classification")
    model, params = init(tagger, key, scale=0.3)
    order = np.argsort(arrays["attention_mask"].sum(1))
    arrays = {k: v[order] for k, v in arrays.items()}
    logits = model.apply({"params": params}, arrays["input_ids"], arrays["attention_mask"])
    want = np.argmax(logits, -1)
    cut = train.predictor(model, batch_size=4, trim=2)(params, arrays)
    real = arrays["attention_mask"] > 0
    assert cut.shape == want.shape and (cut == train.IGNORE_LABEL).any()
    np.testing.assert_array_equal(cut[real], want[real])
    assert set(np.unique(cut[cut != want])) <= {train.IGNORE_LABEL}
    labelled = {**arrays, "labels": np.zeros_like(arrays["input_ids"])}  # padding as class 0
    with pytest.raises(ValueError, match="labels past the last real token"):
        train.predictor(model, batch_size=4, trim=2)(params, labelled)  # not silently -100
    # Ids outside the tables: NaN logits or the last rows' predictions, silently (evaluate and
    # fit refused them)
    for bad in (config.vocab_size, -1):
        ids = np.where(arrays["attention_mask"] > 0, bad, 0).astype(np.int32)
        with pytest.raises(ValueError, match="predict input_ids holds ids"):
            train.predictor(model, batch_size=4)(params, {**arrays, "input_ids": ids})
    # No inputs at all, or labels alone: named (a bare StopIteration, an "arrays is empty").
    for nothing in ({}, {"labels": arrays["labels"]}):
        for trim in (None, 2):
            with pytest.raises(ValueError, match=r"no model inputs in data \(its keys: "):
                train.predictor(model, batch_size=4, trim=trim)(params, nothing)


def test_checkpoints_follow_the_documented_policy(seed, tmp_path):
    """No period: one checkpoint, at the end (orbax's default would also save step 1); a
    period of 2 and keep 1: only the last one stays."""
    run_bert(seed, 3, workdir=tmp_path / "a")
    manager = train.checkpoint_manager(tmp_path / "a" / "checkpoints")
    assert list(manager.all_steps()) == [3]
    manager.close()
    run_bert(seed, 5, workdir=tmp_path / "b", checkpoint_every=2, keep_checkpoints=1)
    manager = train.checkpoint_manager(tmp_path / "b" / "checkpoints")
    assert list(manager.all_steps()) == [5]
    manager.close()


def test_train_records_say_how_many_steps_they_average(seed, tmp_path):
    """Every log_every steps, the last at the end; a run resumed from step 3 logs its first
    window (step 4) over the one step it ran there, and says so. Numpy ints are options as
    Python ones are (the run trained, then failed writing its records: JSON has no int64)."""
    held_out = text_data(BERT, seed + 1, BATCH)  # (its final record's step was the int64)
    run_bert(seed, np.int64(3), workdir=tmp_path, log_every=np.int64(2), eval_data=held_out)
    run_bert(seed, 6, workdir=tmp_path, log_every=2)
    records = [json.loads(line) for line in (tmp_path / train.METRICS_FILE).open()]
    got = [(r["step"], r["steps"]) for r in records if r["split"] == "train"]
    assert got == [(2, 2), (3, 1), (4, 1), (6, 2)]


def test_token_task_records_weight_each_step_by_its_labels(seed):
    """A token task's batches hold different numbers of labels: a record's loss and accuracy
    are over all its steps' labels together, not a mean of the steps' means."""
    config = dataclasses.replace(BERT, task="token_classification")
    state, steps = setup(config, seed)
    arrays = text_data(config, seed, 20, token_labels=True)
    mesh = train.data_mesh(jax.devices()[:1])
    run = lambda log_every: (
        train.fit(
            state,
            steps,
            arrays,
            batch_size=BATCH,
            num_steps=4,
            seed=seed,
            mesh=mesh,
            log_every=log_every,
        ).history
    )
    each, window = run(1), [r for r in run(4) if r["split"] == "train"]
    counts = np.array([r["count"] for r in each])
    assert len(window) == 1 and len(np.unique(counts)) > 1, counts  # padded tails differ
    assert window[0]["count"] == counts.sum()
    for k in ("loss", "accuracy"):  # the same steps (bitwise: same seed, same programs)
        want = np.dot(counts, [r[k] for r in each]) / counts.sum()
        assert window[0][k] == pytest.approx(want, rel=1e-6), k
    # what the unweighted mean would have said (steps' losses differ, and so do their counts)
    assert window[0]["loss"] != pytest.approx(np.mean([r["loss"] for r in each]), rel=1e-9)
    assert window[0]["grad_norm"] == pytest.approx(np.mean([r["grad_norm"] for r in each]))


def test_fit_closes_its_checkpoint_manager_on_every_exit(seed, tmp_path, monkeypatch):
    """A checkpoint that does not fit the state, or a callback that raises mid-run: the error
    reaches the caller and the manager (which writes asynchronously) is closed either way."""
    from rotjax.train import _checkpoint

    managers = []

    def recording(*args, **kwargs):
        manager = make(*args, **kwargs)
        close, manager.closed = manager.close, 0

        def counted():
            manager.closed += 1
            close()

        manager.close = counted
        managers.append(manager)
        return manager

    make = _checkpoint.checkpoint_manager
    monkeypatch.setattr(_checkpoint, "checkpoint_manager", recording)
    run_bert(seed, 2, workdir=tmp_path)
    wider = dataclasses.replace(BERT, hidden_size=12)
    state, steps = setup(wider, seed)
    arrays = text_data(wider, seed, 20)
    # the saved params are of another shape: each array named, with both shapes
    msg = r"step 2 in .* does not fit the state \(\d+ arrays differ\):\n"
    with pytest.raises(ValueError, match=msg) as error:
        train.fit(state, steps, arrays, batch_size=BATCH, num_steps=4, workdir=tmp_path)
    assert "params/classifier/kernel: checkpoint (8, 3), state (12, 3)" in str(error.value)
    # or of another floating dtype (orbax rounded float32 into a bfloat16 state, silently)
    with pytest.raises(ValueError, match=msg) as error:
        run_bert(seed, 4, workdir=tmp_path, params_dtype=jnp.bfloat16)
    assert "params/classifier/kernel: checkpoint float32, state bfloat16" in str(error.value)

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bert(seed, 4, workdir=tmp_path, log_every=1, callback=stop)
    assert [m.closed for m in managers] == [1, 1, 1, 1]


def test_a_damaged_batch_order_is_named_and_a_failed_write_leaves_nothing(
    seed, tmp_path, monkeypatch
):
    from rotjax._atomic import write_whole
    from rotjax.train._loop import BATCHES_FILE

    run_bert(seed, 2, workdir=tmp_path, checkpoint_every=2)
    (tmp_path / BATCHES_FILE).write_text('{"seed": 1')  # a bare JSONDecodeError before
    with pytest.raises(ValueError, match=f"{BATCHES_FILE} is not a run's batch order"):
        run_bert(seed, 4, workdir=tmp_path)

    def full(*args):
        raise OSError("disk full")

    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="disk full"):
        write_whole(tmp_path / "x.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no x.json, no temporary


def test_a_truncated_metrics_line_does_not_block_resuming(seed, tmp_path):
    first = run_bert(seed, 2, workdir=tmp_path, checkpoint_every=2, log_every=1)
    assert first.resumed_from is None
    with open(tmp_path / train.METRICS_FILE, "a") as f:
        f.write('{"step": 3, "split": "tr')  # a crash in the middle of a write
    second = run_bert(seed, 4, workdir=tmp_path, checkpoint_every=2, log_every=1)
    assert second.resumed_from == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / train.METRICS_FILE).open()]
    assert steps == [1, 2, 3, 4]
    (tmp_path / train.METRICS_FILE).write_text('{"step": 1}\n\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:3 is not a JSON record"):  # the file's
        train.MetricsWriter(tmp_path / train.METRICS_FILE, resume_step=2)
    # A finished run evaluated again on other data: the log holds the metrics fit returned.
    eval_a, eval_b = (text_data(BERT, seed + i, 8) for i in (1, 2))
    done = run_bert(seed, 2, workdir=tmp_path / "done", eval_data=eval_a)
    again = run_bert(seed, 2, workdir=tmp_path / "done", eval_data=eval_b)
    assert again.resumed_from == 2 and again.eval_metrics != done.eval_metrics
    records = [json.loads(line) for line in (tmp_path / "done" / train.METRICS_FILE).open()]
    (logged,) = [r for r in records if r["split"] == "eval"]
    assert {k: logged[k] for k in again.eval_metrics} == again.eval_metrics
    # a fresh run (no checkpoint to resume) replaces the old log, unread
    train.MetricsWriter(tmp_path / train.METRICS_FILE)
    assert (tmp_path / train.METRICS_FILE).read_text() == ""


def test_rate_counts_training_time_only(seed, monkeypatch):
    """On a clock where each step takes 1 s and each eval 100 s, every train record says 1
    step/s, whether or not an eval fell inside its window (it said 2.5 when one did)."""
    import rotjax.train._loop as loop

    now = [0.0]
    clock = type("Clock", (), {"perf_counter": staticmethod(lambda: now[0])})
    monkeypatch.setattr(loop, "time", clock)
    shard, run_eval = loop._mesh.shard_batch, loop._run_eval

    def step_batch(*args):
        now[0] += 1.0
        return shard(*args)

    def slow_eval(*args):
        now[0] += 100.0
        return run_eval(*args)

    monkeypatch.setattr(loop._mesh, "shard_batch", step_batch)
    monkeypatch.setattr(loop, "_run_eval", slow_eval)
    records = []
    arrays = text_data(BERT, seed, 20)
    run_bert(seed, 8, log_every=4, eval_every=2, eval_data=arrays, callback=records.append)
    rates = [r["steps_per_second"] for r in records if r["split"] == "train"]
    assert rates == [1.0, 1.0]


def test_eval_data_is_checked_before_training(seed):
    arrays = text_data(BERT, seed, 20)
    trained = []
    no_labels = {k: v for k, v in arrays.items() if k != "labels"}
    empty = {k: v[:0] for k, v in arrays.items()}
    ragged = {**arrays, "labels": arrays["labels"][:5]}
    unmasked = {k: v for k, v in arrays.items() if k != "attention_mask"}  # (padding attended)
    for bad, message in (
        (no_labels, "eval arrays need 'labels'"),
        (empty, "share one non-zero length"),
        (ragged, r"share one non-zero length, got \{.*'labels': 5"),
        (unmasked, r"eval_data lacks \['attention_mask'\], which train_data has"),
    ):
        with pytest.raises(ValueError, match=message):
            run_bert(seed, 4, eval_data=bad, callback=trained.append)
    assert not trained  # refused before the first step


def test_unsigned_labels_and_bfloat16_logits_are_counted_exactly(seed):
    """uint8 labels in an eval set whose last batch is padded (IGNORE_LABEL does not fit in
    uint8), and bfloat16 logits, whose float sums would round counts above 256."""
    model, params = init(BERT, jax.random.key(seed), scale=0.3)
    arrays = text_data(BERT, seed, 10)
    steps = train.classification_steps(model, train.optimizer(learning_rate=0.1))
    want = train.evaluate(steps, params, arrays, batch_size=8)
    for unsigned in (np.uint8, np.uint64):  # uint64's padded batch became float64 labels
        got = train.evaluate(
            steps, params, {**arrays, "labels": arrays["labels"].astype(unsigned)}, batch_size=8
        )
        assert got == want and want["count"] == 10
    with pytest.raises(ValueError, match="predict: no examples"):
        train.predictor(model, batch_size=8)(params, {k: v[:0] for k, v in arrays.items()})
    logits = jnp.zeros((1, 1001, 3), jnp.bfloat16)
    metrics = train.summarize([train.batch_metrics(logits, jnp.zeros((1, 1001), jnp.int32))])
    assert metrics["count"] == 1001
    np.testing.assert_allclose(metrics["loss"], np.log(3), rtol=1e-6)


def test_progress_bar_counts_finished_steps_only(seed, monkeypatch):
    """fit's bar counts a step once its metrics exist (dispatch runs ahead of the
    computation), oldest first, and ends at num_steps."""
    import tqdm.auto

    from rotjax.train import _loop

    class Leaf:
        def __init__(self, ready):
            self.ready = ready

        def is_ready(self):
            return self.ready

    late = Leaf(False)
    unshown = [{"loss": Leaf(True)}, {"loss": Leaf(True), "accuracy": late}, {"loss": Leaf(True)}]
    assert _loop._finished(unshown) == 1 and len(unshown) == 2  # the third waits for the second
    late.ready = True
    assert _loop._finished(unshown) == 2 and unshown == []

    shown = []

    class Bar:  # what fit shows, instead of tqdm
        def __init__(self, total, initial, **kwargs):
            self.n = initial

        def update(self, k):
            self.n += k
            shown.append(self.n)

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    run_bert(seed, 5, progress=True, log_every=2)
    assert shown[-1] == 5 and shown == sorted(shown)


def test_labels_outside_the_classes_are_refused_before_any_work(seed, tmp_path):
    """-1 (the "unlabeled" of many test splits) would train as the last class and 3 (of 3
    classes) give a NaN loss, both silently inside the jitted step: refused by name; labels
    equal to IGNORE_LABEL stay allowed. The majority baseline refuses -1 by name too (numpy's
    bincount said only "'list' argument must have no negative elements")."""
    assert train.majority_baseline([0, 1, 1, train.IGNORE_LABEL], [1, 2, train.IGNORE_LABEL]) == 0.5
    with pytest.raises(ValueError, match=r"majority_baseline: train labels: 1 label\(s\) outside"):
        train.majority_baseline(np.array([0, 1, 1, -1]), np.array([1, 2]))
    with pytest.raises(ValueError, match="majority_baseline needs labels on both sides"):
        train.majority_baseline([0, 1], [])
    state, steps = setup(BERT, seed)
    model, _ = init(BERT, jax.random.key(0))
    assert steps.num_classes == BERT.num_labels == 3
    good = text_data(BERT, seed, 20, token_labels=False)
    for bad_value in (-1, 3):
        bad = {**good, "labels": good["labels"].copy()}
        bad["labels"][5] = bad_value
        msg = rf"train_data labels: 1 label\(s\) outside the classes \[0, 3\) .* \[{bad_value}\]"
        with pytest.raises(ValueError, match=msg):
            train.fit(state, steps, bad, batch_size=BATCH, num_steps=1, workdir=tmp_path)
        assert not (tmp_path / "checkpoints").exists()
        with pytest.raises(ValueError, match=r"eval labels: 1 label\(s\) outside"):
            train.fit(state, steps, good, batch_size=BATCH, num_steps=1, eval_data=bad)
        with pytest.raises(ValueError, match=r"eval labels: 1 label\(s\) outside"):
            train.evaluate(steps, state.params, bad, batch_size=BATCH)
        with pytest.raises(ValueError, match=r"eval labels: 1 label\(s\) outside"):
            train.evaluator(model, bad, batch_size=BATCH)
    # a plain eval step knows no classes: only the negative label is refused
    bad = {**good, "labels": np.where(np.arange(20) == 5, -1, good["labels"])}
    with pytest.raises(ValueError, match=r"outside the classes \[0, ∞\)"):
        train.evaluate(steps.eval_step, state.params, bad, batch_size=BATCH)
    ignored = {**good, "labels": np.where(np.arange(20) == 5, train.IGNORE_LABEL, good["labels"])}
    assert train.evaluate(steps, state.params, ignored, batch_size=BATCH)["count"] == 19
    # every label ignored: nothing to count (evaluation said loss 0, accuracy 0; training
    # took steps of weight decay alone)
    none = {**good, "labels": np.full(20, train.IGNORE_LABEL)}
    with pytest.raises(ValueError, match="eval labels: every label is IGNORE_LABEL"):
        train.evaluate(steps, state.params, none, batch_size=BATCH)
    with pytest.raises(ValueError, match="train_data labels: every label is IGNORE_LABEL"):
        train.fit(state, steps, none, batch_size=BATCH, num_steps=1, workdir=tmp_path)


def test_token_ids_outside_the_tables_and_misfit_eval_data_are_refused_before_any_step(
    seed, tmp_path
):
    """An id past the vocabulary (30522, a MiniLM id, for a 50-row table) made every param
    NaN inside the jitted steps, silently, and a negative one wraps to the last row: both
    refused by name, in train and eval data. Eval images of another size were refused at
    the first eval, after the training before it (and a checkpoint written). bfloat16
    training data failed with a workdir (the batch order's digest took no bfloat16 buffer)."""
    state, steps = setup(BERT, seed)
    model, _ = init(BERT, jax.random.key(0))
    assert steps.token_tables == {"input_ids": BERT.vocab_size, "token_type_ids": 2}
    good = text_data(BERT, seed, 20)
    for bad_id in (BERT.vocab_size, -1):
        bad = {**good, "input_ids": good["input_ids"].copy()}
        bad["input_ids"][3, 0] = bad_id
        low, high = (r"\d+", bad_id) if bad_id > 0 else (bad_id, r"\d+")
        msg = rf"input_ids holds ids {low}\.\.{high}; the model's table has {BERT.vocab_size} rows"
        with pytest.raises(ValueError, match="train_data " + msg):
            train.fit(state, steps, bad, batch_size=BATCH, num_steps=1, workdir=tmp_path)
        assert not (tmp_path / "checkpoints").exists()
        with pytest.raises(ValueError, match="eval " + msg):
            train.fit(state, steps, good, batch_size=BATCH, num_steps=1, eval_data=bad)
        with pytest.raises(ValueError, match="eval " + msg):
            train.evaluate(steps, state.params, bad, batch_size=BATCH)
        with pytest.raises(ValueError, match="eval " + msg):
            train.evaluator(model, bad, batch_size=BATCH)
    vit_state, vit_steps = setup(VIT, seed)
    rng = np.random.default_rng(seed)
    shape = (8, VIT.image_size, VIT.image_size, VIT.num_channels)
    labels = rng.integers(0, VIT.num_labels, 8).astype(np.int32)
    images = {"pixel_values": rng.normal(size=shape).astype(np.float32), "labels": labels}
    size = VIT.image_size + 2
    wrong = {**images, "pixel_values": np.zeros((8, size, size, VIT.num_channels), np.float32)}
    trained = []
    with pytest.raises(ValueError, match=r"^eval_data does not fit the model: .*pixel_values"):
        train.fit(
            vit_state, vit_steps, images, batch_size=BATCH, num_steps=2, eval_data=wrong,
            workdir=tmp_path / "vit", checkpoint_every=1, callback=trained.append,
        )  # fmt: skip
    assert not trained and not (tmp_path / "vit" / "checkpoints").exists()
    half = {**images, "pixel_values": images["pixel_values"].astype(jnp.bfloat16)}
    result = train.fit(
        vit_state, vit_steps, half, batch_size=BATCH, num_steps=1, workdir=tmp_path / "half"
    )
    assert int(result.state.step) == 1


def test_labels_of_a_non_integer_dtype_are_refused_by_name(seed, tmp_path):
    """Float labels passed the class check (1.0 is in [0, 3)) and failed inside optax with an
    error naming neither the labels nor their dtype; bool labels are no class ids either."""
    state, steps = setup(BERT, seed)
    good = text_data(BERT, seed, 20, token_labels=False)
    for dtype in (np.float32, np.bool_):
        bad = {**good, "labels": (good["labels"] > 0).astype(dtype)}
        msg = rf"train_data labels: labels must be integer class ids, got dtype {np.dtype(dtype)}"
        with pytest.raises(ValueError, match=msg):
            train.fit(state, steps, bad, batch_size=BATCH, num_steps=1, workdir=tmp_path)
        assert not (tmp_path / "checkpoints").exists()
        with pytest.raises(ValueError, match=rf"eval labels: .* got dtype {np.dtype(dtype)}"):
            train.evaluate(steps, state.params, bad, batch_size=BATCH)


def test_fit_refuses_a_state_or_checkpoint_past_num_steps(seed, tmp_path):
    run_bert(seed, 2, workdir=tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint at step 2, past num_steps=1"):
        run_bert(seed, 1, workdir=tmp_path)
    trained = run_bert(seed, 2).state
    with pytest.raises(ValueError, match=r"state.step=2 is past num_steps=1"):
        train.fit(trained, setup(BERT, seed)[1], text_data(BERT, seed, 20), batch_size=BATCH,
                  num_steps=1)  # fmt: skip


def test_resuming_with_other_batches_is_refused_unless_allowed(seed, tmp_path):
    """Step t's batch is a function of (seed, batch size, examples): resuming a checkpoint
    under other ones would replay some examples and skip others, silently."""
    run_bert(seed, 2, workdir=tmp_path)
    order = json.loads((tmp_path / train.BATCHES_FILE).read_text())
    assert order.pop("data") == train._loop._fingerprint(text_data(BERT, seed, 20))
    assert order == {"seed": seed, "batch_size": BATCH, "examples": 20, "trim": None}
    state, steps = setup(BERT, seed)
    mesh = train.data_mesh(jax.devices()[:1])
    fit = lambda arrays, run_seed=seed, **k: train.fit(
        state, steps, arrays, batch_size=BATCH, num_steps=3, seed=run_seed, mesh=mesh,
        workdir=tmp_path, **k,
    )  # fmt: skip
    arrays = text_data(BERT, seed, 20)
    fewer = {k: v[:18] for k, v in arrays.items()}
    with pytest.raises(ValueError, match=r"drawn otherwise \(examples: 20 -> 18, data: "):
        fit(fewer)
    with pytest.raises(ValueError, match=rf"drawn otherwise \(seed: {seed} -> {seed + 1}\)"):
        fit(arrays, run_seed=seed + 1)
    # Other examples, as many (another validation split of the same size, say): refused too.
    other = {**arrays, "labels": (arrays["labels"] + 1) % BERT.num_labels}
    with pytest.raises(
        ValueError,
        match=r"\(data: '[0-9a-f]+' -> '[0-9a-f]+'\): resuming would "
        "continue it on other training data",
    ):
        fit(other)
    # Cut batches (other dropout masks) do not continue an uncut run, nor one from before
    # batches.json recorded trim.
    with pytest.raises(ValueError, match=r"\(trim: None -> 2\): resuming would continue it"):
        fit(arrays, trim=2)
    order = json.loads((tmp_path / train.BATCHES_FILE).read_text())
    del order["trim"]
    (tmp_path / train.BATCHES_FILE).write_text(json.dumps(order))
    with pytest.raises(ValueError, match=r"\(trim: None -> 2\)"):
        fit(arrays, trim=2)
    (tmp_path / train.BATCHES_FILE).unlink()  # a run from before the file: uncut too
    with pytest.raises(ValueError, match=r"\(trim: None -> 2\)"):
        fit(arrays, trim=2)
    assert not (tmp_path / "checkpoints" / "3").exists()
    assert fit(fewer, allow_other_batches=True).resumed_from == 2
    assert json.loads((tmp_path / train.BATCHES_FILE).read_text())["examples"] == 18
    # numpy ints (read from an array, say) are recorded as ints
    again = fit(fewer, run_seed=np.int64(seed), trim=np.int64(2), allow_other_batches=True)
    assert again.resumed_from == 3
    assert json.loads((tmp_path / train.BATCHES_FILE).read_text())["trim"] == 2


def test_a_truncated_compilation_cache_entry_is_compiled_again(tmp_path):
    """The test workers share one compilation cache without JAX's lock (conftest): a worker
    may read an entry while the other is still writing it. Such an entry, cut anywhere, is
    compiled again with a warning, and the program computes the same (in a fresh process: JAX
    reads its cache settings once)."""
    import subprocess
    import sys

    code = """if True:
        import json, sys, warnings, jax, jax.numpy as jnp
        from pathlib import Path
        from rotjax.train import enable_compilation_cache
        jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
        enable_compilation_cache(sys.argv[1], min_compile_seconds=0.0, min_entry_bytes=0,
                                 max_bytes=None)
        def run():
            jax.clear_caches()  # the next call reads the entry on disk
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y = jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.arange(12.0).reshape(3, 4))
            return float(y.sum()), any("compilation cache" in str(w.message) for w in caught)
        print(json.dumps([run(), run()]))  # compiled and written, then read whole
        (entry,) = Path(sys.argv[1]).glob("jit__lambda-*-cache")
        whole = entry.read_bytes()
        for cut in (0, len(whole) // 2, len(whole) - 1):
            entry.write_bytes(whole[:cut])
            print(json.dumps(run()))
    """
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    (value, warned), (read, warned_reading) = json.loads(out[0])
    assert read == value and not warned and not warned_reading
    assert [json.loads(line) for line in out[1:]] == [[value, True]] * 3


def test_fit_on_two_processes_is_fit_on_one(tmp_path):
    """The multi-process paths (`initialize_distributed`, each process's rows of a batch, the
    lead process writing the logs, checkpoints of a mesh over processes and the resume from
    them) on the CPU: two processes of one device each, coordinated over localhost, train
    (4 steps, then resumed to 6) to the params of one process with two devices, bit for bit
    (the same two-device program: a sum of two gradients does not depend on their order), with
    the same eval metrics and train log but for its timings."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("two_processes.py")

    def start(i, n, tag, port):
        argv = [str(i), str(n), port, str(root / tag), str(root / f"{tag}.npz"), "4", "6"]
        return subprocess.Popen([sys.executable, script, *argv], stderr=subprocess.PIPE, text=True)

    for attempt in range(3):
        root = tmp_path / str(attempt)  # (nothing of a failed attempt's is resumed from)
        with socket.socket() as s:  # a free port for the coordinator
            s.bind(("localhost", 0))
            port = str(s.getsockname()[1])
        runs = [start(0, 2, "two", port), start(1, 2, "two", port), start(0, 1, "one", port)]
        try:
            errors = [runs[0].communicate(timeout=180)[1]]
            if runs[0].returncode != 0 and "Failed to add port" in errors[0]:
                continue  # the port was taken between the probe and the coordinator's bind
            errors += [run.communicate(timeout=180)[1] for run in runs[1:]]
            break
        finally:  # a process that failed leaves its peer waiting for it: none is left behind
            for run in runs:
                run.kill()
                run.wait()
    else:
        pytest.fail(f"the coordinator found no free port in 3 tries: {errors[0][-3000:]}")
    for run, err in zip(runs, errors, strict=True):
        assert run.returncode == 0, err[-3000:]
    two, one = (np.load(root / f"{tag}.npz") for tag in ("two", "one"))
    assert sorted(two) == sorted(one)
    for name in one:
        np.testing.assert_array_equal(two[name], one[name], err_msg=name)
    assert json.loads(str(one["metrics"]))["resumed_from"] == 4
    timing = ("steps_per_second", "examples_per_second", "elapsed")
    logs = [
        [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]
        for lines in (
            (root / tag / "metrics.jsonl").read_text().splitlines() for tag in ("two", "one")
        )
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 5  # (train at 2, 4, 6; eval at 4, 6)
    assert sorted(os.listdir(root / "two" / "checkpoints")) == ["4", "6"]
