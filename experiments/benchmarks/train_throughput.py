"""Training throughput, rotjax (JAX/Flax) vs transformers (PyTorch), side by side.

Both sides train the same architecture at the same batch size: AdamW (weight decay 0.01,
masked off biases and LayerNorms in rotjax, applied to all params in PyTorch's default
`torch.optim.AdamW` usage here: the cost is the same), global-norm clipping at 1.0, dropout
on (train mode), float32. A step is forward + backward + clipping + update. Throughput is
examples per second over ``--steps`` steps after two warm-up steps (compilation, allocator
warm-up); the two frameworks alternate for ``--rounds`` rounds and the median round counts,
so that load from other processes hits both alike.

XLA's CPU backend flushes denormal floats to zero; PyTorch does not by default, and AdamW's
second moments of rarely seen embedding rows turn denormal, which makes PyTorch's optimizer step
several times slower. The benchmark therefore runs PyTorch with ``torch.set_flush_denormal(True)``
(the same arithmetic as XLA); ``--torch-denormals`` measures PyTorch's default instead.

``--breakdown`` also times forward only and forward + backward, which says where a gap comes
from. ``--profile DIR`` writes a JAX profiler trace of a few rotjax steps (TensorBoard /
Perfetto).

Measured on a 2-core CPU machine (idle, 5 rounds; results/train_throughput.json), on
2026-12-03; on 2026-12-01, on another machine of the same kind (its float32 matmuls up to 2.3x
faster), the same model code gave 0.81 / 1.07 / 0.68 for BERT and 0.51 / 0.58 / 0.50 for the ViT,
with PyTorch at 28.1 / 71.0 / 37.8 and 911.7 / 2961 / 897 ex/s; an earlier run there, at an
earlier commit, 0.91 / 1.21 / 0.74 and 0.65 / 0.90 / 0.62: PyTorch's rates moved by up to 2.3x
between two days, rotjax's by up to 1.4x.

=======  ===================  ===========  ==========  =====
model    what                 rotjax ex/s  torch ex/s  ratio
=======  ===================  ===========  ==========  =====
bert     step (B=32, T=64)    15.7         18.3        0.86
bert     forward              49.8         48.6        1.02
bert     forward + backward   15.7         21.8        0.72
vit      step (B=128)         335.8        509.7       0.66
vit      forward              1567         1672        0.94
vit      forward + backward   315          508         0.62
=======  ===================  ===========  ==========  =====

What limits rotjax here, timed alone in the same run (the ``gemm`` and ``attention`` rows of
the JSON): the attention core (`rotjax.models._layers.attend`) runs 2.5-4x slower than
PyTorch's forward and 2-3x forward + backward (ViT shapes, 2026-12-03: 10.8 vs 4.4 ms,
22.0 vs 10.1 ms), most of the ViT's gap; a single float32 matmul at these models' shapes runs
at 0.88-1.06x PyTorch's speed (0.74-1.05x on 2026-12-01). ``--profile`` attributes 66%
(BERT) and 54% (ViT) of XLA's op time to its matmul fusions (``ynn_fusion``), the rest mostly
to broadcasts and layout copies around them. XLA's flags for other CPU matmul back ends
(``--xla_cpu_experimental_{xnn,ynn,onednn}_fusion_type=dot``,
``--xla_cpu_experimental_onednn_custom_call``) and faster dropout bits (``rbg`` keys) each
moved the step rate by less than the run-to-run noise (< 10%); so did putting heads before
tokens for the attention products (forward 1.22x, forward + backward 0.91x on the ViT).
PyTorch's own numbers vary by ~15% between runs.

Usage::

    python -m experiments.benchmarks.train_throughput            # bert and vit, JSON + table
    python -m experiments.benchmarks.train_throughput --models bert --breakdown
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import RESULTS, SMOKE_RESULTS, results_dir
from rotjax import train
from rotjax.cli._main import _positive_int as positive_int  # the CLI's count type
from rotjax.models import bert, family, vit

RESULT = "train_throughput.json"  # under `results_dir`


def minilm_config() -> bert.Config:
    """The model a MiniLM fine-tune of `experiments.train` trains: all-MiniLM-L6-v2's
    architecture (from its config.json) with a 16-class sequence head."""
    from rotjax import data, hf

    config, _ = hf.load(data.minilm_dir())
    return dataclasses.replace(config, task="sequence_classification", num_labels=16)


def vit_config() -> vit.Config:
    """The Fashion-MNIST ViT of `experiments.train` (imported lazily to keep this standalone)."""
    from experiments.train import VIT_FASHION_MNIST

    return VIT_FASHION_MNIST


def tiny_config(name: str):
    """A two-layer model for ``--smoke`` (a pipeline check, no measurement)."""
    if name == "bert":
        return bert.Config(
            vocab_size=1100,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            num_labels=3,
        )
    return dataclasses.replace(
        vit_config(),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )


def make_batch(name: str, config, batch_size: int, seq_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, config.num_labels, batch_size).astype(np.int32)
    if name == "bert":
        ids = rng.integers(1000, config.vocab_size, (batch_size, seq_len)).astype(np.int32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}
    shape = (batch_size, config.image_size, config.image_size, config.num_channels)
    return {"images": rng.integers(0, 256, shape).astype(np.uint8), "labels": labels}


# ----------------------------------------------------------------------------- rotjax


class JaxRunner:
    def __init__(self, name: str, config, batch: dict[str, np.ndarray]):
        self.model = family(config).Model(config)
        mesh = train.data_mesh()
        self.batch = train.shard_batch(batch, mesh)
        inputs = train.default_inputs(self.model)(self.batch)
        params = jax.jit(self.model.init)(jax.random.key(0), *inputs)["params"]
        tx = train.optimizer(learning_rate=1e-4, weight_decay=0.01, max_grad_norm=1.0)
        self.state = train.replicate(
            train.create_train_state(params, tx, key=jax.random.key(1)), mesh
        )
        steps = train.classification_steps(self.model, tx)
        rep = train.replicated(mesh)
        self.step = jax.jit(
            steps.train_step,
            in_shardings=(rep, train.batch_sharding(mesh)),
            out_shardings=(rep, rep),
            donate_argnums=0,
        )

        def forward(params, batch):
            args = train.default_inputs(self.model)(batch)
            key = jax.random.key(2)
            out = self.model.apply(
                {"params": params}, *args, deterministic=False, rngs={"dropout": key}
            )
            return train.cross_entropy(out, batch["labels"])[0]

        self.forward = jax.jit(forward)
        self.grad = jax.jit(jax.grad(forward))
        t = time.perf_counter()
        self.step = self.step.lower(self.state, self.batch).compile()
        self.compile_seconds = time.perf_counter() - t

    def run(self, what: str, n: int) -> float:
        """Seconds per call, over ``n`` calls after 2 warm-up calls."""
        if what == "step":

            def call():
                self.state, metrics = self.step(self.state, self.batch)
                return metrics["loss"]

        elif what == "forward":

            def call():
                return self.forward(self.state.params, self.batch)

        else:

            def call():
                return self.grad(self.state.params, self.batch)

        for _ in range(2):
            jax.block_until_ready(call())
        t = time.perf_counter()
        for _ in range(n):
            out = call()
        jax.block_until_ready(out)
        jax.block_until_ready(self.state)
        return (time.perf_counter() - t) / n


# ----------------------------------------------------------------------------- PyTorch


def torch_model(config):
    import transformers

    from rotjax import hf

    c = hf.transformers_config(config)
    return getattr(transformers, c.architectures[0])(c)


class TorchRunner:
    def __init__(self, name: str, config, batch: dict[str, np.ndarray]):
        import torch

        self.torch = torch
        torch.manual_seed(0)
        self.model = torch_model(config).train()
        if name == "bert":
            self.inputs = {
                "input_ids": torch.from_numpy(batch["input_ids"]).long(),
                "attention_mask": torch.from_numpy(batch["attention_mask"]).long(),
            }
        else:
            pixels = (batch["images"].astype(np.float32) / 255.0 - 0.5) / 0.5
            # transformers' ViT takes NCHW.
            self.inputs = {"pixel_values": torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())}
        self.labels = torch.from_numpy(batch["labels"]).long()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)

    def loss(self):
        logits = self.model(**self.inputs).logits
        return self.torch.nn.functional.cross_entropy(logits, self.labels)

    def run(self, what: str, n: int) -> float:
        torch = self.torch

        def call():
            if what == "forward":
                with torch.no_grad():
                    return self.loss()
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss()
            loss.backward()
            if what == "step":
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.opt.step()
            return loss

        for _ in range(2):
            call()
        t = time.perf_counter()
        for _ in range(n):
            call()
        return (time.perf_counter() - t) / n


# ----------------------------------------------------------------------------- main


def benchmark(name, config, *, batch_size, seq_len, steps, rounds, breakdown, profile):
    batch = make_batch(name, config, batch_size, seq_len)
    jx, pt = JaxRunner(name, config, batch), TorchRunner(name, config, batch)
    whats = ("step", "forward", "forward_backward") if breakdown else ("step",)
    out = {
        "model": name,
        "config": dataclasses.asdict(config),
        "batch_size": batch_size,
        "seq_len": seq_len if name == "bert" else None,
        "jax_compile_seconds": jx.compile_seconds,
    }
    for what in whats:
        times = {"rotjax": [], "torch": []}
        for _ in range(rounds):
            times["rotjax"].append(jx.run(what, steps))
            times["torch"].append(pt.run(what, steps))
        rates = {k: [batch_size / t for t in v] for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in rates.items()}
        out[what] = {
            "examples_per_second": med,
            "rounds": rates,
            "ratio": med["rotjax"] / med["torch"],
        }
    if profile:
        out["profile"] = op_profile(jx, profile)
    return out


def op_profile(jx, directory: str, steps: int = 3, top: int = 8) -> dict[str, float]:
    """Trace ``steps`` rotjax train steps into ``directory`` and return the share of XLA op
    time per op kind (the HLO name without its number: ``ynn_fusion`` are the matmul
    fusions, ``transpose_copy_fusion`` layout copies, ...), the ``top`` largest."""
    import collections
    import re

    jax.profiler.start_trace(directory)
    jx.run("step", steps)
    jax.profiler.stop_trace()
    trace = max(Path(directory).rglob("*.xplane.pb"), key=lambda f: f.stat().st_mtime)
    ops: collections.Counter = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(str(trace)).planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name and "PjRtCpuClient" not in line.name:
                continue  # XLA's worker threads only
            for ev in line.events:
                if "ThunkExecutor" not in ev.name and "Await" not in ev.name:
                    ops[re.sub(r"\.\d+$", "", ev.name)] += ev.duration_ns
    total = sum(ops.values())
    return {k: v / total for k, v in ops.most_common(top)}


def gemm(shapes, repeats: int = 20) -> list[dict]:
    """GFLOP/s of one float32 matmul ``(m, k) @ (k, n)`` in XLA and in PyTorch."""
    import torch

    rows = []
    for m, k, n in shapes:
        rng = np.random.default_rng(0)
        a, b = (
            rng.normal(size=(m, k)).astype(np.float32),
            rng.normal(size=(k, n)).astype(np.float32),
        )
        ja, jb, mm = jnp.asarray(a), jnp.asarray(b), jax.jit(jnp.matmul)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        rate = {}
        for what, call, sync in (
            ("rotjax", functools.partial(mm, ja, jb), jax.block_until_ready),
            ("torch", functools.partial(torch.matmul, ta, tb), lambda x: x),
        ):
            sync(call())
            t = time.perf_counter()
            for _ in range(repeats):
                r = call()
            sync(r)
            rate[what] = 2 * m * k * n * repeats / (time.perf_counter() - t) / 1e9
        rows.append({"shape": [m, k, n], "gflops": rate, "ratio": rate["rotjax"] / rate["torch"]})
    return rows


def attention(shapes, repeats: int = 20) -> list[dict]:
    """Milliseconds of the attention core alone (``softmax(q kᵀ / sqrt(d)) v`` on
    ``(batch, tokens, heads, d)``, no projections), forward and forward + backward: rotjax's
    `attend` jitted against PyTorch's eager math (``matmul``, ``softmax``, ``matmul`` on
    ``(batch, heads, tokens, d)``) and its ``scaled_dot_product_attention`` (what
    transformers' models call by default)."""
    return [{"shape": list(shape), "ms": _attention_ms(*shape, repeats)} for shape in shapes]


def _attention_ms(b, t, h, d, repeats):
    import torch

    from rotjax.models._layers import attend

    rng = np.random.default_rng(0)
    qkv = [rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(3)]
    jx = [jnp.asarray(x) for x in qkv]
    fwd = jax.jit(attend)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_() for x in qkv)

    def eager():
        return (tq @ tk.transpose(-1, -2) / d**0.5).softmax(-1) @ tv

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

    def no_grad(f):
        with torch.no_grad():
            return f()

    def backward(f):
        (f() ** 2).sum().backward()

    calls = {
        "rotjax": (lambda: fwd(*jx), lambda: grad(*jx), jax.block_until_ready),
        "torch": (lambda: no_grad(eager), lambda: backward(eager), lambda x: x),
        "torch_sdpa": (lambda: no_grad(sdpa), lambda: backward(sdpa), lambda x: x),
    }
    ms: dict[str, dict[str, float]] = {"forward": {}, "forward_backward": {}}
    for who, (f, g, sync) in calls.items():
        for what, call in (("forward", f), ("forward_backward", g)):
            sync(call())
            tic = time.perf_counter()
            for _ in range(repeats):
                r = call()
            sync(r)
            ms[what][who] = (time.perf_counter() - tic) / repeats * 1e3
    return ms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="bert,vit", help="comma-separated: bert, vit")
    p.add_argument("--bert-batch", type=positive_int, default=32)
    p.add_argument("--vit-batch", type=positive_int, default=128)
    p.add_argument("--seq-len", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per round")
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--torch-denormals", action="store_true", help="keep PyTorch's denormals")
    p.add_argument("--breakdown", action="store_true", help="also time forward, fwd+bwd")
    p.add_argument(
        "--profile", default=None, help="trace rotjax steps here; report XLA op time by kind"
    )
    p.add_argument(
        "--out", help=f"default {RESULTS / RESULT} ({SMOKE_RESULTS / RESULT} with --smoke)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny models, one step, one round")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",")]
    if bad := [m for m in models if m not in ("bert", "vit")]:  # (any other ran the ViT)
        p.error(f"--models: {bad} not among bert, vit")
    if args.smoke:
        args.bert_batch = args.vit_batch = 8
        args.seq_len, args.steps, args.rounds = 8, 1, 1

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_flush_denormal(not args.torch_denormals)
    results = []
    for name in models:
        if args.smoke:
            config = tiny_config(name)
        else:
            config = minilm_config() if name == "bert" else vit_config()
        batch = args.bert_batch if name == "bert" else args.vit_batch
        r = benchmark(
            name,
            config,
            batch_size=batch,
            seq_len=args.seq_len,
            steps=args.steps or (3 if name == "bert" else 10),
            rounds=args.rounds,
            breakdown=args.breakdown,
            profile=args.profile and os.path.join(args.profile, name),
        )
        results.append(r)
    # The models' matmul shapes (forward): BERT FFN in/out at B*T = 2048 rows; the ViT FFN at
    # 128 * 50 = 6400 rows and its weight gradient (a skinny, transposed product).
    shapes = [(2048, 384, 1536), (2048, 1536, 384), (6400, 64, 128), (64, 6400, 128)]
    # The attention cores: BERT (B=32, T=64, 12 heads of 32) and the ViT (128, 50, 4 of 16).
    heads = [(32, 64, 12, 32), (128, 50, 4, 16)]
    if args.smoke:
        shapes, heads = [(16, 8, 4)], [(2, 5, 2, 4)]
    report = {
        "gemm": gemm(shapes),
        "attention": attention(heads),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "jax_devices": [str(d) for d in jax.devices()],
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "torch_flush_denormal": not args.torch_denormals,
            "load_average_at_end": os.getloadavg(),
        },
        "results": results,
    }
    out = Path(args.out) if args.out else results_dir(None, args.smoke) / RESULT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    header = (
        f"{'model':6} {'what':17} {'batch':>5} {'rotjax ex/s':>12} {'torch ex/s':>11} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        for what in ("step", "forward", "forward_backward"):
            if what in r:
                e = r[what]["examples_per_second"]
                print(
                    f"{r['model']:6} {what:17} {r['batch_size']:5d} {e['rotjax']:12.1f} "
                    f"{e['torch']:11.1f} {r[what]['ratio']:6.2f}"
                )
    for r in results:
        if "profile" in r:
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["profile"].items())
            print(f"{r['model']}: XLA op time by kind: {shares}")
    for g in report["gemm"]:
        e = g["gflops"]
        print(
            f"matmul {tuple(g['shape'])}: rotjax {e['rotjax']:.0f} GFLOP/s, torch "
            f"{e['torch']:.0f} GFLOP/s, ratio {g['ratio']:.2f}"
        )
    for a in report["attention"]:
        line = ", ".join(
            f"{what} " + " / ".join(f"{v:.2f}" for v in a["ms"][what].values()) for what in a["ms"]
        )
        print(f"attention {tuple(a['shape'])} ms (rotjax / torch / torch sdpa): {line}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    jnp.zeros(())  # initialize the backend before torch starts its thread pool
    main()
