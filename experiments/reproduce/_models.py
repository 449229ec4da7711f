"""The settings of a reproduction run and the models it trains (cached in ``OUT/models``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from experiments import train as T

LANGUAGE = {  # task -> (domain A, domain B, multi-task reference)
    "sequence": ("wordnet_glosses", "wordnet_examples", "wordnet_multitask"),
    "token": ("supersense_nouns", "supersense_verbs", "supersense_both"),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a mode measures. ``full``: the README's numbers; ``quick``: the same pipeline on
    short runs and subsets (<= 15 minutes on 2 CPU cores); ``smoke``: seconds, for the tests."""

    mode: str = "full"
    parts: tuple[str, ...] = ("vision", "language")
    vision_seeds: tuple[int, ...] = (0, 1, 2)
    language_seeds: tuple[int, ...] = (0, 1, 2)
    test_images: int | None = None  # None: the whole test split
    eval_texts: int | None = 1000  # per domain's test split (None: all)
    stats_examples: int = 1000  # unlabeled inputs per model (activations, Grams, Fishers)
    # MiniLM's per-example Fisher gradients include its 30522 x 384 embedding table: with 1000
    # texts, one seed's statistics took over 15 minutes on 2 busy cores; the language part uses
    # fewer.
    language_stats_examples: int = 256
    curve_points: int = 11
    curve_images: int = 2000
    layer_study: bool = True
    max_sweeps: int | None = None  # None: align's default (coordinate descent to convergence)
    # straight-through descent from the activation alignment (`merge.align_straight_through`)
    descent_steps: int = 300

    @classmethod
    def of(cls, mode: str, parts: tuple[str, ...] | None = None) -> Settings:
        if mode == "full":
            s = cls()
        elif mode == "quick":
            s = cls(
                mode="quick",
                vision_seeds=(0, 1),  # one pair
                language_seeds=(0,),
                test_images=1000,
                eval_texts=128,
                stats_examples=128,
                # fusion.merged computes MiniLM's Fishers afresh for every merge (12 here): with
                # 64 texts each and 256 test texts, quick mode took 16.0 min from nothing
                language_stats_examples=32,
                curve_points=5,
                curve_images=500,
                descent_steps=50,
            )
        elif mode == "smoke":
            s = cls(
                mode="smoke",
                parts=("vision",),
                vision_seeds=(0, 1),
                language_seeds=(0,),
                test_images=128,
                eval_texts=32,
                stats_examples=32,
                curve_points=3,
                curve_images=64,
                max_sweeps=2,
                descent_steps=10,
            )
        else:
            raise ValueError(f"mode must be full, quick or smoke, got {mode!r}")
        return dataclasses.replace(s, parts=parts) if parts else s


def results_key(settings: Settings, code: str, *, label: str | None = None, after: str = "") -> str:
    """The key of results computed under ``settings`` (but which parts run), ``code`` (the
    code as a run read it) and ``after`` (e.g. their models' summaries); ``label`` names
    the part."""
    head: list[Any] = [dataclasses.asdict(dataclasses.replace(settings, parts=()))]
    head += [label] if label is not None else []
    return hashlib.sha256((json.dumps(head) + code + after).encode()).hexdigest()[:16]


def read_results(path: Path) -> dict | None:
    """Results kept in ``path``, None if absent or cut short by a crash."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_config(settings: Settings, name: str, seed: int) -> T.Config:
    """The training config of a model: ``name`` is ``vit_fashion_mnist`` or a MiniLM dataset."""
    if name == "vit_fashion_mnist":
        config = T.vit_fashion_mnist(seed=seed, name=f"vit-fashion_mnist-s{seed}")
    else:
        config = T.minilm_wordnet(name, seed=seed, name=f"minilm-{name}-s{seed}")
    if settings.mode == "quick":
        config = T.quick(config)
        if config.model == "minilm":  # 32 steps: the language part of quick mode in minutes
            config = dataclasses.replace(config, train_limit=1024, eval_limit=256)
    elif settings.mode == "smoke":  # a 2-layer, 16-wide ViT: seconds to align and merge
        config = T.smoke(config)
        tiny = dict(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32
        )
        config = dataclasses.replace(
            config, vit_config=dataclasses.replace(config.vit_config, **tiny)
        )
    return config


def part_configs(settings: Settings, part: str) -> list[T.Config]:
    """The training configs of a part's models (``"vision"`` or ``"language"``)."""
    if part == "vision":
        return [run_config(settings, "vit_fashion_mnist", s) for s in settings.vision_seeds]
    seeds = settings.language_seeds
    return [run_config(settings, n, s) for names in LANGUAGE.values() for s in seeds for n in names]


def trained(settings: Settings, out: Path, name: str, seed: int, progress=False) -> dict[str, Any]:
    """The summary of a trained model (``summary["hf"]`` its checkpoint), training it first
    unless ``OUT/models/<run>`` holds a finished run of the same config (`T.cached`)."""
    config = run_config(settings, name, seed)
    return T.cached(config, out / "models" / config.name, progress=progress)
