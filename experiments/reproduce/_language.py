"""The language experiments (the paper's Table 1 in miniature): all-MiniLM-L6-v2 fine-tuned on
two domains of one label space and merged, without and with matching. Sequence
classification: WordNet glosses vs example sentences (accuracy); token classification:
supersense tagging of nouns' vs verbs' example sentences (entity-level F1, seqeval). The
specialists and a multi-task model trained on both domains are the references."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments import fusion
from experiments import train as T
from experiments.reproduce._models import (
    LANGUAGE,
    Settings,
    read_results,
    run_config,
    trained,
)
from rotjax import train
from rotjax._atomic import write_whole

ALIGNMENTS = ("none", "paper", "all")
METHODS = ("average", "fisher", "regmean")
# The sampled Fisher (one label drawn from the model per example: the exact Fisher's unbiased
# one-pass estimate); the exact one costs one backward pass per class.
FISHER_KIND = "sampled"
# Raise it when a fix changes what a replicate computes (its scoring, its merges): kept
# replicates of the older code are then recomputed.
REPLICATE_VERSION = 1

# The settings a replicate's merges depend on (the seed and task are in its path and models).
REPLICATE_SETTINGS = ("mode", "eval_texts", "language_stats_examples")


def run(settings: Settings, out, log, code: str = "", commit: str | None = None) -> dict:
    """Each (task, seed)'s merges, kept in ``OUT/results/language/<task>-s<seed>.json`` with
    a key (`_replicate_key`: the `REPLICATE_SETTINGS`, what it computes, the three models'
    summaries), the ``commit`` of the code that computed it and its seconds: a run cut short
    (the whole part takes hours, over more than one session) resumes at the first replicate
    not done, and a replicate whose key is unchanged is reused, by later code too (the report
    names the replicates' commits and says how many older code computed; remove
    ``OUT/results/language.json`` and ``OUT/results/language`` to recompute them). ``code``
    keys the part as a whole (`experiments.reproduce`), not its replicates: each records its
    digest. ``results["reused"]`` counts the replicates reused, ``results["older_code"]``
    those of them computed by other code."""
    results: dict[str, Any] = {}
    reused = older = 0
    digest = hashlib.sha256(code.encode()).hexdigest()[:16]
    for task, names in LANGUAGE.items():
        results[task] = []
        for seed in settings.language_seeds:
            summaries = [trained(settings, out, n, seed) for n in names]
            log(f"language ({task}), seed {seed}: " + " + ".join(s["name"] for s in summaries))
            path = Path(out) / "results" / "language" / f"{task}-s{seed}.json"
            fields = {name: getattr(settings, name) for name in REPLICATE_SETTINGS}
            key = _replicate_key(fields, summaries)
            kept = read_results(path)
            if kept is not None and kept.get("key") == key and _complete(kept["result"]):
                log(f"  reused ({path})")
                results[task].append(kept["result"])
                reused += 1
                older += kept["result"].get("code") != digest
                continue
            tic = time.perf_counter()
            result = _seed(settings, task, names, seed, summaries, log)
            result |= {"commit": commit, "code": digest, "seconds": time.perf_counter() - tic}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_whole(path, json.dumps({"key": key, "result": result}, default=float) + "\n")
            results[task].append(result)
    return {**results, "reused": reused, "older_code": older}


def _replicate_key(fields: dict, summaries: list) -> str:
    """The key of a replicate: the language ``fields`` of the settings, what it computes (the
    alignments, methods, Fisher kind and `REPLICATE_VERSION`) and its models' summaries, but
    where they are (a moved output directory keeps its replicates)."""
    where = ("workdir", "hf")
    summaries = [{k: v for k, v in s.items() if k not in where} for s in summaries]
    computes = [ALIGNMENTS, METHODS, FISHER_KIND, REPLICATE_VERSION]
    text = json.dumps([fields, computes, summaries], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _complete(result: dict) -> bool:
    """Whether a kept replicate holds every merge this code computes (a replicate kept under
    the same key always does; a hand-edited or truncated one is recomputed)."""
    merges = result.get("merges", {})
    return all(f"{a} | {m}" in merges for a in ALIGNMENTS for m in METHODS)


def _data(settings, name, seed):
    """``(test arrays, the first stats_examples training inputs)`` of a domain."""
    d = T.load_data(run_config(settings, name, seed))
    test = {k: v[: settings.eval_texts] for k, v in d["test"].items()}
    n = settings.language_stats_examples
    stats = {k: v[:n] for k, v in d["train"].items() if k != "labels"}
    return test, stats, d["label_names"]


def _seed(settings, task, names, seed, summaries, log):
    pair = fusion.load_pair(summaries[0]["hf"], summaries[1]["hf"])
    multitask = fusion.load_pair(summaries[2]["hf"], summaries[2]["hf"]).a
    (test_a, stats_a, tags), (test_b, stats_b, _) = (_data(settings, n, seed) for n in names[:2])
    scorers = [_scorer(task, pair.model, t, tags) for t in (test_a, test_b)]

    def score(params):
        per_domain = [s(params) for s in scorers]
        return {"domains": per_domain, "mean": float(np.mean(per_domain))}

    out: dict[str, Any] = {
        "seed": seed,
        "models": [s["name"] for s in summaries],
        "references": {"a": score(pair.a), "b": score(pair.b), "multitask": score(multitask)},
    }
    key = jax.random.key(seed)
    variants = fusion.align_variants(pair, ALIGNMENTS, key=key)
    out["distance"] = {n: v["distance"] for n, v in variants.items() if v["distance"]}
    # A's statistics are the same for every alignment of B: computed once (each row's
    # statistics seconds are then those it computed, as `fusion.merge_rows` counts them)
    memo: dict = {}
    out["merges"] = {}
    for name, v in variants.items():
        for method in METHODS:
            params, seconds = fusion.merged(
                v["pair"],
                method,
                stats_data=[stats_a, stats_b],
                fisher_kind=FISHER_KIND,
                key=key,
                memo=memo,
            )
            out["merges"][f"{name} | {method}"] = {
                **score(params),
                "seconds": {"align": v["seconds"], **seconds},
            }
        log(
            f"  {name}: "
            + ", ".join(f"{m} {out['merges'][f'{name} | {m}']['mean']:.3f}" for m in METHODS)
        )
    return out


def _scorer(task, model, test, tags):
    """``params -> metric`` on one test set: accuracy, or entity-level F1 for tagging."""
    if task == "sequence":
        evaluate = fusion.evaluator(model, test, cap=128)
        return lambda params: evaluate(params)["accuracy"]
    predict = fusion.predictor(model, test, cap=128)
    return lambda params: train.entity_f1(predict(params), test["labels"], tags)
